"""Use cases that change state: one function per operation, one transaction each.

Every function locks the row it changes (``SELECT … FOR UPDATE``), asks :mod:`keyturn.domain`
whether the move is legal, writes it, appends an audit event and queues a ``pg_notify`` that
Postgres delivers on commit. A double click, two bot replicas or an approve racing a deny thus
give exactly one outcome; the losers get a :class:`~keyturn.errors.Conflict`. Sweeps use
``SKIP LOCKED`` so replicas share the work instead of queueing behind each other.

Functions return detached rows: plain data once the transaction has closed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from keyturn.domain import (
    Approval,
    Decision,
    Request,
    RequestStatus,
    command_sha256,
)
from keyturn.errors import Conflict, InvalidInput, NotFound
from keyturn.store.audit_log import Event
from keyturn.store.db import Store, Tx, utcnow
from keyturn.store.models import ApprovalRow, GrantRow, RequestRow

MAX_COMMAND_BYTES = 64 * 1024


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


# ---------------------------------------------------------------- mapping rows <-> domain


def request_of(row: RequestRow) -> Request:
    return Request(
        id=row.id,
        target=row.target,
        command=row.command,
        requester=row.requester,
        on_behalf_of=row.on_behalf_of,
        created_at=row.created_at,
        pending_expires_at=row.pending_expires_at,
        quorum=row.quorum,
        status=RequestStatus(row.status),
        approvals=[
            Approval(a.approver, Decision(a.decision), a.at, a.reason) for a in row.approvals
        ],
        decided_at=row.decided_at,
    )


def save_request(tx: Tx, row: RequestRow, req: Request, now: datetime) -> None:
    for vote in req.approvals[len(row.approvals) :]:
        row.approvals.append(
            ApprovalRow(
                request_id=row.id,
                approver=vote.approver,
                decision=vote.decision,
                reason=vote.reason,
                at=vote.at,
            )
        )
    row.status = req.status
    row.decided_at = req.decided_at
    row.updated_at = now


Row = TypeVar("Row", RequestRow, GrantRow)


async def locked(tx: Tx, model: type[Row], ident: uuid.UUID) -> Row:
    """The row, locked until the transaction ends (``SELECT … FOR UPDATE``)."""
    row = (
        await tx.session.scalars(select(model).where(model.id == ident).with_for_update(of=model))
    ).one_or_none()
    if row is None:
        raise NotFound(f"{model.__tablename__[:-1]} {ident} not found")
    return row


async def locked_request(tx: Tx, request_id: uuid.UUID) -> RequestRow:
    return await locked(tx, RequestRow, request_id)


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class NewRequest:
    target: str
    command: str
    requester: str
    pending_ttl: timedelta
    quorum: int = 1
    on_behalf_of: str | None = None
    run_id: str | None = None
    reason: str | None = None
    rule: str | None = None
    classification: dict[str, Any] = field(default_factory=dict)
    grant_ttl: timedelta | None = None
    idempotency_key: str | None = None
    body_sha256: str | None = None


async def create_request(store: Store, new: NewRequest) -> tuple[RequestRow, bool]:
    """Store a pending request; returns ``(row, created)``.

    With an idempotency key, the same key and body give back the first request
    (``created`` False) and a different body raises :class:`IdempotencyConflict`.
    """
    if not new.command.strip():
        raise InvalidInput("command is empty")
    if len(new.command.encode()) > MAX_COMMAND_BYTES:
        raise InvalidInput(f"command is larger than {MAX_COMMAND_BYTES} bytes")
    if new.pending_ttl <= timedelta(0):
        raise InvalidInput("pending_ttl must be positive")
    if new.idempotency_key is not None:
        existing = await _find_idempotent(store, new)
        if existing is not None:
            return existing, False
    now = utcnow()
    row = RequestRow(
        id=uuid.uuid4(),
        target=new.target,
        command=new.command,
        command_sha256=command_sha256(new.command),
        requester=new.requester,
        on_behalf_of=new.on_behalf_of,
        run_id=new.run_id,
        reason=new.reason,
        status=RequestStatus.PENDING,
        rule=new.rule,
        classification=new.classification,
        quorum=new.quorum,
        grant_ttl_seconds=int(new.grant_ttl.total_seconds()) if new.grant_ttl else None,
        idempotency_key=new.idempotency_key,
        body_sha256=new.body_sha256,
        created_at=now,
        updated_at=now,
        pending_expires_at=now + new.pending_ttl,
        approvals=[],
    )
    try:
        async with store.transaction() as tx:
            tx.session.add(row)
            await tx.session.flush()
            tx.record(
                Event(
                    "request.held",
                    new.requester,
                    request_id=row.id,
                    data={
                        "target": new.target,
                        "command_sha256": row.command_sha256,
                        "rule": new.rule,
                        "on_behalf_of": new.on_behalf_of,
                        "run_id": new.run_id,
                    }
                    | _shadow(new.classification),
                )
            )
    except IntegrityError:
        # Lost a race with the same idempotency key: the winner's row is the answer.
        existing = await _find_idempotent(store, new)
        if existing is None:
            raise
        return existing, False
    return row, True


async def _find_idempotent(store: Store, new: NewRequest) -> RequestRow | None:
    async with store.transaction() as tx:
        row = (
            await tx.session.scalars(
                select(RequestRow).where(
                    RequestRow.requester == new.requester,
                    RequestRow.idempotency_key == new.idempotency_key,
                )
            )
        ).one_or_none()
    if row is not None and row.body_sha256 != new.body_sha256:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    return row


def _shadow(classification: dict[str, Any]) -> dict[str, Any]:
    """What shadow rules would have done, for the audit event (when any matched)."""
    return {"shadow": classification["shadow"]} if classification.get("shadow") else {}


async def get_request(store: Store, request_id: uuid.UUID) -> RequestRow:
    async with store.transaction() as tx:
        row = await tx.session.get(RequestRow, request_id)
    if row is None:
        raise NotFound(f"request {request_id} not found")
    return row


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
WHERE r.id = $1
"""


