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
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import exists, select

from keyturn.domain import REQUEST_TRANSITIONS, Grant, GrantStatus, RequestStatus
from keyturn.errors import InvalidInput, NotFound
from keyturn.store.audit_log import Event
from keyturn.store.db import Store, Tx, utcnow
from keyturn.store.models import GrantRow, RequestRow

log = logging.getLogger(__name__)

REVOKE_CONCURRENCY = 32  # Vault calls in flight per sweep batch


@dataclass(frozen=True)
class Minted:
    """What Vault issued, as keyturn records it: never the credentials themselves."""

    kind: str  # postgres | ssh
    handoff_token: str  # single-use wrapping token around the credentials
    wrap_accessor: str
    handoff_ttl: timedelta
    ttl: timedelta  # the grant's life
    max_ttl: timedelta  # the role's ceiling, for Extend
    lease_id: str | None = None  # SSH certificates have no lease
    serial: str | None = None  # an SSH certificate's serial, for the audit log


Mint = Callable[[RequestRow], Awaitable[Minted]]
Unmint = Callable[[Minted], Awaitable[None]]
RevokeLease = Callable[[GrantRow], Awaitable[None]]


async def get_grant(store: Store, grant_id: uuid.UUID) -> GrantRow:
    async with store.transaction() as tx:
        row = await tx.session.get(GrantRow, grant_id)
    if row is None:
        raise NotFound(f"grant {grant_id} not found")
    return row


# ---------------------------------------------------------------- issuing (bot)


async def awaiting_credentials(store: Store, limit: int = 20) -> list[uuid.UUID]:
    """Approved requests that have no grant yet and whose next attempt is due."""
    async with store.driver() as conn:
        rows = await conn.fetch(
            "SELECT r.id FROM requests r WHERE r.status = 'approved'"
            " AND (r.issue_after IS NULL OR r.issue_after <= now())"
            " AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.request_id = r.id)"
            " ORDER BY r.decided_at LIMIT $1",
            limit,
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
    now = utcnow()
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
        one_shot=True,
        handoff_token=minted.handoff_token,
        handoff_expires_at=now + minted.handoff_ttl,
        created_at=now,
        expires_at=now + minted.ttl,
        max_expires_at=now + minted.max_ttl,
    )
    tx.session.add(row)
    request.issue_error, request.issue_after = None, None
    request.updated_at = now
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
        now = utcnow()
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


# ---------------------------------------------------------------- the hand-off (gateway)


@dataclass(frozen=True)
class Handoff:
    request: RequestRow
    grant: GrantRow
    token: str


async def claim_handoff(store: Store, request_id: uuid.UUID | None = None) -> Handoff | None:
    """Take one approved request whose credentials wait, moving it to ``executing``.

    The wrapping token leaves the database in the same transaction: a second gateway finds
    nothing. The approved hash (on the grant) must match the stored command, or nothing runs.
    """
    async with store.transaction() as tx:
        now = utcnow()
        query = (
            select(RequestRow, GrantRow)
            .join(GrantRow, GrantRow.request_id == RequestRow.id)
            .where(
                RequestRow.status == RequestStatus.APPROVED,
                GrantRow.status == GrantStatus.ACTIVE,
                GrantRow.handoff_token.is_not(None),
                GrantRow.handoff_expires_at > now,
            )
            .order_by(RequestRow.decided_at)
            .limit(1)
            .with_for_update(of=[RequestRow, GrantRow], skip_locked=True)
        )
        if request_id is not None:
            query = query.where(RequestRow.id == request_id)
        found = (await tx.session.execute(query)).one_or_none()
        if found is None:
            return None
        request, grant = found
        token = grant.handoff_token
        assert token is not None
        req = request.domain()
        req.start_execution(grant.command_sha256 or "")
        request.save(req, now)
        grant.handoff_token = None
        tx.record(
            Event(
                "request.executing",
                "keyturn",
                request_id=request.id,
                grant_id=grant.id,
                data={"wrap_accessor": grant.wrap_accessor},
            )
        )
    return Handoff(request, grant, token)


