"""What a name in a query stands for: the FROM items in scope, their columns, and whether a
masked column may be among them (see :mod:`keyturn.classify.lineage`, which walks queries).

Names are resolved as PostgreSQL would be asked to, and where the two could differ, the worse
reading wins: identifiers are compared exactly as the parser gives them (``"S"`` is not
``s``); a name is looked up in the query's own FROM items *and* every enclosing query's (an
inner ``c`` shadows an outer one in PostgreSQL; here both count); a derived table keeps every
column in order, same-named ones included; ``t.f`` is a column only when ``t`` is known to have
one named ``f``, else the call ``f(t)`` on the whole row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pglast import ast

from keyturn.classify.budget import spend
from keyturn.classify.naming import UNNAMED
from keyturn.classify.patterns import Patterns

STAR = "*"
# the target's relations by name -> the columns every relation of that name has
Relations = Mapping[str, frozenset[str]]
# a derived table's columns in order: (name, the masked column it is, or None)
Columns = tuple[tuple[str, str | None], ...]


@dataclass
class Source:
    """One FROM item as seen from the query using it."""

    name: str  # alias, or the table's own name
    table: str | None  # a base table's name; None for a derived one
    outputs: Columns | None = None  # derived: its columns; None for a base table
    exact: bool = True  # derived: False when its columns cannot all be counted
    # derived and not exact: the names its columns may have beyond ``outputs`` (None:
    # unknown), and whether something it reached may have masked columns
    more: frozenset[str] | None = frozenset()
    hides: bool = False


# a CTE's name -> what a query reading it sees (named when read)
Ctes = dict[str, Source]


class Scope:
    """One SELECT's scope: its own FROM items, the enclosing queries' (``outer``), and the
    CTEs it can see. ``holds``: why the command must be held, found while walking it."""

    def __init__(
        self, patterns: Patterns, ctes: Ctes, relations: Relations, outer: Sequence[Source]
    ) -> None:
        spend(1 + len(outer))
        self.patterns = patterns
        self.ctes = ctes
        self.relations = relations
        self.sources: list[Source] = []
        self.outer = list(outer)
        self.merged = False  # a USING or NATURAL join: * has fewer columns than its parts
        self.holds: list[str] = []

    @property
    def visible(self) -> list[Source]:
        """Every FROM item a name here may resolve to: this query's, then the enclosing."""
        return self.sources + self.outer

    def named(self, name: str) -> list[Source]:
        found = self.visible
        spend(len(found))
        return [s for s in found if s.name == name]

    # -- resolving

    def masked_ref(self, ref: ast.ColumnRef) -> str | None:
        fields = [f.sval or "" if isinstance(f, ast.String) else STAR for f in ref.fields or ()]
        if not fields or fields[-1] == STAR:
            return None
        column = fields[-1]
        if len(fields) >= 2:
            sources = self.named(fields[-2])
            if not sources:  # a table named in full (schema.table.col), or one we cannot see
                return self.patterns.column(fields[-2], column) or self.patterns.column(
                    None, column
                )
        else:
            sources = self.visible
            spend(len(sources))
        for source in sources:
            if source.outputs is None:
                found = self.patterns.column(source.table, column)
            else:
                found = self._derived_masked(source, source.outputs, column)
            if found:
                return found
        if not sources:  # no FROM anywhere: erring towards masked
            return self.patterns.column(None, column)
        return None

    def _derived_masked(self, source: Source, outputs: Columns, column: str) -> str | None:
        """The masked column ``column`` of a derived table may be, or None."""
        if found := next((m for n, m in outputs if n == column and m), None):
            return found
        if not source.exact and (found := self.patterns.column(None, column)):
            return found  # a * may have brought it under its own name
        if any(n == column for n, _ in outputs):
            return None  # a column of that name, not masked
        if source.more is None and source.hides:
            # a column of unknown origin in something that may hold a masked one
            return f"{source.name}.{column} (may be masked)"
        # a masked column lineage could not name: any name it does not know may be that one
        return next((m for n, m in outputs if n == UNNAMED and m), None)

    def whole_rows(self, ref: ast.ColumnRef) -> list[Source]:
        """The rows a reference stands for whole: ``t`` (a FROM name), ``t.*``, ``*``, or
        ``t.f`` when ``f`` is not known to be a column of ``t`` (then it is ``f(t)``)."""
        fields = ref.fields or ()
        if len(fields) == 1 and isinstance(fields[0], ast.String):
            return self.named(fields[0].sval or "")
        if fields and isinstance(fields[-1], ast.A_Star):
            return starred(self, fields)
        called = self.call_on_row(ref)
        return [called[0]] if called is not None else []

    def call_on_row(self, ref: ast.ColumnRef) -> tuple[Source, str] | None:
        """``t.f`` read as the call ``f(t)``: the source and ``f``; None for a column.

        A name that a masking pattern matches counts as a column: if it is a call instead, the
        result column is masked all the same, and anywhere else it holds as a masked use.
        """
        fields = ref.fields or ()
        if len(fields) < 2 or not all(isinstance(f, ast.String) for f in fields[-2:]):
            return None
        qualifier, name = strings(fields[-2:])
        for source in self.named(qualifier):
            columns = self.columns(source)
            known = columns is not None and name in columns
            if not known and not self.patterns.column(source.table, name):
                return source, name
        return None

    def columns(self, source: Source) -> frozenset[str] | None:
        """The column names of ``source``, or None when they are not all known."""
        if source.outputs is None:
            return self.relations.get(source.table or "")
        if source.more is None:
            return None
        return frozenset(n for n, _ in source.outputs) | source.more

    def may_hide(self, source: Source) -> bool:
        if source.outputs is not None:
            return any(m for _, m in source.outputs) or source.hides
        # by the patterns, not the catalog: a column added since the catalog was read may
        # be masked, and a whole row carries it
        return self.patterns.table(source.table)

    # -- walking