async def get_request_view(store: Store, request_id: uuid.UUID) -> RequestView:
    """One round trip on a pooled connection, no ORM: long-polls re-read rows often."""
    async with store.driver() as conn:
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
    async with store.driver() as conn:
        rows = await conn.fetch(
            "SELECT id FROM requests WHERE id = ANY($1::uuid[]) AND status <> 'pending'", ids
        )
    return [row["id"] for row in rows]


async def count_pending(store: Store) -> int:
    async with store.driver() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM requests WHERE status = 'pending'")
    return count


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
) -> DecisionResult:
    """Record an approve or deny vote. Who may vote is the caller's check (policy approvers)."""
    async with store.transaction() as tx:
        row = await locked_request(tx, request_id)
        req = request_of(row)
        now = utcnow()
        if decision is Decision.APPROVE:
            decided = req.approve(approver, now)
        else:
            req.deny(approver, reason or "", now)
            decided = True
        save_request(tx, row, req, now)
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


async def cancel_request(store: Store, request_id: uuid.UUID, by: str) -> RequestRow:
    async with store.transaction() as tx:
        row = await locked_request(tx, request_id)
        req = request_of(row)
        now = utcnow()
        req.cancel(by, now)
        save_request(tx, row, req, now)
        tx.record(Event("request.cancelled", by, request_id=row.id))
    return row


async def expire_due_requests(store: Store, *, limit: int = 100) -> list[RequestRow]:
    """Expire pending requests past their TTL; rows another replica holds are skipped."""
    async with store.transaction() as tx:
        now = utcnow()
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
            req = request_of(row)
            req.expire(now)
            save_request(tx, row, req, now)
            tx.record(Event("request.expired", "keyturn", request_id=row.id))
    return list(rows)


async def start_execution(store: Store, request_id: uuid.UUID, sha256: str) -> RequestRow:
    """Claim an approved request for running; a second claim conflicts (approval used once)."""
    async with store.transaction() as tx:
        row = await locked_request(tx, request_id)
        req = request_of(row)
        req.start_execution(sha256)
        save_request(tx, row, req, utcnow())
        tx.record(Event("request.executing", "keyturn", request_id=row.id))
    return row


async def finish_execution(
    store: Store,
    request_id: uuid.UUID,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    result_digest: str | None = None,
) -> RequestRow:
    """Record the outcome; ``error`` set means failed. Store only masked results here."""
    async with store.transaction() as tx:
        row = await locked_request(tx, request_id)
        req = request_of(row)
        if req.status is RequestStatus.APPROVED:
            req.fail()
        else:
            req.finish(ok=error is None)
        save_request(tx, row, req, utcnow())
        row.result, row.error = result, error
        tx.record(
            Event(
                f"request.{req.status}",
                "keyturn",
                request_id=row.id,
                data={"result_digest": result_digest} if result_digest else {"error": error},
            )
        )
    return row


# ---------------------------------------------------------------- decided by policy


@dataclass(frozen=True)
class Outcome:
    """A command the policy decided on its own: blocked, or allowed and run at once.

    ``status`` is ``blocked`` (only an audit event), ``executing`` (recorded before its result
    is known; a :class:`Completion` follows) or a final ``executed`` / ``failed``.
    """

    id: uuid.UUID
    target: str
    command: str
    requester: str
    status: str
    rule: str | None
    classification: dict[str, Any]
    on_behalf_of: str | None = None
    run_id: str | None = None
    reason: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None  # kept only for idempotent replays
    result_digest: str | None = None
    idempotency_key: str | None = None
    body_sha256: str | None = None


@dataclass(frozen=True)
class Completion:
    """How an ``executing`` outcome ended (``result`` is kept only for idempotent replays)."""

    id: uuid.UUID
    requester: str
    error: str | None
    result_digest: str | None
    result: dict[str, Any] | None = None
    release_key: bool = False  # it never ran: its Idempotency-Key may be used again


