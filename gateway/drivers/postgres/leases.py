"""One identity's read-only lease on one target: made on first use, renewed, replaced, revoked.

A lease is renewed at two thirds of its duration and replaced before it ends (when renewal can
no longer reach far enough, or a connection is made after its replacement time). Each lease
is a *generation*; the connection pool (:mod:`.pool`) tells which generation each connection
was made with, and a replaced lease is revoked as soon as its last connection has closed (a
busy one finishes first), which drops its role on the target.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from keyturn.aio import Deadline, cancel, spawn
from keyturn.errors import KeyturnError, Unavailable
from keyturn.vault import Lease, Vault, VaultUnavailable

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3  # of the lease's duration
REPLACE_MARGIN = 60.0  # seconds (at most a quarter of the lease): replace a login this early
RETRY_AFTER_FAILURE = 5.0  # seconds before upkeep tries Vault again after a failed replacement


@dataclass(frozen=True)
class LoginKey:
    target: str
    identity: str


class Unrevoked:
    """Read-only leases Vault could not revoke when they were retired (it was restarting or
    failing over). The gateway's upkeep tries again every few seconds, so their roles leave
    the target soon after Vault is back, not when their TTL runs out."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._leases: dict[str, tuple[LoginKey, float]] = {}  # id -> (login, give up at)

    def __len__(self) -> int:
        return len(self._leases)

    def add(self, key: LoginKey, lease: Lease) -> None:
        # renewed or not, it cannot outlive one more duration from now: Vault ends it then
        self._leases[lease.lease_id] = (key, time.monotonic() + lease.duration)

    async def retry(self) -> None:
        """One pass. Leases past the time they end by themselves are let go without asking
        Vault. The pass stops at the first lease Vault still cannot revoke, which goes to
        the back of the line: Vault being away costs one call a pass, and one lease Vault
        keeps refusing cannot hold up the others."""
        now = time.monotonic()
        for lease_id, (key, give_up) in list(self._leases.items()):
            if now >= give_up:
                del self._leases[lease_id]
                _not_revoked(key, "Vault did not answer in time")
                continue
            try:
                await self.vault.revoke_lease(lease_id)
            except VaultUnavailable:
                self._leases[lease_id] = self._leases.pop(lease_id)  # to the back
                return
            except KeyturnError as exc:
                _not_revoked(key, exc.message)
            del self._leases[lease_id]


def _not_revoked(key: LoginKey, why: str) -> None:
    log.warning("could not revoke a read-only lease of %s (it ends with its TTL): %s", key, why)


