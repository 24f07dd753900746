"""The Postgres frontend/backend protocol 3.0, sans IO (after h11): bytes in, events out;
events out, bytes back. No sockets, no asyncio, no clock here: :mod:`.server` moves bytes.

A :class:`Connection` is one client. :meth:`Connection.receive` buffers what arrived and
returns every complete message as an event; what a message may be depends on the state
(:data:`ALLOWED`): the untyped startup packets first, then the password, then queries. A
message that is malformed, of an unknown type, not allowed in the state, or longer than its
cap raises :class:`ProtocolError` and the connection is done: it never buffers towards a
length it was merely told (a 1 GB length field costs nothing).

Caps, beside their precedents: a startup packet is at most 10,000 bytes (Postgres's own
``MAX_STARTUP_PACKET_LENGTH``); any later message at most ``max_message`` (keyturn's 1 MiB by
default: a statement is judged whole, so it must fit; Postgres allows 1 GB, pgbouncer's
``pkt_buf`` is 4 KiB per read but it forwards any size).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_STARTUP = 10_000
PROTOCOL_3 = 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


class ProtocolError(Exception):
    """The client broke the protocol: answer with this (``sqlstate``) and close."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class State(enum.Enum):
    STARTUP = "startup"  # untyped packets: SSLRequest, GSSENCRequest, CancelRequest, Startup
    PASSWORD = "password"  # noqa: S105 (a state) cleartext auth asked: a PasswordMessage next
    READY = "ready"  # queries
    CLOSED = "closed"


# ------------------------------------------------------------------ events from the client


@dataclass(frozen=True)
class SslRequest:
    pass


@dataclass(frozen=True)
class GssEncRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: int


@dataclass(frozen=True)
class Startup:
    minor: int  # protocol 3.minor
    parameters: dict[str, str]


@dataclass(frozen=True)
class Password:
    password: str


@dataclass(frozen=True)
class Query:
    sql: str


@dataclass(frozen=True)
class Parse:
    name: str
    sql: str
    param_oids: tuple[int, ...]


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True)
class Describe:
    what: str  # "S" a statement, "P" a portal
    name: str


@dataclass(frozen=True)
class Execute:
    portal: str
    max_rows: int


@dataclass(frozen=True)
class Close:
    what: str
    name: str


@dataclass(frozen=True)
class Sync:
    pass


@dataclass(frozen=True)
class Flush:
    pass


@dataclass(frozen=True)
class Terminate:
    pass


Event = (
    SslRequest
    | GssEncRequest
    | CancelRequest
    | Startup
    | Password
    | Query
    | Parse
    | Bind
    | Describe
    | Execute
    | Close
    | Sync
    | Flush
    | Terminate
)

# What each state accepts (typed messages by their type byte); the rules in one place.
ALLOWED: dict[State, frozenset[bytes]] = {
    State.STARTUP: frozenset(),  # untyped packets only
    State.PASSWORD: frozenset({b"p"}),
    State.READY: frozenset(b"QPBDECSHX"[i : i + 1] for i in range(9)),
    State.CLOSED: frozenset(),
}
_REFUSED = {  # typed messages keyturn understands and refuses, with why
    b"F": "the function-call protocol is not supported: call functions in a query",
    b"d": "COPY is not supported by keyturn",
    b"c": "COPY is not supported by keyturn",
    b"f": "COPY is not supported by keyturn",
}


