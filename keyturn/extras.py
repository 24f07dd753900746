"""Which optional extra an entry point needs, and one line saying so when it is missing.

``pip install keyturn`` is the agent SDK alone; the gateway, the bot and the dev stack need
``keyturn[server]`` or ``keyturn[dev]``. The extras are read from the installed distribution's
own metadata (pyproject.toml is the one list), and each requirement is checked as installed
before anything of the server is imported, so a missing extra is a one-line answer rather
than an ``ImportError`` from deep inside a module.
"""

from __future__ import annotations

import re
from importlib import metadata

from keyturn.errors import ConfigError

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA = re.compile(r"""\bextra\s*==\s*["']([^"']+)["']""")


def normalise(name: str) -> str:
    """A distribution's name as PEP 503 compares it (``Slack_Bolt`` is ``slack-bolt``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extra: str, distribution: str = "keyturn") -> list[str]:
    """The name of every requirement ``extra`` adds, following ``keyturn[other]``.

    Requirements with further markers (``uvloop; sys_platform != 'win32'``) are optional
    here: they are left out rather than evaluated.
    """
    own = normalise(distribution)
    found: list[str] = []
    todo, seen = [extra], set()
    lines = metadata.requires(distribution) or []
    while todo:
        wanted = todo.pop()
        seen.add(wanted)
        for line in lines:
            requirement, _, marker = line.partition(";")
            extras_named = _EXTRA.findall(marker)
            rest = re.sub(r"\band\b", "", _EXTRA.sub("", marker)).strip()
            if extras_named != [wanted] or rest:
                continue
            match = _NAME.match(requirement)
            if match is None:
                continue
            name = match.group(1)
            if normalise(name) == own:
                inner = (e.strip() for e in (match.group(2) or "").split(","))
                todo += [e for e in inner if e and e not in seen]
            else:
                found.append(name)
    return found


def missing(extra: str) -> list[str]:
    """The distributions ``extra`` needs that are not installed (none when keyturn itself is
    not installed as a distribution, e.g. run from a bare checkout)."""
    try:
        needed = requirements(extra)
    except metadata.PackageNotFoundError:
        return []
    absent = []
    for name in needed:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            absent.append(name)
    return absent


def require(extra: str, command: str) -> None:
    """Raise a one-line :class:`ConfigError` naming the extra when ``command`` cannot run."""
    absent = missing(extra)
    if absent:
        raise ConfigError(
            f"keyturn {command} needs the {extra} extra: pip install 'keyturn[{extra}]' "
            f"({', '.join(absent)} not installed)"
        )
