"""Helpers for the Postgres protocol's tests: a desk whose gateway listens for Postgres
clients over TLS, and how each real client connects to it."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from keyturn.harness.tls import ServerTls
from tests.integration.conftest import Desk, DeskFactory


@dataclass
class Wire:
    desk: Desk
    tls: ServerTls
    port: int
    decided: set[str] = field(default_factory=set)  # held requests a test has decided

    def url(self, user: str, target: str = "shop", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        extra = f"&{query}" if query else ""
        return (
            f"postgresql://{user}@127.0.0.1:{self.port}/{target}"
            f"?sslmode=verify-full&sslrootcert={self.tls.ca_file}{extra}"
        )

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.ca_file))

    async def asyncpg(self, user: str, token: str, **overrides: Any) -> asyncpg.Connection:
        kwargs = self.kwargs(user, token) | overrides
        context = kwargs.pop("ssl_context")
        return await asyncpg.connect(**kwargs, ssl=context)

    def kwargs(self, user: str, token: str, target: str = "shop") -> dict[str, Any]:
        """asyncpg's and pg8000's keyword arguments."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": user,
            "password": token,
            "database": target,
            "ssl_context": self.ssl_context(),
        }


@contextlib.asynccontextmanager
async def wire_desk(
    run_desk: DeskFactory, tls: ServerTls, writes: dict[str, Any] | None = None, **gateway: Any
) -> AsyncIterator[Wire]:
    """A desk (gateway, bot, Slack) whose gateway also listens for Postgres clients;
    ``writes``: changes to the policy's rule for writes, ``gateway``: gateway settings."""
    settings = {
        "postgres_listen": "127.0.0.1:0",
        "postgres_tls_cert": str(tls.cert_file),
        "postgres_tls_key": str(tls.key_file),
        "postgres_notice_interval": "1s",
        **gateway,
    }
    async with run_desk(gateway=settings, writes=writes) as desk:
        port = desk.gateway.process.wire_port
        assert port is not None
        yield Wire(desk, tls, port)


class Raw:
    """A Postgres client written out byte by byte, for what real clients never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, wire: Wire, *, tls: bool = True) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", wire.port)
        raw = cls(reader, writer)
        if tls:
            writer.write(struct.pack("!ii", 8, 80877103))
            assert await reader.readexactly(1) == b"S"
            await writer.start_tls(wire.ssl_context(), server_hostname="127.0.0.1")
        return raw

    @classmethod
    async def login(cls, wire: Wire, user: str, token: str, target: str = "shop") -> Raw:
        raw = await cls.open(wire)
        raw.startup({"user": user, "database": target})
        kind, body = await raw.message()
        assert (kind, body) == (b"R", struct.pack("!i", 3)), (kind, body)
        raw.send(b"p", token.encode() + b"\0")
        while (await raw.message())[0] != b"Z":
            pass
        return raw

    def startup(self, params: dict[str, str], version: int = 196608) -> None:
        body = struct.pack("!i", version)
        body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
        self.writer.write(struct.pack("!i", len(body) + 5) + body + b"\0")

    def send(self, kind: bytes, body: bytes = b"", length: int | None = None) -> None:
        self.writer.write(
            kind + struct.pack("!i", len(body) + 4 if length is None else length) + body
        )

    async def message(self, timeout: float = 20) -> tuple[bytes, bytes]:
        async with asyncio.timeout(timeout):
            kind = await self.reader.readexactly(1)
            (length,) = struct.unpack("!i", await self.reader.readexactly(4))
            return kind, await self.reader.readexactly(length - 4)

    async def until(self, kind: bytes, timeout: float = 20) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first of ``kind``."""
        out = []
        while True:
            message = await self.message(timeout)
            out.append(message)
            if message[0] == kind:
                return out

    async def closed(self, timeout: float = 10) -> bool:
        """Whether the server closes the connection (reading what it sent before)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except (ConnectionError, ssl.SSLError):
            pass
        await self.close()
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(5):
                await self.writer.wait_closed()


def fields(body: bytes) -> dict[str, str]:
    """An ErrorResponse's or NoticeResponse's fields by their code letter."""
    out = {}
    for part in body.rstrip(b"\0").split(b"\0"):
        if part:
            out[part[:1].decode()] = part[1:].decode()
    return out
