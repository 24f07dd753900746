"""Values between the wire and keyturn: Bind parameters to SQL literals, results to cells.

A statement's parameters are never sent to the target as parameters: each becomes a quoted
literal in the statement's text (:func:`literal`), so the text keyturn judges, records, shows
an approver and runs is the whole statement, values included (one rendition). A parameter
sent in binary is first read back to its text by its type (:func:`param_text`); a type keyturn
cannot read back is refused, never guessed.

Results come from the use cases as the HTTP API's JSON values (masked, capped) with each
column's type oid; :func:`cell` writes one as the client asked, in text as Postgres prints it
or in the type's binary form. A masked column is described as ``text`` and carries ``***``.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import re
import struct
import uuid
from typing import Any

from keyturn.errors import InvalidInput

TEXT = 25
BYTEA = 17
JSONB = 3802
EPOCH = dt.datetime(2000, 1, 1)
EPOCH_DATE = EPOCH.date()
MAX_NUMERIC_DIGITS = 1000  # a numeric parameter keyturn reads back (Postgres: 147,455 + 16,383)

# Text-like types: the text is the value, in both formats.
_TEXTUAL = frozenset({18, 19, 25, 114, 142, 705, 1042, 1043})  # char name text json xml unknown
# Element type of each built-in array type keyturn reads and writes.
ARRAY_OF = {
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21, 1007: 23, 1009: 25, 1014: 1042,
    1015: 1043, 1016: 20, 1021: 700, 1022: 701, 1028: 26, 1182: 1082, 1115: 1114,
    1185: 1184, 1231: 1700, 2951: 2950, 199: 114, 3807: 3802,
}  # fmt: skip
# Type names for parameter types a client gives (by oid), to cast its literal to.
TYPE_NAMES = {
    16: "bool", 17: "bytea", 18: "char", 19: "name", 20: "int8", 21: "int2", 23: "int4",
    25: "text", 26: "oid", 114: "json", 700: "float4", 701: "float8", 1042: "bpchar",
    1043: "varchar", 1082: "date", 1083: "time", 1114: "timestamp", 1184: "timestamptz",
    1186: "interval", 1700: "numeric", 2950: "uuid", 3802: "jsonb",
    **{array: f"_{name}" for array, name in ((1000, "bool"), (1005, "int2"), (1007, "int4"),
       (1016, "int8"), (1009, "text"), (1015, "varchar"), (1021, "float4"), (1022, "float8"),
       (1231, "numeric"), (2951, "uuid"), (1182, "date"), (1115, "timestamp"),
       (1185, "timestamptz"), (3807, "jsonb"))},
}  # fmt: skip
UNTYPED = frozenset({0, 705})  # the client let the server infer the type


class ValueError_(InvalidInput):
    """A value the client sent, or asked for, in a form keyturn cannot give faithfully."""

    def __init__(self, message: str, sqlstate: str = "22P03") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# ------------------------------------------------------------------ parameters


def literal(text: str | None, type_name: str | None) -> str:
    """A parameter's value as a parenthesised SQL literal; cast when the client named its
    type. standard_conforming_strings is on wherever keyturn runs SQL, so only the quote is
    special inside; the parentheses keep the literal from joining what stands before or
    after it (``E$1`` would otherwise make an escape string of it, where ``\'`` ends the
    quote early; ``$1`` then a newline and a string would concatenate with it)."""
    if text is None:
        body = "NULL"
    else:
        if "\0" in text:
            raise ValueError_("invalid byte sequence for encoding UTF8: 0x00", "22021")
        body = "'" + text.replace("'", "''") + "'"
    return f"({body}::{type_name})" if type_name else f"({body})"


def param_text(raw: bytes, binary: bool, oid: int) -> str:
    """A parameter's text, read from the form it was sent in (``oid``: its type)."""
    if not binary or oid in _TEXTUAL:
        return _utf8(raw)
    if oid == JSONB:
        if raw[:1] != b"\x01":
            raise ValueError_("unsupported jsonb version in a binary parameter")
        return _utf8(raw[1:])
    if oid not in ARRAY_OF and oid not in _BINARY_READERS:
        raise ValueError_(
            f"keyturn cannot read a binary parameter of type oid {oid}: send it as text",
            "0A000",
        )
    try:
        if oid in ARRAY_OF:
            return _array_text(_read_array(raw, ARRAY_OF[oid]), ARRAY_OF[oid])
        return str(_BINARY_READERS[oid](raw))
    except ValueError_:
        raise
    except (struct.error, ValueError, IndexError, KeyError, OverflowError, ArithmeticError):
        raise ValueError_(f"a binary parameter of type oid {oid} is malformed") from None


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError_("a parameter is not valid UTF-8", "22021") from None


