"""Per-identity token buckets (per gateway process; with N replicas the limit is N times this)."""

from __future__ import annotations

import time
from collections import OrderedDict

from keyturn.errors import RateLimited

MAX_TRACKED = 100_000


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def check(self, key: str, now: float | None = None) -> None:
        """Take one token for ``key`` or raise RateLimited with the seconds until one is free."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self._rate
            raise RateLimited(
                f"too many requests for {key}; retry in {wait:.1f}s", retry_after=wait
            )
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
