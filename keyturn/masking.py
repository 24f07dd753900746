"""PII masking of results before they leave keyturn (DESIGN.md "Policy: masking").

Two layers: whole columns whose name matches a pattern (``*email*``, ``ssn``) are replaced
outright; in every other text value, detectors find emails, card numbers (only those passing
the Luhn check, so order ids are left alone), US SSNs and phone numbers, and keep just enough
of each to be recognisable (a card's last four digits).
"""

from __future__ import annotations

import fnmatch
import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keyturn.config.rules import Masking

MASK = "***"

_SEP = r"[\s.\-_/]{0,3}"  # what people put between digit groups: any mix, up to three
# Bounded as RFC 5321 bounds an address (64 characters before the @, 253 after): unbounded,
# a 64 KiB value like "a.a.a.…" made the engine rescan to the end from every start, 4 s of
# CPU for one value, on the gateway's event loop.
_EMAIL = re.compile(
    r"\b([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{0,63}@([A-Za-z0-9.-]{1,252}\.[A-Za-z]{2,63})\b"
)
# a card number stands on its own: not the tail of a word (a role name "…h4505-1795…")
_CARD = re.compile(rf"(?<![\w])(?:\d{_SEP}){{12,18}}\d(?![\w])")
_SSN = re.compile(rf"\b(?!000|666|9\d\d)\d{{3}}{_SEP}(?!00)\d{{2}}{_SEP}(?!0000)(\d{{4}})\b")
_PHONE = re.compile(
    rf"(?<![\w-])(?:\+?1{_SEP})?\(?[2-9]\d{{2}}\)?{_SEP}[2-9]\d{{2}}{_SEP}(\d{{4}})(?![\w-])"
)


_WORD = re.compile(r"[A-Za-z0-9_-]+")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2 == 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    if not 13 <= len(digits) <= 19 or not luhn_ok(digits):
        return match.group(0)
    return "*" * (len(digits) - 4) + digits[-4:]


DETECTORS: dict[str, Callable[[str], str]] = {
    "email": lambda text: _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text),
    "credit_card": lambda text: _CARD.sub(_card, text),
    "us_ssn": lambda text: _SSN.sub(lambda m: f"***-**-{m.group(1)}", text),
    "phone": lambda text: _PHONE.sub(lambda m: f"***-***-{m.group(1)}", text),
}


@dataclass(frozen=True)
class Masker:
    columns: tuple[str, ...]
    detectors: tuple[Callable[[str], str], ...]
    keys: tuple[str, ...] = ()  # JSON keys masked outright: the patterns without a table

    @classmethod
    def from_policy(cls, masking: Masking) -> Masker:
        # cards before phones: a 16-digit card must not be half-eaten by the phone pattern
        order = [d for d in ("email", "credit_card", "us_ssn", "phone") if d in masking.detectors]
        # by name, result columns are masked whatever table a pattern names (lineage, in
        # keyturn.classify.lineage, knows the table; a name alone cannot tell)
        names = tuple(p.lower().rpartition(".")[2] for p in masking.columns)
        keys = tuple(p.lower() for p in masking.columns if "." not in p)
        return cls(names, tuple(DETECTORS[d] for d in order), keys)

    def masked_column(self, name: str) -> bool:
        lowered = name.lower()
        return any(fnmatch.fnmatchcase(lowered, p) for p in self.columns)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (maskers live as long as the process)
    def masked_columns(self, names: tuple[str, ...]) -> tuple[bool, ...]:
        return tuple(self.masked_column(name) for name in names)

    def text(self, value: str) -> str:
        """Text as it may leave keyturn: PII masked, and storable and sendable (a NUL, which an
        API's answer or a command's output may hold, becomes U+FFFD; a lone surrogate, ?)."""
        if not value.isascii():  # full-width digits and letters, as the detectors know them
            value = unicodedata.normalize("NFKC", value).encode("utf-8", "replace").decode()
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        for detect in self.detectors:
            value = detect(value)
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value

    def json(self, value: Any, clean: Callable[[str], str] | None = None) -> Any:
        """A JSON document as an agent may see it: the value of a key matching a masked
        pattern, at any depth, is replaced outright; every other string (keys included)
        goes through ``clean`` (if given), then the detectors. Iterative: depth is bounded
        by the parser, not by us."""

        def text(string: str) -> str:
            return self.text(clean(string) if clean is not None else string)

        root: list[Any] = [value]
        stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]  # (container, slot, node)
        while stack:
            container, slot, node = stack.pop()
            if isinstance(node, str):
                container[slot] = text(node)
            elif isinstance(node, list):
                copy = list(node)
                container[slot] = copy
                stack += [(copy, i, item) for i, item in enumerate(node)]
            elif isinstance(node, dict):
                out: dict[str, Any] = {}
                container[slot] = out
                for key, item in node.items():
                    name = text(key)
                    hidden = any(fnmatch.fnmatchcase(key.lower(), p) for p in self.keys)
                    out[name] = MASK if hidden else item
                    if not hidden:
                        stack.append((out, name, item))
        return root[0]

    def names_masked_key(self, text: str) -> bool:
        """Whether ``text`` holds a word that names a masked field (``salary`` in a CSV
        header, ``<email>`` in XML): such text cannot be masked by field, only withheld."""
        if not self.keys:
            return False
        words = {w.lower() for w in _WORD.findall(text)}
        return any(fnmatch.fnmatchcase(w, p) for w in words for p in self.keys)

    def rows(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
        hidden = [self.masked_column(c) for c in columns]
        return [
            [MASK if hide else self.value(v) for hide, v in zip(hidden, row, strict=True)]
            for row in rows
        ]