def _exact(fmt: str, raw: bytes) -> Any:
    if len(raw) != struct.calcsize(fmt):
        raise ValueError("wrong size")
    return struct.unpack(fmt, raw)[0]


def _numeric_from(raw: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack("!hhHH", raw[:8])
    if sign == 0xC000:
        return "NaN"
    if sign in (0xD000, 0xF000):
        return "Infinity" if sign == 0xD000 else "-Infinity"
    if ndigits > MAX_NUMERIC_DIGITS or sign not in (0, 0x4000):
        raise ValueError("bad numeric")
    digits = struct.unpack(f"!{ndigits}H", raw[8 : 8 + 2 * ndigits])
    if len(raw) != 8 + 2 * ndigits or any(d > 9999 for d in digits):
        raise ValueError("bad numeric")
    value = decimal.Decimal(0)
    for i, d in enumerate(digits):
        value += decimal.Decimal(d).scaleb(4 * (weight - i))
    text = f"{value:.{dscale}f}"
    return "-" + text if sign == 0x4000 else text


def _timestamp_from(raw: bytes, zone: str) -> str:
    micros = _exact("!q", raw)
    if abs(micros) == 2**63 - 1 or micros == -(2**63):
        return "infinity" if micros > 0 else "-infinity"
    return (EPOCH + dt.timedelta(microseconds=micros)).isoformat(sep=" ") + zone


def _interval_from(raw: bytes) -> str:
    micros, days, months = struct.unpack("!qii", raw)
    if len(raw) != 16:
        raise ValueError("wrong size")
    return f"{months} mons {days} days {micros} microseconds"


_BINARY_READERS = {
    16: lambda raw: {b"\x01": "t", b"\x00": "f"}[raw],
    20: lambda raw: str(_exact("!q", raw)),
    21: lambda raw: str(_exact("!h", raw)),
    23: lambda raw: str(_exact("!i", raw)),
    26: lambda raw: str(_exact("!I", raw)),
    700: lambda raw: _float_text(_exact("!f", raw), float4=True),
    701: lambda raw: _float_text(_exact("!d", raw)),
    1700: _numeric_from,
    17: lambda raw: "\\x" + raw.hex(),
    2950: lambda raw: str(uuid.UUID(bytes=raw)),
    1082: lambda raw: (EPOCH_DATE + dt.timedelta(days=_exact("!i", raw))).isoformat(),
    1083: lambda raw: str(dt.timedelta(microseconds=_exact("!q", raw))),
    1114: lambda raw: _timestamp_from(raw, ""),
    1184: lambda raw: _timestamp_from(raw, "+00"),
    1186: _interval_from,
}


def _read_array(raw: bytes, elem: int) -> Any:
    ndim, _flags, oid = struct.unpack("!iiI", raw[:12])
    if ndim == 0:
        return []
    if not 0 < ndim <= 6 or oid != elem:
        raise ValueError_("a binary array parameter is malformed")
    dims = [struct.unpack("!ii", raw[12 + 8 * i : 20 + 8 * i])[0] for i in range(ndim)]
    if min(dims) < 1 or math.prod(dims) * 4 > len(raw):  # each element takes 4 bytes at least
        raise ValueError_("a binary array parameter is malformed")
    at = 12 + 8 * ndim
    items: list[str | None] = []
    for _ in range(math.prod(dims)):
        (size,) = struct.unpack("!i", raw[at : at + 4])
        at += 4
        if size == -1:
            items.append(None)
        else:
            items.append(param_text(raw[at : at + size], True, elem))
            at += size
    if at != len(raw):
        raise ValueError_("a binary array parameter is malformed")
    for dim in reversed(dims[1:]):
        items = [items[i : i + dim] for i in range(0, len(items), dim)]  # type: ignore[misc]
    return items


# ------------------------------------------------------------------ results


def _float_text(value: float, *, float4: bool = False) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    text = f"{value:.9g}" if float4 else repr(value)
    return text[:-2] if text.endswith(".0") else text


_PLAIN = re.compile(r'[^\s{}",\\]+')
_NUMBERS = frozenset({20, 21, 23, 26, 700, 701, 1700})
_NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|NaN|-?Infinity")


def _array_text(items: Any, elem: int) -> str:
    parts = []
    for item in items:
        if isinstance(item, list):
            parts.append(_array_text(item, elem))
        elif item is None:
            parts.append("NULL")
        else:
            text = item if isinstance(item, str) else _text(item, elem)
            plain = _PLAIN.fullmatch(text) and text.upper() != "NULL"
            parts.append(
                text if plain else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
            )
    return "{" + ",".join(parts) + "}"


def _text(value: Any, oid: int) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value, float4=oid == 700)
    if isinstance(value, list):
        return _array_text(value, ARRAY_OF.get(oid, TEXT))
    if isinstance(value, dict):
        return json.dumps(value, separators=(", ", ": "))
    if oid == BYTEA:  # the HTTP API carries bytea as base64
        return "\\x" + base64.b64decode(value).hex()
    return str(value)


