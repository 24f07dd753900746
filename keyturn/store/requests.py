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
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from keyturn.domain import (
    RequestStatus,
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
    access: bool = False  # a person's own access: runs no command (keyturn.domain.Request)
    max_pending: int | None = None  # the requester's pending requests at most (agents)
    run_gap: timedelta | None = None  # an agent's step: record.run_gap names its run


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


async def _run_after(tx: Tx, row: RequestRow, gap: timedelta) -> str:
    """The run an agent's step without a run_id joins (keyturn_run_after, as the journal)."""
    run = await tx.session.scalar(
        select(func.keyturn_run_after(row.requester, row.id, row.created_at, gap))
    )
    return str(run)


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
        access=new.access,
        created_at=now,
        updated_at=now,
        pending_expires_at=now + new.pending_ttl,
        approvals=[],
    )
    try:
        async with store.transaction() as tx:
            if new.max_pending is not None:
                await _within_pending(tx, new.requester, new.max_pending)
            if new.run_gap is not None and not new.access:
                row.run = new.run_id or await _run_after(tx, row, new.run_gap)
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
                    | ({"access": True, "reason": new.reason} if new.access else {})
                    | shadow(new.classification),
                )
            )
    except IntegrityError:
        if new.access:  # uq_requests_open_access: the other request won
            raise Conflict(
                f"{new.requester} already has pending or open access to {new.target}"
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
