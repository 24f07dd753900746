"""Where each approval card is and what it shows: the bot's bookkeeping, in Postgres.

One replica claims a request without a card (``SKIP LOCKED``; a stale claim is taken over),
posts it, and records channel and ts. What a card shows is one comparable version, computed
in SQL only (:data:`_CARD_VERSION`): the replica that wins the compare-and-set on it renders
each change, exactly once.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from keyturn.domain import RequestStatus
from keyturn.errors import NotFound
from keyturn.store.db import Store
from keyturn.store.models import GrantRow, RequestRow


async def claim_card(store: Store, replica: str, claim_timeout: timedelta) -> RequestRow | None:
    """Claim one pending request that has no card yet (or whose claim went stale).

    ``SKIP LOCKED`` lets replicas claim different requests at once; a claim older than
    ``claim_timeout`` is taken over (its replica died between claiming and posting).
    """
    async with store.transaction() as tx:
        now = tx.now
        row = (
            await tx.session.scalars(
                select(RequestRow)
                .where(
                    RequestRow.status == RequestStatus.PENDING,
                    RequestRow.slack_ts.is_(None),
                    (RequestRow.card_claimed_at.is_(None))
                    | (RequestRow.card_claimed_at < now - claim_timeout),
                )
                .order_by(RequestRow.created_at)
                .limit(1)
                .with_for_update(of=RequestRow, skip_locked=True)
            )
        ).one_or_none()
        if row is not None:
            row.card_claimed_by, row.card_claimed_at = replica, now
    return row


async def _changed_one(store: Store, sql: str, *args: Any) -> bool:
    """Run a conditional UPDATE; True when it changed exactly one row (the condition held)."""
    async with store.driver() as conn:
        return bool(await conn.execute(sql, *args) == "UPDATE 1")


async def card_posted(
    store: Store, request_id: uuid.UUID, replica: str, channel: str, ts: str, status: str
) -> bool:
    """Record where the card is; False when another replica's claim replaced ours."""
    return await _changed_one(
        store,
        "UPDATE requests SET slack_channel = $3, slack_ts = $4, card_status = $5"
        " WHERE id = $1 AND card_claimed_by = $2 AND slack_ts IS NULL",
        request_id,
        replica,
        channel,
        ts,
        status,
    )


async def release_card(store: Store, request_id: uuid.UUID, replica: str) -> None:
    async with store.driver() as conn:
        await conn.execute(
            "UPDATE requests SET card_claimed_at = NULL WHERE id = $1 AND card_claimed_by = $2",
            request_id,
            replica,
        )


def card_version(status: str, votes: int, grant: GrantRow | None, issue_attempts: int) -> str:
    """What a card shows, as one comparable value: status, votes, and the grant (or retries).

    :data:`_CARD_VERSION` computes the same value in SQL; keep the two in step.
    """
    if grant is not None:
        credentials = f"{grant.status}@{int(grant.expires_at.timestamp())}"
    else:
        credentials = "retry" if issue_attempts else ""
    return f"{status}:{votes}:{credentials}"


_CARD_VERSION = """
r.status || ':' || (SELECT count(*) FROM approvals a WHERE a.request_id = r.id) || ':' ||
coalesce(
    (SELECT g.status || '@' || floor(extract(epoch FROM g.expires_at))::bigint FROM grants g
     WHERE g.request_id = r.id ORDER BY g.created_at DESC LIMIT 1),
    CASE WHEN r.issue_attempts > 0 THEN 'retry' ELSE '' END)
"""


async def stale_cards(store: Store, limit: int = 50) -> list[uuid.UUID]:
    """Requests whose card shows an older state (status, votes, grant) than the database."""
    async with store.driver() as conn:
        rows = await conn.fetch(
            "SELECT r.id FROM requests r WHERE r.slack_ts IS NOT NULL"
            f" AND r.card_status IS DISTINCT FROM ({_CARD_VERSION})"
            " ORDER BY r.updated_at LIMIT $1",
            limit,
        )
    return [r["id"] for r in rows]


async def card_of(store: Store, request_id: uuid.UUID) -> tuple[RequestRow, GrantRow | None]:
    """A request and its newest grant: everything its card shows."""
    async with store.transaction() as tx:
        row = await tx.session.get(RequestRow, request_id)
        if row is None:
            raise NotFound(f"request {request_id} not found")
        grant = (
            await tx.session.scalars(
                select(GrantRow)
                .where(GrantRow.request_id == request_id)
                .order_by(GrantRow.created_at.desc())
                .limit(1)
            )
        ).one_or_none()
    return row, grant


async def take_card_update(
    store: Store, request_id: uuid.UUID, shown: str | None, status: str | None
) -> bool:
    """Compare-and-set the status the card shows: exactly one replica renders each change."""
    return await _changed_one(
        store,
        "UPDATE requests SET card_status = $3 WHERE id = $1"
        " AND card_status IS NOT DISTINCT FROM $2",
        request_id,
        shown,
        status,
    )
