"""A work budget for judging one command: every analysis spends from it, none runs unbounded.

An agent chooses the command, so it chooses how much work judging it takes. Each analysis
(the parse-tree walk, lineage, printing back, argv matching) is meant to be linear, and each
also spends from one shared budget per command: a shape nobody foresaw that makes one of them
superlinear ends as ``too_complex`` (400) after a bounded amount of work, never as a
gateway busy for seconds or a hold that a human would have to read. A unit is about one
node visited or one name compared; :data:`WORK_LIMIT` is sized so that a spent budget is well
under half a second of CPU (``bench/complexity.py`` prints the figures).

The budget lives in a context variable, so nested entry points (``classify`` calls
``read_plan``, which calls ``lineage``) share one, and ``asyncio.to_thread`` carries it along.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from keyturn.errors import TooComplex

WORK_LIMIT = 200_000

_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "keyturn_budget", default=None
)


class Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0

    def spend(self, units: int) -> None:
        self.spent += units
        if self.spent > self.limit:
            raise TooComplex(
                "the command takes more work to judge than keyturn allows; split it up or "
                "simplify it"
            )


@contextlib.contextmanager
def budget(limit: int = WORK_LIMIT) -> Iterator[Budget]:
    """The budget in force: the caller's, if it already has one, else a new one of ``limit``."""
    found = _current.get()
    if found is not None:
        yield found
        return
    fresh = Budget(limit)
    token = _current.set(fresh)
    try:
        yield fresh
    finally:
        _current.reset(token)


def spend(units: int = 1) -> None:
    """Spend from the budget in force. Every entry point opens one (:func:`budget`)."""
    found = _current.get()
    if found is not None:
        found.spend(units)