# ---------------------------------------------------------------- ending grants (bot)


class Sweep(StrEnum):
    """Which active grants a pass ends, and what it calls them."""

    DUE = "due"  # past expires_at: expired
    FINISHED = "finished"  # one-shot, its command has run: revoked
    UNCLAIMED = "unclaimed"  # no gateway took the hand-off in time: revoked


_REQUEST_FAILURE = {
    Sweep.DUE: "the credentials expired before a gateway ran the command",
    Sweep.UNCLAIMED: "no gateway took the credentials before the hand-off expired;"
    " is a gateway running?",
}


def _sweep_query(which: Sweep, now: datetime, limit: int) -> Any:
    query = select(GrantRow).where(GrantRow.status == GrantStatus.ACTIVE)
    if which is Sweep.DUE:
        query = query.where(GrantRow.expires_at <= now).order_by(GrantRow.expires_at)
    elif which is Sweep.FINISHED:
        query = query.where(
            GrantRow.one_shot.is_(True),
            exists().where(
                RequestRow.id == GrantRow.request_id,
                RequestRow.status.in_([RequestStatus.EXECUTED, RequestStatus.FAILED]),
            ),
        )
    else:
        query = query.where(GrantRow.handoff_token.is_not(None), GrantRow.handoff_expires_at <= now)
    return query.limit(limit).with_for_update(of=GrantRow, skip_locked=True)


async def end_grants(
    store: Store, which: Sweep, revoke: RevokeLease, *, limit: int = 200
) -> list[GrantRow]:
    """End a batch of grants: revoke their leases in Vault (concurrently), then mark them.

    A lease Vault fails to revoke keeps its grant active for the next pass (logged).
    """
    gate = asyncio.Semaphore(REVOKE_CONCURRENCY)

    async def revoked(row: GrantRow) -> datetime | None:
        """When Vault confirmed the revocation; None when it failed."""
        try:
            async with gate:
                await revoke(row)
        except Exception as exc:  # the grant stays active and overdue: retried next pass
            log.warning("could not revoke the lease of grant %s: %s", row.id, exc)
            return None
        return utcnow()

    async with store.transaction() as tx:
        rows = list((await tx.session.scalars(_sweep_query(which, utcnow(), limit))).all())
        if not rows:
            return []
        confirmed = await asyncio.gather(*map(revoked, rows))
        done = []
        events = []
        for row, at in zip(rows, confirmed, strict=True):
            if at is None:
                continue
            grant = row.domain()
            if which is Sweep.DUE:
                grant.expire(at)
            else:
                grant.revoke(at)
            row.save(grant, "keyturn")
            done.append(row)
            events.append(
                Event(
                    f"grant.{grant.status}",
                    "keyturn",
                    row.request_id,
                    row.id,
                    {"lease_id": row.lease_id, "why": which.value},
                )
            )
        await tx.session.flush()
        tx.record(*events)
        failure = _REQUEST_FAILURE.get(which)
        if failure is not None:
            await _fail_unrun(tx, [r.request_id for r in done if r.request_id], failure)
    return done


# Credentials that end before their command ran leave the request nothing to run with; a
# gateway that died while running leaves it executing.
assert RequestStatus.FAILED in REQUEST_TRANSITIONS[RequestStatus.APPROVED]
assert RequestStatus.FAILED in REQUEST_TRANSITIONS[RequestStatus.EXECUTING]


async def _fail_unrun(
    tx: Tx,
    request_ids: Sequence[uuid.UUID],
    error: str,
    status: RequestStatus = RequestStatus.APPROVED,
) -> list[uuid.UUID]:
    """Requests still in ``status`` fail, with the reason; one statement."""
    if not request_ids:
        return []
    conn = await tx.driver()
    failed = await conn.fetch(
        "UPDATE requests SET status = 'failed', error = $2, updated_at = now()"
        " WHERE id = ANY($1::uuid[]) AND status = $3 RETURNING id",
        list(request_ids),
        error,
        status.value,
    )
    ids = [r["id"] for r in failed]
    tx.record(*(Event("request.failed", "keyturn", i, data={"error": error}) for i in ids))
    return ids


