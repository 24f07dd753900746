"""Masking patterns: which ``table.column`` names are masked, and what a rule lets use them.

Patterns name columns, optionally with their table (``customers.email``, ``*.ssn``,
``card*``; a pattern without a table applies to every table), matched without regard to case:
a quoted ``"Email"`` is masked as ``email`` is. Erring that way masks more, never less.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Patterns:
    """``table.column`` globs, lower-cased; a bare pattern is ``*.pattern``. ``uses``: the
    functions the deciding rule lets take masked columns as plain arguments (``count``),
    compared exactly (a function named ``"Count"`` is not ``count``)."""

    pairs: tuple[tuple[str, str], ...]
    uses: frozenset[str] = frozenset()

    @classmethod
    def of(cls, patterns: Iterable[str], uses: Iterable[str] = ()) -> Patterns:
        pairs = []
        for raw in patterns:
            table, _, column = raw.lower().rpartition(".")
            pairs.append((table or "*", column))
        return cls(tuple(pairs), frozenset(uses))

    def column(self, table: str | None, name: str) -> str | None:
        """The masked ``table.column`` this is, or None. ``table`` None: any table."""
        folded = name.lower()
        for table_glob, column_glob in self.pairs:
            if fnmatch.fnmatchcase(folded, column_glob) and (
                table is None or fnmatch.fnmatchcase(table.lower(), table_glob)
            ):
                return f"{table or '?'}.{name}"
        return None

    def table(self, table: str | None) -> bool:
        """Whether some column of ``table`` (None: an unknown one) may be masked."""
        return bool(self.pairs) and (
            table is None or any(fnmatch.fnmatchcase(table.lower(), t) for t, _ in self.pairs)
        )