# One statement for a whole batch: one round trip, atomic on its own.
_WRITE_OUTCOMES = """
WITH inserted AS (
    INSERT INTO requests (id, target, command, command_sha256, requester, on_behalf_of, run_id,
        reason, status, rule, classification, quorum, idempotency_key, body_sha256, created_at,
        updated_at, pending_expires_at, decided_at, result, error)
    SELECT x.id, x.target, x.command, encode(sha256(convert_to(x.command, 'UTF8')), 'hex'),
        x.requester, x.on_behalf_of, x.run_id, x.reason, x.status, x.rule, x.classification, 1,
        x.idempotency_key, x.body_sha256, now(), now(), now(), now(), x.result, x.error
    FROM jsonb_to_recordset($1::jsonb) AS x(id uuid, target text, command text, requester text,
        on_behalf_of text, run_id text, reason text, status text, rule text,
        classification jsonb, idempotency_key text, body_sha256 text, result jsonb, error text)
), completed AS (
    UPDATE requests r SET status = x.status, error = x.error, result = x.result,
        idempotency_key = CASE WHEN x.release_key THEN NULL ELSE r.idempotency_key END,
        updated_at = now()
    FROM jsonb_to_recordset($2::jsonb) AS x(id uuid, status text, error text, result jsonb,
        release_key boolean)
    WHERE r.id = x.id AND r.status = 'executing'
    RETURNING r.id
), audited AS (
    -- an outcome is audited only with the change it records: a retried completion whose
    -- first attempt did commit changes nothing and adds no second event
    INSERT INTO audit_events (kind, actor, request_id, data)
    SELECT x.kind, x.actor, x.request_id, x.data
    FROM ROWS FROM (jsonb_to_recordset($3::jsonb) AS (kind text, actor text, request_id uuid,
        data jsonb, outcome boolean)) WITH ORDINALITY AS x(kind, actor, request_id, data,
        outcome, n)
    WHERE NOT coalesce(x.outcome, false) OR x.request_id IN (SELECT id FROM completed)
    ORDER BY x.n
)
SELECT count(pg_notify('keyturn', 'request:' || id)) FROM completed
"""


async def write_outcomes(conn: asyncpg.Connection, records: Sequence[Outcome | Completion]) -> None:
    """Write records in one statement on ``conn`` (the gateway's journal batches them)."""
    rows: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for r in records:
        if isinstance(r, Completion):
            status = RequestStatus.FAILED if r.error else RequestStatus.EXECUTED
            done.append(
                {
                    "id": str(r.id),
                    "status": status.value,
                    "error": r.error,
                    "result": r.result,
                    "release_key": r.release_key,
                }
            )
            events.append(
                {
                    "kind": f"request.{status}",
                    "actor": "keyturn",
                    "request_id": str(r.id),
                    "data": {"result_digest": r.result_digest, "error": r.error},
                    "outcome": True,
                }
            )
            continue
        data: dict[str, Any] = {
            "target": r.target,
            "command_sha256": command_sha256(r.command),
            "rule": r.rule,
            "on_behalf_of": r.on_behalf_of,
            "run_id": r.run_id,
        } | _shadow(r.classification)
        if r.status == "blocked":
            events.append(
                {"kind": "request.blocked", "actor": r.requester, "request_id": None, "data": data}
            )
            continue
        rows.append(
            {
                "id": str(r.id),
                "target": r.target,
                "command": r.command,
                "requester": r.requester,
                "on_behalf_of": r.on_behalf_of,
                "run_id": r.run_id,
                "reason": r.reason,
                "status": r.status,
                "rule": r.rule,
                "classification": r.classification,
                "idempotency_key": r.idempotency_key,
                "body_sha256": r.body_sha256,
                "result": r.result,
                "error": r.error,
            }
        )
        if r.result_digest or r.error:
            data |= {"result_digest": r.result_digest, "error": r.error}
        events.append(
            {"kind": "request.allowed", "actor": r.requester, "request_id": str(r.id), "data": data}
        )
    await conn.execute(_WRITE_OUTCOMES, json.dumps(rows), json.dumps(done), json.dumps(events))


async def find_idempotent(
    store: Store, requester: str, key: str, body_sha256: str
) -> RequestRow | None:
    """The request an earlier call with this key made; a different body is a conflict."""
    return await _find_idempotent(
        store,
        NewRequest("", "", requester, timedelta(1), idempotency_key=key, body_sha256=body_sha256),
    )


# ---------------------------------------------------------------- approval cards (bot)


async def claim_card(store: Store, replica: str, claim_timeout: timedelta) -> RequestRow | None:
    """Claim one pending request that has no card yet (or whose claim went stale).

    ``SKIP LOCKED`` lets replicas claim different requests at once; a claim older than
    ``claim_timeout`` is taken over (its replica died between claiming and posting).
    """
    async with store.transaction() as tx:
        now = utcnow()
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
