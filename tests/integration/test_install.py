"""keyturn as each user installs it: the wheel in a clean virtualenv, with the extra they need
and nothing else (pinned by uv.lock, as every install here is), and a checkout that runs from a
directory no other user may enter.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from keyturn import extras
from keyturn.harness.idp import DevIdP
from tests.integration.conftest import DeskFactory

ROOT = Path(__file__).resolve().parents[2]
AGENT = "crew-wheel"
# What the agent SDK must not bring: every requirement of the other extras.
SERVER_SIDE = {
    extras.normalise(name)
    for extra in ("server", "dev", "crewai", "mcp")
    for name in [*extras.requirements(extra), "uvloop"]
}
# What the client may import of keyturn itself.
AGENT_SIDE = ("keyturn", "keyturn.client", "keyturn.backoff", "keyturn.errors", "keyturn.agent")

CLIENT_RUN = """
import json, sys
from keyturn.client import Client
with Client() as kt:  # KEYTURN_GATEWAY_URL, KEYTURN_AGENT_TOKEN
    result = kt.run("shop", "SELECT id, email FROM customers ORDER BY id", reason="wheel")
print(json.dumps({"rows": result.rows, "modules": sorted(sys.modules)}))
"""


def server_imports() -> set[str]:
    """The top-level modules the server-side distributions provide (read where they are
    installed: here, the suite's own venv)."""
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if {extras.normalise(d) for d in dists} & SERVER_SIDE
    } | {"gateway", "bot"}


def uv() -> str:
    found = shutil.which("uv")
    assert found, "uv is in the test extra: run the suite through scripts/test"
    return found


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the checkout: setuptools leaves build/ behind in the tree it
    builds, and a stale build/lib would ship files that are gone."""
    source = checkout_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    run(uv(), "build", "--quiet", "--wheel", "--out-dir", out, source)
    return next(out.glob("keyturn-*.whl"))


def install(wheel: Path, venv: Path, *extra: str) -> Path:
    """A clean venv with the wheel and what ``keyturn[extra]`` needs, at the locked versions."""
    requirements = venv.parent / f"{venv.name}-requirements.txt"
    picked = [f"--extra={e}" for e in extra]
    run(uv(), "export", "--quiet", "--frozen", "--no-emit-project", *picked,
        "--project", ROOT, "-o", requirements)  # fmt: skip
    run(uv(), "venv", "--quiet", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    run(uv(), "pip", "install", "--quiet", "--python", python, "-r", requirements)
    run(uv(), "pip", "install", "--quiet", "--python", python, "--no-deps", wheel)
    return venv


def installed(venv: Path) -> set[str]:
    listed = run(uv(), "pip", "list", "--python", venv / "bin" / "python", "--format", "json")
    return {p["name"].lower() for p in json.loads(listed.stdout)}


def clean_env(**extra: str) -> dict[str, str]:
    keep = ("HOME", "LANG", "TMPDIR", "XDG_RUNTIME_DIR")
    return {"PATH": "/usr/bin:/bin"} | {k: os.environ[k] for k in keep if k in os.environ} | extra


@pytest.fixture(scope="module")
def client_only(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install(wheel, tmp_path_factory.mktemp("client") / "venv")


def test_the_agent_sdk_installs_without_the_server(client_only: Path) -> None:
    present = {extras.normalise(name) for name in installed(client_only)}
    assert {"keyturn", "httpx", "pydantic"} <= present
    assert not SERVER_SIDE & present
    typed = client_only.glob("lib/python*/site-packages/keyturn/py.typed")
    assert list(typed), "agent code type-checks against the client: py.typed ships"


async def test_the_client_alone_runs_a_command_through_a_gateway(
    client_only: Path, run_desk: DeskFactory, idp: DevIdP
) -> None:
    async with run_desk() as desk:
        proc = await asyncio.create_subprocess_exec(
            client_only / "bin" / "python", "-c", CLIENT_RUN,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=clean_env(KEYTURN_GATEWAY_URL=desk.gateway.url, KEYTURN_AGENT_TOKEN=idp.token(AGENT)),
            cwd="/",  # nothing of the checkout on sys.path
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    ran = json.loads(out)
    assert [row[0] for row in ran["rows"]] == [1, 2]
    imported = set(ran["modules"])
    assert not {m.split(".")[0] for m in imported} & server_imports()
    ours = {m for m in imported if m.split(".")[0] == "keyturn"}
    assert ours and all(m.startswith(AGENT_SIDE) for m in ours), sorted(ours)


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["gateway", "--config", "policy.yml"], "server"),
        (["bot", "--config", "policy.yml"], "server"),
        (["migrate"], "server"),
        (["check-config", "policy.yml"], "server"),
        (["dev"], "dev"),
        (["mcp"], "mcp"),
    ],
)
def test_each_entry_point_without_its_extra_says_which_in_one_line(
    client_only: Path, args: list[str], extra: str
) -> None:
    proc = subprocess.run(
        [client_only / "bin" / "keyturn", *args],
        capture_output=True, text=True, check=False, env=clean_env(), cwd="/",
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'keyturn[{extra}]'" in lines[0]


async def test_the_mcp_extra_serves_its_tools(wheel: Path, tmp_path: Path) -> None:
    venv = await asyncio.to_thread(install, wheel, tmp_path / "venv", "mcp")
    assert "mcp" in installed(venv) and "sqlalchemy" not in installed(venv)
    server = StdioServerParameters(
        command=str(venv / "bin" / "keyturn"),
        args=["mcp"],
        env=clean_env(KEYTURN_GATEWAY_URL="http://127.0.0.1:9", KEYTURN_AGENT_TOKEN="t"),
        cwd="/",
    )
    with (tmp_path / "mcp.log").open("w") as errlog:
        async with (
            stdio_client(server, errlog=errlog) as (read, write),
            ClientSession(read, write, read_timeout_seconds=timedelta(seconds=30)) as session,
        ):
            await session.initialize()
            tools = await session.list_tools()
    names = [t.name for t in tools.tools]
    assert names == ["list_targets", "run_sql", "run_shell", "call_api", "request_status"]


# ------------------------------------------------------------------ a checkout anywhere


def checkout_copy(dest: Path) -> Path:
    """This checkout's files (tracked and new, not ignored: no .venv) under ``dest``."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def outside_env(**extra: str) -> dict[str, str]:
    """This environment without the suite's own venv or keyturn settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYTURN_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT))
    )
    return env | extra


@pytest.fixture(scope="module")
def private_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this checkout in a 0700 directory (as root's home or ``mktemp -d`` are)."""
    private = tmp_path_factory.mktemp("private")
    private.chmod(0o700)
    return checkout_copy(private / "keyturn")


