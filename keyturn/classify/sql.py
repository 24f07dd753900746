"""What a SQL string would do, from PostgreSQL's own parser (pglast), never from text matching.

Every statement of a multi-statement string counts, and so does everything nested in it:
writing CTEs, ``SELECT … INTO``, row locks, function calls, the statement inside ``EXPLAIN
ANALYZE`` or ``PREPARE``. The result is a set of *kinds* (the vocabulary rules match on) plus
human-readable reasons. A string the parser rejects is ``parsed=False``, which is held.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import pglast
from pglast import ast

from keyturn.classify.budget import spend
from keyturn.classify.catalog import UNKNOWN, Catalog
from keyturn.errors import InvalidInput, TooComplex

# Functions a read may call and still be a read: pure, or reading state without changing it.
SAFE_FUNCTIONS = frozenset(
    """
    abs avg bit_and bit_or bool_and bool_or btrim ceil ceiling char_length character_length
    coalesce concat concat_ws count cume_dist current_date current_schema current_time
    current_timestamp date_part date_trunc decode dense_rank encode every exp extract first_value
    floor format generate_series greatest initcap json_agg json_build_array json_build_object
    json_object_agg jsonb_agg jsonb_build_array jsonb_build_object jsonb_extract_path
    jsonb_extract_path_text jsonb_object_agg jsonb_typeof json_typeof lag last_value lead least
    left length ln localtime localtimestamp log lower lpad ltrim max md5 min mod now nth_value
    ntile nullif octet_length percent_rank percentile_cont percentile_disc position power rank
    regexp_match regexp_matches regexp_replace regexp_split_to_array repeat replace reverse
    right round row_number rpad rtrim sign split_part sqrt starts_with stddev stddev_pop
    stddev_samp string_agg strpos substr substring sum to_char to_date to_json to_jsonb
    to_number to_timestamp translate trim trunc unnest upper variance var_pop var_samp
    array_agg array_length array_position array_to_string cardinality age date_bin
    make_date make_interval make_timestamp make_timestamptz timezone isfinite justify_days
    justify_hours justify_interval clock_timestamp statement_timestamp transaction_timestamp
    gen_random_uuid random uuid_generate_v4 pg_typeof version current_user session_user
    current_database inet_client_addr has_table_privilege has_schema_privilege
    pg_relation_size pg_total_relation_size pg_size_pretty pg_database_size
    """.split()
)

# Calls that change something or reach outside the database: named in the reasons.
SIDE_EFFECT_FUNCTIONS = frozenset(
    """
    pg_terminate_backend pg_cancel_backend pg_reload_conf pg_rotate_logfile set_config
    lo_import lo_export lo_unlink lo_create lo_from_bytea lo_put pg_read_file
    pg_read_binary_file pg_ls_dir pg_stat_file pg_file_write dblink dblink_exec
    dblink_connect dblink_open dblink_send_query pg_sleep pg_advisory_lock
    pg_advisory_xact_lock pg_try_advisory_lock nextval setval pg_switch_wal
    pg_create_restore_point pg_promote pg_logical_emit_message pg_notify
    pg_create_logical_replication_slot pg_drop_replication_slot txid_current
    pg_current_xact_id query_to_xml
    """.split()
)

_STATEMENT_KINDS: dict[type[ast.Node], str] = {
    ast.InsertStmt: "insert",
    ast.UpdateStmt: "update",
    ast.DeleteStmt: "delete",
    ast.MergeStmt: "merge",
    ast.TruncateStmt: "truncate",
    ast.CopyStmt: "copy",
    ast.CallStmt: "call",
    ast.DoStmt: "do",
    ast.VariableSetStmt: "set",
    ast.LockStmt: "lock",
    ast.VacuumStmt: "maintenance",
    ast.ReindexStmt: "maintenance",
    ast.ClusterStmt: "maintenance",
    ast.CheckPointStmt: "maintenance",
    ast.TransactionStmt: "transaction",
    ast.PrepareStmt: "prepare",
    ast.ExecuteStmt: "execute",
    ast.DeallocateStmt: "prepare",
    ast.ExplainStmt: "explain",
    ast.VariableShowStmt: "select",
    ast.IndexStmt: "create",
    ast.ViewStmt: "create",
    ast.RuleStmt: "create",
    ast.CreateTableAsStmt: "create",
    ast.AlterSystemStmt: "alter",
    ast.RenameStmt: "alter",
    ast.DropStmt: "drop",
    ast.DropRoleStmt: "drop",
    ast.DropdbStmt: "drop",
    ast.DropOwnedStmt: "drop",
    ast.DropTableSpaceStmt: "drop",
    ast.ReassignOwnedStmt: "alter",
    ast.SecLabelStmt: "alter",
    ast.CommentStmt: "alter",
    ast.ListenStmt: "other",
    ast.NotifyStmt: "other",
    ast.LoadStmt: "other",
    ast.DiscardStmt: "set",
    ast.FetchStmt: "other",
    ast.DeclareCursorStmt: "other",
    ast.ClosePortalStmt: "other",
}


@dataclass
class SqlAnalysis:
    parsed: bool
    kinds: set[str] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    statements: int = 0

    def add(self, kind: str, reason: str | None = None) -> None:
        self.kinds.add(kind)
        if reason and reason not in self.reasons:
            self.reasons.append(reason)


MAX_NODES = 25_000  # more parse-tree nodes than this: too complex to judge (and to print)
MAX_DEPTH = 1_000  # parse-tree nodes nested deeper than this: likewise


def _nodes(value: object) -> Iterator[ast.Node]:
    """Every node in a slot's value, however deeply its lists nest (``VALUES`` rows, the
    ``(function, column definitions)`` pairs of a ``FROM`` function, …)."""
    if isinstance(value, ast.Node):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _nodes(item)


def nodes_under(root: ast.Node) -> Iterator[ast.Node]:
    """Every node of a (bounded) tree, without recursion."""
    stack = [root]
    while stack:
        node = stack.pop()
        spend()
        yield node
        stack.extend(children(node))


def children(node: ast.Node) -> list[ast.Node]:
    slots: Iterable[str] = getattr(type(node), "__slots__", ())
    return [child for name in slots for child in _nodes(getattr(node, name, None))]


def _func_name(call: ast.FuncCall) -> str:
    parts = [p.sval or "" for p in call.funcname or () if isinstance(p, ast.String)]
    return ".".join(parts).lower()


def _option_on(arg: object) -> bool:
    """``EXPLAIN (ANALYZE)``, ``(ANALYZE true)`` and ``(ANALYZE on)`` all run the statement."""
    if isinstance(arg, ast.Boolean):
        return bool(arg.boolval)
    if isinstance(arg, ast.String):
        return (arg.sval or "").lower() not in ("false", "off", "0")
    if isinstance(arg, ast.Integer):
        return bool(arg.ival)
    return True


def explain_analyzes(node: ast.ExplainStmt) -> bool:
    """Whether this EXPLAIN runs its statement (ANALYZE) rather than only planning it."""
    return any(
        isinstance(o, ast.DefElem) and o.defname == "analyze" and _option_on(o.arg)
        for o in node.options or ()
    )


def _statement_kind(node: ast.Node) -> str | None:
    kind = _STATEMENT_KINDS.get(type(node))
    if kind is not None:
        return kind
    name = type(node).__name__
    if not name.endswith("Stmt") or isinstance(node, ast.SelectStmt | ast.RawStmt):
        return None
    if name.startswith(("Create", "Define")):
        return "create"
    if name.startswith("Alter"):
        return "alter"
    if name.startswith("Drop"):
        return "drop"
    if name.startswith("Grant"):
        is_grant = getattr(node, "is_grant", True)
        return "grant" if is_grant else "revoke"
    return "other"


class _Walker:
    """Visits every node of a statement, depth first, without recursion (a deep tree cannot
    exhaust the stack) and within :data:`MAX_NODES`. A handler may return the nodes to walk
    under it instead of all its children (``False``: none)."""

    def __init__(self, analysis: SqlAnalysis, catalog: Catalog | None) -> None:
        self.a = analysis
        self.catalog = catalog
        self.seen = 0
        self.param = 0  # the first $n parameter of the statement walked, if any

    def walk(self, root: ast.Node) -> None:
        stack = [(root, 1)]
        while stack:
            node, depth = stack.pop()
            spend()
            self.seen += 1
            if self.seen > MAX_NODES:
                raise TooComplex(f"the SQL has more than {MAX_NODES:,} parts; split it up")
            if depth > MAX_DEPTH:
                raise TooComplex(f"the SQL {TOO_COMPLEX}")
            below = self._visit(node)
            under = children(node) if below is None else list(below or ())
            stack.extend((child, depth + 1) for child in reversed(under))

    def _visit(self, node: ast.Node) -> Iterable[ast.Node] | Literal[False] | None:
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is not None:
            below: Iterable[ast.Node] | Literal[False] | None = handler(node)
            return below
        kind = _statement_kind(node)
        if kind is not None:
            self.a.add(kind, None if kind in ("select", "other") else f"{kind.upper()} statement")
            if kind == "other":
                self.a.reasons.append(f"{type(node).__name__} is not a known read")
        return None

    # -- statements with details that matter

    def _SelectStmt(self, node: ast.SelectStmt) -> None:
        self.a.add("select")
        if node.intoClause is not None:
            self.a.add("create", "SELECT … INTO creates a table")
        if node.lockingClause:
            self.a.add("lock", "SELECT … FOR UPDATE/SHARE takes row locks")

    def _UpdateStmt(self, node: ast.UpdateStmt) -> None:
        self.a.add("update", "UPDATE statement")
        if node.whereClause is None:
            self.a.add("update_without_where", "UPDATE without WHERE touches every row")

    def _DeleteStmt(self, node: ast.DeleteStmt) -> None:
        self.a.add("delete", "DELETE statement")
        if node.whereClause is None:
            self.a.add("delete_without_where", "DELETE without WHERE removes every row")

    def _CopyStmt(self, node: ast.CopyStmt) -> None:
        self.a.add("copy", "COPY statement")
        if node.is_program:
            self.a.add("copy", "COPY … PROGRAM runs a shell command on the database server")
        elif node.filename:
            self.a.add("copy", "COPY with a server-side file")
        if node.is_from:
            self.a.add("insert", "COPY FROM writes rows")

    def _DoStmt(self, node: ast.DoStmt) -> Literal[False]:
        self.a.add("do", "DO block runs arbitrary procedural code")
        return False  # its body is an opaque string

    def _ExplainStmt(self, node: ast.ExplainStmt) -> list[ast.Node] | Literal[False]:
        self.a.add("explain")
        if explain_analyzes(node) and node.query is not None:
            self.a.reasons.append("EXPLAIN ANALYZE runs the statement")
            return [node.query]
        return False  # a plain EXPLAIN plans but never runs its statement

    def _PrepareStmt(self, node: ast.PrepareStmt) -> None:
        self.a.add("prepare", "PREPARE stores a statement to run later")

    def _ExecuteStmt(self, node: ast.ExecuteStmt) -> None:
        self.a.add("execute", "EXECUTE runs a prepared statement whose text is not in this command")

    def _GrantStmt(self, node: ast.GrantStmt) -> None:
        kind = "grant" if node.is_grant else "revoke"
        self.a.add(kind, f"{kind.upper()} changes privileges")

    def _GrantRoleStmt(self, node: ast.GrantRoleStmt) -> None:
        kind = "grant" if node.is_grant else "revoke"
        self.a.add(kind, f"{kind.upper()} changes role membership")

    def _AlterSystemStmt(self, node: ast.AlterSystemStmt) -> None:
        self.a.add("alter", "ALTER SYSTEM changes server configuration")

    def _VariableSetStmt(self, node: ast.VariableSetStmt) -> None:
        self.a.add("set", f"SET {node.name or ''}".strip())

    def _ColumnRef(self, node: ast.ColumnRef) -> None:
        """``t.f`` may call ``f(t)`` (column notation): judged as that call when ``f`` is a
        function (it is a column when ``t`` has one of that name, which is harmless)."""
        fields = node.fields or ()
        if len(fields) != 2 or not all(isinstance(f, ast.String) for f in fields):
            return
        name = (fields[1].sval or "") if isinstance(fields[1], ast.String) else ""
        if self.catalog is not None:
            why = self.catalog.judge((name,), 1)
            if why is not None and not why.startswith(UNKNOWN):
                self.a.add("function_call", f"calls {name}() in column notation, which {why}")
        elif name.lower() in SIDE_EFFECT_FUNCTIONS:
            self.a.add(
                "function_call", f"calls {name}() in column notation, which has side effects"
            )

    def _ParamRef(self, node: ast.ParamRef) -> None:
        self.param = self.param or node.number or 1

    def _FuncCall(self, node: ast.FuncCall) -> None:
        name = _func_name(node)
        if self.catalog is not None:
            parts = tuple(p.sval or "" for p in node.funcname or () if isinstance(p, ast.String))
            why = self.catalog.judge(parts, len(node.args or ()))
            if why is not None:
                self.a.add("function_call", f"calls {'.'.join(parts)}(), which {why}")
            return
        # no catalog (keyturn classify without a target to ask): the built-in lists
        short = name.rsplit(".", 1)[-1]
        if short in SIDE_EFFECT_FUNCTIONS:
            self.a.add("function_call", f"calls {name}(), which has side effects")
        elif short not in SAFE_FUNCTIONS or ("." in name and not name.startswith("pg_catalog.")):
            self.a.add("function_call", f"calls {name}(), not known to be read-only")


TOO_COMPLEX = "nests too deeply for keyturn to analyse; simplify it or split it up"


# pglast turns Postgres's parse tree into Python objects by recursing in C, with no check:
# a left-deep chain (``1+1+…``, ``x::t::t…``, ``a IS NULL IS NULL…``), which the grammar
# builds without nesting its own stack, takes the process down near 23,000 levels (8 MiB
# stack; fewer where threads get less). Parentheses are bounded by the grammar (~3,300
# levels). Each token that is not a name, a constant, a comma, a parenthesis or a comment
# can add a level at most, so a command with more than MAX_OPERATORS of them is refused
# before pglast sees it; shorter commands cannot have that many.
MAX_OPERATORS = 5000
_FLAT_TOKENS = frozenset(  # names, constants (NULL, TRUE… too), punctuation, comments
    """IDENT ICONST FCONST SCONST BCONST XCONST USCONST UIDENT PARAM NULL_P TRUE_P FALSE_P
    DEFAULT ASCII_44 ASCII_40 ASCII_41 ASCII_59 ASCII_46 SQL_COMMENT C_COMMENT""".split()
)


def _check_depth(sql: str) -> None:
    if len(sql) <= 2 * MAX_OPERATORS:  # too short to hold that many
        return
    operators = sum(1 for token in pglast.parser.scan(sql) if token.name not in _FLAT_TOKENS)
    if operators > MAX_OPERATORS:
        raise TooComplex(
            f"the SQL has more than {MAX_OPERATORS:,} operators and keywords; split it up"
        )


@functools.lru_cache(maxsize=32)  # judging, planning and showing one command share its parse
def parse(sql: str) -> tuple[ast.RawStmt, ...]:
    """pglast's parse of ``sql`` (raises its ParseError, TooComplex past
    :data:`MAX_OPERATORS`, or RecursionError when too deep)."""
    _check_depth(sql)
    return tuple(pglast.parse_sql(sql))


def analyze_sql(sql: str, catalog: Catalog | None = None) -> SqlAnalysis:
    """Raises TooComplex for a command nested past what the parser or the walk can follow.

    With the target's ``catalog``, calls are judged by it; without, by the built-in lists.
    """
    try:
        statements = parse(sql)
    except pglast.parser.ParseError as exc:
        if "stack depth limit exceeded" in str(exc):
            raise TooComplex(f"the SQL {TOO_COMPLEX}") from None
        return SqlAnalysis(parsed=False, reasons=[f"not valid PostgreSQL: {exc}"])
    except RecursionError:
        raise TooComplex(f"the SQL {TOO_COMPLEX}") from None
    analysis = SqlAnalysis(parsed=True, statements=len(statements))
    if not statements:
        return SqlAnalysis(parsed=False, reasons=["no SQL statement"])
    if len(statements) > 1:
        analysis.reasons.append(f"{len(statements)} statements")
    walker = _Walker(analysis, catalog)
    for raw in statements:
        if raw.stmt is not None:
            walker.param = 0
            walker.walk(raw.stmt)
            if walker.param and not isinstance(raw.stmt, ast.PrepareStmt):
                raise InvalidInput(
                    f"the command uses the parameter ${walker.param}, which nothing would "
                    "bind: write the value into the command"
                )
    return analysis


@functools.lru_cache(maxsize=4096)
def calls_a_function(sql: str) -> bool:
    """Whether ``sql`` calls any function: planning it may evaluate the stable ones."""
    roots = [raw.stmt for raw in parse(sql) if raw.stmt is not None]
    return any(isinstance(node, ast.FuncCall) for root in roots for node in nodes_under(root))


def preview_select(sql: str) -> str | None:
    """A SELECT that reads the rows a single UPDATE/DELETE would touch, for an EXPLAIN estimate.

    The read-only role may not EXPLAIN a write (the planner checks write privileges), but it
    may plan ``SELECT 1 FROM <table> WHERE <same condition>``, which estimates the same rows.
    Returns None when there is no such simple equivalent.
    """
    try:
        return _preview_select(sql)
    except (pglast.parser.ParseError, RecursionError, TooComplex):
        # printing back recurses in Python: a few hundred nested calls pass the judge but
        # not the printer; such a command simply gets no estimate
        return None


def _preview_select(sql: str) -> str | None:
    from pglast.stream import RawStream

    statements = parse(sql)
    if len(statements) != 1:
        return None
    stmt = statements[0].stmt
    if isinstance(stmt, ast.UpdateStmt):
        extra = stmt.fromClause or ()
    elif isinstance(stmt, ast.DeleteStmt):
        extra = stmt.usingClause or ()
    elif isinstance(stmt, ast.InsertStmt) and isinstance(stmt.selectStmt, ast.SelectStmt):
        if stmt.selectStmt.valuesLists or stmt.withClause is not None:
            return None
        return str(RawStream()(stmt.selectStmt))
    else:
        return None
    if stmt.withClause is not None:
        return None
    select = ast.SelectStmt(
        targetList=(ast.ResTarget(val=ast.A_Const(val=ast.Integer(ival=1))),),
        fromClause=(stmt.relation, *extra),
        whereClause=stmt.whereClause,
    )
    return str(RawStream()(select))
