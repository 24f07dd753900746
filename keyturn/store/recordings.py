"""Runs in the store: each step's recording written with the change it records, an agent's
steps read back in order, outputs deleted by retention, and recordings checked against the
audit chain.

A step is a request (its row says what was asked, who decided and how it ended) or a blocked
command (no request row: its recording alone, with its command). The recording keeps the
output as the agent saw it (:mod:`keyturn.recording.output`); the audit event that ended the
step carries the recording's hash.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from keyturn.recording.output import Recorded, record_hash
from keyturn.store.audit_log import Event
from keyturn.store.db import Store
from keyturn.store.models import RecordingRow


def output_event(recorded: Recorded | None) -> dict[str, Any]:
    """What the audit event ending a step says of its output (nothing when none is kept)."""
    return {} if recorded is None else {"output": recorded.as_event()}


def recording_json(
    recorded: Recorded,
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
        "step_id": str(recorded.step),
        "request_id": str(request_id) if request_id else None,
        "agent": agent,
        "run_id": run_id,
        "target": target,
        "command": command,
        "rule": rule,
        "kept": recorded.kept,
        "output": recorded.text,
        "output_bytes": recorded.bytes,
        "output_sha256": recorded.sha256,
        "truncated": recorded.truncated,
        "stored_sha256": recorded.stored_sha256,
        "record_hash": recorded.record,
        "outcome": outcome,
    }


def recording_row(
    recorded: Recorded, *, request_id: uuid.UUID, agent: str, run_id: str | None, target: str
) -> RecordingRow:
    """A request's recording, added in the unit of work that ends the request."""
    return RecordingRow(
        step_id=recorded.step,
        request_id=request_id,
        agent=agent,
        run_id=run_id,
        target=target,
        kept=recorded.kept,
        output=recorded.text,
        output_bytes=recorded.bytes,
        output_sha256=recorded.sha256,
        truncated=recorded.truncated,
        stored_sha256=recorded.stored_sha256,
        record_hash=recorded.record,
    )


# Recordings as the chain vouches for them: each one's event (by the step it names), the
# sha256 of its kept text as Postgres computes it, and the newest purge's cut-off.
_VOUCHED = """
SELECT k.step_id, k.kept, k.output_bytes, k.output_sha256, k.truncated, k.stored_sha256,
       k.record_hash, k.at, k.output IS NULL AS gone,
       k.output IS NULL OR encode(sha256(convert_to(k.output, 'UTF8')), 'hex') = k.stored_sha256
           AS text_intact,
       e.seq, e.data -> 'output' ->> 'record' AS vouched
FROM recordings k
LEFT JOIN audit_events e ON e.data -> 'output' ->> 'step' = k.step_id::text
ORDER BY e.seq NULLS FIRST
"""
_UNRECORDED = """
SELECT e.seq FROM audit_events e
WHERE e.data ? 'output' AND NOT EXISTS (
    SELECT 1 FROM recordings k WHERE k.step_id::text = e.data -> 'output' ->> 'step')
ORDER BY e.seq LIMIT 1
"""
_PURGED_BEFORE = """
SELECT max((data ->> 'before')::timestamptz) FROM audit_events WHERE kind = 'recording.purged'
"""


@dataclass(frozen=True)
class Unvouched:
    """A recording the audit chain does not vouch for as it is now."""

    seq: int  # the event that should vouch for it (0: none does)
    problem: str


async def check_recordings(store: Store) -> Unvouched | None:
    """The first recording that was edited, deleted, or purged outside retention."""
    async with store.raw_connection() as conn:
        purged_before = await conn.fetchval(_PURGED_BEFORE)
        async with conn.transaction():
            async for row in conn.cursor(_VOUCHED, prefetch=1000):
                problem = _problem(row, purged_before)
                if problem is not None:
                    return Unvouched(row["seq"] or 0, f"recording {row['step_id']}: {problem}")
        seq = await conn.fetchval(_UNRECORDED)
    if seq is not None:
        return Unvouched(seq, "the recording this event vouches for was deleted")
    return None


def _problem(row: asyncpg.Record, purged_before: datetime | None) -> str | None:
    if row["seq"] is None:
        return "no audit event vouches for it (added or re-keyed outside keyturn)"
    fields = (row["kept"], row["output_bytes"], row["output_sha256"], row["truncated"])
    if record_hash(row["step_id"], *fields, row["stored_sha256"]) != row["vouched"]:
        return "its hashes do not match what the audit chain recorded (changed)"
    if row["record_hash"] != row["vouched"]:
        return "its record hash was changed"
    if not row["text_intact"]:
        return "its output was changed"
    if (
        row["gone"]
        and row["kept"] != "none"
        and (purged_before is None or row["at"] >= purged_before)
    ):
        return "its output was deleted, but no retention purge reached it"
    return None


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
