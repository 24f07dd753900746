"""The allowed path's logins: one Vault read-only lease and a small pool per agent identity.

Every identity reads through a database role of its own (``database/creds/<readonly_role>``
read with the gateway's AppRole), so on the target one agent's sessions are invisible to
another's (``pg_stat_activity`` hides other roles' SQL) and out of its reach
(``pg_terminate_backend`` needs the same role), and the target's logs name who ran what
(``application_name`` carries the request id).

A login is made on first use, renewed at two thirds of its lease, replaced before the lease
ends, closed — connections first, then its lease revoked, which drops the role — when idle for
``gateway.readonly_idle``, and at most ``gateway.readonly_logins`` are open at once (the least
recently used idle one is closed first; when all are busy a new identity gets 429).

Each command runs in a transaction this module opens (``BEGIN READ ONLY``, a local
``statement_timeout`` and ``application_name``) and always ends with a rollback plus a reset
of what a rollback leaves behind (advisory locks, cursors, listeners, settings). A connection
whose state is in doubt — the server reported a change, a deadline cut a query, the socket
failed — is closed, never reused. The reset runs after the answer has gone to the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from gateway.metrics import Metrics
from gateway.results import Deadline
from keyturn.aio import cancel, spawn
from keyturn.errors import KeyturnError, RateLimited, Unavailable
from keyturn.policy import GatewayConfig, PostgresTarget
from keyturn.vault import Lease, Vault

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3  # of the lease's duration
REPLACE_MARGIN = 60.0  # seconds (at most a quarter of the lease): replace a login this early
RESET_TIMEOUT = 5.0
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


@dataclass(frozen=True)
class LoginKey:
    target: str
    identity: str


class Login:
    """One identity's read-only login on one target: a Vault lease and up to ``size``
    connections made with it."""

    def __init__(
        self, vault: Vault, key: LoginKey, target: PostgresTarget, mount: str, cfg: GatewayConfig
    ) -> None:
        self.key = key
        self.vault = vault
        self._target = target
        self._path = f"{mount}/creds/{target.vault.readonly_role}"
        # the server's own timeout is a backstop a little past the gateway's deadline
        self._timeout_ms = int(cfg.statement_timeout.total_seconds() * 1000) + 1000
        self._slots = asyncio.Semaphore(cfg.readonly_pool_size)
        self._idle: list[tuple[int, asyncpg.Connection]] = []  # (lease generation, connection)
        self._lease: Lease | None = None
        self._generation = 0
        self._replace_at = 0.0  # monotonic: after this, a new lease before the next use
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self._resets: set[asyncio.Task[None]] = set()
        self.busy = 0  # commands holding or waiting for a connection
        self.last_used = time.monotonic()
        self.rotations = 0

    @property
    def lease(self) -> Lease | None:
        return self._lease

    @property
    def username(self) -> str | None:
        return self._lease.data["username"] if self._lease else None

    async def _new_lease(self) -> None:
        await self.vault.ensure_login()
        lease = await self.vault.creds(self._path)
        self._lease = lease
        self._generation += 1
        self._set_end(lease.duration)
        self.rotations += 1
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name=f"keyturn-ro-{self.key}")

    def _set_end(self, seconds: float) -> None:
        self._replace_at = time.monotonic() + seconds - min(REPLACE_MARGIN, seconds / 4)

    async def _connect(self, deadline: Deadline) -> tuple[int, asyncpg.Connection]:
        if self._lease is None or time.monotonic() > self._replace_at:
            async with self._lock:
                if self._lease is None or time.monotonic() > self._replace_at:
                    await self._new_lease()
        assert self._lease is not None
        generation, data = self._generation, self._lease.data
        url, kwargs = self._target.login(data["username"], data["password"])
        try:
            conn = await asyncpg.connect(
                url,
                timeout=deadline.left(),
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
                if generation == self._generation and not conn.is_closed():
                    return generation, conn
                conn.terminate()  # made with a replaced lease
            return await self._connect(deadline)
        except BaseException:
            self._slots.release()
            raise

    async def _release(self, generation: int, conn: asyncpg.Connection, reusable: bool) -> None:
        try:
            if reusable:
                try:
                    await conn.execute(RESET, timeout=RESET_TIMEOUT)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    reusable = False
            if reusable and generation == self._generation:
                self._idle.append((generation, conn))
            else:
                conn.terminate()
        finally:
            self._slots.release()
            self.busy -= 1
            self.last_used = time.monotonic()

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
            raise
        reusable = False
        try:
            await conn.execute(
                BEGIN.format(timeout_ms=self._timeout_ms, label=label), timeout=deadline.left()
            )
            yield conn
            reusable = True
        except (asyncpg.PostgresError, TimeoutError, KeyturnError):
            # a statement failed, the deadline cancelled it on the server, or the gateway
            # refused to run it: the reset's rollback (after any cancel landed) cleans it
            reusable = True
            raise
        finally:
            spawn(self._resets, self._release(generation, conn, reusable))

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
                        await self._new_lease()
                else:
                    self._set_end(granted)
            except asyncio.CancelledError:
                raise
            except KeyturnError as exc:
                log.warning("read-only lease upkeep for %s failed: %s", self.key, exc.message)
                try:
                    async with self._lock:
                        await self._new_lease()
                except KeyturnError as again:
                    log.warning("read-only login for %s failed: %s", self.key, again.message)
                    await asyncio.sleep(5)

    async def close(self) -> None:
        """Close its connections, then revoke its lease (Vault drops the role)."""
        await cancel(self._keeper)
        self._keeper = None
        if self._resets:
            await asyncio.gather(*self._resets, return_exceptions=True)
        for _, conn in self._idle:
            with contextlib.suppress(OSError, TimeoutError, asyncpg.InterfaceError):
                await asyncio.wait_for(conn.close(), timeout=5)
            conn.terminate()
        self._idle.clear()
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await self.vault.revoke_lease(lease.lease_id)
            except KeyturnError as exc:
                log.warning(
                    "could not revoke the read-only lease of %s (it ends with its TTL): %s",
                    self.key,
                    exc.message,
                )


class ReadOnlyLogins:
    """Every open read-only login of this gateway, bounded and least-recently-used first out."""

    def __init__(
        self,
        vault: Vault,
        targets: dict[str, PostgresTarget],
        mount: str,
        cfg: GatewayConfig,
        metrics: Metrics,
    ) -> None:
        self.vault = vault
        self._targets = targets
        self._mount = mount
        self._cfg = cfg
        self._metrics = metrics
        self._logins: OrderedDict[LoginKey, Login] = OrderedDict()
        self._closing = 0  # logins out of the table whose connections and lease are closing
        self._lock = asyncio.Lock()
        self._in_flight: dict[str, int] = {}
        metrics.readonly_logins_limit.set(cfg.readonly_logins)
        metrics.readonly_logins.set_function(self.open_count)

    def __contains__(self, target: str) -> bool:
        return target in self._targets

    def logins(self) -> list[Login]:
        return list(self._logins.values())

    def login_of(self, target: str, identity: str) -> Login | None:
        return self._logins.get(LoginKey(target, identity))

    def open_count(self) -> int:
        """Logins in use or still closing: what counts against ``readonly_logins``."""
        return len(self._logins) + self._closing

    @contextlib.asynccontextmanager
    async def admit(self, identity: str) -> AsyncIterator[None]:
        """One allowed command of ``identity`` in flight; 429 past ``agent_concurrency``."""
        running = self._in_flight.get(identity, 0)
        if running >= self._cfg.agent_concurrency:
            self._metrics.commands.labels("rejected").inc()
            raise RateLimited(
                f"{identity} already has {running} allowed commands running (the limit is "
                f"{self._cfg.agent_concurrency}); retry when one has finished",
                retry_after=1.0,
            )
        self._in_flight[identity] = running + 1
        try:
            yield
        finally:
            left = self._in_flight[identity] - 1
            if left:
                self._in_flight[identity] = left
            else:
                del self._in_flight[identity]

    async def login(self, target: str, identity: str) -> Login:
        key = LoginKey(target, identity)
        login = self._logins.get(key)
        if login is None:
            async with self._lock:
                login = self._logins.get(key) or await self._make_room_for(key)
        self._logins.move_to_end(key)
        return login

    @contextlib.asynccontextmanager
    async def transaction(
        self, target: str, identity: str, label: str, deadline: Deadline
    ) -> AsyncIterator[asyncpg.Connection]:
        """``identity``'s own connection to ``target``, in a fresh read-only transaction."""
        login = await self.login(target, identity)
        async with login.transaction(label, deadline) as conn:  # busy from here: not evicted
            yield conn

    async def _make_room_for(self, key: LoginKey) -> Login:
        if len(self._logins) >= self._cfg.readonly_logins:
            idle = next((k for k, login in self._logins.items() if not login.busy), None)
            if idle is None:
                self._metrics.commands.labels("rejected").inc()
                raise RateLimited(
                    f"all {self._cfg.readonly_logins} read-only logins are busy; retry shortly",
                    retry_after=1.0,
                )
            await self._close(idle, "evicted")
        login = Login(self.vault, key, self._targets[key.target], self._mount, self._cfg)
        self._logins[key] = login
        return login

    async def _close(self, key: LoginKey, why: str) -> None:
        login = self._logins.pop(key)
        self._closing += 1
        try:
            await login.close()
        finally:
            self._closing -= 1
        self._metrics.readonly_logins_closed.labels(why).inc()

    async def close_idle(self) -> None:
        """Close logins nobody used for ``readonly_idle``."""
        horizon = time.monotonic() - self._cfg.readonly_idle.total_seconds()
        async with self._lock:
            for key, login in list(self._logins.items()):
                if not login.busy and login.last_used < horizon:
                    await self._close(key, "idle")

    async def reap_forever(self) -> None:
        interval = min(30.0, max(0.1, self._cfg.readonly_idle.total_seconds() / 4))
        while True:
            await asyncio.sleep(interval)
            await self.close_idle()

    async def close(self) -> None:
        async with self._lock:
            for key in list(self._logins):
                await self._close(key, "shutdown")
