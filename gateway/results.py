"""Result sets bounded in rows and bytes, fetched in chunks, masked before they leave.

A value larger than the per-value cap never crosses the wire whole: when the statement is a
SELECT, it runs wrapped (:func:`bounded_select`) so the *server* sends, for each
variable-length column, either the value or only a text prefix of it. Rows come through a
portal a few at a time (chunks sized from what the rows weigh), and fetching stops at the row
cap or once the response would pass its byte cap, so a gateway holds at most about one
response's worth of any result. ``truncated`` names the cap that applied.

A cut value is masked and then loses its last :data:`TAIL_MARGIN` characters: whatever PII
straddled the cut is dropped whole instead of leaking as an unrecognised fragment.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from keyturn.aio import Deadline
from keyturn.masking import MASK, Masker
from keyturn.policy import GatewayConfig

log = logging.getLogger(__name__)

Truncation = Literal["rows", "value_bytes", "response_bytes"]
TAIL_MARGIN = 256  # characters dropped from the end of a cut value, after masking
CHUNK_BYTES = 512 * 1024  # aim of one fetch, from the rows' observed or worst-case weight
MAX_CHUNK_ROWS = 500
LARGE = 256 * 1024  # results this large are shaped (masked, measured) off the event loop

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


@dataclass(frozen=True)
class Limits:
    rows: int
    value_bytes: int
    response_bytes: int

    @classmethod
    def of(cls, cfg: GatewayConfig) -> Limits:
        return cls(cfg.row_limit, cfg.value_bytes, cfg.response_bytes)

    def cut_at(self, columns: int) -> int:
        """Bytes kept of one value: the value cap, less when a row is wide (a row of ``columns``
        cut values still fits one response)."""
        return max(256, min(self.value_bytes, self.response_bytes // max(1, columns)))


@dataclass(frozen=True)
class SqlResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: Truncation | None
    statements: int
    tags: list[str] | None = None  # command tags of an approved run (``UPDATE 3``)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "columns": self.columns,
            "rows": self.rows,
            "row_count": len(self.rows),
            "truncated": self.truncated or False,
            "statements": self.statements,
        }
        if self.tags is not None:
            out["tags"] = self.tags
        return out


class Cut(str):
    """A value the server (or the gateway) cut at the per-value cap: a prefix of its text."""


@dataclass
class Fetched:
    """One statement's raw rows (values still as asyncpg decoded them)."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    truncated: Truncation | None = None
    tag: str = ""


# Dates and times as the server prints them: Python's types cannot hold 'infinity', year
# 5874897, BC dates or 24:00, which are all valid in Postgres.
TEXT_DECODED = ("date", "time", "timetz", "timestamp", "timestamptz", "interval")


async def decode_times_as_text(conn: asyncpg.Connection) -> None:
    for name in TEXT_DECODED:
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=str, decoder=str, format="text"
        )


def _range(value: asyncpg.Range) -> str:
    """A range as Postgres writes it: ``[1,3)``, ``(,5]``, ``empty``."""
    if value.isempty:
        return "empty"
    lower = "" if value.lower is None else jsonable(value.lower)
    upper = "" if value.upper is None else jsonable(value.upper)
    return f"{'[' if value.lower_inc else '('}{lower},{upper}{']' if value.upper_inc else ')'}"


