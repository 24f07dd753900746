"""The one retry shape: doubling from ``first``, never above ``cap``, jittered, reset by a
success."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keyturn.backoff import Backoff


@given(
    first=st.floats(0.01, 10),
    cap=st.floats(0.01, 100),
    failures=st.integers(1, 200),
)
def test_every_wait_is_jittered_below_its_ceiling_and_the_cap(
    first: float, cap: float, failures: int
) -> None:
    backoff = Backoff(first, cap)
    for attempt in range(failures):
        ceiling = min(cap, first * 2**attempt)
        assert ceiling / 2 <= backoff.next() <= ceiling


def test_waits_double_then_stay_at_the_cap_and_a_reset_starts_over() -> None:
    backoff = Backoff(1.0, 30.0)
    ceilings = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        backoff.next()
    assert ceilings == [1, 2, 4, 8, 16, 30, 30, 30]
    backoff.reset()
    assert backoff.ceiling() == 1.0


def test_thousands_of_failures_never_overflow() -> None:
    backoff = Backoff(0.25, 5.0)
    waits = [backoff.next() for _ in range(5000)]
    assert max(waits) <= 5.0 and min(waits[20:]) >= 2.5


def test_waits_differ_between_replicas() -> None:
    """Jitter: two replicas that failed together do not retry at the same instant."""
    waits = {Backoff(1.0, 30.0, attempt=3).next() for _ in range(20)}
    assert len(waits) > 1
