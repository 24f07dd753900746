"""Shell rules per argument: a pattern is a list of argument patterns, matched one to one.

``systemctl status *`` is three argument patterns. As a whole argument, ``*`` matches exactly
one argument and ``**`` any number (none included). Inside an argument, ``*`` and ``?`` never
cross a ``/`` (``**`` does; brackets are literal), and path arguments are normalised first, so
``..`` cannot climb out of a pattern's prefix: ``cat /var/log/*`` matches
``cat /var/log/syslog``, not ``cat /var/log/../../etc/passwd`` nor ``cat /var/log/x /etc/passwd``.

An allow rule must match the whole argument list. A block or hold rule also matches a
command with more arguments than it names (``shutdown`` catches ``shutdown -h now``).
"""

from __future__ import annotations

import functools
import posixpath
import re
import shlex
from collections.abc import Sequence

from keyturn.classify.budget import spend
from keyturn.errors import ConfigError


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> tuple[str, ...]:
    try:
        parts = tuple(shlex.split(pattern))
    except ValueError as exc:
        raise ConfigError(f"shell pattern {pattern!r}: {exc}") from None
    if not parts:
        raise ConfigError("a shell pattern names at least a program")
    return parts


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        else:  # everything else, brackets included, is itself
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def normalised(arg: str) -> str:
    """A path argument as the kernel would resolve its dots (symlinks aside)."""
    if "/" not in arg:
        return arg
    path = posixpath.normpath(arg)
    return path if not arg.endswith("/") or path == "/" else path + "/"


SYSTEM_BIN = frozenset({"/bin", "/usr/bin", "/sbin", "/usr/sbin", "/usr/local/bin"})


def _arg_matches(pattern: str, arg: str, first: bool) -> bool:
    if first and "/" not in pattern:
        if "/" in arg and posixpath.dirname(normalised(arg)) not in SYSTEM_BIN:
            return False  # `cat` is the system's cat, not ./cat or /tmp/cat
        arg = posixpath.basename(arg)  # `uptime` names /usr/bin/uptime as well
    return _regex(pattern).fullmatch(normalised(arg)) is not None


def argv_matches(pattern: Sequence[str], argv: Sequence[str], *, whole: bool = True) -> bool:
    """Whether ``argv`` fits ``pattern``; ``whole=False`` lets ``argv`` run on past it."""

    @functools.cache
    def fits(p: int, a: int) -> bool:
        spend()
        if p == len(pattern):
            return a == len(argv) or not whole
        if pattern[p] == "**":
            return any(fits(p + 1, b) for b in range(a, len(argv) + 1))
        if a == len(argv):
            return False
        if pattern[p] == "*":
            return fits(p + 1, a + 1)
        return _arg_matches(pattern[p], argv[a], a == 0) and fits(p + 1, a + 1)

    return fits(0, 0)
