"""The one retry shape keyturn uses: capped exponential backoff with jitter.

Every loop that waits out a failure (the listener's reconnects, Vault logins, the gateway's
unwrap and journal, the bot's loop and credential issuance, the agent client) waits
``first * 2**attempt``, at most ``cap``, times a jitter in [0.5, 1]: replicas that lost the
same dependency do not come back in step, and no wait exceeds its cap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    first: float
    cap: float
    attempt: int = 0

    def ceiling(self, attempt: int | None = None) -> float:
        """The longest the wait after ``attempt`` (default: the next) can be."""
        n = self.attempt if attempt is None else attempt
        return min(self.cap, self.first * 2.0 ** min(n, 64))

    def next(self) -> float:
        """The next wait, in seconds; each call counts as one more failure."""
        wait = self.ceiling() * random.uniform(0.5, 1.0)  # noqa: S311 (jitter, not a secret)
        self.attempt += 1
        return wait

    def reset(self) -> None:
        """After a success: the next failure waits ``first`` again."""
        self.attempt = 0