async def fail_stranded(store: Store, after: timedelta, *, limit: int = 100) -> list[uuid.UUID]:
    """Requests left ``executing`` by a gateway that died mid-run: once their credentials
    have been dead for ``after`` nothing can still be running them, so they fail."""
    async with store.transaction() as tx:
        conn = await tx.driver()
        rows = await conn.fetch(
            "SELECT r.id FROM requests r JOIN grants g ON g.request_id = r.id"
            " WHERE r.status = 'executing' AND g.status <> 'active'"
            " AND g.ended_at < now() - $1::interval"
            " ORDER BY g.ended_at LIMIT $2 FOR UPDATE OF r SKIP LOCKED",
            after,
            limit,
        )
        return await _fail_unrun(
            tx,
            [r["id"] for r in rows],
            "the gateway running this command stopped before recording a result",
            RequestStatus.EXECUTING,
        )


async def revoke(store: Store, grant_id: uuid.UUID, by: str, revoke_lease: RevokeLease) -> GrantRow:
    """Revoke now (a human's click): Vault first, then the grant; an unrun command fails."""
    async with store.transaction() as tx:
        row = await tx.locked(GrantRow, grant_id)
        grant = row.domain()
        grant.revoke(utcnow())  # raises IllegalTransition when already ended
        await revoke_lease(row)
        await _changed(tx, row, grant, by, {"why": "revoked by hand"})
        if row.request_id is not None:
            await _fail_unrun(tx, [row.request_id], f"credentials revoked by {by} before the run")
    return row


RenewLease = Callable[[GrantRow, timedelta], Awaitable[timedelta]]


async def extend(
    store: Store, grant_id: uuid.UUID, by: str, extra: timedelta, renew_lease: RenewLease
) -> GrantRow:
    """Push ``expires_at`` later, within the role's ceiling, renewing the Vault lease to match.

    ``renew_lease(row, ttl_from_now)`` returns what Vault granted; when Vault grants less
    (its own max TTL), the grant ends when the lease does.
    """
    async with store.transaction() as tx:
        row = await tx.locked(GrantRow, grant_id)
        grant = row.domain()
        now = utcnow()
        ceiling = row.max_expires_at or row.expires_at
        grant.extend(extra, ceiling, now)
        granted = await renew_lease(row, grant.expires_at - now)
        if granted <= timedelta(0):
            raise InvalidInput("Vault would not extend this lease")
        grant.expires_at = min(grant.expires_at, now + granted)
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


# ---------------------------------------------------------------- what the scheduler needs


async def active_grants(store: Store) -> list[tuple[uuid.UUID, datetime]]:
    """Every active grant and when it is due: the scheduler's jobs, rebuilt at start."""
    async with store.driver() as conn:
        rows = await conn.fetch(
            "SELECT id, expires_at FROM grants WHERE status = 'active' ORDER BY expires_at"
        )
    return [(r["id"], r["expires_at"]) for r in rows]


async def known_leases(store: Store, lease_ids: Sequence[str]) -> set[str]:
    """Which of ``lease_ids`` belong to an active grant (the others are orphans)."""
    if not lease_ids:
        return set()
    async with store.driver() as conn:
        rows = await conn.fetch(
            "SELECT lease_id FROM grants WHERE status = 'active' AND lease_id = ANY($1::text[])",
            list(lease_ids),
        )
    return {r["lease_id"] for r in rows}


async def record_orphans(store: Store, lease_ids: Sequence[str]) -> None:
    async with store.transaction() as tx:
        events = [Event("lease.orphan_revoked", "keyturn", data={"lease_id": i}) for i in lease_ids]
        tx.record(*events)
