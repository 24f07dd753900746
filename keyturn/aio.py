"""Small asyncio helpers shared by the long-running tasks of every process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has stopped (None is fine)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def spawn(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Start ``coro`` in the background, held in ``tasks`` until it is done.

    The event loop keeps only weak references to tasks: one nobody holds can vanish mid-run.
    """
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


async def drain(tasks: set[asyncio.Task[Any]], timeout: float) -> None:
    """Let the work in ``tasks`` finish (work may start more), then cancel what is left.

    A stopping process drains before it closes its store and clients: a decision committed a
    moment ago still gets its card and its credentials, and nothing runs on a closed pool.
    """
    deadline = time.monotonic() + timeout
    while pending := {t for t in tasks if not t.done() and t is not asyncio.current_task()}:
        left = deadline - time.monotonic()
        if left <= 0:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return
        await asyncio.wait(pending, timeout=left)


class Deadline:
    """Seconds left of one command's time; every call under it gets what remains."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def left(self) -> float:
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left
