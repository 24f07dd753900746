"""Grants: credentials born on approval, handed to a gateway once, ended on time.

Every function that talks to Vault does so *inside* the transaction that holds the grant's
(or request's) row lock, through a callback the caller passes (the store knows no Vault):

- issuing holds the request's lock while Vault mints, so two bot replicas never issue twice;
- ending revokes the lease first and marks the grant ended only when Vault said yes, so the
  database never claims a credential is dead while it lives (a failure leaves the grant
  active and overdue, and the next sweep tries again);
- sweeps use ``SKIP LOCKED``, so replicas share the work.

Lock order is grant, then request. The gateway's claim takes both at once with
``SKIP LOCKED``, so it never waits on a bot holding a grant.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select

from keyturn.domain import Grant, GrantStatus, RequestStatus
from keyturn.errors import InvalidInput, NotFound
from keyturn.store import executions
from keyturn.store.audit_log import Event
from keyturn.store.db import Store, Tx
from keyturn.store.models import GrantRow, RequestRow


@dataclass(frozen=True)
class Minted:
    """What Vault issued, as keyturn records it: never the credentials themselves."""

    kind: str  # postgres | ssh
    ttl: timedelta  # the grant's life
    max_ttl: timedelta  # the role's ceiling, for Extend
    # the single-use wrapping token a gateway takes; a person's access went to them by DM
    handoff_token: str | None = None
    wrap_accessor: str | None = None
    handoff_ttl: timedelta | None = None
    lease_id: str | None = None  # SSH certificates have no lease
    serial: str | None = None  # an SSH certificate's serial, for the audit log


Mint = Callable[[RequestRow], Awaitable[Minted]]


Unmint = Callable[[Minted], Awaitable[None]]


RevokeLease = Callable[[GrantRow], Awaitable[None]]


RenewLease = Callable[[GrantRow, timedelta], Awaitable[timedelta]]


async def get_grant(store: Store, grant_id: uuid.UUID) -> GrantRow:
    async with store.transaction() as tx:
        row = await tx.session.get(GrantRow, grant_id)
    if row is None:
        raise NotFound(f"grant {grant_id} not found")
    return row


async def newest_grant(tx: Tx, request_id: uuid.UUID) -> GrantRow | None:
    """The request's most recent grant (an approved request has at most one active)."""
    return (
        await tx.session.scalars(
            select(GrantRow)
            .where(GrantRow.request_id == request_id)
            .order_by(GrantRow.created_at.desc())
            .limit(1)
        )
    ).one_or_none()


async def awaiting_credentials(store: Store, limit: int = 20) -> list[uuid.UUID]:
    """Approved requests that have no grant yet and whose next attempt is due."""
    async with store.raw_connection() as conn:
        rows = await conn.fetch(
            "SELECT r.id FROM requests r WHERE r.status = 'approved'"
            " AND (r.issue_after IS NULL OR r.issue_after <= $2)"
            " AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.request_id = r.id)"
            " ORDER BY r.decided_at LIMIT $1",
            limit,
            store.clock.now(),
        )
    return [r["id"] for r in rows]


async def issue(store: Store, request_id: uuid.UUID, mint: Mint, unmint: Unmint) -> GrantRow | None:
    """Mint credentials for an approved request and record the grant, exactly once.

    None when there is nothing to do: the request is not approved, already has a grant, or
    another replica is issuing it right now. Errors from ``mint`` propagate, changing nothing.
    """
    minted: Minted | None = None
    try:
        async with store.transaction() as tx:
            request = (
                await tx.session.scalars(
                    select(RequestRow)
                    .where(
                        RequestRow.id == request_id,
                        RequestRow.status == RequestStatus.APPROVED,
                        ~exists().where(GrantRow.request_id == RequestRow.id),
                    )
                    .with_for_update(of=RequestRow, skip_locked=True)
                )
            ).one_or_none()
            if request is None:
                return None
            minted = await mint(request)
            row = await _record_grant(tx, request, minted)
    except BaseException:
        if minted is not None:
            # Not recorded: nobody will ever revoke it unless we do now (the orphan sweep is
            # the backstop when this process dies right here).
            await asyncio.shield(unmint(minted))
        raise
    return row


async def _record_grant(tx: Tx, request: RequestRow, minted: Minted) -> GrantRow:
    now = tx.now
    row = GrantRow(
        id=uuid.uuid4(),
        request_id=request.id,
        subject=request.requester,
        target=request.target,
        status=GrantStatus.ACTIVE,
        kind=minted.kind,
        lease_id=minted.lease_id,
        wrap_accessor=minted.wrap_accessor,
        command_sha256=request.command_sha256,
        one_shot=not request.access,
        handoff_token=minted.handoff_token,
        handoff_expires_at=now + minted.handoff_ttl if minted.handoff_ttl else None,
        created_at=now,
        expires_at=now + minted.ttl,
        max_expires_at=now + minted.max_ttl,
    )
    tx.session.add(row)
    request.issue_error, request.issue_after = None, None
    request.updated_at = now
    if request.access:  # its human holds the credentials now
        req = request.domain()
        req.open_access()
        request.save(req, now)
    await tx.session.flush()
    tx.record(
        Event(
            "grant.issued",
            "keyturn",
            request_id=request.id,
            grant_id=row.id,
            data={
                "kind": minted.kind,
                "lease_id": minted.lease_id,
                "serial": minted.serial,
                "wrap_accessor": minted.wrap_accessor,
                "expires_at": row.expires_at.isoformat(),
                "command_sha256": request.command_sha256,
            },
        )
    )
    if not request.access:
        tx.wake("handoff", request.id)
    return row