def jsonable(value: Any) -> Any:
    """asyncpg values -> JSON values without losing meaning (decimals stay exact strings)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):  # JSON has no NaN or Infinity: Postgres's spelling as text
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, asyncpg.Record):
        return [jsonable(v) for v in value.values()]
    if isinstance(value, asyncpg.Range):
        return _range(value)
    return str(value)


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


def hidden_columns(
    masker: Masker, names: Sequence[str], masked: Sequence[bool] | None
) -> tuple[bool, ...]:
    """Which result columns are masked whole: by name, and by position where lineage says a
    column is a masked one under another name. A result with another number of columns than
    lineage counted means lineage misread the query: no position can be trusted, all are."""
    hidden = masker.masked_columns(tuple(names))
    if masked is None:
        return hidden
    if len(masked) != len(hidden):
        log.warning(
            "lineage expected %d columns and the result has %d: every column is masked",
            len(masked),
            len(hidden),
        )
        return (True,) * len(hidden)
    return tuple(a or b for a, b in zip(hidden, masked, strict=True))


def _weight(row: Sequence[Any], hidden: Sequence[bool] = ()) -> int:
    """A cheap upper-ish estimate of a raw row's size, for sizing fetches and stopping early.

    A masked column weighs what its mask does: were its value's length to decide where a
    result is cut, the row count would tell the length of a value nobody may see."""
    total = 0
    for i, value in enumerate(row):
        if i < len(hidden) and hidden[i]:
            total += len(MASK) + 8
        elif isinstance(value, str | bytes):
            total += len(value) + 8
        elif isinstance(value, list | tuple | dict):
            total += len(repr(value))
        else:
            total += 16
    return total


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
    out = Fetched(list(layout.names))
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
            weight = _weight(row, hidden)
            heaviest = max(heaviest, weight)
            if weight > budget and out.rows:
                out.truncated = "response_bytes"
                break
            budget -= weight
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


# ------------------------------------------------------------------ shaping


def _cut(value: Any, limit: int) -> Any:
    """At most ``limit`` bytes of a value's text; bounds what no server-side cut did (EXPLAIN
    output, RETURNING rows) and trims a server cut, which counts characters, to bytes."""
    if isinstance(value, str):
        if len(value) <= limit // 4 or len(value.encode()) <= limit:
            return value
        return Cut(value.encode()[:limit].decode(errors="ignore"))
    if isinstance(value, list | dict):
        text = json.dumps(value)
        return Cut(text[:limit]) if len(text) > limit else value
    return value


def shape(
    fetched: Fetched, masker: Masker, limits: Limits, masked: Sequence[bool] | None = None
) -> tuple[list[list[Any]], Truncation | None]:
    """JSON-ready, masked rows within the response cap, and which cap applied (if any).

    A column is masked by its name, and by position where lineage says it is a masked
    column under another name (``SELECT email AS contact``). A result with another number of
    columns than lineage counted means lineage misread the query, so no position can be
    trusted: every column is masked.
    """
    hidden = hidden_columns(masker, fetched.columns, masked)
    cut_at = limits.cut_at(len(fetched.columns))
    truncated = fetched.truncated
    rows: list[list[Any]] = []
    spent, exact = 0, False  # bytes so far: a cheap upper bound until near the cap
    for raw in fetched.rows:
        row = []
        for hide, value in zip(hidden, raw, strict=True):
            value = _cut(jsonable(value), cut_at)
            if hide:  # a null too: whether a masked value is missing is a fact about it
                row.append(MASK)
            elif isinstance(value, Cut):
                truncated = truncated or "value_bytes"
                row.append(masker.text(value)[:-TAIL_MARGIN])
            else:
                row.append(masker.value(value))
        size = 6 * _weight(row)  # JSON escaping at most sextuples a character
        if not exact and spent + size > limits.response_bytes:
            exact, spent = True, len(json.dumps(rows))
        if exact:
            size = len(json.dumps(row))
            if spent + size > limits.response_bytes and rows:
                return rows, "response_bytes"
        spent += size
        rows.append(row)
    return rows, truncated


async def finish(
    fetched: Fetched,
    statements: int,
    masker: Masker,
    limits: Limits,
    tags: list[str] | None = None,
    masked: Sequence[bool] | None = None,
) -> SqlResult:
    """The agent's result: shaped on the event loop when small, in a worker thread when large
    (masking a megabyte of text must not stall every other request)."""
    if sum(_weight(row) for row in fetched.rows) > LARGE:
        rows, truncated = await asyncio.to_thread(shape, fetched, masker, limits, masked)
    else:
        rows, truncated = shape(fetched, masker, limits, masked)
    return SqlResult(fetched.columns, rows, truncated, statements, tags)
