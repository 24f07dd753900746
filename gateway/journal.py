"""Group commit for the fast path's records.

Allowed and blocked commands are recorded (request row, audit event) by one task that writes
everything queued so far in a single statement, so under load many commands share a commit
instead of queueing on the audit chain's head lock one by one.

``record`` returns once its record is committed: an allowed command waits for it before it
runs. ``submit`` queues a record nobody waits for (the outcome of a command already recorded).
Waited-for records go first and alone: submitted ones wait up to ``linger`` and then ride
along with the next commit, so the commit a command waits for carries no one else's
bookkeeping unless that has waited long enough. When a commit fails, submitted records are
kept and retried with backoff, never dropped until ``max_backlog``; one the database refuses
outright fails alone (its batch is retried one record at a time).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import asyncpg

from keyturn.aio import cancel
from keyturn.backoff import Backoff
from keyturn.errors import Conflict
from keyturn.store import outcomes
from keyturn.store.db import Store

log = logging.getLogger(__name__)
Record = outcomes.Outcome | outcomes.Completion
Waited = tuple[Record, asyncio.Future[None] | None]


CONNECT_TIMEOUT = 5.0
COMMIT_TIMEOUT = 10.0


class AlreadyRecorded(Conflict):
    """A record with this request's Idempotency-Key exists already (a concurrent twin won)."""

    code = "already_recorded"


def _as_waited(exc: Exception) -> Exception:
    """What a waiter is told of a record the database refused: a duplicate key by name."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AlreadyRecorded("a request with this Idempotency-Key is recorded already")
    return exc


def _refused(exc: Exception) -> bool:
    """The database rejected the data itself (a data exception or an integrity violation):
    retrying will not help. Anything else — lost connections, too many clients, shutdowns,
    cancels, deadlocks — is transient."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in ("22", "23")


class Journal:
    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 500,
        max_backlog: int = 100_000,
        linger: float = 0.05,
        run_gap: timedelta = timedelta(minutes=15),
    ) -> None:
        self._store = store
        self._run_gap = run_gap  # record.run_gap: how steps without a run_id make runs
        self._linger = linger
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._waited: list[Waited] = []
        self._submitted: list[Record] = []
        self._committing = 0  # records taken from the queues, their commit under way
        self._oldest = 0.0  # loop time the oldest submitted record arrived
        self._flushing = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.commits = 0

    async def record(self, record: Record) -> None:
        """Returns once ``record`` is committed; raises what the commit raised."""
        await self.enqueue(record)

    def enqueue(self, record: Record) -> asyncio.Future[None]:
        """Queue ``record`` for the next commit; the future is done once it is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waited.append((record, future))
        self._wake.set()
        return future

    def submit(self, record: Record) -> None:
        if len(self._submitted) >= self._max_backlog:
            log.error("journal backlog full; dropping a completion record for %s", record.id)
            return
        if not self._submitted:
            self._oldest = asyncio.get_running_loop().time()
        self._submitted.append(record)
        self._wake.set()

    def start(self) -> asyncio.Task[None]:
        """Start committing (again, if the task ended); the process's supervisor watches it."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="keyturn-journal")
        return self._task

    def pending(self) -> int:
        return len(self._waited) + len(self._submitted) + self._committing

    async def stop(self) -> None:
        """Flush what is queued (for up to 5 s), then stop."""
        if self._task is None:
            return
        self._flushing = True
        self._wake.set()
        for _ in range(500):
            if not self.pending():
                break
            await asyncio.sleep(0.01)
        if self.pending():
            log.error("journal stopped with %d records not committed", self.pending())
        await cancel(self._task)
        self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _commit(self, records: list[Record]) -> None:
        """One statement on the journal's own connection (re-made after a failure)."""
        if self._conn is None or self._conn.is_closed():
            dsn = self._store.dsn
            self._conn = await asyncpg.connect(
                dsn.url,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMIT_TIMEOUT,
                server_settings={"application_name": "keyturn-journal"},
                **dsn.connect_args,
            )
        try:
            await outcomes.write_outcomes(self._conn, records, self._run_gap)  # one statement
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
            self._conn.terminate()
            self._conn = None
            raise

    async def _run(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            batch = await self._next_batch()
            self._committing = len(batch)
            try:
                await self._commit([record for record, _ in batch])
            except Exception as exc:
                if _refused(exc):
                    # the database refused a record: one bad record must not fail the others
                    await self._one_by_one(batch)
                else:
                    await self._failed(batch, exc, backoff.next())
                continue
            finally:
                self._committing = 0
            backoff.reset()
            self._committed(batch)

    async def _next_batch(self) -> list[Waited]:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = bool(self._submitted) and (
                self._flushing
                or now - self._oldest >= self._linger
                or len(self._submitted) >= self._max_batch
            )
            if self._waited or due:
                batch = self._waited[: self._max_batch]
                del self._waited[: len(batch)]
                if due:
                    room = self._max_batch - len(batch)
                    batch += [(record, None) for record in self._submitted[:room]]
                    del self._submitted[:room]
                    if self._submitted:  # what did not fit is due at once next time
                        self._oldest = now - self._linger
                return batch
            self._wake.clear()
            timeout = self._oldest + self._linger - now if self._submitted else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _committed(self, batch: list[Waited]) -> None:
        self.commits += 1
        for _, future in batch:
            if future is not None and not future.done():
                future.set_result(None)

    async def _failed(self, batch: list[Waited], exc: Exception, delay: float) -> None:
        """Waiters get the error; submitted records are kept for after a backoff."""
        log.warning("journal commit of %d records failed: %s", len(batch), exc)
        for record, future in batch:
            if future is None:
                self.submit(record)
            elif not future.done():
                future.set_exception(exc)
        await asyncio.sleep(delay)

    async def _one_by_one(self, batch: list[Waited]) -> None:
        for i, item in enumerate(batch):
            try:
                await self._commit([item[0]])
            except Exception as exc:
                if not _refused(exc):  # the database went away meanwhile: the rest waits
                    await self._failed(batch[i:], exc, 0.1)
                    return
                log.error("journal record %s refused by the database: %s", item[0].id, exc)
                if item[1] is not None and not item[1].done():
                    item[1].set_exception(_as_waited(exc))
                # a submitted record the database refuses would be refused forever: dropped
                continue
            self._committed([item])
