"""What an approver is shown: the command as keyturn will run it, with nothing hidden.

SQL is shown statement by statement as pglast prints each back from its parse tree — the text
the executor sends, one statement per protocol message — so a comment, padding or quoting
trick cannot hide a statement. Shell is shown as each simple command's arguments. Invisible
and bidirectional control characters are shown as visible escapes (``⟦U+202E⟧``) and named.
"""

from __future__ import annotations

import functools
import shlex
import unicodedata
from dataclasses import dataclass

from pglast.stream import RawStream

from keyturn.classify.shell import analyze_shell
from keyturn.classify.sql import parse
from keyturn.domain import command_sha256


@dataclass(frozen=True)
class Part:
    kind: str  # SQL: the statement's kind (UPDATE, SELECT …); shell: the program
    text: str  # with invisible characters escaped


@dataclass(frozen=True)
class Shown:
    sha256: str  # of the command as stored: the approval is bound to it
    parts: tuple[Part, ...]
    hidden: tuple[str, ...]  # the invisible characters found, named ("U+202E RIGHT-TO-LEFT …")
    # shell: the line exactly as the target's shell gets it (redirects, assignments and all)
    line: str | None = None


# Unicode's Default_Ignorable_Code_Point characters that are not format (Cf) characters, and
# blanks that are letters or symbols: drawn as nothing, or as a space, by Slack.
_BLANK = frozenset(
    [
        0x034F,
        0x115F,
        0x1160,
        0x17B4,
        0x17B5,
        0x3164,
        0xFFA0,
        0x2800,
        *range(0x180B, 0x1810),
        *range(0xFE00, 0xFE10),
        *range(0xFFF0, 0xFFF9),
        *range(0xE0100, 0xE01F0),
    ]
)


def _escaped(char: str) -> bool:
    if char in "\n\t":
        return False
    category = unicodedata.category(char)
    return (
        category in ("Cf", "Cc", "Co", "Cs", "Cn", "Zl", "Zp")
        or (category == "Zs" and char != " ")
        or ord(char) in _BLANK
    )


def visible(text: str) -> tuple[str, list[str]]:
    """``text`` with every invisible or direction-changing character as ``⟦U+XXXX⟧``."""
    out, found = [], []
    for char in text:
        if _escaped(char):
            code = f"U+{ord(char):04X}"
            out.append(f"⟦{code}⟧")
            found.append(f"{code} {unicodedata.name(char, 'unnamed')}")
        else:
            out.append(char)
    return "".join(out), found


def sql_statements(command: str) -> list[tuple[str, str]]:
    """Each statement's kind and text as pglast prints it back (raises pglast's ParseError)."""
    out = []
    for raw in parse(command):
        node = raw.stmt
        kind = type(node).__name__.removesuffix("Stmt").upper() if node is not None else "EMPTY"
        out.append((kind, str(RawStream()(node)) if node is not None else ""))
    return out


@functools.lru_cache(maxsize=1024)
def shown(command: str, shell: bool) -> Shown:
    """The command as the card shows it; unparseable input is shown as it is, flagged."""
    parts: list[tuple[str, str]]
    try:
        if shell:
            analysis = analyze_shell(command)
            parts = [(words[0], shlex.join(words)) for words in analysis.commands]
        else:
            parts = sql_statements(command)
    except Exception:  # held because it cannot be parsed: show the raw text, nothing lost
        parts = []
    if not parts:
        parts = [("UNPARSED", command)]
    hidden: list[str] = []
    out = []
    for kind, text in parts:
        text, found = visible(text)
        hidden += found
        out.append(Part(visible(kind)[0], text))
    line, raw_hidden = visible(command)  # also those only in comments the printing dropped
    return Shown(
        command_sha256(command),
        tuple(out),
        tuple(dict.fromkeys(hidden + raw_hidden)),
        line if shell else None,
    )
