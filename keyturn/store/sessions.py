"""People's own sessions (``/keyturn db|ssh``): what someone has asked for and holds, what
waits on approvers, and the reminder before a session ends.

Sessions are requests (``session`` true) with grants, so approving, issuing, revoking and
expiring them are the same operations as for agents (:mod:`keyturn.store.requests`,
:mod:`keyturn.store.grants`, :mod:`keyturn.store.endings`); this module only reads them and
claims reminders, each exactly once across replicas.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import String, cast, select

from keyturn.domain import GrantStatus, RequestStatus
from keyturn.errors import InvalidInput, NotFound
from keyturn.store.db import Store
from keyturn.store.grants import newest_grant
from keyturn.store.models import GrantRow, RequestRow

SHORT_ID = 8  # how many leading characters of a request id people may type


@dataclass(frozen=True)
class Held:
    """One of a person's sessions: the request and its newest grant (None while pending)."""

    request: RequestRow
    grant: GrantRow | None


async def of_requester(store: Store, user: str, limit: int = 25) -> list[Held]:
    """``user``'s sessions still pending or open, oldest first."""
    async with store.transaction() as tx:
        rows = (
            await tx.session.scalars(
                select(RequestRow)
                .where(
                    RequestRow.session.is_(True),
                    RequestRow.requester == user,
                    RequestRow.status.in_(
                        [RequestStatus.PENDING, RequestStatus.APPROVED, RequestStatus.EXECUTING]
                    ),
                )
                .order_by(RequestRow.created_at)
                .limit(limit)
            )
        ).all()
        return [Held(row, await newest_grant(tx, row.id)) for row in rows]


async def pending(store: Store, limit: int = 100) -> list[RequestRow]:
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


async def own(store: Store, user: str, typed: str) -> Held:
    """The session ``user`` names by its id or the id's first characters; someone else's
    session, or none, is :class:`NotFound` (which of the two is not said)."""
    ident = typed.strip().lower()
    if len(ident) < SHORT_ID or any(c not in "0123456789abcdef-" for c in ident):
        raise InvalidInput(
            f"`{typed[:40]}` is not a request id: type its first {SHORT_ID} characters or more,"
            " as `/keyturn list` shows them"
        )
    async with store.transaction() as tx:
        rows = (
            await tx.session.scalars(
                select(RequestRow)
                .where(
                    RequestRow.session.is_(True),
                    RequestRow.requester == user,
                    cast(RequestRow.id, String).startswith(ident),
                )
                .limit(2)
            )
        ).all()
        if len(rows) > 1:
            raise InvalidInput(f"`{typed[:40]}` matches several of your requests: type more of it")
        if not rows:
            raise NotFound(f"you have no request `{typed[:40]}` (see `/keyturn list`)")
        return Held(rows[0], await newest_grant(tx, rows[0].id))


async def claim_expiry_reminders(store: Store, within: timedelta, limit: int = 50) -> list[Held]:
    """Open sessions ending within ``within`` whose requester has not been warned: marked
    warned now, so one replica warns once (:func:`unclaim_reminder` if the warning failed)."""
    async with store.raw_connection() as conn:
        ids = await conn.fetch(
            "UPDATE grants g SET reminded_at = $1 FROM requests r"
            " WHERE r.id = g.request_id AND r.session AND g.status = $2"
            " AND g.reminded_at IS NULL AND g.expires_at <= $3 AND g.expires_at > $1"
            " AND g.id IN (SELECT id FROM grants WHERE status = $2 AND reminded_at IS NULL"
            "              AND expires_at <= $3 ORDER BY expires_at LIMIT $4"
            "              FOR UPDATE SKIP LOCKED)"
            " RETURNING g.id",
            store.clock.now(),
            GrantStatus.ACTIVE.value,
            store.clock.now() + within,
            limit,
        )
    return [await _held(store, r["id"]) for r in ids]


async def _held(store: Store, grant_id: uuid.UUID) -> Held:
    async with store.transaction() as tx:
        grant = await tx.session.get(GrantRow, grant_id)
        request = await tx.session.get(RequestRow, grant.request_id) if grant else None
    if grant is None or request is None:
        raise NotFound(f"grant {grant_id} not found")
    return Held(request, grant)


async def unclaim_reminder(store: Store, grant_id: uuid.UUID) -> None:
    async with store.raw_connection() as conn:
        await conn.execute("UPDATE grants SET reminded_at = NULL WHERE id = $1", grant_id)
