"""Ending grants in bulk: those due, those whose one-shot command ran, hand-offs nobody took.

Each ending revokes the lease in Vault first and marks the grant ended only when Vault said
yes (a failure leaves it active and overdue, and a later pass tries again after a backoff, so
that grants Vault keeps refusing cannot stand first in every pass while others fall due).
``SKIP LOCKED`` lets replicas share the work. Requests a grant ended before they ran fail,
in set-based SQL limited to the moves :data:`~keyturn.domain.REQUEST_TRANSITIONS` allows.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import exists, select

from keyturn.backoff import Backoff
from keyturn.domain import GrantStatus, RequestStatus
from keyturn.store import executions
from keyturn.store.audit_log import Event
from keyturn.store.db import Store
from keyturn.store.grants import RevokeLease
from keyturn.store.models import GrantRow, RequestRow

log = logging.getLogger(__name__)


REVOKE_CONCURRENCY = 32  # Vault calls in flight per sweep batch
REVOKE_RETRY_CAP = 60.0  # seconds: the longest wait before a failed revocation is retried


class Ending(StrEnum):
    """Which active grants a pass ends, and what it calls them."""

    DUE = "due"  # past expires_at: expired
    FINISHED = "finished"  # one-shot, its command has run: revoked
    UNCLAIMED = "unclaimed"  # no gateway took the hand-off in time: revoked


# Credentials that end before their command ran leave the request nothing to run with.
_REQUEST_FAILURE = {
    Ending.DUE: "the credentials expired before a gateway ran the command",
    Ending.UNCLAIMED: "no gateway took the credentials before the hand-off expired;"
    " is a gateway running?",
}


def _sweep_query(which: Ending, now: datetime, limit: int) -> Any:
    query = select(GrantRow).where(
        GrantRow.status == GrantStatus.ACTIVE,
        GrantRow.revoke_after.is_(None) | (GrantRow.revoke_after <= now),
    )
    if which is Ending.DUE:
        query = query.where(GrantRow.expires_at <= now).order_by(GrantRow.expires_at)
    elif which is Ending.FINISHED:
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
    store: Store, which: Ending, revoke: RevokeLease, *, limit: int = 200
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
        return store.clock.now()  # when Vault confirmed it

    async with store.transaction() as tx:
        rows = list((await tx.session.scalars(_sweep_query(which, tx.now, limit))).all())
        if not rows:
            return []
        confirmed = await asyncio.gather(*map(revoked, rows))
        done = []
        events = []
        for row, at in zip(rows, confirmed, strict=True):
            if at is None:  # not first in the next pass, or a few such grants block all others
                row.revoke_attempts += 1
                retry = Backoff(1.0, REVOKE_RETRY_CAP, attempt=row.revoke_attempts - 1)
                row.revoke_after = tx.now + timedelta(seconds=retry.next())
                continue
            grant = row.domain()
            if which is Ending.DUE:
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
        ended = [r.request_id for r in done if r.request_id]
        await executions.grants_ended(tx, ended, _REQUEST_FAILURE.get(which))
    return done


async def fail_stranded(store: Store, after: timedelta, *, limit: int = 100) -> list[uuid.UUID]:
    """Requests left ``executing`` by a gateway that died mid-run: once their credentials
    have been dead for ``after`` nothing can still be running them, so they fail."""
    async with store.transaction() as tx:
        conn = await tx.raw_connection()
        rows = await conn.fetch(
            "SELECT r.id FROM requests r JOIN grants g ON g.request_id = r.id"
            " WHERE r.status = 'executing' AND NOT r.access AND g.status <> 'active'"
            " AND g.ended_at < $1"
            " ORDER BY g.ended_at LIMIT $2 FOR UPDATE OF r SKIP LOCKED",
            tx.now - after,
            limit,
        )
        return await executions.fail_unrun(
            tx,
            [r["id"] for r in rows],
            "the gateway running this command stopped before recording a result",
            RequestStatus.EXECUTING,
        )
