"""Running an allowed SQL command on the safe path, and estimating a held one.

Allowed commands run in a read-only transaction on the read-only login, under the pool's
statement timeout, through a cursor so at most ``row_limit`` rows are ever fetched. Held
commands are never executed: their estimate comes from ``EXPLAIN (FORMAT JSON)`` of an
equivalent SELECT (see :func:`keyturn.classify.sql.preview_select`).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import functools
import ipaddress
import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import pglast

from keyturn.classify.sql import preview_select


@dataclass(frozen=True)
class SqlResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    statements: int
    tags: list[str] | None = None  # command tags of an approved run (``UPDATE 3``)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "columns": self.columns,
            "rows": self.rows,
            "row_count": len(self.rows),
            "truncated": self.truncated,
            "statements": self.statements,
        }
        if self.tags is not None:
            out["tags"] = self.tags
        return out


def jsonable(value: Any) -> Any:
    """asyncpg values -> JSON values without losing meaning (decimals stay exact strings)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, asyncpg.Record):
        return [jsonable(v) for v in value.values()]
    return str(value)


@functools.lru_cache(maxsize=4096)
def split_statements(sql: str) -> tuple[str, ...]:
    """Each statement's own text, as PostgreSQL's parser delimits them."""
    statements = pglast.parse_sql(sql)
    if len(statements) == 1:
        return (sql,)
    encoded = sql.encode()  # locations are byte offsets
    out = []
    for raw in statements:
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(encoded)
        out.append(encoded[start:end].decode().strip())
    return tuple(out)


async def _fetch_capped(conn: asyncpg.Connection, sql: str, limit: int) -> list[asyncpg.Record]:
    """At most ``limit`` rows, in one round trip.

    The extended protocol's Execute takes a row limit; asyncpg exposes it only through the
    private ``_execute`` (its public API caps rows with a cursor, which needs a transaction:
    two more round trips per command). Fall back to that when ``_execute`` is gone.
    """
    execute = getattr(conn, "_execute", None)
    if execute is not None:
        records: list[asyncpg.Record] = await execute(sql, (), limit, None)
        return records
    async with conn.transaction(readonly=True):
        cursor = await conn.cursor(sql)
        fetched: list[asyncpg.Record] = await cursor.fetch(limit)
        return fetched


async def run_readonly(conn: asyncpg.Connection, sql: str, row_limit: int) -> SqlResult:
    """Run every statement; the result is the last one's rows, capped at ``row_limit``.

    The login is read-only (role and session default), so a single statement runs in its
    implicit transaction; several share one explicit read-only transaction.
    """
    statements = split_statements(sql)
    if len(statements) == 1:
        records = await _fetch_capped(conn, sql, row_limit + 1)
    else:
        async with conn.transaction(readonly=True):
            for statement in statements[:-1]:
                await conn.execute(statement)
            records = await _fetch_capped(conn, statements[-1], row_limit + 1)
    if records:
        columns = list(records[0].keys())
    else:
        columns = [a.name for a in (await conn.prepare(statements[-1])).get_attributes()]
    rows = [[jsonable(v) for v in record.values()] for record in records[:row_limit]]
    return SqlResult(columns, rows, len(records) > row_limit, len(statements))


async def estimate_rows(conn: asyncpg.Connection, sql: str) -> int | None:
    """Planner's row estimate for what ``sql`` would touch, without running it; None if unknown."""
    query = preview_select(sql)
    if query is None:
        return None
    try:
        async with conn.transaction(readonly=True):
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}")
    except (asyncpg.PostgresError, OSError):
        return None
    doc = json.loads(plan) if isinstance(plan, str) else plan
    try:
        return int(doc[0]["Plan"]["Plan Rows"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


async def run_approved(conn: asyncpg.Connection, sql: str, row_limit: int) -> SqlResult:
    """Run an approved command: every statement in one transaction, all or nothing.

    The result is the last statement's rows (capped; a write without RETURNING has none) and
    each statement's command tag, such as ``UPDATE 3``, in ``tags``.
    """
    statements = split_statements(sql)
    tags: list[str] = []
    records: list[asyncpg.Record] = []
    columns: list[str] = []
    async with conn.transaction():
        for statement in statements:
            prepared = await conn.prepare(statement)
            attributes = prepared.get_attributes()
            if attributes:
                cursor = await prepared.cursor()
                records = await cursor.fetch(row_limit + 1)
                columns = [a.name for a in attributes]
            else:
                records, columns = [], []
                await prepared.fetch()
            tags.append(prepared.get_statusmsg() or "")
    rows = [[jsonable(v) for v in record.values()] for record in records[:row_limit]]
    return SqlResult(columns, rows, len(records) > row_limit, len(statements), tags)
