"""The allowed path's logins: one Vault read-only lease and a small pool per agent identity.

Every identity reads through a database role of its own (``database/creds/<readonly_role>``
read with the gateway's AppRole), so on the target one agent's sessions are invisible to
another's (``pg_stat_activity`` hides other roles' SQL) and out of its reach
(``pg_terminate_backend`` needs the same role), and the target's logs name who ran what
(``application_name`` carries the request's tag, which only keyturn can tie to the request).

A login (:mod:`.pool`, its leases :mod:`.leases`) is made on first use, closed — connections
first, then its lease revoked, which drops the role — when idle for
``gateway.readonly_idle``, and at most ``gateway.readonly_logins`` hold a lease at once: the
least recently used idle one is closed to make room, and when every one is busy a new
identity waits (within its deadline) for one to fall idle, then gets 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import asyncpg

from gateway.drivers.postgres.leases import LoginKey, Unrevoked
from gateway.drivers.postgres.pool import ReadOnlyLogin
from gateway.metrics import Metrics
from keyturn.aio import Deadline, spawn
from keyturn.config.process import GatewayConfig
from keyturn.config.targets import PostgresTarget
from keyturn.errors import RateLimited
from keyturn.vault import Vault


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
        self._logins: OrderedDict[LoginKey, ReadOnlyLogin] = OrderedDict()
        self._closing = 0  # logins out of the table whose connections and lease are closing
        self._unclaimed = 0  # of those, the ones no new login waits for
        self._freed = asyncio.Event()  # set when a login falls idle or one finishes closing
        self._closes: set[asyncio.Task[None]] = set()
        self.unrevoked = Unrevoked(vault)  # retried by the driver's upkeep
        metrics.readonly_logins_limit.set(cfg.readonly_logins)
        metrics.readonly_leases_unrevoked.set_function(lambda: len(self.unrevoked))
        metrics.readonly_logins.set_function(self.open_count)

    def __contains__(self, target: str) -> bool:
        return target in self._targets

    def logins(self) -> list[ReadOnlyLogin]:
        return list(self._logins.values())

    def login_of(self, target: str, identity: str) -> ReadOnlyLogin | None:
        return self._logins.get(LoginKey(target, identity))

    def open_count(self) -> int:
        """Logins holding a lease or connections, or still closing: what counts against
        ``readonly_logins`` (a login waiting for an evicted one to close holds nothing yet)."""
        return sum(1 for login in self._logins.values() if login.holds) + self._closing

    async def login(self, target: str, identity: str, deadline: Deadline) -> ReadOnlyLogin:
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

    def _make_room_for(self, key: LoginKey) -> ReadOnlyLogin | None:
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
        login = ReadOnlyLogin(
            self.vault,
            key,
            self._targets[key.target],
            self._mount,
            self._cfg,
            self.unrevoked,
            after=after,
            on_idle=self._freed.set,
        )
        self._logins[key] = login
        return login

    def _close(
        self, login: ReadOnlyLogin, why: str, *, claimed: bool = False
    ) -> asyncio.Task[None]:
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

    def reap_interval(self) -> float:
        """How often :meth:`close_idle` runs: a quarter of ``readonly_idle``, 0.1 to 30 s."""
        return min(30.0, max(0.1, self._cfg.readonly_idle.total_seconds() / 4))

    async def close(self) -> None:
        keys = list(self._logins)
        await asyncio.gather(*(self._close(self._logins.pop(key), "shutdown") for key in keys))
        while self._closes:
            await asyncio.gather(*self._closes, return_exceptions=True)
        await self.unrevoked.retry()  # a last try; Vault's own expiry ends what is left