async def issue_failed(
    store: Store, request_id: uuid.UUID, error: str, retry_in: timedelta | None
) -> RequestRow | None:
    """Note a failed attempt; retry after ``retry_in``, or (None) give up: the request fails."""
    async with store.transaction() as tx:
        row = await tx.locked(RequestRow, request_id)
        if row.status != RequestStatus.APPROVED:
            return None
        now = tx.now
        row.issue_attempts += 1
        row.issue_error = error
        row.updated_at = now
        if retry_in is None:
            req = row.domain()
            req.fail()
            row.save(req, now)
            row.error = f"credentials could not be issued: {error}"
            tx.record(
                Event("request.failed", "keyturn", request_id=row.id, data={"error": row.error})
            )
        else:
            row.issue_after = now + retry_in
            if row.issue_attempts == 1:
                tx.record(
                    Event(
                        "grant.issue_delayed", "keyturn", request_id=row.id, data={"error": error}
                    )
                )
        tx.wake("request", row.id)  # its card shows the attempt
    return row


async def revoke(store: Store, grant_id: uuid.UUID, by: str, revoke_lease: RevokeLease) -> GrantRow:
    """Revoke now (a human's click): Vault first, then the grant; an unrun command fails."""
    async with store.transaction() as tx:
        row = await tx.locked(GrantRow, grant_id)
        grant = row.domain()
        grant.revoke(tx.now)  # raises IllegalTransition when already ended
        await revoke_lease(row)
        await _changed(tx, row, grant, by, {"why": "revoked by hand"})
        if row.request_id is not None:
            unrun = f"credentials revoked by {by} before the run"
            await executions.grants_ended(tx, [row.request_id], unrun)
    return row


async def extend(
    store: Store, grant_id: uuid.UUID, by: str, extra: timedelta, renew_lease: RenewLease
) -> GrantRow:
    """Push ``expires_at`` later, within the role's ceiling, renewing the Vault lease to match.

    ``renew_lease(row, ttl_from_now)`` returns what Vault granted; when Vault grants less
    (its own max TTL), the grant ends when the lease does.
    """
    async with store.transaction() as tx:
        row = await tx.locked(GrantRow, grant_id)
        if not row.lease_id:  # an SSH certificate: its validity was fixed when it was signed
            raise InvalidInput("an SSH certificate cannot be extended: ask for a new one")
        grant = row.domain()
        now = tx.now
        ceiling = row.max_expires_at or row.expires_at
        grant.extend(extra, ceiling, now)
        granted = await renew_lease(row, grant.expires_at - now)
        if granted <= timedelta(0):
            raise InvalidInput("Vault would not extend this lease")
        grant.expires_at = min(grant.expires_at, now + granted)
        row.reminded_at = None  # warned again before the new expiry
        await _changed(tx, row, grant, by, {"expires_at": grant.expires_at.isoformat()}, "extended")
    return row


async def _changed(
    tx: Tx, row: GrantRow, grant: Grant, by: str, data: dict[str, Any], kind: str | None = None
) -> None:
    """Write a grant's move by ``by``: the row, its audit event, its notification."""
    row.save(grant, by)
    tx.record(
        Event(
            f"grant.{kind or grant.status}",
            by,
            request_id=row.request_id,
            grant_id=row.id,
            data={"lease_id": row.lease_id, **data},
        )
    )


async def active_grants(store: Store) -> list[tuple[uuid.UUID, datetime]]:
    """Every active grant and when it is due: the scheduler's jobs, rebuilt at start."""
    async with store.raw_connection() as conn:
        rows = await conn.fetch(
            "SELECT id, expires_at FROM grants WHERE status = 'active' ORDER BY expires_at"
        )
    return [(r["id"], r["expires_at"]) for r in rows]


async def known_leases(store: Store, lease_ids: Sequence[str]) -> set[str]:
    """Which of ``lease_ids`` belong to an active grant (the others are orphans)."""
    if not lease_ids:
        return set()
    async with store.raw_connection() as conn:
        rows = await conn.fetch(
            "SELECT lease_id FROM grants WHERE status = 'active' AND lease_id = ANY($1::text[])",
            list(lease_ids),
        )
    return {r["lease_id"] for r in rows}


async def record_orphans(store: Store, lease_ids: Sequence[str]) -> None:
    async with store.transaction() as tx:
        events = [Event("lease.orphan_revoked", "keyturn", data={"lease_id": i}) for i in lease_ids]
        tx.record(*events)
