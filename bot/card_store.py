"""Where each approval card is and what it shows: the bot's bookkeeping, in its own table.

One replica claims a request without a card (``SKIP LOCKED``; a stale claim is taken over),
posts it, and records channel and ts. What a card shows is one comparable version of the
request (status, votes, its grant or issuance retries): a typed :class:`CardVersion`, computed
in SQL only (:data:`_VERSION`): at claim time for what the new card shows, later to find stale
cards. The replica that wins the compare-and-set on ``shown`` renders each change, exactly
once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select, text

from keyturn.domain import RequestStatus
from keyturn.errors import NotFound
from keyturn.store import grants
from keyturn.store.db import Store
from keyturn.store.models import CardRow, GrantRow, RequestRow

# The version of request ``r`` a card would show (``g``: its newest grant, see _WITH_GRANT).
_VERSION = """
jsonb_build_object(
    'status', r.status,
    'votes', (SELECT count(*) FROM approvals a WHERE a.request_id = r.id),
    'grant', g.status,
    'grant_expires', floor(extract(epoch FROM g.expires_at))::bigint,
    'retrying', g.status IS NULL AND r.issue_attempts > 0
)::text
"""
_WITH_GRANT = """
LEFT JOIN LATERAL (
    SELECT status, expires_at FROM grants WHERE request_id = r.id ORDER BY created_at DESC LIMIT 1
) g ON true
"""


@dataclass(frozen=True)
class CardVersion:
    """What a card shows of its request: its status, votes and newest grant (or that issuing
    is being retried). Computed by SQL alone (:data:`_VERSION`), stored as its JSON text, read
    back as this typed value; a card is stale when the two versions differ."""

    status: str
    votes: int
    grant: str | None
    grant_expires: int | None
    retrying: bool
    text: str = field(compare=False, repr=False)  # the stored form, for compare-and-set

    @classmethod
    def of(cls, text: str) -> CardVersion:
        data = json.loads(text)
        return cls(
            status=str(data["status"]),
            votes=int(data["votes"]),
            grant=data["grant"],
            grant_expires=data["grant_expires"],
            retrying=bool(data["retrying"]),
            text=text,
        )

    @classmethod
    def maybe(cls, text: str | None) -> CardVersion | None:
        return None if text is None else cls.of(text)


@dataclass(frozen=True)
class Claimed:
    """A request this replica may post a card for, and the version that card will show."""

    request: RequestRow
    version: CardVersion


@dataclass(frozen=True)
class Card:
    """A posted card, its request (and newest grant), the version it shows and the current one."""

    request: RequestRow
    grant: GrantRow | None
    channel: str
    ts: str
    shown: CardVersion | None  # None: not drawn from the database yet (a card just adopted)
    current: CardVersion

    @property
    def stale(self) -> bool:
        return self.shown != self.current


async def claim_card(store: Store, replica: str, claim_timeout: timedelta) -> Claimed | None:
    """Claim one pending request that has no card yet (or whose claim went stale).

    ``SKIP LOCKED`` lets replicas claim different requests at once; a claim older than
    ``claim_timeout`` is taken over (its replica died between claiming and posting).
    """
    async with store.transaction() as tx:
        row = (
            await tx.session.scalars(
                select(RequestRow)
                .outerjoin(CardRow, CardRow.request_id == RequestRow.id)
                .where(
                    RequestRow.status == RequestStatus.PENDING,
                    CardRow.ts.is_(None),
                    CardRow.claimed_at.is_(None) | (CardRow.claimed_at < tx.now - claim_timeout),
                )
                .order_by(RequestRow.created_at)
                .limit(1)
                .with_for_update(of=RequestRow, skip_locked=True)
            )
        ).one_or_none()
        if row is None:
            return None
        # The card row is not locked by the SELECT: take it over only if it is still unposted
        # and unclaimed (or stale) now, or a replica that just posted would be overwritten.
        version = await tx.session.scalar(
            text(
                "INSERT INTO cards (request_id, claimed_by, claimed_at) VALUES (:id, :by, :at)"
                " ON CONFLICT (request_id) DO UPDATE SET claimed_by = :by, claimed_at = :at"
                " WHERE cards.ts IS NULL"
                " AND (cards.claimed_at IS NULL OR cards.claimed_at < :stale)"
                f" RETURNING (SELECT {_VERSION} FROM requests r {_WITH_GRANT} WHERE r.id = :id)"
            ),
            {"id": row.id, "by": replica, "at": tx.now, "stale": tx.now - claim_timeout},
        )
    return None if version is None else Claimed(row, CardVersion.of(version))


async def _changed_one(store: Store, sql: str, *args: Any) -> bool:
    """Run a conditional UPDATE; True when it changed exactly one row (the condition held)."""
    async with store.raw_connection() as conn:
        return bool(await conn.execute(sql, *args) == "UPDATE 1")


async def card_posted(
    store: Store, claimed: Claimed, replica: str, channel: str, ts: str, *, adopted: bool = False
) -> bool:
    """Record where the card is; False when another replica's claim replaced ours. An
    ``adopted`` card (posted by a claim that died) was drawn from an older state than this
    claim's: it is recorded as showing nothing yet, so the next refresh redraws it."""
    return await _changed_one(
        store,
        "UPDATE cards SET channel = $3, ts = $4, shown = $5"
        " WHERE request_id = $1 AND claimed_by = $2 AND ts IS NULL",
        claimed.request.id,
        replica,
        channel,
        ts,
        None if adopted else claimed.version.text,
    )


