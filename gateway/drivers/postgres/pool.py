"""One identity's read-only connections to one target, made with its lease (:mod:`.leases`).

Each command runs in a transaction this module opens (``BEGIN READ ONLY``, a local
``statement_timeout`` and ``application_name``) and always ends with ``ROLLBACK`` — which
undoes every setting, ``LISTEN``, cursor and temporary object of the transaction — and
``pg_advisory_unlock_all()``, the one thing a read can leave behind a rollback. After a
deadline the same applies: asyncpg waits for its cancel to land before the rollback. A
connection whose state is in doubt — the server reported a change, the reset failed, the
socket failed — is closed, never reused. The reset runs after the answer has gone out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import asyncpg

from gateway.drivers.postgres.fetch import decode_times_as_text
from gateway.drivers.postgres.leases import Leases, LoginKey, Unrevoked
from keyturn.aio import Deadline, spawn
from keyturn.config.process import GatewayConfig
from keyturn.config.targets import PostgresTarget
from keyturn.errors import KeyturnError, Unavailable
from keyturn.vault import Lease, Vault

log = logging.getLogger(__name__)

# How long a connection's rollback may wait for the server. After a deadline the query was
# cancelled, but a few functions (translate() over huge strings, say) never look for a
# cancel: the connection — and its slot of the identity's pool — stays taken until the server
# is really done, so no agent can pile up runaway backends beyond its pool.
RESET_TIMEOUT = 3600.0
SLOW_RESET = 5.0  # a reset slower than this is logged: the target is still busy with a read
# asyncpg keeps a connection's prepared statements this long: after a schema change, a
# cached description (say of SELECT *) is at most this old
STATEMENT_LIFETIME = 30
BEGIN = (
    "BEGIN TRANSACTION READ ONLY ISOLATION LEVEL REPEATABLE READ;"
    " SET LOCAL statement_timeout = {timeout_ms};"
    " SET LOCAL application_name = 'keyturn:{label}'"
)
# A rollback undoes every setting (SET, SET LOCAL, set_config), LISTEN, cursor and temporary
# object of the transaction; session-level advisory locks are what a read can leave behind.
# (What else outlives a transaction — PREPARE, DECLARE … WITH HOLD after a COMMIT — is never
# run: pglast refuses it and the server's command tag would betray it.)
RESET = "ROLLBACK; SELECT pg_advisory_unlock_all()"


class ReadOnlyLogin:
    """One identity's read-only login on one target: its leases and up to ``size``
    connections made with them."""

    def __init__(
        self,
        vault: Vault,
        key: LoginKey,
        target: PostgresTarget,
        mount: str,
        cfg: GatewayConfig,
        unrevoked: Unrevoked,
        *,
        after: asyncio.Task[None] | None = None,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.key = key
        self._on_idle = on_idle
        self._after = after  # the login this one replaces, closing: wait before leasing
        self.leases = Leases(
            vault,
            key,
            f"{mount}/creds/{target.vault.readonly_role}",
            unrevoked,
            on_rotate=self._drop_stale,
        )
        self._target = target
        # the server's own timeout is a backstop a little past the gateway's deadline
        self._timeout_ms = int(cfg.statement_timeout.total_seconds() * 1000) + 1000
        self._slots = asyncio.Semaphore(cfg.readonly_pool_size)
        self._idle: list[tuple[int, asyncpg.Connection]] = []  # (lease generation, connection)
        self._releases: set[asyncio.Task[None]] = set()
        self._draining: set[asyncpg.Connection] = set()  # resetting, maybe behind a runaway
        self._closed = False
        self.busy = 0  # commands holding or waiting for a connection
        self.last_used = time.monotonic()

    @property
    def lease(self) -> Lease | None:
        return self.leases.current

    @property
    def holds(self) -> bool:
        return self.leases.holds

    @property
    def username(self) -> str | None:
        lease = self.leases.current
        return lease.data["username"] if lease else None

    @property
    def rotations(self) -> int:
        return self.leases.rotations

    def _drop_stale(self) -> None:
        """A new lease: idle connections made with an older one are closed."""
        current = self.leases.generation
        stale = [(g, conn) for g, conn in self._idle if g != current]
        self._idle = [(g, conn) for g, conn in self._idle if g == current]
        for generation, conn in stale:
            self._closed_one(generation, conn)

    def _closed_one(self, generation: int, conn: asyncpg.Connection) -> None:
        conn.terminate()
        self.leases.closed(generation)

    async def _connect(self, deadline: Deadline) -> tuple[int, asyncpg.Connection]:
        if self._closed:
            raise Unavailable(f"the read-only login of {self.key.identity} is closing; retry")
        if self._after is not None:  # the login evicted to make room must be gone first
            await asyncio.wait_for(asyncio.shield(self._after), deadline.left())
            self._after = None
        generation, lease = await self.leases.usable(deadline)
        url, kwargs = self._target.login(lease.data["username"], lease.data["password"])
        try:
            conn = await asyncpg.connect(
                url,
                timeout=deadline.left(),
                max_cached_statement_lifetime=STATEMENT_LIFETIME,
                server_settings={
                    "application_name": "keyturn",
                    "default_transaction_read_only": "on",
                    "standard_conforming_strings": "on",
                    "idle_in_transaction_session_timeout": str(self._timeout_ms + 5000),
                },
                **kwargs,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise Unavailable(
                f"target {self.key.target} refused the read-only login: {type(exc).__name__}"
            ) from None
        self.leases.opened(generation)
        try:
            await decode_times_as_text(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._closed_one(generation, conn)
            raise Unavailable(f"target {self.key.target} failed: {type(exc).__name__}") from None
        return generation, conn

    async def _acquire(self, deadline: Deadline) -> tuple[int, asyncpg.Connection]:
        if self._slots.locked():
            async with asyncio.timeout(deadline.left()):
                await self._slots.acquire()
        else:
            await self._slots.acquire()  # free: no timer needed
        try:
            while self._idle:
                generation, conn = self._idle.pop()
                if generation == self.leases.generation and not conn.is_closed():
                    return generation, conn
                self._closed_one(generation, conn)  # made with a replaced lease
            return await self._connect(deadline)
        except BaseException:
            self._slots.release()
            raise

    async def _reset(self, conn: asyncpg.Connection) -> bool:
        """Roll back and unlock; False when the connection cannot be trusted any more."""
        started = time.monotonic()
        self._draining.add(conn)
        try:
            await conn.execute(RESET, timeout=RESET_TIMEOUT)
        except (
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,  # mid-operation (a cancelled read): unusable
        ):
            return False
        finally:
            self._draining.discard(conn)
            if time.monotonic() - started > SLOW_RESET:
                log.warning(
                    "a read of %s on %s ran %.0f s past its answer (it ignored the cancel);"
                    " its connection was held until it ended",
                    self.key.identity,
                    self.key.target,
                    time.monotonic() - started,
                )
        return True

    async def _release(self, generation: int, conn: asyncpg.Connection, reusable: bool) -> None:
        try:
            reusable = reusable and await self._reset(conn)
            if reusable and generation == self.leases.generation and not self._closed:
                self._idle.append((generation, conn))
            else:
                self._closed_one(generation, conn)
        finally:
            self._slots.release()
            self.busy -= 1
            self.last_used = time.monotonic()
            if not self.busy:
                self._on_idle()

    @contextlib.asynccontextmanager
    async def transaction(
        self, label: str, deadline: Deadline
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside a fresh read-only transaction; reset (or closed) afterwards."""
        self.busy += 1
        self.last_used = time.monotonic()
        try:
            generation, conn = await self._acquire(deadline)
        except BaseException:
            self.busy -= 1
            if not self.busy:
                self._on_idle()
            raise
        reusable = False
        try:
            await conn.execute(
                BEGIN.format(timeout_ms=self._timeout_ms, label=label), timeout=deadline.left()
            )
            yield conn
            reusable = True
        except (asyncpg.PostgresError, TimeoutError, KeyturnError):
            # a statement failed, the deadline cancelled it on the server (asyncpg waits for
            # the cancel to land before the next command), or the gateway refused to run it:
            # the reset's rollback cleans the connection
            reusable = True
            raise
        finally:
            spawn(self._releases, self._release(generation, conn, reusable))

    async def close(self) -> None:
        """Close its connections (busy ones once they finish), then revoke its leases."""
        self._closed = True
        await self.leases.stop()
        for conn in list(self._draining):  # shutting down: stop waiting for runaways
            conn.terminate()
        while self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        idle, self._idle = self._idle, []
        for generation, conn in idle:
            with contextlib.suppress(OSError, TimeoutError, asyncpg.InterfaceError):
                await asyncio.wait_for(conn.close(), timeout=5)
            self._closed_one(generation, conn)
        await self.leases.close()