def cell(value: Any, oid: int, binary: bool) -> bytes | None:
    """One result value as the client asked for it (``binary``: the type's binary form)."""
    if value is None:
        return None
    if oid in _NUMBERS and isinstance(value, str) and not _NUMBER.fullmatch(value):
        # a detector masked part of a number (a card number in a numeric column): no value
        # of the column's type can say so
        raise ValueError_(
            f"a value of type oid {oid} was masked and cannot be sent as its type: "
            "select it as text",
            "0A000",
        )
    if not binary:
        return _text(value, oid).encode()
    if oid in _TEXTUAL:
        return _text(value, oid).encode()
    if oid == JSONB:
        return b"\x01" + _text(value, oid).encode()
    writer = _BINARY_WRITERS.get(oid)
    if writer is None:
        raise ValueError_(
            f"keyturn sends values of type oid {oid} as text only: ask for text results",
            "0A000",
        )
    try:
        return bytes(writer(value))
    except (ValueError, TypeError, ArithmeticError, struct.error):
        raise ValueError_(f"a value of type oid {oid} cannot be sent in binary") from None


def _numeric_to(value: Any) -> bytes:
    number = decimal.Decimal(str(value))
    if number.is_nan():
        return struct.pack("!hhHH", 0, 0, 0xC000, 0)
    if number.is_infinite():
        return struct.pack("!hhHH", 0, 0, 0xD000 if number > 0 else 0xF000, 0)
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    dscale = max(0, -exponent)
    text = "".join(map(str, digits)) or "0"
    # align to base-10000 groups around the decimal point
    int_len = len(text) + exponent  # digits before the point (may be <= 0)
    pad_left = (4 - int_len % 4) % 4
    text = "0" * pad_left + text
    int_len += pad_left
    text += "0" * ((4 - (len(text) % 4)) % 4)
    groups = [int(text[i : i + 4]) for i in range(0, len(text), 4)]
    weight = int_len // 4 - 1
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        weight = 0
    head = struct.pack("!hhHH", len(groups), weight, 0x4000 if sign else 0, dscale)
    return head + struct.pack(f"!{len(groups)}H", *groups)


def _timestamp_to(value: Any) -> bytes:
    text = str(value)
    if text in ("infinity", "-infinity"):
        return struct.pack("!q", 2**63 - 1 if text == "infinity" else -(2**63))
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    delta = moment - EPOCH
    return struct.pack("!q", (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds)


def _date_to(value: Any) -> bytes:
    text = str(value)
    if text in ("infinity", "-infinity"):
        return struct.pack("!i", 2**31 - 1 if text == "infinity" else -(2**31))
    return struct.pack("!i", (dt.date.fromisoformat(text) - EPOCH_DATE).days)


def _float_to(fmt: str) -> Any:
    return lambda value: struct.pack(fmt, float(value))


_BINARY_WRITERS = {
    16: lambda value: b"\x01" if value is True else b"\x00",
    20: lambda value: struct.pack("!q", int(value)),
    21: lambda value: struct.pack("!h", int(value)),
    23: lambda value: struct.pack("!i", int(value)),
    26: lambda value: struct.pack("!I", int(value)),
    700: _float_to("!f"),
    701: _float_to("!d"),
    1700: _numeric_to,
    17: lambda value: base64.b64decode(value),
    2950: lambda value: uuid.UUID(str(value)).bytes,
    1082: _date_to,
    1114: _timestamp_to,
    1184: _timestamp_to,
}
