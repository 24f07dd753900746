"""Time, from one place per process.

The store, the bot and the gateway read ``now`` from the :class:`Clock` their bootstrap gives
them (``Store(dsn, clock=...)``), never from the wall clock directly, so a test can move time
forward (:class:`ManualClock`) instead of sleeping through a TTL. Postgres and Vault keep their
own clocks: leases, ``statement_timeout`` and scheduled revocations still run in real time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """The real time, in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock(Clock):
    """Real time plus an offset a test moves: ``advance(timedelta(minutes=5))`` makes five
    minutes pass at once for everything that reads this clock (and nothing else)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, by: timedelta) -> None:
        if by < timedelta(0):
            raise ValueError("time only moves forward")
        self.offset += by
