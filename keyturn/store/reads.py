"""Read models for hot paths: single statements on pooled connections, no ORM session.

Long-polls re-read requests often; these answer in one round trip.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keyturn.domain import TAG_LENGTH, Decision
from keyturn.errors import NotFound
from keyturn.store.db import Store
from keyturn.store.models import RequestRow


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a requester may see of a request: a small read model for hot read paths."""

    id: uuid.UUID
    target: str
    requester: str
    status: str
    rule: str | None
    created_at: datetime
    pending_expires_at: datetime
    estimated_rows: int | None
    result: dict[str, Any] | None
    error: str | None
    denied_by: str | None
    deny_reason: str | None

    @classmethod
    def of(cls, row: RequestRow) -> RequestView:
        denial = next((a for a in row.approvals if a.decision == Decision.DENY), None)
        return cls(
            row.id,
            row.target,
            row.requester,
            row.status,
            row.rule,
            row.created_at,
            row.pending_expires_at,
            (row.classification or {}).get("estimated_rows"),
            row.result,
            row.error,
            denial.approver if denial else None,
            denial.reason if denial else None,
        )


_VIEW = """
SELECT r.id, r.target, r.requester, r.status, r.rule, r.created_at, r.pending_expires_at,
       (r.classification ->> 'estimated_rows')::bigint,
       CASE WHEN r.status IN ('executed', 'failed') THEN r.result END, r.error,
       d.approver, d.reason
FROM requests r
LEFT JOIN LATERAL (
    SELECT approver, reason FROM approvals a
    WHERE a.request_id = r.id AND a.decision = 'deny' ORDER BY a.id LIMIT 1
) d ON true
WHERE r.id = $1 AND NOT r.access  -- the agent API's view: a person's access is not there
"""


async def get_request_view(store: Store, request_id: uuid.UUID) -> RequestView:
    """One round trip on a pooled connection, no ORM: long-polls re-read rows often."""
    async with store.raw_connection() as conn:
        row = await conn.fetchrow(_VIEW, request_id)
    if row is None:
        raise NotFound(f"request {request_id} not found")
    result = row[8]
    return RequestView(
        id=row[0],
        target=row[1],
        requester=row[2],
        status=row[3],
        rule=row[4],
        created_at=row[5],
        pending_expires_at=row[6],
        estimated_rows=row[7],
        result=json.loads(result) if isinstance(result, str) else result,
        error=row[9],
        denied_by=row[10],
        deny_reason=row[11],
    )


async def decided_among(store: Store, ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Which of ``ids`` are no longer pending: the batched poll behind many long-polls."""
    if not ids:
        return []
    async with store.raw_connection() as conn:
        rows = await conn.fetch(
            "SELECT id FROM requests WHERE id = ANY($1::uuid[]) AND status <> 'pending'", ids
        )
    return [row["id"] for row in rows]


async def count_pending(store: Store) -> int:
    async with store.raw_connection() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM requests WHERE status = 'pending'")
    return count


@dataclass(frozen=True, slots=True)
class Tagged:
    """A request found by the tag a target saw (its ``application_name``)."""

    id: uuid.UUID
    target: str
    requester: str
    status: str
    created_at: datetime


async def requests_tagged(store: Store, tag: str) -> list[Tagged]:
    """The requests whose :func:`~keyturn.domain.request_tag` is ``tag`` (a scan: an
    operator's question, not a hot path)."""
    async with store.raw_connection() as conn:
        rows = await conn.fetch(
            "SELECT id, target, requester, status, created_at FROM requests"
            " WHERE left(encode(sha256(convert_to(id::text, 'UTF8')), 'hex'), $2) = $1"
            " ORDER BY created_at",
            tag,
            TAG_LENGTH,
        )
    return [Tagged(*row) for row in rows]
