"""Every grant ends on time: APScheduler date jobs, a sweep behind them, an orphan hunt.

- One ``AsyncIOScheduler`` date job per active grant at ``expires_at``, rebuilt from the
  database at start (overdue grants are revoked at once) and moved when a grant changes
  (every replica hears ``grant:<id>`` notifications, so each schedules every grant).
- A job does not revoke "its" grant alone: it starts a pass over *every* due grant, so a
  thousand grants due in the same second make a few batched passes, not a thousand
  transactions. Passes use ``SKIP LOCKED``: replicas share the work and never revoke twice.
- A periodic sweep (``bot.sweep_interval``) revokes anything overdue a job missed, hand-offs
  no gateway took in time, and orphan leases: leases under the bot's roles that no active
  grant knows (the bot died between Vault and Postgres), once they have been unknown for
  ``bot.orphan_grace``. One-shot grants whose command has run are ended by the bot's own
  pass (:meth:`end_finished`), which runs on every wake-up and poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot.credentials import Issuer
from keyturn.config.process import BotConfig
from keyturn.errors import KeyturnError, NotFound
from keyturn.store import endings, grants
from keyturn.store.db import Store

log = logging.getLogger(__name__)

BATCH = 64
DRAINERS = 3  # grants per pass: small enough that each commit follows its revocations closely


class Revoker:
    def __init__(
        self, store: Store, issuer: Issuer, cfg: BotConfig, scheduler: AsyncIOScheduler
    ) -> None:
        self.store = store
        self.issuer = issuer
        self.cfg = cfg
        self.scheduler = scheduler  # AsyncIOScheduler(timezone=UTC), built by the bootstrap
        self._end_lock = asyncio.Lock()
        self._end_wanted = False
        self._suspects: dict[str, float] = {}  # orphan lease id -> first seen (monotonic)
        self._rebuilt = False

    # ------------------------------------------------------------------ scheduling

    def start(self) -> None:
        """Start the scheduler and the sweep; :meth:`rebuild_once` then adds the grants."""
        self.scheduler.start()
        self.scheduler.add_job(
            self.end_missed,
            "interval",
            seconds=self.cfg.sweep_interval.total_seconds(),
            id="keyturn-sweep",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        self._rebuilt = False

    async def rebuild_once(self) -> None:
        """Once per start (retried until Postgres answers): every grant's job, overdue ones
        revoked at once."""
        if not self._rebuilt:
            await self.reschedule_all()
            self._rebuilt = True

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def schedule(self, grant_id: uuid.UUID, expires_at: datetime) -> None:
        self.scheduler.add_job(
            self.end_due,
            "date",
            run_date=expires_at,
            id=f"grant:{grant_id}",
            replace_existing=True,
            misfire_grace_time=None,  # late is better than never
        )

    def unschedule(self, grant_id: uuid.UUID) -> None:
        job = self.scheduler.get_job(f"grant:{grant_id}")
        if job is not None:
            job.remove()

    def scheduled(self, grant_id: uuid.UUID) -> datetime | None:
        job = self.scheduler.get_job(f"grant:{grant_id}")
        return job.next_run_time if job is not None else None

    async def reschedule_all(self) -> None:
        for grant_id, expires_at in await grants.active_grants(self.store):
            self.schedule(grant_id, expires_at)
        await self.end_due()

    async def on_grant(self, grant_id: uuid.UUID) -> None:
        """A grant was issued, extended or ended (here or on another replica)."""
        try:
            row = await grants.get_grant(self.store, grant_id)
        except NotFound:
            return
        if row.status == "active":
            self.schedule(row.id, row.expires_at)
        else:
            self.unschedule(row.id)

    # ------------------------------------------------------------------ ending

    async def end_due(self) -> None:
        """End every due grant. Concurrent calls coalesce into as few passes as needed; a
        pass runs a few drainers side by side (``SKIP LOCKED`` gives each its own batches) so
        Vault stays busy while a batch commits."""
        self._end_wanted = True
        async with self._end_lock:
            while self._end_wanted:
                self._end_wanted = False
                await asyncio.gather(*(self._end(endings.Ending.DUE) for _ in range(DRAINERS)))

    async def _end(self, which: endings.Ending) -> int:
        """End grants of one kind in batches until a batch comes back short."""
        ended = 0
        while True:
            batch = await endings.end_grants(self.store, which, self.issuer.revoke, limit=BATCH)
            ended += len(batch)
            for row in batch:
                self.unschedule(row.id)
            if len(batch) < BATCH:
                return ended

    async def end_missed(self) -> None:
        """The guarantee behind the jobs; each part is logged and retried on the next pass."""
        for part in (
            self.end_due,
            lambda: self._end(endings.Ending.UNCLAIMED),
            lambda: endings.fail_stranded(self.store, self.cfg.stranded_after),
            self.revoke_orphans,
        ):
            try:
                await part()
            except (KeyturnError, OSError) as exc:
                log.warning("revocation sweep: %s", exc)

    async def end_finished(self) -> int:
        """One-shot grants whose command has run: revoke them now."""
        return await self._end(endings.Ending.FINISHED)

    async def revoke_orphans(self) -> list[str]:
        """Revoke leases under the bot's roles that no active grant has known for a while."""
        vault = self.issuer.vault
        await vault.ensure_login()
        found: list[str] = []
        for prefix in self.issuer.lease_prefixes():
            try:
                found += await vault.lease_ids(prefix)
            except NotFound:
                continue
        unknown = set(found) - await grants.known_leases(self.store, found)
        now = time.monotonic()
        self._suspects = {lease: self._suspects.get(lease, now) for lease in unknown}
        grace = self.cfg.orphan_grace.total_seconds()
        orphans = sorted(lease for lease, seen in self._suspects.items() if now - seen >= grace)
        revoked = []
        for lease in orphans:
            try:
                await vault.revoke_lease(lease)
            except KeyturnError as exc:
                log.warning("could not revoke orphan lease %s: %s", lease, exc)
                continue
            revoked.append(lease)
            del self._suspects[lease]
        if revoked:
            log.warning("revoked %d orphan lease(s) no grant knew: %s", len(revoked), revoked)
            await grants.record_orphans(self.store, revoked)
        return revoked
