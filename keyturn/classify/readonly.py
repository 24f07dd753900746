"""What the read-only path will run: each statement of an allowed command, if all are reads.

A second judgement beside the rules, kept apart from the classifier's walk on purpose: an
allow rule says what the policy author meant, this says what keyturn will execute without a
human. Whatever the rules say, only plain reads (``SELECT`` without ``INTO`` or row locks,
``SHOW``, ``EXPLAIN``) and at most ``gateway.max_statements`` of them run at once; anything
else — transaction control, ``SET``/``RESET``/``DISCARD``, ``LISTEN``/``NOTIFY``, ``DO``,
``COPY``, ``PREPARE``/``EXECUTE``, writes — is held for approval. So is a read of a system
relation that is not known to describe only structure (:data:`STRUCTURE_CATALOGS`): statistics
views copy column values (``pg_stats`` shows an email column's most common values and histogram
past any masking), activity views copy other sessions' query texts, and a catalog added by a
new PostgreSQL release, or an extension's ``pg_…`` view in any schema, is held until someone
looks at it. (An extension's view named otherwise is judged as any other relation.)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.stream import RawStream

from keyturn.classify.budget import budget
from keyturn.classify.catalog import Catalog
from keyturn.classify.lineage import lineage
from keyturn.classify.patterns import Patterns
from keyturn.classify.sql import explain_analyzes, nodes_under, parse
from keyturn.errors import KeyturnError

NO_MASKING = Patterns(())
# pg_catalog relations that describe structure, settings or counters, never the values of a
# table's rows or another session's SQL or locks (some hold literals a DBA wrote: function
# bodies, policy conditions). Any other relation named "pg_…" in any schema (an extension's
# pg_stat_statements lives in public or extensions), and anything in pg_catalog or pg_toast,
# is held: the class is "copies values", and what is not known to be safe is treated as if it
# did.
STRUCTURE_CATALOGS = frozenset(
    """
    pg_am pg_attrdef pg_attribute pg_available_extensions pg_cast pg_class pg_collation
    pg_constraint pg_database pg_depend pg_description pg_enum pg_extension pg_index
    pg_indexes pg_inherits pg_language pg_matviews pg_namespace pg_opclass
    pg_operator pg_policies pg_proc pg_roles pg_sequence pg_sequences pg_settings
    pg_stat_all_indexes
    pg_stat_all_tables pg_stat_database pg_stat_sys_tables pg_stat_user_indexes
    pg_stat_user_tables pg_statio_all_tables pg_statio_user_tables pg_tables pg_tablespace
    pg_timezone_abbrevs pg_timezone_names pg_trigger pg_type pg_views
    """.split()
)


class NotReadOnly(KeyturnError):
    """The command has a statement the read-only path never runs (it may still be held)."""

    code = "not_read_only"
    status = 403


@dataclass(frozen=True)
class Statement:
    text: str
    select: bool  # a SELECT (incl. VALUES, TABLE, set operations): it can be wrapped
    masked: tuple[bool, ...] | None = None  # result columns masked by lineage (None: unknown)


def statement_texts(sql: str) -> list[tuple[str, ast.Node | None]]:
    """Each statement's own text (as PostgreSQL's parser delimits them) and parse tree."""
    statements = parse(sql)
    if len(statements) == 1:
        return [(sql, statements[0].stmt)]
    out = []
    for raw in statements:  # pglast gives locations in characters (libpg_query's bytes,
        start = raw.stmt_location or 0  # converted): slicing bytes broke on non-ASCII text
        end = start + raw.stmt_len if raw.stmt_len else len(sql)
        out.append((sql[start:end].strip(), raw.stmt))
    return out


def _system_relation(node: ast.Node) -> str | None:
    """Why a read of a system relation under ``node`` is held, or None."""
    for found in nodes_under(node):
        if not isinstance(found, ast.RangeVar) or not found.relname:
            continue
        schema, name = found.schemaname, found.relname
        structure = schema in (None, "pg_catalog") and name in STRUCTURE_CATALOGS
        system = schema in ("pg_catalog", "pg_toast") or name.startswith("pg_")
        if system and not structure:
            return (
                f"reads {name}, a system relation that may copy column values or other "
                "sessions' SQL past masking"
            )
    return None


def _refusal(node: ast.Node | None) -> str | None:
    if isinstance(node, ast.SelectStmt):
        if node.intoClause is not None:
            return "SELECT … INTO creates a table"
        if node.lockingClause:
            return "SELECT … FOR UPDATE/SHARE takes row locks"
        return _system_relation(node)
    if isinstance(node, ast.VariableShowStmt):
        return None
    if isinstance(node, ast.ExplainStmt):
        if explain_analyzes(node):  # ANALYZE runs its statement: that must be a read
            return _refusal(node.query)
        if node.query is not None and any(
            isinstance(n, ast.FuncCall) for n in nodes_under(node.query)
        ):  # the planner folds them into constants it prints: repeat('x', 1e9) would be 1 GB
            return "EXPLAIN of a query that calls functions never runs on the read-only path"
        return None
    name = type(node).__name__.removesuffix("Stmt") if node is not None else "an empty statement"
    return f"{name} never runs on the read-only path"


@functools.lru_cache(maxsize=4096)
def read_plan(
    sql: str, max_statements: int, masking: Patterns = NO_MASKING, catalog: Catalog | None = None
) -> tuple[Statement, ...]:
    """The statements of an allowed command, each a read; raises NotReadOnly otherwise —
    also for a read that uses a masked column other than as itself (see lineage, which
    takes the target's columns from ``catalog``). Raises TooComplex past the work budget."""
    with budget():
        return _read_plan(sql, max_statements, masking, catalog)


def _read_plan(
    sql: str, max_statements: int, masking: Patterns, catalog: Catalog | None
) -> tuple[Statement, ...]:
    try:
        texts = statement_texts(sql)
    except pglast.parser.ParseError as exc:
        raise NotReadOnly(f"not valid PostgreSQL: {exc}") from None
    if len(texts) > max_statements:
        raise NotReadOnly(
            f"{len(texts)} statements; the read-only path runs at most {max_statements} per command"
        )
    plan = []
    for _, node in texts:
        refusal = _refusal(node)
        if refusal is not None:
            raise NotReadOnly(refusal)
        assert node is not None
        plan.append(Statement(_deparsed(node), isinstance(node, ast.SelectStmt)))
    relations = catalog.columns if catalog is not None else {}
    traced = lineage([node for _, node in texts], masking, relations)
    if traced.holds:
        raise NotReadOnly("; ".join(traced.holds[:3]) + (" …" if len(traced.holds) > 3 else ""))
    plan[-1] = dataclasses.replace(plan[-1], masked=traced.masked)
    return tuple(plan)


def _deparsed(node: ast.Node) -> str:
    """The statement as pglast prints it back: what the server runs is what was judged —
    no comments, no padding, no trailing semicolon, one canonical quoting."""
    try:
        return str(RawStream()(node))
    except Exception as exc:  # pglast cannot print every tree it can read
        raise NotReadOnly(f"cannot be printed back from its parse tree ({exc})") from None
