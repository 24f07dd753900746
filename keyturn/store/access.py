"""People's own access (``/keyturn db|ssh``): what someone has asked for and holds, and
the reminder before it ends.

A person's access is a request (``access`` true) with grants, so approving, issuing, revoking and
expiring them are the same operations as for agents (:mod:`keyturn.store.requests`,
:mod:`keyturn.store.grants`, :mod:`keyturn.store.endings`); this module only reads them and
claims reminders, each exactly once across replicas.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Select, String, cast, select, true

from keyturn.domain import RequestStatus
from keyturn.errors import InvalidInput, NotFound
from keyturn.store.db import Store
from keyturn.store.grants import newest_grant
from keyturn.store.models import GrantRow, RequestRow

SHORT_ID = 8  # how many leading characters of a request id people may type


@dataclass(frozen=True)
class Held:
    """One piece of a person's access: the request and its newest grant (None while pending)."""

    request: RequestRow
    grant: GrantRow | None


def _access_of(user: str) -> Select[RequestRow]:
    return select(RequestRow).where(RequestRow.access.is_(True), RequestRow.requester == user)


async def of_requester(
    store: Store, user: str, target: str | None = None, limit: int = 25
) -> list[Held]:
    """``user``'s access still pending or open (on ``target``), oldest first."""
    async with store.transaction() as tx:
        rows = (
            await tx.session.scalars(
                _access_of(user)
                .where(
                    RequestRow.target == target if target else true(),
                    RequestRow.status.in_(
                        [RequestStatus.PENDING, RequestStatus.APPROVED, RequestStatus.EXECUTING]
                    ),
                )
                .order_by(RequestRow.created_at)
                .limit(limit)
            )
        ).all()
        return [Held(row, await newest_grant(tx, row.id)) for row in rows]


async def own(store: Store, user: str, typed: str) -> Held:
    """The access ``user`` names by its id or the id's first characters; someone else's,
    or none, is :class:`NotFound` (which of the two is not said)."""
    ident = typed.strip().lower()
    if len(ident) < SHORT_ID or any(c not in "0123456789abcdef-" for c in ident):
        raise InvalidInput(
            f"`{typed[:40]}` is not a request id: type its first {SHORT_ID} characters or more"
        )
    async with store.transaction() as tx:
        rows = (
            await tx.session.scalars(
                _access_of(user).where(cast(RequestRow.id, String).startswith(ident)).limit(2)
            )
        ).all()
        if len(rows) > 1:
            raise InvalidInput(f"`{typed[:40]}` matches several of your requests: type more of it")
        if not rows:
            raise NotFound(f"you have no request `{typed[:40]}`")
        return Held(rows[0], await newest_grant(tx, rows[0].id))


@dataclass(frozen=True)
class Expiring:
    """Open access whose requester is due a warning."""

    request: RequestRow
    grant: GrantRow


async def claim_expiry_reminders(
    store: Store, within: timedelta, limit: int = 50
) -> list[Expiring]:
    """Open access ending within ``within`` whose requester has not been warned: marked
    warned now, so one replica warns once (:func:`unclaim_reminder` if the warning failed)."""
    async with store.transaction() as tx:
        conn = await tx.raw_connection()
        ids = await conn.fetch(
            "UPDATE grants SET reminded_at = $1 WHERE id IN ("
            " SELECT g.id FROM grants g JOIN requests r ON r.id = g.request_id"
            " WHERE r.access AND g.status = 'active' AND g.reminded_at IS NULL"
            " AND g.expires_at > $1 AND g.expires_at <= $2"
            " ORDER BY g.expires_at LIMIT $3 FOR UPDATE OF g SKIP LOCKED)"
            " RETURNING id",
            tx.now,
            tx.now + within,
            limit,
        )
        found = (
            await tx.session.execute(
                select(RequestRow, GrantRow)
                .join(GrantRow, GrantRow.request_id == RequestRow.id)
                .where(GrantRow.id.in_([r["id"] for r in ids]))
            )
        ).all()
    return [Expiring(request, grant) for request, grant in found]


async def unclaim_reminder(store: Store, grant_id: uuid.UUID) -> None:
    async with store.raw_connection() as conn:
        await conn.execute("UPDATE grants SET reminded_at = NULL WHERE id = $1", grant_id)
