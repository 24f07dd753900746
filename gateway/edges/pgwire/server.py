"""The Postgres protocol's asyncio edge: accept, negotiate TLS, authenticate, move bytes.

Everything about messages is :mod:`.protocol` (sans IO) and everything about statements is
:mod:`.session`; this module only reads, feeds, and writes, and keeps the process-wide
tables: connections by identity (``gateway.postgres_connections_per_agent``), and the
cancel keys.

TLS is required. A client asks for it with an SSLRequest (answered ``S``) or starts TLS
directly (``sslnegotiation=direct``, which must negotiate ALPN ``postgresql``). Bytes sent
after an SSLRequest before the handshake would be read as if they came over TLS (CVE-2021-23214
in Postgres itself): they close the connection. GSSENCRequest is declined (``N``). A
StartupMessage in the clear is refused. The password is the agent's token, asked for with
cleartext-password authentication (inside TLS only); ``user`` must be the token's subject
(or absent), ``database`` is the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import ssl
import struct
from collections import Counter
from dataclasses import dataclass, field

from gateway.auth import Authenticator
from gateway.edges.pgwire import protocol as pg
from gateway.edges.pgwire import sockets
from gateway.edges.pgwire.errors import Fatal, error_of
from gateway.edges.pgwire.session import Session, Settings
from gateway.ratelimit import RateLimiter
from gateway.usecases import wire
from gateway.usecases.gateway import Gateway
from keyturn.classify.session import SessionSettings
from keyturn.errors import KeyturnError, Unauthorized

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 15.0  # to finish TLS and authentication (Postgres's authentication_timeout: 60 s)
STARTING = 256  # connections not yet authenticated, from anywhere
STARTING_PER_PEER = 32  # from one address (the limit test opens 500 from one: 20 get in)
QUEUED_EVENTS = 256  # events read ahead of the one running (backpressure past that)
ALPN = "postgresql"
AUTH_FAILED = "password authentication failed"  # what libpq's users search for


@dataclass(frozen=True)
class WireConfig:
    max_connections: int  # all clients, authenticated or not
    per_agent: int  # authenticated connections of one identity
    max_message: int
    settings: Settings


class _Out:
    """What a session sends, gathered and written at once when it flushes (at Sync, Flush, a
    held statement's notice): one TLS record and one segment, not one per message."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._parts: list[bytes] = []

    def send(self, data: bytes) -> None:
        self._parts.append(data)

    async def flush(self) -> None:
        if self._parts:
            self._writer.write(b"".join(self._parts))
            self._parts.clear()
        await self._writer.drain()


@dataclass
class _Client:
    out: _Out
    session: Session | None = None
    running: asyncio.Future[None] | None = None  # the event being handled (cancellable)


@dataclass
class WireServer:
    gw: Gateway
    auth: Authenticator
    limiter: RateLimiter
    tls: ssl.SSLContext
    config: WireConfig
    _tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _by_agent: Counter[str] = field(init=False, default_factory=Counter)
    _keys: dict[int, tuple[int, _Client]] = field(init=False, default_factory=dict)
    _open: int = field(init=False, default=0)
    _starting: Counter[str] = field(init=False, default_factory=Counter)  # by peer address

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (0 picks a free one)."""
        sock = socket.create_server((host, port), backlog=512)
        sock.setblocking(False)
        self._listener = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        self._accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._accepting
        self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, address = await loop.sock_accept(listener)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = str(address[0])
            starting = sum(self._starting.values())
            if (
                self._open >= self.config.max_connections
                or self._starting[peer] >= STARTING_PER_PEER
                or starting >= STARTING
            ):
                # connections that never authenticate hold no more than these slots: a
                # flood of idle sockets from one address cannot lock everyone else out
                self.gw.metrics.pg_connections_refused.labels("limit").inc()
                sock.close()
                continue
            task = loop.create_task(self._serve(sock, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ one connection

    async def _serve(self, sock: socket.socket, peer: str) -> None:
        metrics = self.gw.metrics
        self._open += 1
        self._starting[peer] += 1
        metrics.pg_connections.inc()
        writers: list[asyncio.StreamWriter] = []  # the TLS stream, once it owns the socket
        try:
            try:
                async with asyncio.timeout(STARTUP_TIMEOUT):  # TLS and authentication
                    opened = await self._negotiate(sock, writers)
                    if opened is None:
                        return
                    reader, writer, conn, startup = opened
                    client = await self._authenticate(reader, writer, conn, startup)
            finally:
                self._started(peer)
            if client is None:
                return
            await self._run(reader, writer, conn, client)
        except pg.ProtocolError as exc:
            metrics.pg_connections_refused.labels("protocol").inc()
            for writer in writers:
                writer.write(pg.error(exc.sqlstate, exc.message, severity="FATAL"))
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._open -= 1
            metrics.pg_connections.dec()
            for writer in writers:
                writer.close()
                with contextlib.suppress(Exception):  # a peer that never answers TLS's close
                    async with asyncio.timeout(STARTUP_TIMEOUT):
                        await writer.wait_closed()
            if not writers:
                sock.close()

    async def _negotiate(
        self, sock: socket.socket, writers: list[asyncio.StreamWriter]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, pg.Connection, pg.Event] | None:
        """Up to TLS: returns the streams, the protocol state and the first event over TLS."""
        loop = asyncio.get_running_loop()
        conn = pg.Connection(self.config.max_message)
        while True:
            first = await sockets.peek(loop, sock)
            if first[:1] == b"\x16":  # a TLS ClientHello: direct TLS
                return await self._over_tls(sock, conn, writers, direct=True)
            event = await sockets.plain_packet(loop, sock, conn)
            if isinstance(event, pg.GssEncRequest):
                await loop.sock_sendall(sock, b"N")
                continue
            if isinstance(event, pg.CancelRequest):
                self._cancel(event)
                return None
            if isinstance(event, pg.SslRequest):
                if sockets.pending(sock):
                    log.warning("a Postgres client sent data after SSLRequest: closed")
                    self.gw.metrics.pg_connections_refused.labels("tls").inc()
                    return None
                await loop.sock_sendall(sock, b"S")
                return await self._over_tls(sock, conn, writers, direct=False)
            self.gw.metrics.pg_connections_refused.labels("tls").inc()
            refusal = pg.error(
                "28000",
                "keyturn accepts Postgres clients over TLS only: connect with sslmode=require "
                "or stricter (verify-full with keyturn's CA)",
                severity="FATAL",
            )
            await loop.sock_sendall(sock, refusal)
            return None

    async def _over_tls(
        self,
        sock: socket.socket,
        conn: pg.Connection,
        writers: list[asyncio.StreamWriter],
        *,
        direct: bool,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, pg.Connection, pg.Event] | None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=sockets.READ_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=self.tls, ssl_handshake_timeout=STARTUP_TIMEOUT
        )
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        writers.append(writer)  # it owns the socket now: closing is the writer's
        alpn = transport.get_extra_info("ssl_object").selected_alpn_protocol()
        if direct and alpn != ALPN:
            self.gw.metrics.pg_connections_refused.labels("tls").inc()
            writer.write(pg.error("08P01", "direct TLS needs ALPN postgresql", severity="FATAL"))
            return None
        while True:
            data = await reader.read(sockets.READ_CHUNK)
            if not data:
                return None
            events = conn.receive(data)
            if events:
                break
        event = events[0]
        if isinstance(event, pg.CancelRequest):
            self._cancel(event)
            return None
        if not isinstance(event, pg.Startup) or len(events) > 1:
            raise pg.ProtocolError("expected a StartupMessage")
        return reader, writer, conn, event

    async def _authenticate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: pg.Connection,
        startup: pg.Event,
    ) -> _Client | None:
        assert isinstance(startup, pg.Startup)
        metrics = self.gw.metrics
        params = startup.parameters
        unknown = [name for name in params if name.startswith("_pq_.")]
        if startup.minor > 0 or unknown:
            writer.write(pg.negotiate_version(0, unknown))
        writer.write(pg.auth_cleartext())
        await writer.drain()
        password = await sockets.next_event(reader, conn)
        assert isinstance(password, pg.Password)
        token = password.password
        target = params.get("database") or params.get("user") or ""

        def refuse(sqlstate: str, message: str, reason: str) -> None:
            metrics.pg_connections_refused.labels(reason).inc()
            writer.write(pg.error(sqlstate, message, severity="FATAL"))

        try:
            who = await self.auth.authenticate(f"Bearer {token}")
        except Unauthorized:
            refuse("28P01", f"{AUTH_FAILED}: keyturn takes the agent's token", "auth")
            return None
        user = params.get("user")
        if user not in (None, who.subject):
            refuse("28P01", f"{AUTH_FAILED}: user must be the token's subject", "auth")
            return None
        try:
            facts = await wire.session_facts(self.gw, who, target)
        except KeyturnError as exc:
            error = error_of(exc)
            sqlstate = "3D000" if error.sqlstate == "42501" else error.sqlstate
            refuse(sqlstate, f'database "{target}": {exc.message}', "auth")
            return None
        if self._by_agent[who.subject] >= self.config.per_agent:
            refuse(
                "53300",
                f"too many connections for {who.subject}: keyturn allows "
                f"{self.config.per_agent} per agent (gateway.postgres_connections_per_agent)",
                "limit",
            )
            return None
        client = _Client(out=_Out(writer))
        client.session = Session(
            self.gw,
            self.config.settings,
            who,
            target,
            SessionSettings(facts.search_path, facts.timezone),
            check=lambda: self.auth.authenticate(f"Bearer {token}"),
            limit=self.limiter.check,
            send=client.out.send,
            flush=client.out.flush,
        )
        self._by_agent[who.subject] += 1
        pid, secret = self._new_key(client)
        writer.write(pg.auth_ok())
        for name, value in (
            ("server_version", facts.server_version),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", facts.timezone),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("is_superuser", "off"),
            ("session_authorization", who.subject),
            ("application_name", params.get("application_name", "")),
        ):
            writer.write(pg.parameter_status(name, value))
        writer.write(pg.backend_key(pid, secret))
        writer.write(pg.ready("I"))
        await writer.drain()
        client.session.application_name = params.get("application_name", "")
        return client

    async def _run(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: pg.Connection,
        client: _Client,
    ) -> None:
        """Read ahead into a bounded queue while one event at a time is handled: a client
        that disconnects is noticed while its statement waits (and the wait ends)."""
        session = client.session
        assert session is not None
        queue: asyncio.Queue[pg.Event | None] = asyncio.Queue(QUEUED_EVENTS)

        async def read_ahead() -> None:
            try:
                while True:
                    data = await reader.read(sockets.READ_CHUNK)
                    if not data:
                        break
                    for event in conn.receive(data):
                        await queue.put(event)
            finally:
                await queue.put(None)

        reading = asyncio.create_task(read_ahead())
        try:
            while True:
                event = await sockets.take(queue, reading)
                if event is None or isinstance(event, pg.Terminate):
                    return
                handling = asyncio.ensure_future(session.handle(event))
                client.running = handling
                try:
                    await asyncio.wait({handling, reading}, return_when=asyncio.FIRST_COMPLETED)
                    if not handling.done():  # the client went away: stop (a held request
                        handling.cancel()  # stays held, an allowed read is cancelled)
                        await asyncio.gather(handling, return_exceptions=True)
                        return
                finally:
                    client.running = None
                if handling.cancelled():  # a CancelRequest came for it
                    session.cancelled(event)
                elif isinstance(handling.exception(), Fatal):
                    fatal = handling.exception()
                    assert isinstance(fatal, Fatal)
                    client.out.send(pg.error(fatal.sqlstate, fatal.message, severity="FATAL"))
                    await client.out.flush()
                    return
                else:
                    handling.result()
                await client.out.flush()
        finally:
            reading.cancel()
            self._by_agent[session.who.subject] -= 1
            if self._by_agent[session.who.subject] <= 0:
                del self._by_agent[session.who.subject]
            for pid, (_, owner) in list(self._keys.items()):
                if owner is client:
                    del self._keys[pid]

    def _started(self, peer: str) -> None:
        self._starting[peer] -= 1
        if self._starting[peer] <= 0:
            del self._starting[peer]

    # ------------------------------------------------------------------ cancel

    def _new_key(self, client: _Client) -> tuple[int, int]:
        while True:
            pid = secrets.randbelow(2**31 - 1) + 1
            if pid not in self._keys:
                secret = secrets.randbits(32)
                self._keys[pid] = (secret, client)
                return pid, secret

    def _cancel(self, request: pg.CancelRequest) -> None:
        """Cancel the statement a client is running, if the key is right (compared in
        constant time); Postgres answers a cancel request with nothing either way."""
        entry = self._keys.get(request.pid)
        if entry is None or not hmac.compare_digest(
            struct.pack("!I", entry[0]), struct.pack("!I", request.secret)
        ):
            return
        client = entry[1]
        if client.running is not None and not client.running.done():
            client.running.cancel()
