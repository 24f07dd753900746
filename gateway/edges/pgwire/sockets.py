"""What the Postgres edge does with a socket before (and besides) a stream: wait for bytes,
peek at the first one (a TLS ClientHello means direct TLS), read one startup packet in the
clear and nothing past it, and the first events once a stream is up."""

from __future__ import annotations

import asyncio
import socket
import struct

from gateway.edges.pgwire import protocol as pg

READ_CHUNK = 64 * 1024


async def readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The first byte waiting, without taking it (a TLS ClientHello starts with 0x16)."""
    while True:
        await readable(loop, sock)
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not data:
            raise ConnectionError("closed")
        return data


def pending(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


async def plain_packet(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, conn: pg.Connection
) -> pg.Event:
    """One untyped startup packet read in the clear, and nothing past it."""
    head = await recv_exactly(loop, sock, 4)
    (length,) = struct.unpack("!i", head)
    if not 8 <= length <= pg.MAX_STARTUP:
        raise pg.ProtocolError(f"invalid startup packet length {length}")
    events = conn.receive(head + await recv_exactly(loop, sock, length - 4))
    if len(events) != 1:
        raise pg.ProtocolError("expected one startup packet")
    return events[0]


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


async def next_event(reader: asyncio.StreamReader, conn: pg.Connection) -> pg.Event:
    while True:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise ConnectionError("closed")
        events = conn.receive(data)
        if events:
            if len(events) > 1:
                raise pg.ProtocolError("messages sent before authentication finished")
            return events[0]


async def take(
    queue: asyncio.Queue[pg.Event | None], reading: asyncio.Task[None]
) -> pg.Event | None:
    event = await queue.get()
    if event is None and reading.done() and not reading.cancelled():
        error = reading.exception()
        if error is not None:
            raise error
    return event
