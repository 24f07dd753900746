"""Background loops that cannot die silently: started, watched and restarted in one place.

Each process's bootstrap hands its loops to a :class:`Supervisor`. A loop is a *pass* (one
coroutine function call) run every ``period`` seconds, or sooner when its ``wake`` event is
set (a NOTIFY hint; polling stays the guarantee). What a pass can end with:

- success: the next pass after ``period`` (or a wake);
- an *expected* error (:class:`~keyturn.errors.Unavailable`: Postgres, Vault or Slack away
  or out of room, which production meets): a warning, and the next pass after the shared
  backoff. The loop is alive; whether its dependencies are is ``/readyz``'s business;
- anything else: a *crash*. It is logged with its traceback, counted in
  ``keyturn_loop_crashes_total{loop}``, and the next pass comes after the backoff. The loop is
  *down* from its crash until a pass completes; a loop down for longer than its period is
  named by :meth:`Supervisor.down`, and ``/healthz`` answers 503 with it.

A pass never takes its task with it, and the task is watched too: were it to end while the
supervisor runs, it is counted as a crash and started again. Long-running tasks that retry on
their own (the journal, the listener) are *watched* the same way (:meth:`Supervisor.watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from keyturn.backoff import Backoff
from keyturn.errors import Unavailable

log = logging.getLogger(__name__)

FIRST_RETRY = 1.0  # seconds after a failed pass; doubling up to RETRY_CAP
RETRY_CAP = 30.0


@dataclass
class Loop:
    name: str
    step: Callable[[], Awaitable[object]]  # one pass
    period: float  # seconds between passes
    wake: asyncio.Event | None = None  # set to run the next pass early
    retry_cap: float = RETRY_CAP  # seconds between failed passes, at the most
    failing_since: float | None = field(default=None, init=False)  # monotonic, while down
    passes: int = field(default=0, init=False)


class Supervisor:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        expected: tuple[type[BaseException], ...] = (Unavailable,),
    ) -> None:
        self._expected = expected
        self._loops: dict[str, Loop] = {}
        # every task the supervisor keeps going, loops' and watched ones alike: how to start
        # it, and the task now running
        self._starters: dict[str, Callable[[], asyncio.Task[Any]]] = {}
        self._current: dict[str, asyncio.Task[Any]] = {}
        self._running = False
        self.crashes = Counter(
            "keyturn_loop_crashes_total",
            "Unexpected exceptions in a background loop (each was logged with its traceback)",
            ["loop"],
            registry=registry,
        )

    def add(self, loop: Loop) -> Loop:
        self._loops[loop.name] = loop
        self._keep(
            loop.name,
            lambda: asyncio.create_task(self._run(loop), name=f"keyturn-loop-{loop.name}"),
        )
        return loop

    @property
    def loops(self) -> list[Loop]:
        return list(self._loops.values())

    def watch(self, name: str, start: Callable[[], asyncio.Task[Any]]) -> None:
        """A long-running task that handles its own failures: ``start()`` starts it (and
        starts it anew once it has ended). Should it end while the process runs, that is a
        crash like a loop's: logged, counted, and the task started again after
        :data:`FIRST_RETRY`. Its owner stops it; the supervisor only stops restarting it."""
        self._keep(name, start)

    def _keep(self, name: str, start: Callable[[], asyncio.Task[Any]]) -> None:
        if name in self._starters:
            raise ValueError(f"{name} is supervised already")
        self._starters[name] = start
        self.crashes.labels(name)  # the series exists at 0 from the start
        if self._running:
            self._begin(name)

    def start(self) -> None:
        self._running = True
        for name in self._starters:  # in the order given: watched tasks before the loops
            self._begin(name)

    async def stop(self) -> None:
        """Stop the loops (and restarting anything); watched tasks are their owners' to stop."""
        self._running = False
        tasks = [self._current.pop(name) for name in self._loops if name in self._current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def down(self) -> list[str]:
        """Loops that have been down (crashed, no pass completed since) longer than their
        period."""
        now = time.monotonic()
        return sorted(
            loop.name
            for loop in self._loops.values()
            if loop.failing_since is not None and now - loop.failing_since > loop.period
        )

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/healthz`` of the process: 200, or 503 naming the loops :meth:`down`."""
        down = self.down()
        if not down:
            return 200, {"status": "ok"}
        message = f"background loops down: {', '.join(down)}"
        return 503, {"error": {"code": "loops_down", "message": message, "loops": down}}

    def _begin(self, name: str) -> None:
        task = self._starters[name]()
        self._current[name] = task
        task.add_done_callback(lambda done: self._ended(name, done))

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        """A kept task ended: a crash, unless the supervisor is stopping (or the task was
        already replaced); it starts again after :data:`FIRST_RETRY`."""
        if not self._running or self._current.get(name) is not task:
            return
        exc = None if task.cancelled() else task.exception()
        log.error("%s ended (%r); starting it again", name, exc)
        self.crashes.labels(name).inc()
        loop = self._loops.get(name)
        if loop is not None:
            loop.failing_since = loop.failing_since or time.monotonic()
        asyncio.get_running_loop().call_later(FIRST_RETRY, self._restart, name)

    def _restart(self, name: str) -> None:
        if self._running:
            self._begin(name)

    async def _run(self, loop: Loop) -> None:
        backoff = Backoff(FIRST_RETRY, loop.retry_cap)
        while True:
            if loop.wake is not None:
                loop.wake.clear()
            try:
                await loop.step()
            except asyncio.CancelledError:
                raise
            except self._expected as exc:
                wait = backoff.next()
                log.warning("loop %s: %s; next pass in %.1f s", loop.name, exc, wait)
                await asyncio.sleep(wait)
                continue
            except Exception:
                wait = backoff.next()
                self.crashes.labels(loop.name).inc()
                loop.failing_since = loop.failing_since or time.monotonic()
                log.exception("loop %s crashed; next pass in %.1f s", loop.name, wait)
                await asyncio.sleep(wait)
                continue
            loop.passes += 1
            loop.failing_since = None
            backoff.reset()
            await self._rest(loop)

    @staticmethod
    async def _rest(loop: Loop) -> None:
        if loop.wake is None:
            await asyncio.sleep(loop.period)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(loop.period):
                await loop.wake.wait()
