"""A command an agent submitted, as every use case receives it from an edge, and its records."""

from __future__ import annotations

import asyncio
import functools
import uuid
from dataclasses import dataclass
from typing import Any

from keyturn.classify import Identity, Verdict
from keyturn.config.process import RecordConfig
from keyturn.recording.output import Recording, make_recording
from keyturn.store import outcomes


@dataclass(frozen=True)
class Submission:
    target: str
    command: str
    reason: str | None
    run_id: str | None
    body_sha256: str  # of what the agent sent: a replayed Idempotency-Key must match it
    idempotency_key: str | None = None
    as_http: bool = False  # sent in the http field, as an API call (for an HTTP target only)


def classification(verdict: Verdict) -> dict[str, Any]:
    """What is stored (and audited) of a verdict: kinds, reasons, and what shadow rules
    would have done."""
    out: dict[str, Any] = {"kinds": sorted(verdict.kinds), "reasons": verdict.reasons}
    if verdict.shadow:
        out["shadow"] = [{"rule": rule, "action": action} for rule, action in verdict.shadow]
    return out


def outcome(
    sub: Submission, who: Identity, verdict: Verdict, *, status: str, **extra: Any
) -> outcomes.Outcome:
    """The record of a command the gateway decides alone (blocked, or allowed and run)."""
    return outcomes.Outcome(
        id=uuid.uuid4(),
        target=sub.target,
        command=sub.command,
        requester=who.subject,
        status=status,
        rule=verdict.rule.name if verdict.rule else None,
        classification=classification(verdict),
        on_behalf_of=who.on_behalf_of,
        run_id=sub.run_id,
        reason=sub.reason,
        **extra,
    )


LARGE_ROWS = 200  # results with more rows are encoded in a worker thread
LARGE_BYTES = 64 * 1024  # and API answers of more bytes


def large(rows: int, size: int) -> bool:
    """Whether encoding a result of ``rows`` rows or an API answer of ``size`` bytes would
    hold the event loop long enough to matter (a 16 MiB answer: a second)."""
    return rows > LARGE_ROWS or size > LARGE_BYTES


async def recording_for(
    config: RecordConfig,
    step: uuid.UUID,
    output: dict[str, Any],
    timing: list[Any] | None = None,
) -> Recording:
    """What the step's run keeps of ``output`` (its ``sha256`` is the request's
    ``result_digest``) and of a driver's ``timing``; in a worker thread for a large output."""
    keep = functools.partial(
        make_recording, step, output, kept=config.outputs, cap=config.output_bytes, timing=timing
    )
    if large(len(output.get("rows") or ()), _size_guess(output)):
        return await asyncio.to_thread(keep)
    return keep()


def _size_guess(output: dict[str, Any]) -> int:
    """An output's size without encoding it: its strings, and 16 bytes a cell (a wide result
    of few rows is as costly as a long one)."""
    text = sum(len(v) for v in output.values() if isinstance(v, str))
    rows = output.get("rows") or ()
    cells = len(rows) * len(output.get("columns") or ())
    return max(int(output.get("bytes") or 0), text + 16 * cells)
