"""The safe path's credentials: an asyncpg pool per target on Vault-issued read-only logins.

The gateway reads ``database/creds/<readonly_role>`` with its own AppRole, opens a small pool
with that login, renews the lease at two thirds of its duration and, when Vault will not extend
it far enough (the role's max TTL is near), swaps in a new login and pool before the old lease
ends. Nothing is fetched until the first allowed command, so a gateway starts even while Vault
is down (``/readyz`` says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from keyturn.aio import cancel, spawn
from keyturn.errors import KeyturnError, Unavailable
from keyturn.policy import PostgresTarget
from keyturn.store.dsn import parse_dsn
from keyturn.vault import Lease, Vault

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3  # of the lease's duration
REPLACE_MARGIN = 60.0  # seconds (at most a quarter of the lease): replace a login this early


def login_dsn(
    target: PostgresTarget, username: str, password: str
) -> tuple[str, dict[str, object]]:
    dsn = parse_dsn(target.dsn, "dsn")
    parts = urlsplit(dsn.url)
    netloc = f"{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc)), {
        **dsn.connect_args,
        "user": username,
        "password": password,
    }


class ReadOnlyPool:
    def __init__(
        self,
        vault: Vault,
        name: str,
        target: PostgresTarget,
        *,
        mount: str,
        statement_timeout: timedelta,
        size: int,
    ) -> None:
        self.name = name
        self.vault = vault
        self._target = target
        self._path = f"{mount}/creds/{target.vault.readonly_role}"
        self._timeout_ms = int(statement_timeout.total_seconds() * 1000)
        self._size = size
        self._pool: asyncpg.Pool | None = None
        self._lease: Lease | None = None
        self._replace_at = 0.0  # monotonic: after this, a new login before the next use
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # old pools draining after a swap
        self.rotations = 0

    async def _open(self) -> None:
        await self.vault.ensure_login()
        lease = await self.vault.creds(self._path)
        url, kwargs = login_dsn(self._target, lease.data["username"], lease.data["password"])
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=self._size,
                server_settings={
                    "statement_timeout": str(self._timeout_ms),
                    "default_transaction_read_only": "on",
                    "application_name": "keyturn-gateway",
                },
                **kwargs,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise Unavailable(
                f"target {self.name} refused the read-only login: {type(exc).__name__}"
            ) from None
        old = self._pool
        self._pool, self._lease = pool, lease
        self._set_end(lease.duration)
        self.rotations += 1
        if old is not None:
            spawn(self._closing, _close_gracefully(old))
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name=f"keyturn-ro-{self.name}")

    def _set_end(self, seconds: float) -> None:
        self._replace_at = time.monotonic() + seconds - min(REPLACE_MARGIN, seconds / 4)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None or time.monotonic() > self._replace_at:
            async with self._lock:
                if self._pool is None or time.monotonic() > self._replace_at:
                    await self._open()
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            yield conn

    async def _keep(self) -> None:
        """Renew at 2/3 of the lease; replace the login when renewal cannot reach far enough."""
        while True:
            assert self._lease is not None
            await asyncio.sleep(max(self._lease.duration * RENEW_AT, 1.0))
            lease = self._lease
            try:
                granted = await self.vault.renew_lease(
                    lease.lease_id, timedelta(seconds=lease.duration)
                )
                if granted < lease.duration * RENEW_AT:  # the role's max TTL is near
                    async with self._lock:
                        await self._open()
                else:
                    self._set_end(granted)
            except asyncio.CancelledError:
                raise
            except KeyturnError as exc:
                log.warning("read-only lease upkeep for %s failed: %s", self.name, exc.message)
                try:
                    async with self._lock:
                        await self._open()
                except KeyturnError as again:
                    log.warning("read-only login for %s failed: %s", self.name, again.message)
                    await asyncio.sleep(5)

    async def close(self) -> None:
        await cancel(self._keeper)
        self._keeper = None
        if self._pool is not None:
            await _close_gracefully(self._pool)
            self._pool = None


async def _close_gracefully(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=30)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        pool.terminate()
