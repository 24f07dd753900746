"""An agent's result from fetched rows: JSON-ready values, masked, within the caps.

Rows come from :mod:`gateway.drivers.postgres.fetch` still as asyncpg decoded them. Here they
become JSON values without losing meaning, masked (by column name, and by lineage's
positions), and cut to the per-value and response caps; ``truncated`` names the cap that
applied.

A cut value is masked and then loses its last :data:`TAIL_MARGIN` characters: whatever PII
straddled the cut is dropped whole instead of leaking as an unrecognised fragment.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from keyturn.config.process import GatewayConfig
from keyturn.masking import MASK, Masker

log = logging.getLogger(__name__)

Truncation = Literal["rows", "value_bytes", "response_bytes"]
TEXT = 25  # the type a masked column is described as: its values are all "***"
TAIL_MARGIN = 256  # characters dropped from the end of a cut value, after masking
LARGE = 256 * 1024  # results this large are shaped (masked, measured) off the event loop


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
    types: list[int] | None = None  # each column's type oid; text (25) for a masked one

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
        if self.types is not None:
            out["types"] = self.types
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
    types: list[int] = field(default_factory=list)  # each column's type oid


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


def weight(row: Sequence[Any], hidden: Sequence[bool] = ()) -> int:
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
        size = 6 * weight(row)  # JSON escaping at most sextuples a character
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
    if sum(weight(row) for row in fetched.rows) > LARGE:
        rows, truncated = await asyncio.to_thread(shape, fetched, masker, limits, masked)
    else:
        rows, truncated = shape(fetched, masker, limits, masked)
    hidden = hidden_columns(masker, fetched.columns, masked)
    types = [TEXT if hide else oid for hide, oid in zip(hidden, fetched.types, strict=True)]
    return SqlResult(fetched.columns, rows, truncated, statements, tags, types)