class _Reader:
    """Reads a message body; running past its end is a ProtocolError, not an IndexError."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise ProtocolError("message is shorter than its contents say")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def int16(self) -> int:
        return int(struct.unpack("!h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack("!i", self.take(4))[0])

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise ProtocolError("string without its terminating zero byte")
        raw = self.data[self.at : end]
        self.at = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("text that is not UTF-8", "22021") from None

    def count(self, size: int) -> int:
        """A count of items of at least ``size`` bytes each, checked against what is left."""
        n = self.int16()
        if n < 0 or n * size > len(self.data) - self.at:
            raise ProtocolError("a count larger than the message")
        return n

    def done(self) -> None:
        if self.at != len(self.data):
            raise ProtocolError("message is longer than its contents")


class Connection:
    """One client's side of the protocol, as a state machine over bytes."""

    def __init__(self, max_message: int = 1024 * 1024) -> None:
        self.state = State.STARTUP
        self.max_message = max_message
        self._buffer = bytearray()

    def receive(self, data: bytes) -> list[Event]:
        """Every complete message in what has arrived so far, as events."""
        if self.state is State.CLOSED:
            raise ProtocolError("the connection is closed")
        self._buffer += data
        events: list[Event] = []
        try:
            while (event := self._next()) is not None:
                events.append(event)
                if isinstance(event, SslRequest | Terminate | CancelRequest):
                    break  # nothing may follow these in the same read
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return events

    @property
    def buffered(self) -> int:
        """Bytes received and not yet an event (after an SSLRequest: must be none)."""
        return len(self._buffer)

    def _next(self) -> Event | None:
        buf = self._buffer
        if self.state is State.STARTUP:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack("!i", buf[:4])
            if not 8 <= length <= MAX_STARTUP:
                raise ProtocolError(f"invalid startup packet length {length}")
            if len(buf) < length:
                return None
            body = bytes(buf[4:length])
            del buf[:length]
            return self._startup(_Reader(body))
        if len(buf) < 5:
            return None
        kind = bytes(buf[:1])
        (length,) = struct.unpack("!i", buf[1:5])
        if kind in _REFUSED:
            raise ProtocolError(_REFUSED[kind], "0A000")
        if kind not in ALLOWED[self.state]:
            raise ProtocolError(f"unexpected message type {kind!r} ({self.state.value})")
        if not 4 <= length <= self.max_message:
            raise ProtocolError(
                f"invalid message length {length} (keyturn takes at most {self.max_message})",
                "54000" if length > self.max_message else "08P01",
            )
        if len(buf) < 1 + length:
            return None
        body = bytes(buf[5 : 1 + length])
        del buf[: 1 + length]
        reader = _Reader(body)
        event = self._typed(kind, reader)
        reader.done()
        return event

    def _startup(self, r: _Reader) -> Event:
        code = r.int32()
        if code == SSL_REQUEST:
            r.done()
            return SslRequest()
        if code == GSSENC_REQUEST:
            r.done()
            return GssEncRequest()
        if code == CANCEL_REQUEST:
            event = CancelRequest(r.int32() & 0xFFFFFFFF, r.int32() & 0xFFFFFFFF)
            r.done()
            return event
        if code >> 16 != 3:
            raise ProtocolError(f"unsupported protocol {code >> 16}.{code & 0xFFFF}", "0A000")
        parameters: dict[str, str] = {}
        while (name := r.cstring()) != "":
            if name in parameters:
                raise ProtocolError(f"startup parameter {name!r} given twice")
            parameters[name] = r.cstring()
        r.done()
        self.state = State.PASSWORD
        return Startup(code & 0xFFFF, parameters)

    def _typed(self, kind: bytes, r: _Reader) -> Event:
        if kind == b"p":
            self.state = State.READY
            return Password(r.cstring())
        if kind == b"Q":
            return Query(r.cstring())
        if kind == b"P":
            name, sql = r.cstring(), r.cstring()
            return Parse(name, sql, tuple(r.int32() & 0xFFFFFFFF for _ in range(r.count(4))))
        if kind == b"B":
            portal, statement = r.cstring(), r.cstring()
            formats = tuple(r.int16() for _ in range(r.count(2)))
            params: list[bytes | None] = []
            for _ in range(r.count(4)):
                size = r.int32()
                params.append(None if size == -1 else r.take(size))
            results = tuple(r.int16() for _ in range(r.count(2)))
            if any(f not in (0, 1) for f in formats + results):
                raise ProtocolError("format codes are 0 (text) or 1 (binary)")
            return Bind(portal, statement, formats, tuple(params), results)
        if kind in (b"D", b"C"):
            what = r.take(1).decode("latin-1")
            if what not in ("S", "P"):
                raise ProtocolError(f"expected S or P, not {what!r}")
            return (Describe if kind == b"D" else Close)(what, r.cstring())
        if kind == b"E":
            return Execute(r.cstring(), r.int32())
        if kind == b"S":
            return Sync()
        if kind == b"H":
            return Flush()
        self.state = State.CLOSED  # X
        return Terminate()


# ------------------------------------------------------------------ messages to the client


def _message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _cstr(text: str) -> bytes:
    return text.replace("\0", "").encode() + b"\0"


def auth_cleartext() -> bytes:
    return _message(b"R", struct.pack("!i", 3))


def auth_ok() -> bytes:
    return _message(b"R", struct.pack("!i", 0))


def parameter_status(name: str, value: str) -> bytes:
    return _message(b"S", _cstr(name) + _cstr(value))


def backend_key(pid: int, secret: int) -> bytes:
    return _message(b"K", struct.pack("!II", pid, secret))


def negotiate_version(minor: int, unknown: Sequence[str]) -> bytes:
    body = struct.pack("!ii", minor, len(unknown)) + b"".join(_cstr(n) for n in unknown)
    return _message(b"v", body)


def ready(status: str) -> bytes:
    return _message(b"Z", status.encode())


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_size: int = -1
    type_mod: int = -1


def row_description(columns: Sequence[Column], formats: Sequence[int]) -> bytes:
    body = [struct.pack("!h", len(columns))]
    for column, fmt in zip(columns, formats, strict=True):
        body.append(_cstr(column.name))
        body.append(struct.pack("!ihihih", 0, 0, column.type_oid, column.type_size, -1, fmt))
    return _message(b"T", b"".join(body))


def data_row(values: Iterable[bytes | None]) -> bytes:
    cells = list(values)
    body = [struct.pack("!h", len(cells))]
    for value in cells:
        body.append(b"\xff\xff\xff\xff" if value is None else struct.pack("!i", len(value)) + value)
    return _message(b"D", b"".join(body))


def command_complete(tag: str) -> bytes:
    return _message(b"C", _cstr(tag))


def _fields(
    severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None
) -> bytes:
    out = b"S" + _cstr(severity) + b"V" + _cstr(severity) + b"C" + _cstr(sqlstate)
    out += b"M" + _cstr(message)
    if detail:
        out += b"D" + _cstr(detail)
    if hint:
        out += b"H" + _cstr(hint)
    return out + b"\0"


def error(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return _message(b"E", _fields(severity, sqlstate, message, detail, hint))


def notice(message: str, *, severity: str = "NOTICE", sqlstate: str = "00000") -> bytes:
    return _message(b"N", _fields(severity, sqlstate, message, None, None))


def parameter_description(oids: Sequence[int]) -> bytes:
    return _message(b"t", struct.pack(f"!h{len(oids)}I", len(oids), *oids))


PARSE_COMPLETE = _message(b"1")
BIND_COMPLETE = _message(b"2")
CLOSE_COMPLETE = _message(b"3")
NO_DATA = _message(b"n")
EMPTY_QUERY = _message(b"I")
PORTAL_SUSPENDED = _message(b"s")