def dev_once(checkout: Path) -> subprocess.CompletedProcess[str]:
    """``scripts/dev --once`` with a private TMPDIR too (as a user's ``~/tmp`` would be)."""
    private_tmp = checkout.parent / "tmp"
    private_tmp.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        [checkout / "scripts" / "dev", "--once"],
        capture_output=True, text=True, check=False, cwd=checkout, timeout=600,
        # the suite's own install filled uv's cache: nothing to download
        env=outside_env(UV_OFFLINE="1", TMPDIR=str(private_tmp)),
    )  # fmt: skip


def test_the_dev_stack_runs_from_a_private_directory(private_checkout: Path) -> None:
    """As root the harness runs Postgres as ``nobody``, who cannot enter a 0700 directory: the
    stack must still come up from a checkout there."""
    proc = dev_once(private_checkout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (private_checkout / ".venv" / "bin" / "keyturn").is_file()


def test_a_failed_install_leaves_the_old_venv_or_none(
    private_checkout: Path, tmp_path: Path
) -> None:
    """The network is down (uv offline, nothing cached, pip with no index) when pyproject.toml
    has changed."""
    venv = private_checkout / ".venv"
    if not (venv / ".keyturn-installed").is_file():
        assert dev_once(private_checkout).returncode == 0
    stamp = (venv / ".keyturn-installed").read_text()
    pyproject = private_checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# edited\n")
    (tmp_path / "no-wheels").mkdir()
    cut_off = outside_env(
        UV_OFFLINE="1",
        UV_CACHE_DIR=str(tmp_path / "empty-cache"),
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(tmp_path / "no-wheels"),
    )

    def keyturn_help() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [private_checkout / "scripts" / "dev", "--help"],
            capture_output=True, text=True, check=False, cwd=private_checkout, env=cut_off,
        )  # fmt: skip

    failed = keyturn_help()
    assert failed.returncode == 2
    said = [line for line in failed.stderr.splitlines() if line.startswith("!!")]
    assert said == ["!! could not update .venv (see above); it still has what it had: "
                    "run the command again"]  # fmt: skip
    assert (venv / ".keyturn-installed").read_text() == stamp  # synced again next time
    works = subprocess.run([venv / "bin" / "keyturn", "--help"], capture_output=True, check=False)
    assert works.returncode == 0

    shutil.rmtree(venv)
    failed = keyturn_help()
    assert failed.returncode == 2 and "nothing was left behind" in failed.stderr
    assert not venv.exists()
