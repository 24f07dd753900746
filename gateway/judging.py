"""Where the gateway judges commands: a few worker threads, never the event loop.

An agent chooses its command and so the CPU that judging it costs (parsing, lineage, printing
back, argv matching; each bounded by :mod:`keyturn.classify.budget`). On the event loop that
time would stall every other agent, ``/healthz`` and the background loops. In a small pool of
its own it only queues other judgements: at most :data:`JUDGES` threads contend with the loop
for the interpreter, whatever number of agents send adversarial commands at once. And each
agent identity is judged one command at a time (:class:`Turns`): one agent sending costly
commands from many connections waits for itself, not in front of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

JUDGES = 2
_POOL = ThreadPoolExecutor(max_workers=JUDGES, thread_name_prefix="keyturn-judge")

P = ParamSpec("P")
R = TypeVar("R")


async def judged(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` in the judging pool, with the caller's context variables."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_POOL, call)


class Turns:
    """One judgement at a time per agent identity; a lock lives while someone holds or
    waits for it (a weak map: idle identities cost nothing)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    @contextlib.asynccontextmanager
    async def turn(self, subject: str) -> AsyncIterator[None]:
        lock = self._locks.get(subject)
        if lock is None:
            lock = self._locks[subject] = asyncio.Lock()
        async with lock:
            yield
