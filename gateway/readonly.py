"""The allowed path's logins: one Vault read-only lease and a small pool per agent identity.

Every identity reads through a database role of its own (``database/creds/<readonly_role>``
read with the gateway's AppRole), so on the target one agent's sessions are invisible to
another's (``pg_stat_activity`` hides other roles' SQL) and out of its reach
(``pg_terminate_backend`` needs the same role), and the target's logs name who ran what
(``application_name`` carries the request's tag, which only keyturn can tie to the request).

A login is made on first use, renewed at two thirds of its lease, replaced before the lease
ends (the old lease is revoked once its last connection closes), closed — connections first,
then its lease revoked, which drops the role — when idle for ``gateway.readonly_idle``, and at
most ``gateway.readonly_logins`` hold a lease at once: the least recently used idle one is
closed to make room, and when every one is busy a new identity waits (within its deadline)
for one to fall idle, then gets 429.

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
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from gateway.metrics import Metrics
from gateway.results import decode_times_as_text
from keyturn.aio import Deadline, cancel, spawn
from keyturn.errors import KeyturnError, RateLimited, Unavailable
from keyturn.policy import GatewayConfig, PostgresTarget
from keyturn.vault import Lease, Vault

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3  # of the lease's duration
REPLACE_MARGIN = 60.0  # seconds (at most a quarter of the lease): replace a login this early
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


@dataclass(frozen=True)
class LoginKey:
    target: str
    identity: str


class Login:
    """One identity's read-only login on one target: a Vault lease and up to ``size``
    connections made with it.

    Each lease is a *generation*; connections remember theirs. When a lease is replaced, the
    old one is revoked as soon as its last connection has closed (a busy one finishes first).
    """

    def __init__(
        self,
        vault: Vault,
        key: LoginKey,
        target: PostgresTarget,
        mount: str,
        cfg: GatewayConfig,
        *,
        after: asyncio.Task[None] | None = None,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.key = key
        self._on_idle = on_idle
        self._after = after  # the login this one replaces, closing: wait before leasing
        self.vault = vault
        self._target = target
        self._path = f"{mount}/creds/{target.vault.readonly_role}"
        # the server's own timeout is a backstop a little past the gateway's deadline
        self._timeout_ms = int(cfg.statement_timeout.total_seconds() * 1000) + 1000
        self._slots = asyncio.Semaphore(cfg.readonly_pool_size)
        self._idle: list[tuple[int, asyncpg.Connection]] = []  # (lease generation, connection)
        self._lease: Lease | None = None
        self._generation = 0
        self._open: dict[int, int] = {}  # generation -> its connections still open
        self._retired: dict[int, Lease] = {}  # replaced leases, revoked once unused
        self._replace_at = 0.0  # monotonic: after this, a new lease before the next use
        self._renewing: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._draining: set[asyncpg.Connection] = set()  # resetting, maybe behind a runaway
        self._closed = False
        self.busy = 0  # commands holding or waiting for a connection
        self.last_used = time.monotonic()
        self.rotations = 0

    @property
    def lease(self) -> Lease | None:
        return self._lease

    @property
    def holds(self) -> bool:
        """Whether it holds (or is asking Vault for) a lease, or has connections open."""
        return (
            self._lease is not None
            or any(self._open.values())
            or bool(self._retired)
            or (self._renewing is not None and not self._renewing.done())
        )

    @property
    def username(self) -> str | None:
        return self._lease.data["username"] if self._lease else None

    async def _new_lease(self) -> None:
        await self.vault.ensure_login()
        lease = await self.vault.creds(self._path)
        if self._closed:  # closed while Vault answered: this lease was never used
            spawn(self._background, self._revoke(lease))
            return
        if self._lease is not None:
            self._retired[self._generation] = self._lease
        self._lease = lease
        self._generation += 1
        self._set_end(lease.duration)
        self.rotations += 1
        stale = [(g, conn) for g, conn in self._idle if g != self._generation]
        self._idle = [(g, conn) for g, conn in self._idle if g == self._generation]
        for generation, conn in stale:
            self._closed_one(generation, conn)
        for generation in list(self._retired):
            self._maybe_revoke(generation)
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name=f"keyturn-ro-{self.key}")

    async def _fresh_lease(self, deadline: Deadline | None = None) -> None:
        """One lease request at a time; callers wait for it (bounded by ``deadline``), but it
        runs on when they stop waiting, so a lease Vault issued is always recorded."""
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._new_lease())
        if deadline is None:
            await self._renewing
        else:
            await asyncio.wait_for(asyncio.shield(self._renewing), deadline.left())

    def _set_end(self, seconds: float) -> None:
        self._replace_at = time.monotonic() + seconds - min(REPLACE_MARGIN, seconds / 4)

    def _maybe_revoke(self, generation: int) -> None:
        if generation in self._retired and not self._open.get(generation):
            self._open.pop(generation, None)
            spawn(self._background, self._revoke(self._retired.pop(generation)))

    def _closed_one(self, generation: int, conn: asyncpg.Connection) -> None:
        conn.terminate()
        self._open[generation] = self._open.get(generation, 1) - 1
        self._maybe_revoke(generation)

    async def _revoke(self, lease: Lease) -> None:
        try:
            await self.vault.revoke_lease(lease.lease_id)
        except KeyturnError as exc:
            log.warning(
                "could not revoke a read-only lease of %s (it ends with its TTL): %s",
                self.key,
                exc.message,
            )

    async def _connect(self, deadline: Deadline) -> tuple[int, asyncpg.Connection]:
        if self._closed:
            raise Unavailable(f"the read-only login of {self.key.identity} is closing; retry")
        if self._after is not None:  # the login evicted to make room must be gone first
            await asyncio.wait_for(asyncio.shield(self._after), deadline.left())
            self._after = None
        if self._lease is None or time.monotonic() > self._replace_at:
            await self._fresh_lease(deadline)
        if self._lease is None:  # closed meanwhile
            raise Unavailable(f"the read-only login of {self.key.identity} is closing; retry")
        generation, data = self._generation, self._lease.data
        url, kwargs = self._target.login(data["username"], data["password"])
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
        self._open[generation] = self._open.get(generation, 0) + 1
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
                if generation == self._generation and not conn.is_closed():
                    return generation, conn
                self._closed_one(generation, conn)  # made with a replaced lease
            return await self._connect(deadline)
        except BaseException:
            self._slots.release()
            raise

    async def _release(self, generation: int, conn: asyncpg.Connection, reusable: bool) -> None:
        try:
            if reusable:
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
                    reusable = False
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
            if reusable and generation == self._generation and not self._closed:
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
            spawn(self._background, self._release(generation, conn, reusable))

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
                    await self._fresh_lease()
                elif self._lease is lease:  # not replaced by a connect meanwhile
                    self._set_end(granted)
            except asyncio.CancelledError:
                raise
            except KeyturnError as exc:
                log.warning("read-only lease upkeep for %s failed: %s", self.key, exc.message)
                try:
                    await self._fresh_lease()
                except KeyturnError as again:
                    log.warning("read-only login for %s failed: %s", self.key, again.message)
                    await asyncio.sleep(5)

    async def close(self) -> None:
        """Close its connections (busy ones once they finish), then revoke its leases."""
        self._closed = True
        await cancel(self._keeper)
        self._keeper = None
        if self._renewing is not None:
            await asyncio.gather(self._renewing, return_exceptions=True)
        for conn in list(self._draining):  # shutting down: stop waiting for runaways
            conn.terminate()
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        idle, self._idle = self._idle, []
        for generation, conn in idle:
            with contextlib.suppress(OSError, TimeoutError, asyncpg.InterfaceError):
                await asyncio.wait_for(conn.close(), timeout=5)
            self._closed_one(generation, conn)
        if self._lease is not None:
            self._retired[self._generation] = self._lease
            self._lease = None
            self._maybe_revoke(self._generation)
        while self._background:  # the revocations
            await asyncio.gather(*self._background, return_exceptions=True)


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
        self._unclaimed = 0  # of those, the ones no new login waits for
        self._freed = asyncio.Event()  # set when a login falls idle or one finishes closing
        self._closes: set[asyncio.Task[None]] = set()
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
        """Logins holding a lease or connections, or still closing: what counts against
        ``readonly_logins`` (a login waiting for an evicted one to close holds nothing yet)."""
        return sum(1 for login in self._logins.values() if login.holds) + self._closing

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

    async def login(self, target: str, identity: str, deadline: Deadline) -> Login:
        """``identity``'s login to ``target``; when every login is busy and the table is full,
        wait (within ``deadline``) for one to fall idle, then 429."""
        key = LoginKey(target, identity)
        while True:
            login = self._logins.get(key) or self._make_room_for(key)
            if login is not None:
                self._logins.move_to_end(key)
                return login
            self._freed.clear()
            try:
                async with asyncio.timeout(deadline.left()):
                    await self._freed.wait()
            except TimeoutError:
                self._metrics.commands.labels("rejected").inc()
                raise RateLimited(
                    f"all {self._cfg.readonly_logins} read-only logins are busy; retry shortly",
                    retry_after=1.0,
                ) from None

    @contextlib.asynccontextmanager
    async def transaction(
        self, target: str, identity: str, label: str, deadline: Deadline
    ) -> AsyncIterator[asyncpg.Connection]:
        """``identity``'s own connection to ``target``, in a fresh read-only transaction."""
        login = await self.login(target, identity, deadline)
        async with login.transaction(label, deadline) as conn:  # busy from here: not evicted
            yield conn

    def _make_room_for(self, key: LoginKey) -> Login | None:
        """A new login, after the least recently used idle one if the table is full (None
        when every login is busy).

        The evicted login closes in the background; the new one waits for that before it asks
        Vault for a lease, so the logins holding a lease never exceed the bound.
        """
        after = None
        if len(self._logins) + self._unclaimed >= self._cfg.readonly_logins:
            idle = next((k for k, login in self._logins.items() if not login.busy), None)
            if idle is None:
                return None
            after = self._close(self._logins.pop(idle), "evicted", claimed=True)
        login = Login(
            self.vault,
            key,
            self._targets[key.target],
            self._mount,
            self._cfg,
            after=after,
            on_idle=self._freed.set,
        )
        self._logins[key] = login
        return login

    def _close(self, login: Login, why: str, *, claimed: bool = False) -> asyncio.Task[None]:
        """Close ``login`` in the background. A ``claimed`` close makes room for a new login
        that waits for it, so its place is already taken; any other keeps its place until
        done."""
        self._closing += 1
        self._unclaimed += not claimed

        async def close() -> None:
            try:
                await login.close()
            finally:
                self._closing -= 1
                self._unclaimed -= not claimed
                self._freed.set()
            self._metrics.readonly_logins_closed.labels(why).inc()

        return spawn(self._closes, close())

    async def close_idle(self) -> None:
        """Close logins nobody used for ``readonly_idle``."""
        horizon = time.monotonic() - self._cfg.readonly_idle.total_seconds()
        idle = [
            k for k, login in self._logins.items() if not login.busy and login.last_used < horizon
        ]
        await asyncio.gather(*(self._close(self._logins.pop(key), "idle") for key in idle))

    async def reap_forever(self) -> None:
        interval = min(30.0, max(0.1, self._cfg.readonly_idle.total_seconds() / 4))
        while True:
            await asyncio.sleep(interval)
            await self.close_idle()

    async def close(self) -> None:
        keys = list(self._logins)
        await asyncio.gather(*(self._close(self._logins.pop(key), "shutdown") for key in keys))
        while self._closes:
            await asyncio.gather(*self._closes, return_exceptions=True)
