"""What the install scripts need to know about uv.lock, with nothing but the standard library.

    python scripts/lockfile.py uv-pin             pip requirement for the locked uv, with hashes
    python scripts/lockfile.py check-platform     exit 2 with one line if the lock does not
                                                  cover this Python and platform
    python scripts/lockfile.py diff OLD NEW       the packages whose locked version changed

It runs before any virtualenv exists (under the Python that will make it), so it reads the
lock with ``tomllib`` and evaluates the lock's markers with the ``packaging`` that every pip
carries.
"""

from __future__ import annotations

import platform
import sys
import tomllib
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "uv.lock"


def load(path: Path = LOCK) -> dict[str, object]:
    with path.open("rb") as f:
        return tomllib.load(f)


def versions(lock: dict[str, object]) -> dict[str, str]:
    """Package name -> its locked version(s), comma-joined where markers lock several (numpy
    for older and newer Pythons); the project itself is left out."""
    packages = lock.get("package", [])
    assert isinstance(packages, list)
    found: dict[str, set[str]] = {}
    for p in packages:
        if "version" in p and p.get("source", {}).get("editable") is None:
            found.setdefault(p["name"], set()).add(p["version"])
    return {name: ", ".join(sorted(v)) for name, v in found.items()}


def uv_pin(lock: dict[str, object]) -> str:
    """``uv==X --hash=…`` for every wheel of the locked uv, for ``pip --require-hashes``."""
    packages = lock.get("package", [])
    assert isinstance(packages, list)
    for p in packages:
        if p["name"] == "uv":
            hashes = " ".join(f"--hash={w['hash']}" for w in p.get("wheels", []))
            return f"uv=={p['version']} {hashes}"
    raise SystemExit("uv.lock has no uv: add uv to the test extra and run scripts/lock")


def _marker_true(marker: str) -> bool:
    try:
        from pip._vendor.packaging.markers import Marker
    except ImportError:  # no pip here: let uv itself judge
        return True
    return Marker(marker).evaluate()


def platform_problem(lock: dict[str, object]) -> str | None:
    """One line when no ``supported-markers`` entry of the lock holds here, else None."""
    markers = lock.get("supported-markers")
    if not isinstance(markers, list) or any(_marker_true(m) for m in markers):
        return None
    here = f"Python {platform.python_version()} on {sys.platform} {platform.machine()}"
    return (
        f"uv.lock does not cover {here}: add it to [tool.uv] environments in pyproject.toml "
        "and run scripts/lock"
    )


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """``name old -> new`` lines, sorted; added and removed packages shown with ``-``."""
    names = sorted(set(old) | set(new))
    return [
        f"{n} {old.get(n, '-')} -> {new.get(n, '-')}" for n in names if old.get(n) != new.get(n)
    ]


def main(argv: list[str]) -> int:
    if argv[:1] == ["uv-pin"]:
        print(uv_pin(load()))
        return 0
    if argv[:1] == ["check-platform"]:
        problem = platform_problem(load())
        if problem:
            print(problem, file=sys.stderr)
            return 2
        return 0
    if argv[:1] == ["diff"] and len(argv) == 3:
        for line in diff(versions(load(Path(argv[1]))), versions(load(Path(argv[2])))):
            print(line)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
