"""Helpers for the Postgres protocol's tests: a desk whose gateway listens for Postgres
clients over TLS, and how each real client connects to it."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    run_desk: DeskFactory, tls: ServerTls, **gateway: Any
) -> AsyncIterator[Wire]:
    settings = {
        "postgres_listen": "127.0.0.1:0",
        "postgres_tls_cert": str(tls.cert_file),
        "postgres_tls_key": str(tls.key_file),
        "postgres_notice_interval": "1s",
        **gateway,
    }
    async with run_desk(gateway=settings) as desk:
        port = desk.gateway.process.wire_port
        assert port is not None
        yield Wire(desk, tls, port)


def ca_path(tls: ServerTls) -> Path:
    return tls.ca_file
