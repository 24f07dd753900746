"""How many allowed commands each agent has running: a bound on what one agent can occupy."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.metrics import Metrics
from keyturn.errors import RateLimited


class InFlight:
    """Allowed commands running per agent identity; rate-limited past ``agent_concurrency``."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self._limit = limit
        self._metrics = metrics
        self._running: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def admit(self, identity: str) -> AsyncIterator[None]:
        running = self._running.get(identity, 0)
        if running >= self._limit:
            self._metrics.commands.labels("rejected").inc()
            raise RateLimited(
                f"{identity} already has {running} allowed commands running (the limit is "
                f"{self._limit}); retry when one has finished",
                retry_after=1.0,
            )
        self._running[identity] = running + 1
        try:
            yield
        finally:
            left = self._running[identity] - 1
            if left:
                self._running[identity] = left
            else:
                del self._running[identity]