class Leases:
    """The lease generations of one login, and the connections still open on each."""

    def __init__(
        self,
        vault: Vault,
        key: LoginKey,
        path: str,
        unrevoked: Unrevoked,
        *,
        on_rotate: Callable[[], None] = lambda: None,
    ) -> None:
        self.vault = vault
        self.key = key
        self._unrevoked = unrevoked
        self._path = path
        self._on_rotate = on_rotate  # a new generation: the pool drops older idle connections
        self._lease: Lease | None = None
        self.generation = 0
        self._open: dict[int, int] = {}  # generation -> its connections still open
        self._retired: dict[int, Lease] = {}  # replaced leases, revoked once unused
        self._replace_at = 0.0  # monotonic: after this, a new lease before the next use
        self._renewing: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._revocations: set[asyncio.Task[None]] = set()
        self._closed = False
        self.rotations = 0

    @property
    def current(self) -> Lease | None:
        return self._lease

    @property
    def holds(self) -> bool:
        """Whether it holds (or is asking Vault for) a lease, or connections are open on one."""
        return (
            self._lease is not None
            or any(self._open.values())
            or bool(self._retired)
            or (self._renewing is not None and not self._renewing.done())
        )

    async def usable(self, deadline: Deadline) -> tuple[int, Lease]:
        """The generation and lease a new connection is made with (a fresh one when due)."""
        if self._lease is None or time.monotonic() > self._replace_at:
            await self._fresh(deadline)
        if self._lease is None:  # closed meanwhile
            raise Unavailable(f"the read-only login of {self.key.identity} is closing; retry")
        return self.generation, self._lease

    def opened(self, generation: int) -> None:
        self._open[generation] = self._open.get(generation, 0) + 1

    def closed(self, generation: int) -> None:
        """A connection of ``generation`` is gone: its lease may be revoked now."""
        self._open[generation] = self._open.get(generation, 1) - 1
        self._maybe_revoke(generation)

    async def _new(self) -> None:
        await self.vault.ensure_login()
        lease = await self.vault.creds(self._path)
        if self._closed:  # closed while Vault answered: this lease was never used
            spawn(self._revocations, self._revoke(lease))
            return
        if self._lease is not None:
            self._retired[self.generation] = self._lease
        self._lease = lease
        self.generation += 1
        self._set_end(lease.duration)
        self.rotations += 1
        self._on_rotate()
        for generation in list(self._retired):
            self._maybe_revoke(generation)
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name=f"keyturn-ro-{self.key}")

    async def _fresh(self, deadline: Deadline | None = None) -> None:
        """One lease request at a time; callers wait for it (bounded by ``deadline``), but it
        runs on when they stop waiting, so a lease Vault issued is always recorded."""
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._new())
        if deadline is None:
            await self._renewing
        else:
            await asyncio.wait_for(asyncio.shield(self._renewing), deadline.left())

    def _set_end(self, seconds: float) -> None:
        self._replace_at = time.monotonic() + seconds - min(REPLACE_MARGIN, seconds / 4)

    def _maybe_revoke(self, generation: int) -> None:
        if generation in self._retired and not self._open.get(generation):
            self._open.pop(generation, None)
            spawn(self._revocations, self._revoke(self._retired.pop(generation)))

    async def _revoke(self, lease: Lease) -> None:
        try:
            await self.vault.revoke_lease(lease.lease_id)
        except VaultUnavailable as exc:  # a restart, a failover: upkeep tries again
            log.info("read-only lease of %s not revoked yet: %s", self.key, exc.message)
            self._unrevoked.add(self.key, lease)
        except KeyturnError as exc:
            _not_revoked(self.key, exc.message)

    async def _keep(self) -> None:
        """Renew at 2/3 of the lease; replace it when renewal cannot reach far enough."""
        while True:
            assert self._lease is not None
            await asyncio.sleep(max(self._lease.duration * RENEW_AT, 1.0))
            lease = self._lease
            try:
                granted = await self.vault.renew_lease(
                    lease.lease_id, timedelta(seconds=lease.duration)
                )
                if granted < lease.duration * RENEW_AT:  # the role's max TTL is near
                    await self._fresh()
                elif self._lease is lease:  # not replaced by a connect meanwhile
                    self._set_end(granted)
            except asyncio.CancelledError:
                raise
            except KeyturnError as exc:
                log.warning("read-only lease upkeep for %s failed: %s", self.key, exc.message)
                try:
                    await self._fresh()
                except KeyturnError as again:
                    log.warning("read-only login for %s failed: %s", self.key, again.message)
                    await asyncio.sleep(RETRY_AFTER_FAILURE)
            except Exception:  # never a silently dead upkeep: the lease would just run out
                log.exception("read-only lease upkeep for %s failed unexpectedly", self.key)
                await asyncio.sleep(RETRY_AFTER_FAILURE)

    async def stop(self) -> None:
        """No more leases: upkeep stops, and a lease Vault is issuing now is recorded."""
        self._closed = True
        await cancel(self._keeper)
        self._keeper = None
        if self._renewing is not None:
            await asyncio.gather(self._renewing, return_exceptions=True)

    async def close(self) -> None:
        """Once every connection is closed: revoke the current lease and any retired one."""
        if self._lease is not None:
            self._retired[self.generation] = self._lease
            self._lease = None
            self._maybe_revoke(self.generation)
        while self._revocations:
            await asyncio.gather(*self._revocations, return_exceptions=True)
