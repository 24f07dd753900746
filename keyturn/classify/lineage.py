"""Masked columns followed through a query: selected as themselves, or used.

Masking patterns name columns, optionally with their table (``customers.email``,
``*.ssn``, ``card*`` — a pattern without a table applies to every table). A masked column may
come back only *as itself*: directly, or through aliases, subqueries, CTEs and set operations,
and then the gateway masks that result column wherever it lands. Any other use — inside an
expression or function, a cast, a predicate, a join key, GROUP BY, ORDER BY, a window, or a
whole row (``row_to_json(t)``, ``t::text``) — would let its value out in another shape
(``reverse(email)``, ``WHERE email = 'ada@…'`` answering yes or no), so the command is held
with the reason. ``SELECT *`` stays allowed: its columns are masked by name.

Unqualified columns are resolved against the FROM clause without asking the target: a name a
pattern could mask in any table in scope counts as masked. Erring that way holds, never leaks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pglast import ast
from pglast.enums import SetOperation, SubLinkType

from keyturn.classify.sql import children

STAR = "*"
# Functions of a whole row, callable in column notation (t.to_json): the row comes out whole.
ROW_FUNCTIONS = frozenset(
    """to_json to_jsonb row_to_json json_build_array jsonb_build_array hstore text
    record_out array_to_json json_agg jsonb_agg string_agg""".split()
)
# name -> (its columns -> masked source or None, whether those columns are all known)
Ctes = dict[str, tuple[dict[str, str | None], bool]]


@dataclass(frozen=True)
class Patterns:
    """``table.column`` globs, lower-cased; a bare pattern is ``*.pattern``. ``uses``: the
    functions the deciding rule lets take masked columns as plain arguments (``count``)."""

    pairs: tuple[tuple[str, str], ...]
    uses: frozenset[str] = frozenset()

    @classmethod
    def of(cls, patterns: Iterable[str], uses: Iterable[str] = ()) -> Patterns:
        pairs = []
        for raw in patterns:
            table, _, column = raw.lower().rpartition(".")
            pairs.append((table or "*", column))
        return cls(tuple(pairs), frozenset(u.lower() for u in uses))

    def column(self, table: str | None, name: str) -> str | None:
        """The masked ``table.column`` this is, or None. ``table`` None: any table."""
        name = name.lower()
        for table_glob, column_glob in self.pairs:
            if fnmatch.fnmatchcase(name, column_glob) and (
                table is None or fnmatch.fnmatchcase(table.lower(), table_glob)
            ):
                return f"{table or '?'}.{name}"
        return None

    def table(self, table: str | None) -> bool:
        """Whether some column of ``table`` (None: an unknown one) may be masked."""
        return bool(self.pairs) and (
            table is None or any(fnmatch.fnmatchcase(table.lower(), t) for t, _ in self.pairs)
        )


@dataclass
class Source:
    """One FROM item as seen from the query using it."""

    name: str  # alias, or the table's own name
    table: str | None  # a base table's name; None for a derived one
    outputs: dict[str, str | None] | None = None  # derived: column -> masked source or None
    exact: bool = True  # derived: False when a * over a base table fed it (columns unknown)


@dataclass
class Lineage:
    holds: list[str] = field(default_factory=list)  # why the command must be held
    # per result column of the last statement: masked or not (None: unknown, a * over a
    # base table; its columns are masked by name)
    masked: tuple[bool, ...] | None = None


class _Query:
    """One SELECT's scope: its FROM items (and the CTEs it can see)."""

    def __init__(self, patterns: Patterns, ctes: Ctes) -> None:
        self.patterns = patterns
        self.ctes = ctes
        self.sources: list[Source] = []
        self.holds: list[str] = []

    # -- resolving

    def masked_ref(self, ref: ast.ColumnRef) -> str | None:
        fields = [f.sval or "" if isinstance(f, ast.String) else STAR for f in ref.fields or ()]
        if not fields or fields[-1] == STAR:
            return None
        column = fields[-1]
        if len(fields) >= 2:
            qualifier = fields[-2]
            sources = [s for s in self.sources if s.name == qualifier]
            if not sources:  # a table named in full (schema.table.col), or one we cannot see
                return self.patterns.column(qualifier, column) or self.patterns.column(None, column)
        else:
            sources = self.sources
        for source in sources:
            if source.outputs is not None:
                if source.outputs.get(column.lower()):
                    return source.outputs[column.lower()]
                if not source.exact and self.patterns.column(None, column):
                    return self.patterns.column(None, column)
            else:
                found = self.patterns.column(source.table, column)
                if found:
                    return found
        if not sources:  # no FROM: a name an outer query brings in
            return self.patterns.column(None, column)
        return None

    def whole_row(self, ref: ast.ColumnRef) -> Source | None:
        fields = ref.fields or ()
        if len(fields) == 1 and isinstance(fields[0], ast.String):
            return next((s for s in self.sources if s.name == fields[0].sval), None)
        return None

    def whole_rows(self, ref: ast.ColumnRef) -> list[Source]:
        """The rows a reference stands for whole: ``t`` (a FROM name), ``t.*``, ``*``, or a
        row function in column notation (``t.to_json`` is ``to_json(t)``)."""
        fields = ref.fields or ()
        row = self.whole_row(ref)
        if row is not None:
            return [row]
        if fields and isinstance(fields[-1], ast.A_Star):
            return _starred(self, fields)
        if (
            len(fields) == 2
            and isinstance(fields[0], ast.String)
            and isinstance(fields[1], ast.String)
            and (fields[1].sval or "").lower() in ROW_FUNCTIONS
        ):
            return [s for s in self.sources if s.name == fields[0].sval]
        return []

    def may_hide(self, source: Source) -> bool:
        if source.outputs is not None:
            return any(source.outputs.values())
        return self.patterns.table(source.table)

    # -- walking

    def uses(self, node: ast.Node | None, where: str) -> None:
        """Hold for every masked column, and whole masked row, used anywhere under ``node``."""
        if node is None:
            return
        for found, shape in self.references(node):
            self.holds.append(f"uses {found} {shape}{where}")

    def references(self, node: ast.Node) -> Iterator[tuple[str, str]]:
        stack: list[tuple[ast.Node, str]] = [(node, "")]
        while stack:
            current, inside = stack.pop()
            if isinstance(current, ast.ColumnRef):
                rows = self.whole_rows(current)
                hidden = [row for row in rows if self.may_hide(row)]
                if hidden:
                    yield f"the whole row of {hidden[0].name}", inside
                    continue
                if rows:
                    continue
                found = self.masked_ref(current)
                if found:
                    yield found, inside
                continue
            if isinstance(current, ast.SubLink):
                sub = current.subselect
                if isinstance(sub, ast.SelectStmt):
                    inner = _outputs(sub, self.patterns, self.ctes, outer=self)
                    self.holds += inner.holds
                    for masked in inner.masked:
                        if masked:
                            yield masked, inside or "inside a subquery "
                if current.testexpr is not None:
                    stack.append((current.testexpr, inside or "in a comparison "))
                continue
            if isinstance(current, ast.FuncCall):
                if _name(current).lower() in self.patterns.uses and all(
                    isinstance(arg, ast.ColumnRef) for arg in current.args or ()
                ):  # the rule lets count(email) through; its FILTER and OVER still count
                    extra = (current.agg_filter, current.over, *(current.agg_order or ()))
                    stack.extend((n, inside) for n in extra if isinstance(n, ast.Node))
                    continue
                inside = inside or f"inside {_name(current)}() "
            elif isinstance(current, ast.TypeCast):
                inside = inside or "inside a cast "
            elif isinstance(current, ast.A_Expr | ast.BoolExpr | ast.NullTest):
                inside = inside or "inside an expression "
            stack.extend((child, inside) for child in children(current))


