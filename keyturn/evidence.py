"""``keyturn audit evidence``: one step's proof written from the store, for
:mod:`keyturn.recording.proof` to check anywhere, offline; sealed with the deployment's audit
key when Vault is at hand."""

from __future__ import annotations

import json
import uuid
from typing import IO, Any

from sqlalchemy import func, literal_column, or_, select

from keyturn.audit import event_json, stream
from keyturn.checkpoint import Anchor
from keyturn.errors import InvalidInput, NotFound
from keyturn.recording.proof import FORMAT, seal_message, seal_of
from keyturn.recording.runs import Step
from keyturn.store import run_steps
from keyturn.store.db import Store
from keyturn.store.models import AuditEventRow, RecordingRow
from keyturn.store.recordings import VOUCHED_STEP

MAX_SEGMENT = 1_000_000  # events between a step's first and last: a file of a few hundred MB


async def write(
    store: Store, step_id: uuid.UUID, out: IO[str], anchor: Anchor | None = None
) -> int:
    """Write the evidence of one step (a request, or a blocked command) to ``out``, sealed
    when ``anchor`` is given; returns how many audit events it holds. NotFound when keyturn
    has no such step."""
    step = await run_steps.step(store, step_id)
    if step is None:
        raise NotFound(f"no request or blocked command {step_id}")
    e = AuditEventRow
    own = or_(
        e.request_id == step_id, literal_column(f"audit_events.{VOUCHED_STEP}") == str(step_id)
    )
    async with store.transaction() as tx:
        first, last = (
            await tx.session.execute(select(func.min(e.seq), func.max(e.seq)).where(own))
        ).one()
        recording = await tx.session.get(RecordingRow, step_id)
    if first is None:
        raise NotFound(f"no audit event is about {step_id}")
    if last - first >= MAX_SEGMENT:
        raise InvalidInput(
            f"the step's events span {last - first + 1} events of the chain, over the "
            f"{MAX_SEGMENT} an evidence file holds; export the chain (keyturn audit export)"
        )
    events = [event_json(row, exact=True) async for row in stream(store, first - 1, last)]
    seal = None
    if anchor is not None:
        seal = seal_of(str(step_id), events, store.clock.now().isoformat())
        seal["hmac"] = await anchor.hmac(seal_message(seal))
    evidence = {
        "keyturn_evidence": FORMAT,
        "step": _step(step),
        "recording": None if recording is None else _recording(recording),
        "events": events,
        "seal": seal,
    }
    json.dump(evidence, out, indent=1, sort_keys=True)
    out.write("\n")
    return len(events)


def _step(step: Step) -> dict[str, Any]:
    """The step as the file claims it: each claim is held against the events."""
    grant = step.grant
    return {
        "id": str(step.id),
        "agent": step.agent,
        "run": step.run,
        "run_id": step.run_id,
        "target": step.target,
        "command": step.command,
        "verdict": step.verdict,
        "status": step.status,
        "rule": step.rule,
        "at": step.at.isoformat(),
        "decisions": [
            {"by": v.approver, "decision": v.decision, "at": v.at.isoformat(), "reason": v.reason}
            for v in step.votes
        ],
        "grant": None
        if grant is None
        else {
            "id": str(grant.id),
            "issued_at": grant.issued_at.isoformat(),
            "expires_at": grant.expires_at.isoformat(),
            "status": grant.status,
            "ended_at": grant.ended_at.isoformat() if grant.ended_at else None,
            "ended_by": grant.ended_by,
        },
    }


def _recording(row: RecordingRow) -> dict[str, Any]:
    return {
        "step": str(row.step_id),
        "kept": row.kept,
        "output": row.output,
        "output_bytes": row.output_bytes,
        "output_sha256": row.output_sha256,
        "truncated": row.truncated,
        "stored_sha256": row.stored_sha256,
        "purged_at": row.purged_at.isoformat() if row.purged_at else None,
    }
