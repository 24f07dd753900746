"""Recordings held against the audit chain (``keyturn audit verify``): each recording's hashes
must be the ones the event that ended its step carries, its kept text must still hash to
what was kept, a blocked command's recording must be the step its event records, every event
that vouches for a recording must find it, and an output may be gone only where a retention
purge (itself an audit event) reached it by the time of that event."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from keyturn.store.db import Store
from keyturn.store.recordings import VOUCHED_STEP, recording_of

# Each recording with the event that vouches for it; the kept text's sha256 is computed by
# Postgres, so no output is carried here.
_VOUCHED = f"""
SELECT k.step_id, k.kept, k.output_bytes, k.output_sha256, k.truncated, k.stored_sha256,
       k.output IS NULL AS gone,
       k.output IS NULL OR encode(sha256(convert_to(k.output, 'UTF8')), 'hex') = k.stored_sha256
           AS text_intact,
       e.seq, e.at, e.data -> 'output' ->> 'record' AS vouched,
       -- a blocked command's step is its recording alone: it must be what its event says
       k.request_id IS NOT DISTINCT FROM e.request_id
       AND (k.request_id IS NOT NULL OR (
           e.kind = 'request.blocked' AND e.actor = k.agent
           AND e.data ->> 'command_sha256' = encode(sha256(convert_to(k.command, 'UTF8')), 'hex')
           AND e.data ->> 'target' = k.target
           AND e.data ->> 'run_id' IS NOT DISTINCT FROM k.run_id
           AND e.data ->> 'rule' IS NOT DISTINCT FROM k.rule)) AS step_intact
FROM recordings k
LEFT JOIN audit_events e ON e.{VOUCHED_STEP} = k.step_id::text
ORDER BY e.seq NULLS FIRST
"""
_UNRECORDED = f"""
SELECT e.seq FROM audit_events e
WHERE e.data ? 'output' AND NOT EXISTS (
    SELECT 1 FROM recordings k WHERE k.step_id::text = e.{VOUCHED_STEP})
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
    """The first recording that was edited, deleted, or purged outside retention. One
    snapshot: a purge committing meanwhile is seen whole or not at all."""
    async with (
        store.raw_connection() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        purged_before = await conn.fetchval(_PURGED_BEFORE)
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
    if recording_of(row, None).digest != row["vouched"]:
        return "its hashes do not match what the audit chain recorded (changed)"
    if not row["step_intact"]:
        return "it is not the step its audit event records (changed)"
    if not row["text_intact"]:
        return "its output was changed"
    # the event's time, which the chain covers: not the row's, which anyone could move
    reached = purged_before is not None and row["at"] < purged_before
    if row["gone"] and row["kept"] != "none" and not reached:
        return "its output was deleted, but no retention purge reached it"
    return None
