"""Result sets bounded in rows and bytes, fetched in chunks from the server.

A value larger than the per-value cap never crosses the wire whole: when the statement is a
SELECT, it runs wrapped (:func:`bounded_select`) so the *server* sends, for each
variable-length column, either the value or only a text prefix of it. Rows come through a
portal a few at a time (chunks sized from what the rows weigh), and fetching stops at the row
cap or once the response would pass its byte cap, so a gateway holds at most about one
response's worth of any result. Shaping them for the agent is :mod:`.values`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.drivers.postgres.values import Cut, Fetched, Limits, hidden_columns, weight
from keyturn.aio import Deadline
from keyturn.masking import Masker

CHUNK_BYTES = 512 * 1024  # aim of one fetch, from the rows' observed or worst-case weight
MAX_CHUNK_ROWS = 500

# Types whose values have a small fixed bound (no server-side cut needed).
_SMALL_TYPES = frozenset(
    {
        16,  # bool
        18,  # char
        19,  # name
        20,  # int8
        21,  # int2
        23,  # int4
        26,  # oid
        28,  # xid
        29,  # cid
        600,  # point
        650,  # cidr
        700,  # float4
        701,  # float8
        774,  # macaddr8
        790,  # money
        829,  # macaddr
        869,  # inet
        1082,  # date
        1083,  # time
        1114,  # timestamp
        1184,  # timestamptz
        1186,  # interval
        1266,  # timetz
        2950,  # uuid
        3220,  # pg_lsn
        5069,  # xid8
    }
)
_TEXT_TYPES = frozenset({25, 1042, 1043})  # text, bpchar, varchar: octet_length takes them
_BYTEA = 17


# Dates and times as the server prints them: Python's types cannot hold 'infinity', year
# 5874897, BC dates or 24:00, which are all valid in Postgres.
TEXT_DECODED = ("date", "time", "timetz", "timestamp", "timestamptz", "interval")


async def decode_times_as_text(conn: asyncpg.Connection) -> None:
    for name in TEXT_DECODED:
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=str, decoder=str, format="text"
        )


# ------------------------------------------------------------------ the server-side cut


def _length(column: str, oid: int) -> str:
    if oid in _TEXT_TYPES:
        return f"octet_length({column})"
    if oid == _BYTEA:
        return f"(octet_length({column}) * 2 + 2)"  # its hex text
    return f"octet_length({column}::text)"


@dataclass(frozen=True)
class Layout:
    """How one statement's rows are fetched: computed once per statement and column set."""

    names: tuple[str, ...]
    small: tuple[bool, ...]  # per column: bounded by its type, never cut
    wrapped: str | None  # the statement as the server runs it (None: as it is)
    worst: int  # the most bytes one row can weigh
    cut: int
    pairs: bool  # see :func:`paired`


@functools.lru_cache(maxsize=4096)
def _layout(sql: str, columns: tuple[tuple[str, int], ...], cut: int, wrap: bool) -> Layout:
    oids = tuple(oid for _, oid in columns)
    small = tuple(oid in _SMALL_TYPES for oid in oids)
    return Layout(
        tuple(name for name, _ in columns),
        small,
        bounded_select(sql, oids, cut) if wrap else None,
        sum(16 if s else cut for s in small),
        cut,
        paired(oids),
    )


MAX_OUTPUTS = 1664  # the most columns Postgres returns from one SELECT


def paired(oids: Sequence[int]) -> bool:
    """Whether each variable-length column can come as a (value, prefix) pair; in rows too
    wide for that, such columns come as text (cut one character past ``cut`` to tell)."""
    return len(oids) + sum(oid not in _SMALL_TYPES for oid in oids) <= MAX_OUTPUTS


def bounded_select(sql: str, oids: Sequence[int], cut: int) -> str | None:
    """``sql`` (one SELECT) wrapped so no value larger than ``cut`` bytes leaves the server.

    Each variable-length column (by type oid) becomes two: the value when it fits, else NULL;
    and a text prefix when it does not (or one text column, see :func:`paired`). None when
    every column is small already.
    """
    if all(oid in _SMALL_TYPES for oid in oids):
        return None
    pairs = paired(oids)
    names = [f"c{i}" for i in range(len(oids))]
    outputs = []
    for name, oid in zip(names, oids, strict=True):
        column = f"_k.{name}"
        if oid in _SMALL_TYPES:
            outputs.append(column)
        elif not pairs:
            outputs.append(f"left({column}::text, {cut + 1})")
        else:
            length = _length(column, oid)
            outputs.append(f"CASE WHEN {length} > {cut} THEN NULL ELSE {column} END")
            outputs.append(f"CASE WHEN {length} > {cut} THEN left({column}::text, {cut}) END")
    # the newline keeps a trailing "-- comment" in ``sql`` from swallowing the parenthesis
    return f"SELECT {', '.join(outputs)} FROM (\n{sql}\n) AS _k({', '.join(names)})"


