"""Masked columns followed through a query: selected as themselves, or used.

A masked column (:mod:`keyturn.classify.patterns`) may come back only *as itself*: directly,
or through aliases, subqueries, CTEs and set operations, and then the gateway masks that
result column wherever it lands. Any other use — inside an expression or function, a cast, a
predicate, a join key, GROUP BY, ORDER BY, a window, or a whole row (``row_to_json(t)``,
``t::text``) — would let its value out in another shape (``reverse(email)``, ``WHERE email =
'ada@…'`` answering yes or no), so the command is held with the reason. ``SELECT *`` stays
allowed: its columns are masked by name.

A whole row is a use wherever it appears, under any alias, CTE or subquery, and whatever takes
it: PostgreSQL reads ``t.f`` as the column ``f`` of ``t`` when there is one and otherwise as the
call ``f(t)`` (or the cast ``t::f``), so ``c.concat`` is ``concat(c)``. Which it is depends on
``t``'s columns, so they come from the target's catalog (``relations``); a ``t.f`` that is not
known to be a column of ``t`` is a call on the whole row, and holds when ``t`` may carry a
masked column — unless the rule's ``masked_uses`` lists ``f``. No list of "row functions"
decides: a name not known to be a column is treated as the worst it could be.

Names are resolved in :mod:`keyturn.classify.scope`, never better for the agent than
PostgreSQL resolves them. Subqueries in FROM and CTE bodies see the enclosing queries' items
(they may be correlated with them), a LATERAL one its siblings too. Where the result's columns
cannot be counted (``(f()).*``, ``*`` over a USING join, a function in FROM), positions are
unknown and columns are masked by name; the gateway masks every column of a result whose
count differs from what lineage expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pglast import ast
from pglast.enums import SetOperation, SubLinkType

from keyturn.classify.budget import spend
from keyturn.classify.naming import UNNAMED, column_name
from keyturn.classify.patterns import Patterns
from keyturn.classify.scope import (
    Ctes,
    Outputs,
    Relations,
    Scope,
    Source,
    derived,
    star,
    starred,
    strings,
    with_names,
)
from keyturn.classify.sql import children, nodes_under


@dataclass
class Lineage:
    holds: list[str] = field(default_factory=list)  # why the command must be held
    # per result column of the last statement: masked or not (None: unknown, a * over a
    # base table; its columns are masked by name)
    masked: tuple[bool, ...] | None = None


def _uses(query: Scope, node: ast.Node | None, where: str) -> None:
    """Hold for every masked column, and whole masked row, used anywhere under ``node``."""
    if node is None:
        return
    for found, shape in _references(query, node):
        query.holds.append(f"uses {found} {shape}{where}")


def _references(query: Scope, node: ast.Node) -> Iterator[tuple[str, str]]:
    stack: list[tuple[ast.Node, str]] = [(node, "")]
    while stack:
        current, inside = stack.pop()
        spend()
        if isinstance(current, ast.ColumnRef):
            called = query.call_on_row(current)
            if called is not None and called[1] in query.patterns.uses:
                continue  # the rule lets this function take a masked row (count)
            rows = query.whole_rows(current)
            hidden = [row for row in rows if query.may_hide(row)]
            if hidden:
                yield f"the whole row of {hidden[0].name}", inside
                continue
            # a bare name is a column of some FROM item first, in PostgreSQL, and a row only
            # when none has it: both readings count
            found = query.masked_ref(current)
            if found:
                yield found, inside
            continue
        if isinstance(current, ast.SubLink):
            sub = current.subselect
            if isinstance(sub, ast.SelectStmt):
                inner = _outputs(sub, query.patterns, query.ctes, query.relations, query.visible)
                query.holds += inner.holds
                if current.subLinkType != SubLinkType.EXISTS_SUBLINK:  # EXISTS reads no column
                    for masked in inner.masked:
                        if masked:
                            yield masked, inside or "inside a subquery "
                    if not inner.exact and inner.hides:  # compared, IN, ANY, a row: by value
                        yield "a * that may bring a masked column", inside or "inside a subquery "
            if current.testexpr is not None:
                stack.append((current.testexpr, inside or "in a comparison "))
            continue
        if isinstance(current, ast.FuncCall):
            if _name(current) in query.patterns.uses and all(
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


def _name(call: ast.FuncCall) -> str:
    return ".".join(p.sval or "" for p in call.funcname or () if isinstance(p, ast.String))


def _sources(query: Scope, items: Sequence[ast.Node], ctes: Ctes) -> None:
    for item in items:
        if isinstance(item, ast.RangeTableSample):
            _uses(query, item, "in TABLESAMPLE")
            _sources(query, [item.relation] if item.relation is not None else [], ctes)
            continue
        if isinstance(item, ast.RangeVar):
            name = (item.alias.aliasname if item.alias else None) or item.relname or ""
            cte = ctes.get(item.relname or "") if not item.schemaname else None
            given = strings(item.alias.colnames) if item.alias else []
            if cte is not None:
                renamed = with_names(cte.outputs or (), given, cte.exact, cte.hides)
                query.sources.append(dataclasses.replace(cte, name=name, outputs=renamed))
            elif given and query.patterns.table(item.relname):
                query.holds.append(f"renames the columns of {item.relname}, which may be masked")
                query.sources.append(Source(name, item.relname))
            else:
                query.sources.append(Source(name, item.relname))
        elif isinstance(item, ast.RangeSubselect) and isinstance(item.subquery, ast.SelectStmt):
            # correlated with the enclosing queries always; with its siblings when LATERAL
            scope = query.visible if item.lateral else query.outer
            inner = _outputs(item.subquery, query.patterns, ctes, query.relations, scope)
            query.holds += inner.holds
            alias = item.alias.aliasname if item.alias else ""
            names = strings(item.alias.colnames if item.alias else ())
            query.sources.append(derived(alias or "", names, inner))
        elif isinstance(item, ast.JoinExpr):
            before = len(query.sources)
            _sources(query, [n for n in (item.larg, item.rarg) if n is not None], ctes)
            joined = query.sources[before:]
            _uses(query, item.quals, "in a join condition")
            for column in strings(item.usingClause):  # USING compares the named columns
                if any(query.masked_ref(_column(s.name, column)) for s in joined):
                    query.holds.append(f"joins on a masked column ({column}) in USING")
            if item.isNatural and any(query.may_hide(s) for s in joined):
                query.holds.append("a NATURAL join may compare masked columns")
            query.merged = query.merged or bool(item.usingClause) or bool(item.isNatural)
            if item.join_using_alias is not None:  # USING (k) AS u: u.k, the merged columns
                merged = tuple((c, None) for c in strings(item.usingClause))
                query.sources.append(Source(item.join_using_alias.aliasname or "", None, merged))
            if item.alias is not None:  # the join's columns under one name
                joint = _joint(query, item.alias, joined, bool(item.usingClause or item.isNatural))
                del query.sources[before:]  # hidden behind the alias, as PostgreSQL hides them
                query.sources.append(joint)
        elif isinstance(item, ast.RangeFunction):
            _uses(query, item, "in a FROM function")
            query.sources.append(Source(_function_name(item), None, (), False, None))
        else:  # JSON_TABLE, XMLTABLE, …: columns of their own, of unknown number
            _uses(query, item, "in FROM")
            alias = getattr(item, "alias", None)
            name = alias.aliasname or "" if isinstance(alias, ast.Alias) else ""
            query.sources.append(Source(name, None, (), False, None))


def _joint(query: Scope, alias: ast.Alias, joined: list[Source], merged: bool) -> Source:
    """``(a JOIN b) AS j``: j's columns are a's then b's, each masked as it was there. A base
    table's are known by name only (from the catalog; in no known order), a USING or NATURAL
    join merges some: then positions are unknown, and names are all that is known."""
    columns: list[tuple[str, str | None]] = []
    exact = not merged
    more: frozenset[str] | None = frozenset()
    for source in joined:
        if source.outputs is None:
            known = query.relations.get(source.table or "")
            exact = False
            if known is None:
                more = None
            else:
                columns += [(n, query.patterns.column(source.table, n)) for n in sorted(known)]
            continue
        columns += source.outputs
        exact = exact and source.exact
        more = None if source.more is None or more is None else more | source.more
    hides = any(query.may_hide(s) for s in joined)
    renamed = with_names(tuple(columns), strings(alias.colnames), exact, hides)
    return Source(alias.aliasname or "", None, renamed, exact, more, hides)


def _function_name(item: ast.RangeFunction) -> str:
    """How a function in FROM is named: its alias, else (one function) its own name."""
    if item.alias is not None:
        return item.alias.aliasname or ""
    calls = [f[0] for f in item.functions or () if f and isinstance(f[0], ast.FuncCall)]
    return _name(calls[0]).rsplit(".", 1)[-1] if len(calls) == 1 else ""


def _column(qualifier: str, name: str) -> ast.ColumnRef:
    return ast.ColumnRef(fields=(ast.String(sval=qualifier), ast.String(sval=name)))


def _cte(
    query: ast.SelectStmt,
    name: str,
    given: list[str],
    patterns: Patterns,
    ctes: Ctes,
    relations: Relations,
    outer: Sequence[Source],
    recursive: bool,
) -> Outputs:
    """A CTE's columns. Under WITH RECURSIVE one (``seed UNION ALL step``) reads itself in
    its step: as what the seed and the steps so far make, until the masks stop growing (they
    only grow, so at most once more than it has columns; usually the first pass is the last).
    Without RECURSIVE its own name in its body is whatever that name meant outside it."""
    if not (recursive and query.op and query.larg is not None and query.rarg is not None):
        return _outputs(query, patterns, ctes, relations, outer)
    seed = _outputs(query.larg, patterns, ctes, relations, outer)
    found, holds = seed, []
    for _ in range(len(seed.names) + 1):
        ctes[name] = derived(name, given, found)
        again = _outputs(query, patterns, ctes, relations, outer, left=seed)  # seed | step
        holds += again.holds
        if [bool(m) for m in again.masked] == [bool(m) for m in found.masked]:
            break  # reading itself as it is gives itself
        found = again
    return dataclasses.replace(again, holds=list(dict.fromkeys(holds)))


def _reads_later(ctes: Sequence[ast.CommonTableExpr]) -> list[str]:
    """WITH RECURSIVE lets a CTE read one listed after it; lineage follows CTEs in order and
    would take the later name for a table of that name, so such a list is held."""
    for i, cte in enumerate(ctes):
        later = {c.ctename for c in ctes[i + 1 :]}
        for node in nodes_under(cte.ctequery) if cte.ctequery is not None else ():
            if isinstance(node, ast.RangeVar) and not node.schemaname and node.relname in later:
                return [f"a CTE of a WITH RECURSIVE reads {node.relname}, listed after it"]
    return []


def _search_and_cycle(cte: ast.CommonTableExpr, source: Source) -> list[str]:
    """SEARCH … SET o and CYCLE … USING p copy the listed columns' values into new columns
    (and CYCLE compares them): listing a column that may be masked is a use of it."""
    listed: list[str] = []
    for clause in (cte.search_clause, cte.cycle_clause):
        if isinstance(clause, ast.CTESearchClause):
            listed += strings(clause.search_col_list)
        elif isinstance(clause, ast.CTECycleClause):
            listed += strings(clause.cycle_col_list)
    masked = {n for n, m in source.outputs or () if m}
    if any(n in masked for n in listed) or (listed and not source.exact and source.hides):
        return [f"SEARCH or CYCLE of {cte.ctename} copies or compares a masked column"]
    return []


def _outputs(
    stmt: ast.SelectStmt,
    patterns: Patterns,
    ctes: Ctes,
    relations: Relations,
    outer: Sequence[Source] = (),
    left: Outputs | None = None,
) -> Outputs:
    """``outer``: the FROM items of the enclosing queries. ``left``: the first term of this
    set operation, already followed (a recursive CTE's seed): following it again would double
    the work at every level of nesting."""
    spend(1 + len(ctes))  # the copy below
    ctes = dict(ctes)
    holds: list[str] = []
    listed = [
        cte
        for cte in ((stmt.withClause.ctes or ()) if stmt.withClause else ())
        if isinstance(cte, ast.CommonTableExpr)
    ]
    recursive = bool(stmt.withClause and stmt.withClause.recursive)
    if recursive:
        holds += _reads_later(listed)
    for cte in listed:
        if isinstance(cte.ctequery, ast.SelectStmt):
            name, given = cte.ctename or "", strings(cte.aliascolnames)
            inner = _cte(cte.ctequery, name, given, patterns, ctes, relations, outer, recursive)
            holds += inner.holds
            ctes[name] = derived(name, given, inner)
            holds += _search_and_cycle(cte, ctes[name])
    if stmt.op and stmt.larg is not None and stmt.rarg is not None:  # UNION / INTERSECT / EXCEPT
        left = left or _outputs(stmt.larg, patterns, ctes, relations, outer)
        right = _outputs(stmt.rarg, patterns, ctes, relations, outer)
        either = [a or b for a, b in zip(left.masked, right.masked, strict=False)]
        holds += left.holds + right.holds
        if not (left.exact and right.exact) and patterns.pairs:
            holds.append("a * over a table with masked columns inside a set operation")
        if any(either) and (stmt.op != SetOperation.SETOP_UNION or not stmt.all):
            holds.append("compares masked values (UNION, INTERSECT or EXCEPT)")
        holds += _ordering(stmt, left.names, either)
        probe = Scope(patterns, ctes, relations, outer)
        _uses(probe, stmt.limitCount, "in LIMIT")
        _uses(probe, stmt.limitOffset, "in OFFSET")
        # ORDER BY over a set operation reads its output columns (email::text is one)
        probe.sources.append(Source("", None, tuple(zip(left.names, either, strict=False))))
        for item in stmt.sortClause or ():
            _uses(probe, item, "in ORDER BY")
        return Outputs(left.names, either, holds + probe.holds, True)
    query = Scope(patterns, ctes, relations, outer)
    _sources(query, stmt.fromClause or (), ctes)
    out = Outputs([], [], holds)
    if stmt.valuesLists:  # VALUES (…), (…): column1, column2, … as PostgreSQL names them
        _values(out, query, stmt.valuesLists)
        # its ORDER BY, LIMIT and OFFSET read those columns (ORDER BY column1::text)
        query.sources.append(Source("", None, tuple(zip(out.names, out.masked, strict=False))))
    _uses(query, stmt.whereClause, "in WHERE")
    _uses(query, stmt.havingClause, "in HAVING")
    _uses(query, stmt.limitCount, "in LIMIT")
    _uses(query, stmt.limitOffset, "in OFFSET")
    for item in stmt.groupClause or ():
        _uses(query, item, "in GROUP BY")
    for item in stmt.sortClause or ():
        _uses(query, item, "in ORDER BY")
    for item in stmt.windowClause or ():
        _uses(query, item, "in a window")
    for item in stmt.distinctClause or ():
        if isinstance(item, ast.Node):
            _uses(query, item, "in DISTINCT ON")
    for target in stmt.targetList or ():
        if not isinstance(target, ast.ResTarget) or target.val is None:
            continue
        value = target.val
        fields = value.fields or () if isinstance(value, ast.ColumnRef) else ()
        if fields and isinstance(fields[-1], ast.A_Star):  # * and t.*
            reached = starred(query, fields)
            if not reached:  # a t lineage does not know: columns of unknown number
                out.unknown(hides=True)
            for source in reached:
                star(out, query, source)
            if len(fields) == 1 and query.merged:
                out.unknown(hides=False)  # a USING column once for two: positions shift
            continue
        if isinstance(value, ast.ColumnRef) and not query.whole_rows(value):
            out.names.append(column_name(target))
            out.masked.append(query.masked_ref(value))
            continue
        if isinstance(value, ast.ColumnRef) and len(fields) == 1:  # a bare name: both readings
            _uses(query, value, "")  # the row, if it is one and may hide a masked column
            out.names.append(column_name(target))
            out.masked.append(query.masked_ref(value))  # the column, if one of that name is
            continue
        if isinstance(value, ast.SubLink) and value.subLinkType == SubLinkType.EXPR_SUBLINK:
            sub = value.subselect
            if isinstance(sub, ast.SelectStmt):
                inner = _outputs(sub, patterns, ctes, relations, query.visible)
                query.holds += inner.holds
                # named after the subquery's first column, as it comes out (a * expanded)
                first = inner.names[0] if inner.exact and inner.names else UNNAMED
                out.names.append(target.name or first)
                masked = inner.masked[0] if inner.masked else None
                if not inner.exact and inner.hides:  # a * whose first column may be masked
                    masked = masked or "a column a * may bring"
                out.masked.append(masked)
                continue
        _uses(query, value, "")
        if isinstance(value, ast.A_Indirection) and isinstance(
            (value.indirection or (None,))[-1], ast.A_Star
        ):  # (f()).*: as many columns as f returns, named as it names them
            out.unknown(hides=False)
            continue
        out.names.append(column_name(target))
        out.masked.append(None)
    uncounted = not out.exact and (out.hides or any(out.masked))
    out.holds += _ordering(stmt, out.names, out.masked, uncounted) + query.holds
    return out


def _values(out: Outputs, query: Scope, rows: Sequence[object]) -> None:
    """``VALUES (…), (…)``: a masked column there as itself stays masked in its position
    (whatever row it is in); anything else that uses one holds. (pglast gives each row as a
    plain tuple of expressions.)"""
    for row in rows:
        items = row if isinstance(row, tuple | list) else (row,)
        for index, item in enumerate(items):
            if index == len(out.names):
                out.names.append(f"column{index + 1}")
                out.masked.append(None)
            if isinstance(item, ast.ColumnRef) and not query.whole_rows(item):
                out.masked[index] = out.masked[index] or query.masked_ref(item)
            elif isinstance(item, ast.Node):
                _uses(query, item, "in VALUES")


def _ordering(
    stmt: ast.SelectStmt, names: list[str], masked: Sequence[str | None], uncounted: bool = False
) -> list[str]:
    """ORDER BY, GROUP BY (grouping sets, ROLLUP and CUBE included) and DISTINCT ON by
    position (``1``) or output name, and plain DISTINCT, when they land on a masked column:
    its order, grouping or equality tells its value. ``uncounted``: a * that may bring a
    masked column made the positions unknown, so any position may be one."""
    found = []
    distinct = stmt.distinctClause or ()
    if distinct and all(d is None for d in distinct) and (any(masked) or uncounted):
        found.append("compares masked values (DISTINCT)")
    items = [*(stmt.sortClause or ()), *_grouping_keys(stmt.groupClause or ())]
    items += [d for d in distinct if isinstance(d, ast.Node)]
    for item in items:
        key = item.node if isinstance(item, ast.SortBy) else item
        indexes: list[int] = []
        if isinstance(key, ast.A_Const) and isinstance(key.val, ast.Integer):
            if uncounted:
                found.append("orders or groups by a position a * may fill with a masked column")
            indexes = [(key.val.ival or 0) - 1]
        elif isinstance(key, ast.ColumnRef) and len(key.fields or ()) == 1:
            field_ = (key.fields or ())[0]
            name = (field_.sval or "") if isinstance(field_, ast.String) else ""
            indexes = [i for i, n in enumerate(names) if n == name] or [
                i
                for i, n in enumerate(names)
                if n == UNNAMED  # a name lineage could not give
            ]
        for index in indexes:
            if 0 <= index < len(masked) and masked[index]:
                found.append(f"orders or groups by a masked column ({masked[index]})")
    return found


def _grouping_keys(items: Iterable[ast.Node | None]) -> Iterator[ast.Node]:
    """GROUP BY's keys, out of ROLLUP, CUBE, GROUPING SETS and their (a, b) rows."""
    for item in items:
        if isinstance(item, ast.GroupingSet):
            yield from _grouping_keys(item.content or ())
        elif isinstance(item, ast.RowExpr):
            yield from _grouping_keys(item.args or ())
        elif isinstance(item, ast.Node):
            yield item


def lineage(
    statements: Sequence[ast.Node | None], patterns: Patterns, relations: Relations
) -> Lineage:
    """Why a command must hold, and which result columns of its last statement are masked.

    ``relations``: the target's tables and views with their columns (an unknown one: every
    ``t.f`` on it that no pattern names is taken for a call on the whole row)."""
    out = Lineage()
    if not patterns.pairs:
        return out
    for stmt in statements:
        if isinstance(stmt, ast.SelectStmt):
            found = _outputs(stmt, patterns, {}, relations)
            out.holds += found.holds
            out.masked = tuple(m is not None for m in found.masked) if found.exact else None
            renamed = [
                m
                for n, m in zip(found.names, found.masked, strict=False)
                if m and not patterns.column(None, n)
            ]
            if not found.exact and renamed:  # positions unknown: only names mask, and these
                out.holds.append("a masked column under another name beside a *")
        elif isinstance(stmt, ast.ExplainStmt) and isinstance(stmt.query, ast.SelectStmt):
            out.holds += _outputs(stmt.query, patterns, {}, relations).holds
        elif isinstance(stmt, ast.ExplainStmt) and stmt.query is not None:
            # the plan of a DELETE, a DECLARE, a CREATE TABLE AS: its estimates answer for
            # its conditions. Judged with no scope: any masked-pattern name is a masked use.
            probe = Scope(patterns, {}, relations, ())
            _uses(probe, stmt.query, "in the explained statement")
            out.holds += probe.holds
    out.holds = list(dict.fromkeys(h.replace("  ", " ").strip() for h in out.holds))
    return out