@dataclass
class _Outputs:
    names: list[str]
    masked: list[str | None]
    holds: list[str]
    exact: bool = True  # False when a * reached a base table: positions unknown


def _name(call: ast.FuncCall) -> str:
    return ".".join(p.sval or "" for p in call.funcname or () if isinstance(p, ast.String))


def _target_name(target: ast.ResTarget) -> str:
    if target.name:
        return target.name.lower()
    value = target.val
    if isinstance(value, ast.ColumnRef):
        last = (value.fields or ())[-1]
        return (last.sval or "").lower() if isinstance(last, ast.String) else STAR
    if isinstance(value, ast.FuncCall):
        return _name(value).rsplit(".", 1)[-1].lower()
    return "?column?"


def _sources(query: _Query, items: Sequence[ast.Node], ctes: Ctes) -> None:
    for item in items:
        if isinstance(item, ast.RangeTableSample):
            query.uses(item, "in TABLESAMPLE")
            _sources(query, [item.relation] if item.relation is not None else [], ctes)
            continue
        if isinstance(item, ast.RangeVar):
            name = (item.alias.aliasname if item.alias else None) or item.relname or ""
            cte = ctes.get((item.relname or "").lower()) if not item.schemaname else None
            given = _strings(item.alias.colnames) if item.alias else []
            if cte is not None:
                columns, exact = cte
                names = given + list(columns)[len(given) :]
                renamed = dict(zip(names, columns.values(), strict=False))
                query.sources.append(Source(name, None, renamed, exact))
            elif given and query.patterns.table(item.relname):
                query.holds.append(f"renames the columns of {item.relname}, which may be masked")
                query.sources.append(Source(name, item.relname))
            else:
                query.sources.append(Source(name, item.relname))
        elif isinstance(item, ast.RangeSubselect) and isinstance(item.subquery, ast.SelectStmt):
            outer = query if item.lateral else None
            inner = _outputs(item.subquery, query.patterns, ctes, outer=outer)
            query.holds += inner.holds
            alias = item.alias.aliasname if item.alias else ""
            names = _strings(item.alias.colnames if item.alias else ())
            names += inner.names[len(names) :]
            columns = dict(zip(names, inner.masked, strict=False))
            query.sources.append(Source(alias or "", None, columns, inner.exact))
        elif isinstance(item, ast.JoinExpr):
            before = len(query.sources)
            _sources(query, [n for n in (item.larg, item.rarg) if n is not None], ctes)
            joined = query.sources[before:]
            query.uses(item.quals, "in a join condition")
            for column in _strings(item.usingClause):  # USING compares the named columns
                if any(query.masked_ref(_column(s.name, column)) for s in joined):
                    query.holds.append(f"joins on a masked column ({column}) in USING")
            if item.isNatural and any(query.may_hide(s) for s in joined):
                query.holds.append("a NATURAL join may compare masked columns")
            if item.alias is not None:  # the join's columns under one name: unknown which
                query.sources.append(Source(item.alias.aliasname or "", None, {}, exact=False))
        elif isinstance(item, ast.RangeFunction):
            query.uses(item, "in a FROM function")
            alias = item.alias.aliasname if item.alias else ""
            query.sources.append(Source(alias or "", None, {}))
        else:
            query.uses(item, "in FROM")