def _unwrap(record: Sequence[Any], layout: Layout) -> list[Any]:
    """A wrapped row back to one value per original column (a cut value as :class:`Cut`)."""
    values: list[Any] = []
    i = 0
    for is_small in layout.small:
        if is_small:
            values.append(record[i])
            i += 1
        elif not layout.pairs:
            text = record[i]
            values.append(Cut(text[: layout.cut]) if text and len(text) > layout.cut else text)
            i += 1
        else:
            value, prefix = record[i], record[i + 1]
            values.append(Cut(prefix) if prefix is not None else value)
            i += 2
    return values


# ------------------------------------------------------------------ fetching


async def describe(conn: asyncpg.Connection, sql: str, deadline: Deadline) -> Any:
    """Parse and describe ``sql`` on the server (cached per connection): its prepared state.

    ``Connection._get_statement`` and the protocol's ``bind_execute``/``execute`` are asyncpg
    internals (stable since 0.18): the public API neither caches ``prepare()`` nor returns the
    server's command tag from a portal, and both matter here. The read-path tests exercise
    every call, so an asyncpg upgrade that moves them fails loudly, never silently.
    """
    return await conn._get_statement(sql, deadline.left())


# What a statement cached before a schema change fails with: forget the cache and run again.
STALE_STATEMENT = (
    asyncpg.InvalidCachedStatementError,
    asyncpg.UndefinedFunctionError,  # the bounded wrapper, when a column changed type
    asyncpg.DatatypeMismatchError,
)


def forget_statements(conn: asyncpg.Connection) -> None:
    """Drop ``conn``'s statement cache (asyncpg internal, as :func:`describe`)."""
    conn._drop_local_statement_cache()


def columns_of(state: Any) -> tuple[Any, ...]:
    """The row description the server gave: empty for statements that return no rows."""
    return tuple(state._get_attributes())


async def fetch_bounded(
    conn: asyncpg.Connection,
    sql: str,
    limits: Limits,
    deadline: Deadline,
    *,
    wrap: bool,
    state: Any = None,
    masker: Masker | None = None,
    masked: Sequence[bool] | None = None,
) -> Fetched:
    """Run one statement inside the caller's transaction and fetch its rows within the caps.

    ``tag`` is the server's command tag (``SELECT 3``), or empty when fetching stopped at a
    cap before the statement completed. ``masker`` and ``masked`` (lineage's positions): the
    columns that will be masked weigh as their masks do when the response cap is applied.
    """
    state = state if state is not None else await describe(conn, sql, deadline)
    attributes = columns_of(state)
    protocol = conn._protocol
    if not attributes:
        _, status, _ = await protocol.bind_execute(state, [], "", 0, True, deadline.left())
        return Fetched([], tag=_tag(status))
    cut = limits.cut_at(len(attributes))
    layout = _layout(sql, tuple((a.name, a.type.oid) for a in attributes), cut, wrap)
    wrapped = layout.wrapped
    running = await describe(conn, wrapped, deadline) if wrapped else state
    out = Fetched(list(layout.names), types=[a.type.oid for a in attributes])
    hidden = hidden_columns(masker, out.columns, masked) if masker is not None else ()
    want = max(1, min(limits.rows + 1, CHUNK_BYTES // layout.worst, MAX_CHUNK_ROWS))
    budget = limits.response_bytes
    records, status, done = await protocol.bind_execute(
        running, [], "", want, True, deadline.left()
    )
    while True:
        heaviest = 1
        for record in records:
            if len(out.rows) == limits.rows:
                out.truncated = "rows"
                break
            row = _unwrap(record, layout) if wrapped else list(record)
            size = weight(row, hidden)
            heaviest = max(heaviest, size)
            if size > budget and out.rows:
                out.truncated = "response_bytes"
                break
            budget -= size
            out.rows.append(row)
        if done:
            out.tag = _tag(status)
            return out
        if out.truncated:
            return out
        want = max(1, min(limits.rows + 1 - len(out.rows), CHUNK_BYTES // heaviest, MAX_CHUNK_ROWS))
        records, status, done = await protocol.execute(running, "", want, True, deadline.left())


def _tag(status: bytes | str | None) -> str:
    if isinstance(status, bytes):
        return status.decode(errors="replace")
    return status or ""
