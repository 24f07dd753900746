"""How PostgreSQL names a result column it was not given a name for (its ``FigureColname``).

Lineage follows masked columns by name through subqueries, CTEs and set operations, so it must
name a column exactly as the server does: ``SELECT 'x'::text UNION ALL SELECT email …`` makes a
column the server calls ``text`` (a set operation takes its left branch's names), and an outer
``reverse(text)`` reads the email. A name the rules below do not know is ``?column?``, as the
server's own fallback; lineage treats a masked column of that name as one any unknown name may
mean (see :mod:`keyturn.classify.scope`).
"""

from __future__ import annotations

from pglast import ast
from pglast.enums import A_Expr_Kind, MinMaxOp, SubLinkType

UNNAMED = "?column?"

# node type -> the name PostgreSQL gives it (src/backend/parser/parse_target.c)
_FIXED: dict[type[ast.Node], str] = {
    ast.A_ArrayExpr: "array",
    ast.RowExpr: "row",
    ast.CoalesceExpr: "coalesce",
    ast.GroupingFunc: "grouping",
}
_SQL_VALUE_FUNCTIONS = {
    "SVFOP_CURRENT_DATE": "current_date",
    "SVFOP_CURRENT_TIME": "current_time",
    "SVFOP_CURRENT_TIME_N": "current_time",
    "SVFOP_CURRENT_TIMESTAMP": "current_timestamp",
    "SVFOP_CURRENT_TIMESTAMP_N": "current_timestamp",
    "SVFOP_LOCALTIME": "localtime",
    "SVFOP_LOCALTIME_N": "localtime",
    "SVFOP_LOCALTIMESTAMP": "localtimestamp",
    "SVFOP_LOCALTIMESTAMP_N": "localtimestamp",
    "SVFOP_CURRENT_ROLE": "current_role",
    "SVFOP_CURRENT_USER": "current_user",
    "SVFOP_USER": "user",
    "SVFOP_SESSION_USER": "session_user",
    "SVFOP_CURRENT_CATALOG": "current_catalog",
    "SVFOP_CURRENT_SCHEMA": "current_schema",
}


def column_name(target: ast.ResTarget) -> str:
    """The name of the result column ``target`` makes."""
    if target.name:
        return target.name
    return _figure(target.val)[0] if target.val is not None else UNNAMED


def _last_string(nodes: tuple[ast.Node, ...] | None) -> str | None:
    found = [n.sval for n in nodes or () if isinstance(n, ast.String) and n.sval]
    return found[-1] if found else None


def _figure(node: ast.Node) -> tuple[str, int]:
    """(name, strength): 2 for a name from the expression, 1 from a type, 0 for none."""
    if isinstance(node, ast.ColumnRef):
        if node.fields and isinstance(node.fields[-1], ast.A_Star):  # t.*: named as expanded
            return UNNAMED, 0
        name = _last_string(node.fields)
        return (name, 2) if name else (UNNAMED, 0)
    if isinstance(node, ast.A_Indirection):
        name = _last_string(node.indirection)
        return (name, 2) if name else _figure(node.arg) if node.arg else (UNNAMED, 0)
    if isinstance(node, ast.FuncCall):
        name = _last_string(node.funcname)
        return (name, 2) if name else (UNNAMED, 0)
    if isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_NULLIF:
        return "nullif", 2
    if isinstance(node, ast.TypeCast):
        name, strength = _figure(node.arg) if node.arg is not None else (UNNAMED, 0)
        if strength <= 1 and node.typeName is not None:
            typed = _last_string(node.typeName.names)
            if typed:
                return typed, 1
        return name, strength
    if isinstance(node, ast.CaseExpr):  # named after its ELSE when that has a name
        name, strength = _figure(node.defresult) if node.defresult else (UNNAMED, 0)
        return (name, strength) if strength > 1 else ("case", 1)
    if isinstance(node, ast.CollateClause):
        return _figure(node.arg) if node.arg is not None else (UNNAMED, 0)
    if isinstance(node, ast.SubLink):
        if node.subLinkType == SubLinkType.EXISTS_SUBLINK:
            return "exists", 2
        if node.subLinkType == SubLinkType.ARRAY_SUBLINK:
            return "array", 2
        if node.subLinkType == SubLinkType.EXPR_SUBLINK and node.subselect is not None:
            return _first_column(node.subselect), 2
        return UNNAMED, 0
    if isinstance(node, ast.MinMaxExpr):
        return ("greatest" if node.op == MinMaxOp.IS_GREATEST else "least"), 2
    if isinstance(node, ast.SQLValueFunction):
        return _SQL_VALUE_FUNCTIONS.get(getattr(node.op, "name", ""), UNNAMED), 2
    fixed = _FIXED.get(type(node))
    return (fixed, 2) if fixed else (UNNAMED, 0)


def _first_column(query: ast.Node) -> str:
    """A subquery's first column's name (a set operation's: its left branch's)."""
    while isinstance(query, ast.SelectStmt) and query.op and query.larg is not None:
        query = query.larg
    if isinstance(query, ast.SelectStmt):
        first = next((t for t in query.targetList or () if isinstance(t, ast.ResTarget)), None)
        if first is not None:
            return column_name(first)
    return UNNAMED
