"""What runs on a target: allowed reads, the planner's estimate for a held write, approved runs.

The read-only path does not trust the classifier, nor the parser to agree with the database.
:func:`keyturn.classify.readonly.read_plan` splits a command with pglast and refuses,
whatever any rule says, every statement that is not a plain read. Each statement then goes
alone over the extended protocol, where the server refuses a second statement in one
message, inside a read-only transaction the gateway opened (see :mod:`.pool`).
After every statement the *server's* word is checked — its command tag, the transaction
status, and the parse-relevant settings it reports — and any surprise drops the connection
before anything else runs on it.
"""

from __future__ import annotations

import json

import asyncpg

from gateway.drivers.postgres.fetch import columns_of, describe, fetch_bounded
from gateway.drivers.postgres.values import Fetched, Limits
from keyturn.aio import Deadline
from keyturn.classify.readonly import NotReadOnly, Statement
from keyturn.classify.shown import sql_statements
from keyturn.masking import Masker

READ_TAGS = frozenset({"SELECT", "SHOW", "EXPLAIN"})
# Settings the server reports (ParameterStatus) that change how it reads the next statement
# or who runs it; a change means the session is no longer the one the gateway opened.
PINNED = {
    "standard_conforming_strings": "on",
    "client_encoding": "UTF8",
    "is_superuser": "off",
}


class ConnectionChanged(Exception):
    """The server reports something the gateway did not ask for: drop the connection."""


def check_connection(conn: asyncpg.Connection, tag: str) -> None:
    """Raise ConnectionChanged unless the server still reports the session the gateway opened.

    ``tag`` is the server's command tag of the statement just run (empty when it was cut
    short at a cap, which only a row-returning statement can be).
    """
    if not conn.is_in_transaction():
        raise ConnectionChanged("the statement ended the gateway's read-only transaction")
    kind = tag.split(" ", 1)[0]
    if tag and kind not in READ_TAGS:
        raise ConnectionChanged(f"the database ran {kind}, not a read")
    settings = conn.get_settings()
    for name, expected in PINNED.items():
        if getattr(settings, name, expected) != expected:
            raise ConnectionChanged(f"the statement changed {name}")


async def run_readonly(
    conn: asyncpg.Connection,
    plan: tuple[Statement, ...],
    limits: Limits,
    deadline: Deadline,
    masker: Masker,
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
            masker=masker,
            masked=statement.masked,
        )
        check_connection(conn, fetched.tag)
    return fetched, len(plan)


async def estimate_rows(conn: asyncpg.Connection, query: str, deadline: Deadline) -> int | None:
    """Planner's row estimate for ``query`` (a held command's preview), without running it;
    None if unknown."""
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

    The statements are those the approver saw (:func:`keyturn.classify.shown.shown`).

    Returns the last statement's rows (bounded like a read's; a write without RETURNING has
    none) and each statement's command tag, such as ``UPDATE 3``.
    """
    # exactly what the card showed: each statement as pglast prints it back, one per message
    statements = [text for _, text in sql_statements(sql)]
    tags: list[str] = []
    fetched = Fetched([])
    async with conn.transaction():
        for statement in statements:
            fetched = await fetch_bounded(conn, statement, limits, deadline, wrap=False)
            tags.append(fetched.tag)
    return fetched, tags
