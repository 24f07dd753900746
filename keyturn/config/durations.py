"""Durations as the policy file writes them (``90s``, ``10m``, ``1h30m``, ``2d``, ``500ms``)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import (
    BeforeValidator,
)

LONGEST = timedelta(days=3650)  # any duration past this is a typo (and past timedelta's range)


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")


def parse_duration(value: object) -> timedelta:
    """``90``, ``"90s"``, ``"10m"``, ``"1h30m"``, ``"2d"``, ``"500ms"`` -> a positive timedelta."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and value.strip() and (m := _DURATION.match(value.strip())):
        d, h, mi, s, ms = (int(x or 0) for x in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s + ms / 1000
    else:
        raise ValueError(f"expected a duration such as 30s, 10m, 1h or 2d, got {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > LONGEST.total_seconds():
        raise ValueError(f"{value!r} is longer than {LONGEST.days} days: surely a mistake")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def format_duration(duration: timedelta) -> str:
    """``1h30m`` for 5400 s: durations as they are typed in this file and in Slack."""
    minutes, seconds = divmod(int(duration.total_seconds()), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    units = ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s"))
    return "".join(f"{v}{u}" for v, u in units if v) or "0s"
