"""``scripts/test --latest``: the whole suite against the newest releases pyproject.toml allows.

Runs in a throwaway virtualenv (the committed uv.lock and .venv are not touched):

1. locks a copy of the project with ``uv lock --upgrade`` and lists what moved;
2. installs that into a temporary venv (with this checkout, editable) and runs scripts/_suite.sh;
3. when the suite fails, finds the upgrade that broke it: a binary search over the upgraded
   packages, each step the committed lock with the first k of them upgraded
   (``uv lock --upgrade-package``), re-running the checks (ruff, mypy, contracts) and only the
   tests that failed (all the asked-for tests when a check failed before pytest ran).

Exit status: the suite's (0 when everything passes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from lockfile import diff, load, versions  # noqa: E402


def sh(*args: str | Path, env: dict[str, str] | None = None, quiet: bool = False) -> int:
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run([str(a) for a in args], env=env, stdout=out, stderr=out).returncode


class Trial:
    """A throwaway project copy (pyproject.toml, README.md, a uv.lock) and its venv."""

    def __init__(self, scratch: Path, name: str) -> None:
        self.project = scratch / name
        self.venv = scratch / f"{name}-venv"
        self.project.mkdir()
        for name_ in ("pyproject.toml", "README.md", "uv.lock"):
            shutil.copy(ROOT / name_, self.project / name_)

    def lock(self, *upgrade: str) -> bool:
        return sh("uv", "lock", "--quiet", "--project", self.project, *upgrade) == 0

    def install(self) -> bool:
        requirements = self.project / "requirements.txt"
        python = self.venv / "bin" / "python"
        steps = [
            ("uv", "export", "--quiet", "--frozen", "--all-extras", "--no-emit-project",
             "--project", self.project, "-o", requirements),
            ("uv", "venv", "--quiet", "--allow-existing", "--python", sys.executable, self.venv),
            ("uv", "pip", "sync", "--quiet", "--compile-bytecode", "--python", python,
             requirements),
            ("uv", "pip", "install", "--quiet", "--python", python, "--no-deps", "-e", ROOT),
        ]  # fmt: skip
        return all(sh(*step) == 0 for step in steps)

    def suite(self, pytest_args: list[str], cache: Path) -> int:
        env = dict(os.environ)
        env["PATH"] = f"{self.venv / 'bin'}:{env['PATH']}"
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PYTEST_ADDOPTS"] = f"{env.get('PYTEST_ADDOPTS', '')} -o cache_dir={cache}".strip()
        return sh(ROOT / "scripts" / "_suite.sh", *pytest_args, env=env)


def failed_tests(cache: Path) -> list[str]:
    """The test ids pytest recorded as failed (none when it never ran)."""
    recorded = cache / "v" / "cache" / "lastfailed"
    return sorted(json.loads(recorded.read_text())) if recorded.is_file() else []


def culprit(scratch: Path, upgraded: list[str], again: list[str]) -> str | None:
    """The first package in ``upgraded`` whose upgrade (with those before it) fails the suite
    run with ``again`` as pytest's arguments, or None when no step isolates one."""
    lo, hi = 0, len(upgraded)  # upgrading upgraded[:hi] fails; upgraded[:lo] is not known to
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = Trial(scratch, f"bisect-{mid}")
        flags = [f"--upgrade-package={name}" for name in upgraded[:mid]]
        print(f"== --latest: trying the first {mid} of {len(upgraded)} upgrades", flush=True)
        if not (trial.lock(*flags) and trial.install()):
            return None
        if trial.suite(again, scratch / f"bisect-{mid}-cache") == 0:
            lo = mid
        else:
            hi = mid
    return upgraded[hi - 1]


def main(pytest_args: list[str]) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="keyturn-latest-"))
    try:
        latest = Trial(scratch, "latest")
        print("== --latest: locking the newest releases pyproject.toml allows", flush=True)
        if not latest.lock("--upgrade"):
            print("!! uv could not lock the newest releases (see above)", file=sys.stderr)
            return 2
        moved = diff(versions(load(ROOT / "uv.lock")), versions(load(latest.project / "uv.lock")))
        print(f"== --latest: {len(moved)} packages differ from uv.lock", flush=True)
        for line in moved:
            print(f"   {line}")
        if not latest.install():
            print("!! could not install the newest releases (see above)", file=sys.stderr)
            return 2
        cache = scratch / "pytest-cache"
        status = latest.suite(pytest_args, cache)
        if status == 0:
            print("== --latest: the suite passes: scripts/lock can take these releases")
            return 0
        upgraded = [line.split()[0] for line in moved]
        print("== --latest: the suite fails; looking for the upgrade that broke it", flush=True)
        failed = failed_tests(cache)
        again = ["-x", "-q", *failed] if failed else pytest_args
        name = culprit(scratch, upgraded, again) if upgraded else None
        if name is None:
            print("!! --latest: the suite fails and no single upgrade could be isolated")
        else:
            line = next(line for line in moved if line.split()[0] == name)
            print(f"!! --latest: it breaks with {line} (upgraded after those listed before it)")
        return status
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