def _column(qualifier: str, name: str) -> ast.ColumnRef:
    return ast.ColumnRef(fields=(ast.String(sval=qualifier), ast.String(sval=name)))


def _strings(nodes: Iterable[ast.Node] | None) -> list[str]:
    return [(n.sval or "").lower() for n in nodes or () if isinstance(n, ast.String)]


def _outputs(
    stmt: ast.SelectStmt,
    patterns: Patterns,
    ctes: Ctes,
    outer: _Query | None = None,
) -> _Outputs:
    ctes = dict(ctes)
    holds: list[str] = []
    recursive = bool(stmt.withClause and stmt.withClause.recursive)
    for cte in (stmt.withClause.ctes or ()) if stmt.withClause else ():
        if isinstance(cte, ast.CommonTableExpr) and isinstance(cte.ctequery, ast.SelectStmt):
            if recursive and cte.ctequery.larg is not None:
                # the recursive term reads the CTE itself: as its first term defines it
                seed = _outputs(cte.ctequery.larg, patterns, ctes)
                seeded = _strings(cte.aliascolnames)
                seeded += seed.names[len(seeded) :]
                ctes[(cte.ctename or "").lower()] = (
                    dict(zip(seeded, seed.masked, strict=False)),
                    seed.exact,
                )
            inner = _outputs(cte.ctequery, patterns, ctes)
            holds += inner.holds
            columns = _strings(cte.aliascolnames)
            columns += inner.names[len(columns) :]
            ctes[(cte.ctename or "").lower()] = (
                dict(zip(columns, inner.masked, strict=False)),
                inner.exact,
            )
    if stmt.op and stmt.larg is not None and stmt.rarg is not None:  # UNION / INTERSECT / EXCEPT
        left = _outputs(stmt.larg, patterns, ctes, outer)
        right = _outputs(stmt.rarg, patterns, ctes, outer)
        either = [a or b for a, b in zip(left.masked, right.masked, strict=False)]
        holds += left.holds + right.holds
        if not (left.exact and right.exact) and patterns.pairs:
            holds.append("a * over a table with masked columns inside a set operation")
        if any(either) and (stmt.op != SetOperation.SETOP_UNION or not stmt.all):
            holds.append("compares masked values (UNION, INTERSECT or EXCEPT)")
        holds += _ordering(stmt, left.names, either)
        probe = _Query(patterns, ctes)
        probe.uses(stmt.limitCount, "in LIMIT")
        probe.uses(stmt.limitOffset, "in OFFSET")
        return _Outputs(left.names, either, holds + probe.holds, True)
    query = _Query(patterns, ctes)
    if outer is not None:
        query.sources += outer.sources
    _sources(query, stmt.fromClause or (), ctes)
    for rows in stmt.valuesLists or ():
        query.uses(rows, "in VALUES")
    query.uses(stmt.whereClause, "in WHERE")
    query.uses(stmt.havingClause, "in HAVING")
    query.uses(stmt.limitCount, "in LIMIT")
    query.uses(stmt.limitOffset, "in OFFSET")
    for item in stmt.groupClause or ():
        query.uses(item, "in GROUP BY")
    for item in stmt.sortClause or ():
        query.uses(item, "in ORDER BY")
    for item in stmt.windowClause or ():
        query.uses(item, "in a window")
    for item in stmt.distinctClause or ():
        if isinstance(item, ast.Node):
            query.uses(item, "in DISTINCT ON")
    names: list[str] = []
    masked: list[str | None] = []
    exact = True
    for target in stmt.targetList or ():
        if not isinstance(target, ast.ResTarget) or target.val is None:
            continue
        value = target.val
        if isinstance(value, ast.ColumnRef) and query.whole_row(value) is None:
            fields = value.fields or ()
            if fields and isinstance(fields[-1], ast.A_Star):  # * and t.*
                for source in _starred(query, fields):
                    if source.outputs is None or not source.exact:
                        exact = False
                    for name, source_masked in (source.outputs or {}).items():
                        names.append(name)
                        masked.append(source_masked)
                continue
            names.append(_target_name(target))
            masked.append(query.masked_ref(value))
            continue
        if isinstance(value, ast.SubLink) and value.subLinkType == SubLinkType.EXPR_SUBLINK:
            sub = value.subselect
            if isinstance(sub, ast.SelectStmt):
                inner = _outputs(sub, patterns, ctes, outer=query)
                query.holds += inner.holds
                names.append(_target_name(target))
                masked.append(inner.masked[0] if inner.masked else None)
                continue
        query.uses(value, "")
        names.append(_target_name(target))
        masked.append(None)
    holds += _ordering(stmt, names, masked)
    return _Outputs(names, masked, holds + query.holds, exact)