async def release_card(store: Store, request_id: uuid.UUID, replica: str) -> None:
    """Give a claim back (posting failed): the next pass, on any replica, tries again."""
    async with store.raw_connection() as conn:
        await conn.execute(
            "UPDATE cards SET claimed_at = NULL WHERE request_id = $1 AND claimed_by = $2",
            request_id,
            replica,
        )


async def posted_at(store: Store, request_id: uuid.UUID) -> tuple[str, str] | None:
    """(channel, ts) of the request's card once it is posted."""
    async with store.raw_connection() as conn:
        row = await conn.fetchrow(
            "SELECT channel, ts FROM cards WHERE request_id = $1 AND ts IS NOT NULL", request_id
        )
    return (row["channel"], row["ts"]) if row else None


async def stale_cards(store: Store, limit: int = 50) -> list[uuid.UUID]:
    """Requests whose card shows an older version (status, votes, grant) than the database."""
    async with store.raw_connection() as conn:
        rows = await conn.fetch(
            f"SELECT r.id FROM cards c JOIN requests r ON r.id = c.request_id {_WITH_GRANT}"
            f" WHERE c.ts IS NOT NULL AND c.shown IS DISTINCT FROM ({_VERSION})"
            " ORDER BY r.updated_at LIMIT $1",
            limit,
        )
    return [r["id"] for r in rows]


async def card_of(store: Store, request_id: uuid.UUID) -> Card | None:
    """A posted card with everything it shows; None while the request has no card."""
    async with store.transaction() as tx:
        found = (
            await tx.session.execute(
                text(
                    f"SELECT c.channel, c.ts, c.shown, ({_VERSION}) AS current"
                    f" FROM cards c JOIN requests r ON r.id = c.request_id {_WITH_GRANT}"
                    " WHERE c.request_id = :id AND c.ts IS NOT NULL"
                ),
                {"id": request_id},
            )
        ).one_or_none()
        if found is None:
            return None
        row = await tx.session.get(RequestRow, request_id)
        if row is None:
            raise NotFound(f"request {request_id} not found")
        grant = await grants.newest_grant(tx, request_id)
    shown, current = CardVersion.maybe(found.shown), CardVersion.of(found.current)
    return Card(row, grant, found.channel, found.ts, shown, current)


async def take_card_update(
    store: Store, request_id: uuid.UUID, shown: CardVersion | None, version: CardVersion | None
) -> bool:
    """Compare-and-set the version the card shows: exactly one replica renders each change."""
    return await _changed_one(
        store,
        "UPDATE cards SET shown = $3 WHERE request_id = $1 AND shown IS NOT DISTINCT FROM $2",
        request_id,
        shown.text if shown is not None else None,
        version.text if version is not None else None,
    )


# approvers are reminded once, at half the pending TTL, of requests pending at least this long
REMIND_PENDING_FROM = timedelta(minutes=2)


@dataclass(frozen=True)
class Overdue:
    """A pending request's card whose approvers are due a reminder."""

    request: RequestRow
    channel: str
    ts: str


async def claim_approver_reminders(store: Store, limit: int = 50) -> list[Overdue]:
    """Cards of requests pending for half their pending TTL (of at least
    :data:`REMIND_PENDING_FROM`), not reminded yet: marked reminded now, so one replica
    reminds once."""
    async with store.transaction() as tx:
        found = (
            await tx.session.execute(
                text(
                    "UPDATE cards SET reminded_at = :now WHERE request_id IN ("
                    " SELECT c.request_id FROM cards c JOIN requests r ON r.id = c.request_id"
                    " WHERE r.status = 'pending'"
                    " AND c.ts IS NOT NULL AND c.reminded_at IS NULL"
                    " AND r.pending_expires_at - r.created_at >= :worth"
                    " AND r.created_at + (r.pending_expires_at - r.created_at) / 2 <= :now"
                    " ORDER BY r.created_at LIMIT :limit FOR UPDATE OF c SKIP LOCKED)"
                    " RETURNING request_id, channel, ts"
                ),
                {"now": tx.now, "limit": limit, "worth": REMIND_PENDING_FROM},
            )
        ).all()
        rows = [(await tx.session.get(RequestRow, f.request_id), f.channel, f.ts) for f in found]
    return [Overdue(row, channel, ts) for row, channel, ts in rows if row is not None]
