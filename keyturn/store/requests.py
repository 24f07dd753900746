"""Requests' state changes: one function per use case, one transaction each.

Every function locks the row it changes (``SELECT … FOR UPDATE``), asks :mod:`keyturn.domain`
whether the move is legal, writes it and records what happened (the unit of work turns that
into an audit event and a notification on commit). A double click, two bot replicas or an
approve racing a deny thus give exactly one outcome; the losers get a
:class:`~keyturn.errors.Conflict`. Sweeps use ``SKIP LOCKED`` so replicas share the work.

Functions return detached rows: plain data once the transaction has closed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from keyturn.domain import (
    Deciders,
    Decision,
    IllegalTransition,
    RequestStatus,
    came_from,
    command_sha256,
)
from keyturn.errors import Conflict, InvalidInput, NotFound
from keyturn.store.audit_log import Event
from keyturn.store.db import Store, Tx
from keyturn.store.models import RequestRow

MAX_COMMAND_BYTES = 64 * 1024


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


@dataclass(frozen=True)
class NewRequest:
    target: str
    command: str
    requester: str
    pending_ttl: timedelta
    quorum: int = 1
    on_behalf_of: str | None = None
    run_id: str | None = None
    reason: str | None = None
    rule: str | None = None
    classification: dict[str, Any] = field(default_factory=dict)
    grant_ttl: timedelta | None = None
    idempotency_key: str | None = None
    body_sha256: str | None = None
    session: bool = False  # a human's own session: runs no command (keyturn.domain.Request)
    max_pending: int | None = None  # the requester's pending requests at most (agents)


class TooManyPending(Conflict):
    """An agent already has as many requests waiting for a human as it may. A conflict, not a
    rate limit: clients do not retry it; the agent (or its model) reads why and waits."""

    code = "too_many_pending"


async def _within_pending(tx: Tx, requester: str, limit: int) -> None:
    """Count ``requester``'s pending requests under a lock on its name (concurrent holds of
    one agent take turns here, so the limit is exact across gateways)."""
    await tx.session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('keyturn-pending:' || :who, 0))"),
        {"who": requester},
    )
    waiting = await tx.session.scalar(
        select(func.count())
        .select_from(RequestRow)
        .where(RequestRow.requester == requester, RequestRow.status == RequestStatus.PENDING)
    )
    if (waiting or 0) >= limit:
        raise TooManyPending(
            f"{requester} already has {waiting} requests waiting for a human (at most {limit}); "
            "wait for them to be decided or to expire, then send more"
        )


async def create_request(store: Store, new: NewRequest) -> tuple[RequestRow, bool]:
    """Store a pending request; returns ``(row, created)``.

    With an idempotency key, the same key and body give back the first request
    (``created`` False) and a different body raises :class:`IdempotencyConflict`.
    """
    if not new.command.strip():
        raise InvalidInput("command is empty")
    if len(new.command.encode()) > MAX_COMMAND_BYTES:
        raise InvalidInput(f"command is larger than {MAX_COMMAND_BYTES} bytes")
    if new.pending_ttl <= timedelta(0):
        raise InvalidInput("pending_ttl must be positive")
    if new.idempotency_key is not None:
        existing = await find_by_key(store, new.requester, new.idempotency_key, new.body_sha256)
        if existing is not None:
            return existing, False
    now = store.clock.now()
    row = RequestRow(
        id=uuid.uuid4(),
        target=new.target,
        command=new.command,
        command_sha256=command_sha256(new.command),
        requester=new.requester,
        on_behalf_of=new.on_behalf_of,
        run_id=new.run_id,
        reason=new.reason,
        status=RequestStatus.PENDING,
        rule=new.rule,
        classification=new.classification,
        quorum=new.quorum,
        grant_ttl_seconds=int(new.grant_ttl.total_seconds()) if new.grant_ttl else None,
        idempotency_key=new.idempotency_key,
        body_sha256=new.body_sha256,
        session=new.session,
        created_at=now,
        updated_at=now,
        pending_expires_at=now + new.pending_ttl,
        approvals=[],
    )
    try:
        async with store.transaction() as tx:
            if new.max_pending is not None:
                await _within_pending(tx, new.requester, new.max_pending)
            tx.session.add(row)
            await tx.session.flush()
            tx.record(
                Event(
                    "request.held",
                    new.requester,
                    request_id=row.id,
                    data={
                        "target": new.target,
                        "command_sha256": row.command_sha256,
                        "rule": new.rule,
                        "on_behalf_of": new.on_behalf_of,
                        "run_id": new.run_id,
                    }
                    | ({"session": True, "reason": new.reason} if new.session else {})
                    | shadow(new.classification),
                )
            )
    except IntegrityError:
        if new.session:  # uq_requests_open_session: the other request won
            raise Conflict(
                f"{new.requester} already has a pending or open session on {new.target}"
            ) from None
        # Lost a race with the same idempotency key: the winner's row is the answer.
        existing = await find_by_key(store, new.requester, new.idempotency_key, new.body_sha256)
        if existing is None:
            raise
        return existing, False
    return row, True


async def find_by_key(
    store: Store, requester: str, key: str | None, body_sha256: str | None
) -> RequestRow | None:
    """The request an earlier call with this Idempotency-Key made; the same key with a
    different body is an :class:`IdempotencyConflict`."""
    async with store.transaction() as tx:
        row = (
            await tx.session.scalars(
                select(RequestRow).where(
                    RequestRow.requester == requester, RequestRow.idempotency_key == key
                )
            )
        ).one_or_none()
    if row is not None and row.body_sha256 != body_sha256:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    return row


def shadow(classification: dict[str, Any]) -> dict[str, Any]:
    """What shadow rules would have done, for the audit event (when any matched)."""
    return {"shadow": classification["shadow"]} if classification.get("shadow") else {}


async def get_request(store: Store, request_id: uuid.UUID) -> RequestRow:
    async with store.transaction() as tx:
        row = await tx.session.get(RequestRow, request_id)
    if row is None:
        raise NotFound(f"request {request_id} not found")
    return row


async def pending_requests(store: Store, limit: int = 100) -> list[RequestRow]:
    """Every pending request, agents' and people's, oldest first: who may decide each is
    the bot's question (Slack user groups)."""
    async with store.transaction() as tx:
        return list(
            (
                await tx.session.scalars(
                    select(RequestRow)
                    .where(RequestRow.status == RequestStatus.PENDING)
                    .order_by(RequestRow.created_at)
                    .limit(limit)
                )
            ).all()
        )


