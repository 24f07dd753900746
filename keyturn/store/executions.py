"""A request's execution: claimed once, finished with its outcome, and ended with its
grant (an approval never outlives the credentials it was for)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from keyturn.domain import (
    IllegalTransition,
    RequestStatus,
    came_from,
)
from keyturn.recording.output import Recording
from keyturn.store.audit_log import Event
from keyturn.store.db import Store, Tx
from keyturn.store.models import RequestRow
from keyturn.store.recordings import output_event, recording_row


async def start_execution(store: Store, request_id: uuid.UUID, sha256: str) -> RequestRow:
    """Claim an approved request for running; a second claim conflicts (approval used once)."""
    async with store.transaction() as tx:
        row = await tx.locked(RequestRow, request_id)
        req = row.domain()
        req.start_execution(sha256)
        row.save(req, tx.now)
        tx.record(Event("request.executing", "keyturn", request_id=row.id))
    return row


async def finish_execution(
    store: Store,
    request_id: uuid.UUID,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    recording: Recording | None = None,
) -> RequestRow:
    """Record the outcome and what its run keeps of it; ``error`` set means failed. Store
    only masked results here."""
    async with store.transaction() as tx:
        row = await tx.locked(RequestRow, request_id)
        req = row.domain()
        if req.status is RequestStatus.APPROVED:
            req.fail()
        else:
            req.finish(ok=error is None)
        row.save(req, tx.now)
        row.result, row.error = result, error
        if recording is not None:
            tx.session.add(recording_row(recording, request_id=row.id))
        outcome = {"error": error} if error else {"result_digest": recording and recording.sha256}
        tx.record(
            Event(
                f"request.{req.status}",
                "keyturn",
                request_id=row.id,
                data=outcome | output_event(recording),
            )
        )
    return row


async def _move_all(
    tx: Tx,
    request_ids: Sequence[uuid.UUID],
    came: RequestStatus,
    to: RequestStatus,
    *,
    error: str | None = None,
    access_only: bool = False,
) -> list[uuid.UUID]:
    """Move the requests still in ``came`` to ``to`` (with ``error``, when given) in one
    statement, for a move the domain allows; the ids that moved."""
    if came not in came_from(to):
        raise IllegalTransition("request", came, to)
    if not request_ids:
        return []
    conn = await tx.raw_connection()
    moved = await conn.fetch(
        "UPDATE requests SET status = $3, error = coalesce($4::text, error), updated_at = $5"
        " WHERE id = ANY($1::uuid[]) AND status = $2 AND (access OR NOT $6::boolean)"
        " RETURNING id",
        list(request_ids),
        came.value,
        to.value,
        error,
        tx.now,
        access_only,
    )
    return [r["id"] for r in moved]


async def fail_unrun(
    tx: Tx,
    request_ids: Sequence[uuid.UUID],
    error: str,
    status: RequestStatus = RequestStatus.APPROVED,
) -> list[uuid.UUID]:
    """Requests still in ``status`` fail, with the reason (an approval whose credentials died
    unused, a run its gateway lost)."""
    ids = await _move_all(tx, request_ids, status, RequestStatus.FAILED, error=error)
    tx.record(*(Event("request.failed", "keyturn", i, data={"error": error}) for i in ids))
    return ids


async def grants_ended(tx: Tx, request_ids: Sequence[uuid.UUID], unrun: str | None) -> None:
    """What follows for the requests whose grants just ended: an approval that never ran
    fails with ``unrun`` (when given); a person's access is over (``executed``)."""
    if unrun is not None:
        await fail_unrun(tx, request_ids, unrun)
    over = await _move_all(
        tx, request_ids, RequestStatus.EXECUTING, RequestStatus.EXECUTED, access_only=True
    )
    tx.record(*(Event("request.access_ended", "keyturn", i) for i in over))
