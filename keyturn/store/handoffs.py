"""The hand-off: a gateway takes an approved request's wrapped credentials, once.

The claim locks grant and request together with ``SKIP LOCKED`` (lock order grant, then
request), so it never waits on a bot holding a grant, and clears the wrapping token in the
same transaction: exactly one gateway ever holds it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select

from keyturn.domain import GrantStatus, RequestStatus
from keyturn.store.audit_log import Event
from keyturn.store.db import Store
from keyturn.store.models import GrantRow, RequestRow


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
        now = tx.now
        query = (
            select(RequestRow, GrantRow)
            .join(GrantRow, GrantRow.request_id == RequestRow.id)
            .where(
                RequestRow.status == RequestStatus.APPROVED,
                RequestRow.access.is_(False),  # a person's credentials: never a gateway's
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