def _ordering(stmt: ast.SelectStmt, names: list[str], masked: Sequence[str | None]) -> list[str]:
    """ORDER BY, GROUP BY and DISTINCT ON by position (``1``) or output name, when they
    land on a masked column: its order or grouping tells its value."""
    found = []
    items = [*(stmt.sortClause or ()), *(stmt.groupClause or ())]
    items += [d for d in stmt.distinctClause or () if isinstance(d, ast.Node)]
    for item in items:
        key = item.node if isinstance(item, ast.SortBy) else item
        index = None
        if isinstance(key, ast.A_Const) and isinstance(key.val, ast.Integer):
            index = (key.val.ival or 0) - 1
        elif isinstance(key, ast.ColumnRef) and len(key.fields or ()) == 1:
            field = (key.fields or ())[0]
            name = (field.sval or "").lower() if isinstance(field, ast.String) else ""
            index = names.index(name) if name in names else None
        if index is not None and 0 <= index < len(masked) and masked[index]:
            found.append(f"orders or groups by a masked column ({masked[index]})")
    return found


def _starred(query: _Query, fields: Sequence[ast.Node]) -> list[Source]:
    """The sources a ``*`` or ``t.*`` reaches."""
    if len(fields) >= 2 and isinstance(fields[-2], ast.String):
        return [s for s in query.sources if s.name == fields[-2].sval]
    return query.sources


def lineage(statements: Sequence[ast.Node | None], patterns: Patterns) -> Lineage:
    """Why a command must hold, and which result columns of its last statement are masked."""
    out = Lineage()
    if not patterns.pairs:
        return out
    for stmt in statements:
        if isinstance(stmt, ast.SelectStmt):
            found = _outputs(stmt, patterns, {})
            out.holds += found.holds
            out.masked = tuple(m is not None for m in found.masked) if found.exact else None
            if not found.exact and any(found.masked):  # positions unknown, names changed
                out.holds.append("a masked column under another name beside a *")
        elif isinstance(stmt, ast.ExplainStmt) and isinstance(stmt.query, ast.SelectStmt):
            out.holds += _outputs(stmt.query, patterns, {}).holds
    out.holds = list(dict.fromkeys(h.replace("  ", " ").strip() for h in out.holds))
    return out
