"""What runs on a target: allowed reads, the planner's estimate for a held write, approved runs.

The read-only path does not trust the classifier, nor the parser to agree with the database.
:func:`read_plan` splits a command with pglast and refuses, whatever any rule says, every
statement that is not a plain read (transaction control, ``SET``/``RESET``/``DISCARD``,
``LISTEN``/``NOTIFY``, ``DO``, ``COPY``, ``PREPARE``/``EXECUTE``, writes). Each statement then
goes alone over the extended protocol, where the server refuses a second statement in one
message, inside a read-only transaction the gateway opened (see :mod:`gateway.readonly`).
After every statement the *server's* word is checked — its command tag, the transaction
status, and the parse-relevant settings it reports — and any surprise drops the connection
before anything else runs on it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import asyncpg
import pglast
from pglast import ast

from gateway.results import Deadline, Fetched, Limits, columns_of, describe, fetch_bounded
from keyturn.classify.sql import preview_select
from keyturn.errors import KeyturnError

READ_TAGS = frozenset({"SELECT", "SHOW", "EXPLAIN"})
# Settings the server reports (ParameterStatus) that change how it reads the next statement
# or who runs it; a change means the session is no longer the one the gateway opened.
PINNED = {
    "standard_conforming_strings": "on",
    "client_encoding": "UTF8",
    "is_superuser": "off",
}


class NotReadOnly(KeyturnError):
    """The command has a statement the read-only path never runs (it may still be held)."""

    code = "not_read_only"
    status = 403


class SessionChanged(Exception):
    """The server reports something the gateway did not ask for: drop the connection."""


@dataclass(frozen=True)
class Statement:
    text: str
    select: bool  # a SELECT (incl. VALUES, TABLE, set operations): it can be wrapped


def _statement_texts(sql: str) -> list[tuple[str, ast.Node | None]]:
    statements = pglast.parse_sql(sql)
    if len(statements) == 1:
        return [(sql, statements[0].stmt)]
    encoded = sql.encode()  # locations are byte offsets
    out = []
    for raw in statements:
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(encoded)
        out.append((encoded[start:end].decode().strip(), raw.stmt))
    return out


@functools.lru_cache(maxsize=4096)
def split_statements(sql: str) -> tuple[str, ...]:
    """Each statement's own text, as PostgreSQL's parser delimits them."""
    return tuple(text for text, _ in _statement_texts(sql))


def _refusal(node: ast.Node | None) -> str | None:
    if isinstance(node, ast.SelectStmt):
        if node.intoClause is not None:
            return "SELECT … INTO creates a table"
        if node.lockingClause:
            return "SELECT … FOR UPDATE/SHARE takes row locks"
        return None
    if isinstance(node, ast.VariableShowStmt | ast.ExplainStmt):
        return None
    name = type(node).__name__.removesuffix("Stmt") if node is not None else "an empty statement"
    return f"{name} never runs on the read-only path"


@functools.lru_cache(maxsize=4096)
def read_plan(sql: str, max_statements: int) -> tuple[Statement, ...]:
    """The statements of an allowed command, each a read; raises NotReadOnly otherwise."""
    try:
        texts = _statement_texts(sql)
    except pglast.parser.ParseError as exc:
        raise NotReadOnly(f"not valid PostgreSQL: {exc}") from None
    if len(texts) > max_statements:
        raise NotReadOnly(
            f"{len(texts)} statements; the read-only path runs at most {max_statements} per command"
        )
    plan = []
    for text, node in texts:
        refusal = _refusal(node)
        if refusal is not None:
            raise NotReadOnly(refusal)
        plan.append(Statement(text, isinstance(node, ast.SelectStmt)))
    return tuple(plan)


def check_session(conn: asyncpg.Connection, tag: str) -> None:
    """Raise SessionChanged unless the server still reports the session the gateway opened.

    ``tag`` is the server's command tag of the statement just run (empty when it was cut
    short at a cap, which only a row-returning statement can be).
    """
    if not conn.is_in_transaction():
        raise SessionChanged("the statement ended the gateway's read-only transaction")
    kind = tag.split(" ", 1)[0]
    if tag and kind not in READ_TAGS:
        raise SessionChanged(f"the database ran {kind}, not a read")
    settings = conn.get_settings()
    for name, expected in PINNED.items():
        if getattr(settings, name, expected) != expected:
            raise SessionChanged(f"the statement changed {name}")


async def run_readonly(
    conn: asyncpg.Connection, plan: tuple[Statement, ...], limits: Limits, deadline: Deadline
) -> tuple[Fetched, int]:
    """Run each statement of ``plan`` in the open read-only transaction; the last one's rows.

    A statement the server describes as returning no rows is not a read, whatever pglast
    said: it is refused before it runs. Earlier statements run only as far as their first
    row: a read's rows are its only effect.
    """
    skip = Limits(0, limits.value_bytes, limits.response_bytes)
    fetched = Fetched([])
    for i, statement in enumerate(plan):
        state = await describe(conn, statement.text, deadline)
        if not columns_of(state):
            raise NotReadOnly("the database describes a statement that returns no rows: not a read")
        last = i == len(plan) - 1
        fetched = await fetch_bounded(
            conn,
            statement.text,
            limits if last else skip,
            deadline,
            wrap=statement.select,
            state=state,
        )
        check_session(conn, fetched.tag)
    return fetched, len(plan)


async def estimate_rows(conn: asyncpg.Connection, sql: str, deadline: Deadline) -> int | None:
    """Planner's row estimate for what ``sql`` would touch, without running it; None if unknown.

    The read-only role may not EXPLAIN a write (the planner checks write privileges), but it
    may plan ``SELECT 1 FROM <table> WHERE <same condition>``, which estimates the same rows.
    """
    query = preview_select(sql)
    if query is None:
        return None
    try:
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", timeout=deadline.left())
    except asyncpg.PostgresError:
        return None
    doc = json.loads(plan) if isinstance(plan, str) else plan
    try:
        return int(doc[0]["Plan"]["Plan Rows"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


async def run_approved(
    conn: asyncpg.Connection, sql: str, limits: Limits, deadline: Deadline
) -> tuple[Fetched, list[str]]:
    """Run an approved command: every statement in one transaction, all or nothing.

    Returns the last statement's rows (bounded like a read's; a write without RETURNING has
    none) and each statement's command tag, such as ``UPDATE 3``.
    """
    statements = split_statements(sql)
    tags: list[str] = []
    fetched = Fetched([])
    async with conn.transaction():
        for statement in statements:
            fetched = await fetch_bounded(conn, statement, limits, deadline, wrap=False)
            tags.append(fetched.tag)
    return fetched, tags
