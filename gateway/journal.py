"""Group commit for the fast path's records.

Allowed and blocked commands must be recorded (request row, audit event) before the agent gets
its answer, but one transaction per command would serialize the gateway on the audit chain's
head lock. Callers put a record in and await it; one task writes everything queued so far in a
single transaction and then releases all of them, so under load many commands share a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from keyturn.store import operations as ops
from keyturn.store.db import Store

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, store: Store, *, max_batch: int = 500) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[ops.Outcome, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.commits = 0

    async def record(self, outcome: ops.Outcome) -> None:
        """Returns once ``outcome`` is committed; raises what the commit raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((outcome, future))
        await future

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keyturn-journal")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await ops.record_outcomes(self._store, [outcome for outcome, _ in batch])
                self.commits += 1
            except Exception as exc:  # every waiter hears about the failure
                log.warning("journal commit of %d records failed: %s", len(batch), exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
