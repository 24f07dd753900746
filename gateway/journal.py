"""Group commit for the fast path's records.

Allowed and blocked commands are recorded (request row, audit event) by one task that writes
everything queued so far in a single transaction, so under load many commands share a commit
instead of queueing on the audit chain's head lock one by one.

``record`` returns once its record is committed (the caller waits: no unrecorded access).
``submit`` queues without waiting (a completion whose access is already recorded); when a
commit fails, such records are kept and retried with backoff, never dropped, until the queue
limit is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from keyturn.aio import cancel
from keyturn.store import operations as ops
from keyturn.store.db import Store

log = logging.getLogger(__name__)
Record = ops.Outcome | ops.Completion


def _refused(exc: Exception) -> bool:
    """The database rejected the data itself (not the connection): retrying will not help."""
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(
        exc, asyncpg.PostgresConnectionError
    )


class Journal:
    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 500,
        max_backlog: int = 100_000,
        linger: float = 0.05,
    ) -> None:
        self._store = store
        self._linger = linger
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._queue: asyncio.Queue[tuple[Record, asyncio.Future[None] | None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.commits = 0

    async def record(self, record: Record) -> None:
        """Returns once ``record`` is committed; raises what the commit raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((record, future))
        await future

    def submit(self, record: Record) -> None:
        if self._queue.qsize() >= self._max_backlog:
            log.error("journal backlog full; dropping a completion record for %s", record.id)
            return
        self._queue.put_nowait((record, None))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keyturn-journal")

    async def stop(self) -> None:
        """Flush what is queued (briefly), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._queue.join()
        await cancel(self._task)
        self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _commit(self, records: list[Record]) -> None:
        """One transaction on the journal's own connection (re-made after a failure)."""
        if self._conn is None or self._conn.is_closed():
            dsn = self._store.dsn
            self._conn = await asyncpg.connect(
                dsn.url,
                server_settings={"application_name": "keyturn-journal"},
                **dsn.connect_args,
            )
        try:
            await ops.write_outcomes(self._conn, records)  # one statement: atomic by itself
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
            self._conn.terminate()
            self._conn = None
            raise

    async def _run(self) -> None:
        delay = 0.1
        while True:
            batch = await self._next_batch()
            try:
                await self._commit([record for record, _ in batch])
            except Exception as exc:
                if _refused(exc):
                    # the database refused a record: one bad record must not fail the others
                    await self._one_by_one(batch)
                    continue
                delay = await self._failed(batch, exc, delay)
                continue
            delay = 0.1
            self._committed(batch)

    def _committed(self, batch: list[tuple[Record, asyncio.Future[None] | None]]) -> None:
        self.commits += 1
        self._done(len(batch))
        for _, future in batch:
            if future is not None and not future.done():
                future.set_result(None)

    async def _failed(
        self, batch: list[tuple[Record, asyncio.Future[None] | None]], exc: Exception, delay: float
    ) -> float:
        """Waiters get the error; completions are queued again after a backoff."""
        self._done(len(batch))
        log.warning("journal commit of %d records failed: %s", len(batch), exc)
        for record, future in batch:
            if future is None:
                self._queue.put_nowait((record, None))  # retried after the backoff
            elif not future.done():
                future.set_exception(exc)
        await asyncio.sleep(delay)
        return min(delay * 2, 5.0)

    async def _one_by_one(self, batch: list[tuple[Record, asyncio.Future[None] | None]]) -> None:
        for item in batch:
            try:
                await self._commit([item[0]])
            except Exception as exc:
                if not _refused(exc):
                    await self._failed([item], exc, 0.1)
                    continue
                self._done(1)
                log.error("journal record %s refused by the database: %s", item[0].id, exc)
                if item[1] is not None and not item[1].done():
                    item[1].set_exception(exc)
                # a completion the database refuses would be refused forever: not retried
                continue
            self._committed([item])

    async def _next_batch(self) -> list[tuple[Record, asyncio.Future[None] | None]]:
        """Everything queued; completions alone wait up to ``linger`` for a record to ride with.

        Nobody waits on a completion, so committing it on its own would only delay the next
        command's commit; riding along with that commit costs nothing.
        """
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if any(future is not None for _, future in batch) or loop.time() >= deadline:
                break
            try:
                async with asyncio.timeout_at(deadline):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    def _done(self, count: int) -> None:
        for _ in range(count):
            self._queue.task_done()
