"""``keyturn audit evidence``: one step's proof written from the store, for
:mod:`keyturn.recording.proof` to check anywhere, offline."""

from __future__ import annotations

import json
import uuid
from typing import IO, Any

from sqlalchemy import func, or_, select

from keyturn.audit import StoredEvent, stream
from keyturn.errors import InvalidInput, NotFound
from keyturn.recording.proof import FORMAT
from keyturn.recording.views import step_json
from keyturn.store import run_steps
from keyturn.store.db import Store
from keyturn.store.models import AuditEventRow, AuditHeadRow, RecordingRow

MAX_SEGMENT = 1_000_000  # events between a step's first and last: a file of a few hundred MB


async def write(store: Store, step_id: uuid.UUID, out: IO[str]) -> int:
    """Write the evidence of one step (a request, or a blocked command) to ``out``; returns
    how many audit events it holds. NotFound when keyturn has no such step."""
    step = await run_steps.step(store, step_id)
    if step is None:
        raise NotFound(f"no request or blocked command {step_id}")
    e = AuditEventRow
    own = or_(e.request_id == step_id, e.data["output"]["step"].astext == str(step_id))
    async with store.transaction() as tx:
        first, last = (
            await tx.session.execute(select(func.min(e.seq), func.max(e.seq)).where(own))
        ).one()
        head = await tx.session.get(AuditHeadRow, 1)
        recording = await tx.session.get(RecordingRow, step_id)
    if first is None:
        raise NotFound(f"no audit event is about {step_id}")
    if last - first >= MAX_SEGMENT:
        raise InvalidInput(
            f"the step's events span {last - first + 1} events of the chain, over the "
            f"{MAX_SEGMENT} an evidence file holds; export the chain (keyturn audit export)"
        )
    shown = step_json(step, 1)
    shown.pop("step")
    shown.pop("output")
    events = [_event(row) async for row in stream(store, first - 1, last)]
    evidence = {
        "keyturn_evidence": FORMAT,
        "step": shown,
        "recording": None if recording is None else _recording(recording),
        "events": events,
        "head": {"seq": head.seq, "hash": head.hash} if head is not None else None,
    }
    json.dump(evidence, out, indent=1, sort_keys=True)
    out.write("\n")
    return len(events)


def _recording(row: RecordingRow) -> dict[str, Any]:
    return {
        "step": str(row.step_id),
        "kept": row.kept,
        "output": row.output,
        "output_bytes": row.output_bytes,
        "output_sha256": row.output_sha256,
        "truncated": row.truncated,
        "stored_sha256": row.stored_sha256,
        "record_hash": row.record_hash,
        "purged_at": row.purged_at.isoformat() if row.purged_at else None,
    }


def _event(row: StoredEvent) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "at": row.at.isoformat(),
        "kind": row.kind,
        "actor": row.actor,
        "request_id": str(row.request_id) if row.request_id else None,
        "grant_id": str(row.grant_id) if row.grant_id else None,
        "data_text": row.data_text,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }
