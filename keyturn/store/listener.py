"""One LISTEN connection per process that wakes whoever waits on a row.

A notification is only a hint: waiters re-read the row. Polling is the guarantee: every wait is
bounded by the caller's poll interval, so a lost notification or a dropped connection costs at
most one interval. The connection lives outside the SQLAlchemy pool, is probed with
``SELECT 1`` after quiet periods, and is re-established with capped, jittered backoff. After
each reconnect every waiter is woken, because notifications sent meanwhile are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from keyturn.aio import cancel
from keyturn.backoff import Backoff
from keyturn.store.audit_log import NOTIFY_CHANNEL
from keyturn.store.dsn import Dsn

log = logging.getLogger(__name__)

Callback = Callable[[str, str], None]
T = TypeVar("T")


class Watch:
    """One waiter's interest in a row, woken by notifications, reconnects and pollers.

    Deliberately small (a long-poll holds one for up to minutes, thousands at a time): a flag
    and a future, no Event, no task.
    """

    __slots__ = ("_flag", "_future", "_key", "_registry")

    def __init__(self, registry: dict[str, set[Watch]], key: str) -> None:
        self._registry = registry
        self._key = key
        self._flag = False
        self._future: asyncio.Future[None] | None = None

    def __enter__(self) -> Watch:
        self._registry[self._key].add(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        watches = self._registry.get(self._key)
        if watches is not None:
            watches.discard(self)
            if not watches:
                del self._registry[self._key]

    def set(self) -> None:
        self._flag = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """True if woken (now or since the last wait), False when ``timeout`` passed."""
        if not self._flag:
            self._future = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    await self._future
            except TimeoutError:
                return False
            finally:
                self._future = None
        self._flag = False
        return True


class Listener:
    def __init__(
        self,
        dsn: Dsn,
        *,
        channel: str = NOTIFY_CHANNEL,
        probe_after: float = 30.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._probe_after = probe_after
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._waiters: dict[str, set[Watch]] = defaultdict(set)
        self._subscribers: list[Callback] = []
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.connected = asyncio.Event()
        self.connects = 0  # how many times a LISTEN connection was established
        self.failures = 0  # connections that failed or were lost
        self.last_wait = 0.0  # seconds of the last backoff before reconnecting

    # ------------------------------------------------------------ waiting side

    def watch(self, kind: str, ident: object) -> Watch:
        """``with listener.watch("request", id) as change:`` then ``await change.wait(t)``.

        Enter before reading the row, so a change between the read and the wait is not missed.
        """
        return Watch(self._waiters, f"{kind}:{ident}")

    def subscribe(self, callback: Callback) -> None:
        """Call ``callback(kind, ident)`` for every notification; ``("*", "")`` after reconnects."""
        self._subscribers.append(callback)

    @property
    def waiting(self) -> int:
        return sum(len(watches) for watches in self._waiters.values())

    def watched(self, kind: str) -> list[str]:
        """Idents of ``kind`` someone is waiting on (for a batch poller)."""
        prefix = f"{kind}:"
        return [key[len(prefix) :] for key in self._waiters if key.startswith(prefix)]

    def wake(self, kind: str, ident: str) -> None:
        """Wake watchers of one row, as a notification would (used by pollers)."""
        for watch in self._waiters.get(f"{kind}:{ident}", ()):
            watch.set()

    def _dispatch(self, kind: str, ident: str) -> None:
        self.wake(kind, ident)
        for callback in self._subscribers:
            try:
                callback(kind, ident)
            except Exception:
                log.exception("listener subscriber failed on %s:%s", kind, ident)

    def _wake_all(self) -> None:
        for watches in self._waiters.values():
            for watch in watches:
                watch.set()
        for callback in self._subscribers:
            try:
                callback("*", "")
            except Exception:
                log.exception("listener subscriber failed on reconnect")

    # ------------------------------------------------------------ connection side

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        kind, _, ident = payload.partition(":")
        self._dispatch(kind, ident)

    def _on_termination(self, _conn: Any) -> None:
        self._lost.set()

    def start(self) -> asyncio.Task[None]:
        """Start listening (again, if the task ended); the process's supervisor watches it."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="keyturn-listener")
        return self._task

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn.url,
                    server_settings={"application_name": "keyturn-listener"},
                    timeout=10,
                    **self._dsn.connect_args,
                )
                self._lost.clear()
                conn.add_termination_listener(self._on_termination)
                await conn.add_listener(self._channel, self._on_notify)
                self.connects += 1
                self.connected.set()
                backoff.reset()
                if self.connects > 1:
                    log.info("listener reconnected to %s", self._dsn.redacted)
                    self._wake_all()
                await self._hold(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the listener die: log, back off, retry
                log.warning("listener connection to %s lost: %s", self._dsn.redacted, exc)
                self.failures += 1
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            self.last_wait = backoff.next()
            await asyncio.sleep(self.last_wait)

    async def _hold(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is gone: terminated, or silent and failing a probe."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=self._probe_after)
            if self._lost.is_set() or conn.is_closed():
                return
            await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=10)


async def wait_until(
    listener: Listener,
    kind: str,
    ident: object,
    read: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    timeout: float,
    poll_interval: float = 2.0,
) -> T:
    """Re-read a row until ``done(row)`` or ``timeout``; returns the last read.

    Woken early by a notification for ``<kind>:<ident>``; otherwise re-reads every
    ``poll_interval`` seconds, so it works even when no notification ever arrives.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with listener.watch(kind, ident) as change:
        row = await read()
        while not done(row):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            del row  # not held while waiting: thousands of long-polls may wait at once
            await change.wait(min(poll_interval, remaining))
            row = await read()
        return row
