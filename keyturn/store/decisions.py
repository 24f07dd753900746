"""Deciding a request: votes (who may vote is :class:`keyturn.domain.Deciders`, checked
under the request's row lock), and expiry past the pending TTL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select

from keyturn.domain import (
    Deciders,
    Decision,
    RequestStatus,
)
from keyturn.store.audit_log import Event
from keyturn.store.db import Store
from keyturn.store.models import RequestRow


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