@dataclass
class Outputs:
    names: list[str]
    masked: list[str | None]
    holds: list[str]
    exact: bool = True  # False when the columns cannot all be counted: positions unknown
    more: frozenset[str] | None = frozenset()  # not exact: names the * may have brought
    hides: bool = False  # not exact: something the * reached may have masked columns

    def unknown(self, hides: bool) -> None:
        """Columns of unknown number and names were added here."""
        self.exact, self.more, self.hides = False, None, self.hides or hides


def derived(name: str, names: list[str], found: Outputs) -> Source:
    """A FROM item made by a query: its columns under ``names`` (the query's own, renamed)."""
    columns = tuple(zip(found.names, found.masked, strict=False))
    renamed = with_names(columns, names, found.exact, found.hides)
    return Source(name, None, renamed, found.exact, found.more, found.hides)


def with_names(columns: Columns, given: list[str], exact: bool, hides: bool) -> Columns:
    """``columns`` with the first ones renamed to ``given`` (``AS x(a, b)``, a CTE's list).

    When the columns cannot be counted (a ``*`` fed them), which column each new name lands
    on is unknown: if any of them may be masked, every new name is taken for a masked one.
    """
    if not given:
        return columns
    if exact:
        names = given + [n for n, _ in columns][len(given) :]
        return tuple(zip(names, (m for _, m in columns), strict=False))
    risky = "a column renamed over *" if hides or any(m for _, m in columns) else None
    return tuple((n, risky) for n in given) + columns


def strings(nodes: Iterable[ast.Node] | None) -> list[str]:
    """Identifiers as the parser gives them: unquoted ones already folded, quoted ones not."""
    return [n.sval or "" for n in nodes or () if isinstance(n, ast.String)]


def star(out: Outputs, query: Scope, source: Source) -> None:
    """What ``*`` or ``t.*`` adds to ``out`` from ``source``: its known columns in order, or,
    over a base table, columns known at most by name (the catalog may be older than the
    table, so never by position)."""
    if source.outputs is None:
        out.exact = False
        columns = query.relations.get(source.table or "")
        out.more = None if columns is None or out.more is None else out.more | columns
        out.hides = out.hides or query.patterns.table(source.table)
        return
    if not source.exact:
        out.exact = False
        out.more = None if source.more is None or out.more is None else out.more | source.more
        out.hides = out.hides or source.hides
    out.names += [n for n, _ in source.outputs]
    out.masked += [m for _, m in source.outputs]


def starred(query: Scope, fields: Sequence[ast.Node]) -> list[Source]:
    """The sources a ``*`` (this query's own FROM items) or ``t.*`` (any named t) reaches."""
    if len(fields) >= 2 and isinstance(fields[-2], ast.String):
        return query.named(fields[-2].sval or "")
    return query.sources
