"""Supervised loops: a crash is counted and retried, never the end of the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from keyturn import supervise
from keyturn.errors import Unavailable
from keyturn.supervise import Loop, Supervisor


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervise, "FIRST_RETRY", 0.02)
    monkeypatch.setattr(supervise, "RETRY_CAP", 0.05)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def crashes(supervisor: Supervisor, name: str) -> float:
    return supervisor.crashes.labels(name)._value.get()


class Flaky:
    """A pass that raises ``error`` while ``failing`` is set."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.failing = True
        self.passes = 0

    async def step(self) -> None:
        if self.failing:
            raise self.error
        self.passes += 1


async def test_a_crashing_pass_is_counted_reported_down_and_retried_until_it_recovers() -> None:
    supervisor = Supervisor(CollectorRegistry())
    flaky = Flaky(RuntimeError("a bug"))
    supervisor.add(Loop("flaky", flaky.step, period=0.01))
    supervisor.start()
    try:
        await until(lambda: supervisor.down() == ["flaky"])
        assert crashes(supervisor, "flaky") >= 1
        flaky.failing = False
        await until(lambda: flaky.passes >= 2)  # the same loop, alive again
        assert supervisor.down() == []
    finally:
        await supervisor.stop()


async def test_a_dependency_being_away_is_retried_without_a_crash() -> None:
    supervisor = Supervisor(CollectorRegistry())
    flaky = Flaky(Unavailable("Postgres is away"))
    loop = supervisor.add(Loop("waiting", flaky.step, period=0.01))
    supervisor.start()
    try:
        await asyncio.sleep(0.2)  # several retries
        assert crashes(supervisor, "waiting") == 0 and supervisor.down() == []
        assert loop.failing_since is None
        flaky.failing = False
        await until(lambda: flaky.passes >= 1)
    finally:
        await supervisor.stop()


async def test_a_pass_that_ends_its_own_task_gets_the_loop_started_again() -> None:
    """A stray CancelledError from inside a pass (an inner timeout gone wrong) ends the task
    that runs the loop; the supervisor sees the task end and starts the loop again."""
    supervisor = Supervisor(CollectorRegistry())
    flaky = Flaky(asyncio.CancelledError())
    supervisor.add(Loop("cancelled", flaky.step, period=0.01))
    supervisor.start()
    try:
        await until(lambda: crashes(supervisor, "cancelled") >= 2)
        flaky.failing = False
        await until(lambda: flaky.passes >= 1)
        await until(lambda: supervisor.down() == [])
    finally:
        await supervisor.stop()


async def test_a_wake_runs_the_next_pass_early() -> None:
    supervisor = Supervisor(CollectorRegistry())
    flaky = Flaky(RuntimeError())
    flaky.failing = False
    wake = asyncio.Event()
    supervisor.add(Loop("woken", flaky.step, period=3600, wake=wake))
    supervisor.start()
    try:
        await until(lambda: flaky.passes == 1)
        wake.set()
        await until(lambda: flaky.passes == 2)
    finally:
        await supervisor.stop()


async def test_stopping_ends_every_loop_and_counts_nothing() -> None:
    supervisor = Supervisor(CollectorRegistry())
    flaky = Flaky(RuntimeError())
    flaky.failing = False
    supervisor.add(Loop("steady", flaky.step, period=0.01))
    supervisor.start()
    await until(lambda: flaky.passes >= 1)
    await supervisor.stop()
    passes = flaky.passes
    await asyncio.sleep(0.05)
    assert flaky.passes == passes and crashes(supervisor, "steady") == 0


async def test_a_watched_task_that_ends_is_counted_and_started_again() -> None:
    """The journal and the listener retry on their own; should one end anyway (a bug in its
    own loop), the supervisor sees it, counts it and starts it again."""
    supervisor = Supervisor(CollectorRegistry())
    started: list[asyncio.Task[None]] = []
    running = asyncio.Event()

    async def first_dies_then_runs() -> None:
        if len(started) == 1:
            raise RuntimeError("a bug in the task's own loop")
        running.set()
        await asyncio.Event().wait()

    def start() -> asyncio.Task[None]:
        started.append(asyncio.create_task(first_dies_then_runs()))
        return started[-1]

    supervisor.watch("journal", start)
    supervisor.start()
    try:
        await asyncio.wait_for(running.wait(), 10)
        assert len(started) == 2 and crashes(supervisor, "journal") == 1
    finally:
        await supervisor.stop()
        started[-1].cancel()
    await asyncio.sleep(supervise.FIRST_RETRY * 2)
    assert len(started) == 2  # stopping is not a crash: nothing is started again