@dataclass(frozen=True)
class DecisionResult:
    request: RequestRow
    decided: bool  # True when this vote ended the pending state (quorum reached or denied)


async def decide(
    store: Store,
    request_id: uuid.UUID,
    approver: str,
    decision: Decision,
    reason: str | None = None,
    *,
    deciders: Deciders,
) -> DecisionResult:
    """Record an approve or deny vote, if ``approver`` is among ``deciders`` (resolved from
    the policy by the caller) and may vote now; checked under the request's row lock."""
    async with store.transaction() as tx:
        row = await tx.locked(RequestRow, request_id)
        req = row.domain()
        now = tx.now
        if decision is Decision.APPROVE:
            decided = req.approve(approver, deciders, now)
        else:
            req.deny(approver, deciders, reason or "", now)
            decided = True
        row.save(req, now)
        kind = {
            (Decision.APPROVE, True): "request.approved",
            (Decision.APPROVE, False): "request.approval_recorded",
            (Decision.DENY, True): "request.denied",
        }[(decision, decided)]
        tx.record(
            Event(
                kind,
                approver,
                request_id=row.id,
                data={"approvals": len(req.approvers), "quorum": req.quorum}
                | ({"reason": req.denial.reason} if req.denial else {}),
            )
        )
    return DecisionResult(row, decided)


async def cancel_request(store: Store, request_id: uuid.UUID, by: str) -> RequestRow:
    async with store.transaction() as tx:
        row = await tx.locked(RequestRow, request_id)
        req = row.domain()
        now = tx.now
        req.cancel(by, now)
        row.save(req, now)
        tx.record(Event("request.cancelled", by, request_id=row.id))
    return row


async def expire_due_requests(store: Store, *, limit: int = 100) -> list[RequestRow]:
    """Expire pending requests past their TTL; rows another replica holds are skipped."""
    async with store.transaction() as tx:
        now = tx.now
        rows = (
            await tx.session.scalars(
                select(RequestRow)
                .where(
                    RequestRow.status == RequestStatus.PENDING,
                    RequestRow.pending_expires_at <= now,
                )
                .order_by(RequestRow.pending_expires_at)
                .limit(limit)
                .with_for_update(of=RequestRow, skip_locked=True)
            )
        ).all()
        for row in rows:
            req = row.domain()
            req.expire(now)
            row.save(req, now)
            tx.record(Event("request.expired", "keyturn", request_id=row.id))
    return list(rows)


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
    result_digest: str | None = None,
) -> RequestRow:
    """Record the outcome; ``error`` set means failed. Store only masked results here."""
    async with store.transaction() as tx:
        row = await tx.locked(RequestRow, request_id)
        req = row.domain()
        if req.status is RequestStatus.APPROVED:
            req.fail()
        else:
            req.finish(ok=error is None)
        row.save(req, tx.now)
        row.result, row.error = result, error
        tx.record(
            Event(
                f"request.{req.status}",
                "keyturn",
                request_id=row.id,
                data={"result_digest": result_digest} if result_digest else {"error": error},
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
    sessions_only: bool = False,
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
        " WHERE id = ANY($1::uuid[]) AND status = $2 AND (session OR NOT $6::boolean)"
        " RETURNING id",
        list(request_ids),
        came.value,
        to.value,
        error,
        tx.now,
        sessions_only,
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
    fails with ``unrun`` (when given); a person's session is over (``executed``)."""
    if unrun is not None:
        await fail_unrun(tx, request_ids, unrun)
    over = await _move_all(
        tx, request_ids, RequestStatus.EXECUTING, RequestStatus.EXECUTED, sessions_only=True
    )
    tx.record(*(Event("request.session_ended", "keyturn", i) for i in over))
