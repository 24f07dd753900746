"""Recordings in the store: each step's written with the change it records (the journal's
statement, or the unit of work ending an approved run), read back, and outputs deleted by
retention. :mod:`keyturn.store.recording_checks` holds them against the audit chain.

A step is a request (its row says what was asked, who decided and how it ended) or a blocked
command (no request row: its recording alone, with its command). The recording keeps the
output as the agent saw it (:mod:`keyturn.recording.output`); the audit event that ended the
step carries the recording's hash.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, get_args

from keyturn.recording.output import Kept, Recording
from keyturn.store.audit_log import Event
from keyturn.store.db import Store
from keyturn.store.models import RecordingRow


def output_event(recording: Recording | None) -> dict[str, Any]:
    """What the audit event ending a step says of its output (nothing when none is kept)."""
    return {} if recording is None else {"output": recording.as_event()}


def recording_json(
    recording: Recording,
    *,
    request_id: uuid.UUID | None,
    agent: str | None = None,
    run_id: str | None = None,
    target: str | None = None,
    command: str | None = None,
    rule: str | None = None,
    outcome: bool = False,
) -> dict[str, Any]:
    """A recording as the journal's statement reads it (``outcome``: written only if the
    completion it belongs to changed its request; agent, run and target then come from it)."""
    return {
        "step_id": str(recording.step),
        "request_id": str(request_id) if request_id else None,
        "agent": agent,
        "run_id": run_id,
        "target": target,
        "command": command,
        "rule": rule,
        "kept": recording.kept,
        "output": recording.text,
        "output_bytes": recording.bytes,
        "output_sha256": recording.sha256,
        "truncated": recording.truncated,
        "stored_sha256": recording.stored_sha256,
        "outcome": outcome,
    }


def recording_row(recording: Recording, *, request_id: uuid.UUID) -> RecordingRow:
    """A request's recording, added in the unit of work that ends the request."""
    return RecordingRow(
        step_id=recording.step,
        request_id=request_id,
        kept=recording.kept,
        output=recording.text,
        output_bytes=recording.bytes,
        output_sha256=recording.sha256,
        truncated=recording.truncated,
        stored_sha256=recording.stored_sha256,
    )


# The step an audit event vouches for (its ``data.output.step``): how verify and evidence find
# the event that ended a step.
VOUCHED_STEP = "data -> 'output' ->> 'step'"


def recording_of(row: Mapping[str, Any], text: str | None) -> Recording:
    """A recording as stored (``text``: its output, when read)."""
    kept = row["kept"]
    if kept not in get_args(Kept):
        raise ValueError(f"unknown recording kind {kept!r}")
    return Recording(
        row["step_id"],
        kept,
        text,
        row["output_bytes"],
        row["output_sha256"],
        row["truncated"],
        row["stored_sha256"],
    )


async def purge(store: Store, retention: timedelta, *, batch: int = 1000) -> int:
    """Delete outputs older than ``retention`` (their hashes stay), in batches; the purge is
    an audit event, so ``verify`` can tell it from an output deleted by hand."""
    before = store.clock.now() - retention
    deleted = 0
    while True:
        async with store.transaction() as tx:
            conn = await tx.raw_connection()
            count = len(
                await conn.fetch(
                    "UPDATE recordings SET output = NULL, purged_at = $2 WHERE step_id IN ("
                    " SELECT step_id FROM recordings WHERE output IS NOT NULL AND at < $1"
                    " ORDER BY at LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING step_id",
                    before,
                    tx.now,
                    batch,
                )
            )
            if count:
                tx.record(
                    Event(
                        "recording.purged",
                        "keyturn",
                        data={"before": before.isoformat(), "outputs": count},
                    )
                )
        deleted += count
        if count < batch:
            return deleted
