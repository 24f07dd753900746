"""What the policy decided on its own, written in batches by the gateway's journal.

Blocked and allowed commands never pass through a person: the gateway records them (and how
an allowed one ended) in one set-based statement per batch. Status changes there are only
the moves :data:`~keyturn.domain.REQUEST_TRANSITIONS` allows, passed in from it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from keyturn.domain import (
    RequestStatus,
    came_from,
    command_sha256,
)
from keyturn.recording.output import Recording
from keyturn.store.audit_log import recording
from keyturn.store.recordings import output_event, recording_json
from keyturn.store.requests import shadow


@dataclass(frozen=True)
class Outcome:
    """A command the policy decided on its own: blocked, or allowed and run at once.

    ``status`` is ``blocked`` (only an audit event), ``executing`` (recorded before its result
    is known; a :class:`Completion` follows) or a final ``executed`` / ``failed``.
    """

    id: uuid.UUID
    target: str
    command: str
    requester: str
    status: str
    rule: str | None
    classification: dict[str, Any]
    on_behalf_of: str | None = None
    run_id: str | None = None
    reason: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None  # kept only for idempotent replays
    result_digest: str | None = None
    idempotency_key: str | None = None
    body_sha256: str | None = None
    recording: Recording | None = None  # what its run keeps of the output (blocked: the refusal)


@dataclass(frozen=True)
class Completion:
    """How an ``executing`` outcome ended (``result`` is kept only for idempotent replays)."""

    id: uuid.UUID
    requester: str
    error: str | None
    result_digest: str | None
    result: dict[str, Any] | None = None
    release_key: bool = False  # it never ran: its Idempotency-Key may be used again
    recording: Recording | None = None  # what its run keeps of the output


# where a run may end, executed or failed: the domain's table says, not this module
_COMPLETABLE = sorted(came_from(RequestStatus.EXECUTED) & came_from(RequestStatus.FAILED))

# One statement for a whole batch: one round trip, atomic on its own.
_WRITE_OUTCOMES = """
WITH named AS (
    -- the run each agent's steps without a run_id join (written together, they share one)
    SELECT s.agent, keyturn_run_after(s.agent, min(s.id::text)::uuid, now(), $6::interval) AS run
    FROM (
        SELECT x.requester AS agent, x.id
        FROM jsonb_to_recordset($1::jsonb) AS x(requester text, id uuid, run_id text)
        WHERE x.run_id IS NULL
        UNION ALL
        SELECT y.agent, y.step_id
        FROM jsonb_to_recordset($5::jsonb) AS y(agent text, step_id uuid, run_id text,
            request_id uuid)
        WHERE y.run_id IS NULL AND y.request_id IS NULL
    ) s GROUP BY s.agent
), inserted AS (
    INSERT INTO requests (id, target, command, command_sha256, requester, on_behalf_of, run_id,
        run, reason, status, rule, classification, quorum, idempotency_key, body_sha256,
        created_at, updated_at, pending_expires_at, decided_at, result, error)
    SELECT x.id, x.target, x.command, encode(sha256(convert_to(x.command, 'UTF8')), 'hex'),
        x.requester, x.on_behalf_of, x.run_id,
        coalesce(x.run_id, (SELECT n.run FROM named n WHERE n.agent = x.requester)),
        x.reason, x.status, x.rule, x.classification, 1,
        x.idempotency_key, x.body_sha256, now(), now(), now(), now(), x.result, x.error
    FROM jsonb_to_recordset($1::jsonb) AS x(id uuid, target text, command text, requester text,
        on_behalf_of text, run_id text, reason text, status text, rule text,
        classification jsonb, idempotency_key text, body_sha256 text, result jsonb, error text)
), completed AS (
    UPDATE requests r SET status = x.status, error = x.error, result = x.result,
        idempotency_key = CASE WHEN x.release_key THEN NULL ELSE r.idempotency_key END,
        updated_at = now()
    FROM jsonb_to_recordset($2::jsonb) AS x(id uuid, status text, error text, result jsonb,
        release_key boolean)
    WHERE r.id = x.id AND r.status = ANY($4::text[])
    RETURNING r.id
), kept AS (
    -- a completion's recording goes with the change it records, as its event does; a
    -- blocked command's is its whole step
    INSERT INTO recordings (step_id, request_id, agent, run_id, run, target, command, rule,
        kept, output, output_bytes, output_sha256, truncated, stored_sha256)
    SELECT x.step_id, x.request_id, x.agent, x.run_id,
        CASE WHEN x.request_id IS NULL THEN
            coalesce(x.run_id, (SELECT n.run FROM named n WHERE n.agent = x.agent)) END,
        x.target, x.command, x.rule, x.kept, x.output, x.output_bytes, x.output_sha256,
        x.truncated, x.stored_sha256
    FROM jsonb_to_recordset($5::jsonb) AS x(step_id uuid, request_id uuid, agent text,
        run_id text, target text, command text, rule text, kept text, output text,
        output_bytes bigint, output_sha256 text, truncated boolean, stored_sha256 text,
        outcome boolean)
    WHERE NOT x.outcome OR x.request_id IN (SELECT id FROM completed)
    ON CONFLICT DO NOTHING
), happened AS (
    -- an outcome is audited only with the change it records: a retried completion whose
    -- first attempt did commit changes nothing and adds no second event
    SELECT x.kind, x.actor, x.request_id, x.grant_id, x.data, x.n
    FROM ROWS FROM (jsonb_to_recordset($3::jsonb) AS (kind text, actor text, request_id uuid,
        grant_id uuid, data jsonb, outcome boolean)) WITH ORDINALITY AS x(kind, actor,
        request_id, grant_id, data, outcome, n)
    WHERE NOT coalesce(x.outcome, false) OR x.request_id IN (SELECT id FROM completed)
)""" + recording("happened", "SELECT 'request:' || id FROM completed")


async def write_outcomes(
    conn: asyncpg.Connection, records: Sequence[Outcome | Completion], run_gap: timedelta
) -> None:
    """Write records in one statement on ``conn`` (the gateway's journal batches them); a
    step without a run_id joins its agent's run of ``run_gap`` (keyturn_run_after)."""
    rows: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    for r in records:
        if isinstance(r, Completion):
            status = RequestStatus.FAILED if r.error else RequestStatus.EXECUTED
            done.append(
                {
                    "id": str(r.id),
                    "status": status.value,
                    "error": r.error,
                    "result": r.result,
                    "release_key": r.release_key,
                }
            )
            events.append(
                {
                    "kind": f"request.{status}",
                    "actor": "keyturn",
                    "request_id": str(r.id),
                    "data": {"result_digest": r.result_digest, "error": r.error}
                    | output_event(r.recording),
                    "outcome": True,
                }
            )
            if r.recording is not None:
                kept.append(recording_json(r.recording, request_id=r.id, outcome=True))
            continue
        data: dict[str, Any] = (
            {
                "target": r.target,
                "command_sha256": command_sha256(r.command),
                "rule": r.rule,
                "on_behalf_of": r.on_behalf_of,
                "run_id": r.run_id,
            }
            | shadow(r.classification)
            | output_event(r.recording)
        )
        if r.recording is not None and r.status == "blocked":  # its recording is its step
            kept.append(
                recording_json(
                    r.recording,
                    request_id=None,
                    agent=r.requester,
                    run_id=r.run_id,
                    target=r.target,
                    command=r.command,
                    rule=r.rule,
                )
            )
        elif r.recording is not None:
            kept.append(recording_json(r.recording, request_id=r.id))
        if r.status == "blocked":
            events.append(
                {"kind": "request.blocked", "actor": r.requester, "request_id": None, "data": data}
            )
            continue
        rows.append(
            {
                "id": str(r.id),
                "target": r.target,
                "command": r.command,
                "requester": r.requester,
                "on_behalf_of": r.on_behalf_of,
                "run_id": r.run_id,
                "reason": r.reason,
                "status": r.status,
                "rule": r.rule,
                "classification": r.classification,
                "idempotency_key": r.idempotency_key,
                "body_sha256": r.body_sha256,
                "result": r.result,
                "error": r.error,
            }
        )
        if r.result_digest or r.error:
            data |= {"result_digest": r.result_digest, "error": r.error}
        events.append(
            {"kind": "request.allowed", "actor": r.requester, "request_id": str(r.id), "data": data}
        )
    await conn.execute(
        _WRITE_OUTCOMES,
        json.dumps(rows),
        json.dumps(done),
        json.dumps(events),
        _COMPLETABLE,
        json.dumps(kept),
        run_gap,
    )
