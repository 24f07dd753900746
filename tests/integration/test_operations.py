"""State changes on a real Postgres: row locks, conflicts, idempotency, immutability."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import pytest
from sqlalchemy import func, select, text

from keyturn.domain import Deciders, Decision, IllegalTransition, RequestStatus, SelfApproval
from keyturn.errors import Conflict, InvalidInput, NotFound
from keyturn.store import decisions, endings, executions, grants, handoffs, requests
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from keyturn.store.models import ApprovalRow, AuditEventRow, GrantRow, RequestRow

UPDATE = "UPDATE orders SET status = 'paid' WHERE id = 42"


def held(**overrides: object) -> requests.NewRequest:
    fields: dict[str, object] = {
        "target": "orders-db",
        "command": UPDATE,
        "requester": "crew-billing",
        "on_behalf_of": "U_HUMAN",
        "pending_ttl": timedelta(minutes=15),
        "rule": "writes",
    }
    fields.update(overrides)
    return requests.NewRequest(**fields)  # type: ignore[arg-type]


async def count(store: Store, model: type, **where: object) -> int:
    async with store.transaction() as tx:
        query = select(func.count()).select_from(model).filter_by(**where)
        return int((await tx.session.execute(query)).scalar_one())


async def test_create_stores_command_and_hash(store: Store) -> None:
    row, created = await requests.create_request(store, held())
    assert created
    again = await requests.get_request(store, row.id)
    assert again.command == UPDATE
    assert again.command_sha256 == row.command_sha256
    assert again.status == RequestStatus.PENDING
    assert await count(store, AuditEventRow, kind="request.held") == 1


async def test_stored_command_is_immutable(store: Store, database: Dsn) -> None:
    row, _ = await requests.create_request(store, held())
    conn = await asyncpg.connect(database.url)
    try:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
            await conn.execute(
                "UPDATE requests SET command = 'DROP TABLE orders' WHERE id = $1", row.id
            )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO requests (id, target, command, command_sha256, requester, status,"
                " classification, quorum, pending_expires_at)"
                " VALUES ($1, 't', 'SELECT 1', $2, 'x', 'pending', '{}', 1, now())",
                uuid.uuid4(),
                "0" * 64,
            )
    finally:
        await conn.close()


async def test_idempotency_key(store: Store) -> None:
    first, created = await requests.create_request(
        store, held(idempotency_key="k1", body_sha256="a")
    )
    same, created_again = await requests.create_request(
        store, held(idempotency_key="k1", body_sha256="a")
    )
    assert created and not created_again
    assert same.id == first.id
    with pytest.raises(requests.IdempotencyConflict):
        await requests.create_request(store, held(idempotency_key="k1", body_sha256="b"))
    # the key is per requester
    other, created_other = await requests.create_request(
        store, held(idempotency_key="k1", body_sha256="b", requester="crew-other")
    )
    assert created_other and other.id != first.id


async def test_concurrent_same_idempotency_key_creates_one(store: Store) -> None:
    results = await asyncio.gather(
        *(
            requests.create_request(store, held(idempotency_key="race", body_sha256="x"))
            for _ in range(10)
        )
    )
    assert len({row.id for row, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_approve_and_deny_flow(store: Store) -> None:
    row, _ = await requests.create_request(store, held(quorum=2))
    first = await decisions.decide(
        store, row.id, "U1", Decision.APPROVE, deciders=Deciders.only("U1")
    )
    assert not first.decided and first.request.status == "pending"
    with pytest.raises(Conflict):
        await decisions.decide(store, row.id, "U1", Decision.APPROVE, deciders=Deciders.only("U1"))
    with pytest.raises(SelfApproval):
        await decisions.decide(
            store, row.id, "U_HUMAN", Decision.APPROVE, deciders=Deciders.only("U_HUMAN")
        )
    second = await decisions.decide(
        store, row.id, "U2", Decision.APPROVE, deciders=Deciders.only("U2")
    )
    assert second.decided and second.request.status == "approved"
    with pytest.raises(IllegalTransition):
        await decisions.decide(
            store, row.id, "U3", Decision.DENY, "too late", deciders=Deciders.only("U3")
        )

    denied, _ = await requests.create_request(store, held())
    result = await decisions.decide(
        store, denied.id, "U1", Decision.DENY, "not during the freeze", deciders=Deciders.only("U1")
    )
    assert result.request.status == "denied"
    stored = await requests.get_request(store, denied.id)
    assert stored.approvals[0].reason == "not during the freeze"


async def test_unknown_request(store: Store) -> None:
    with pytest.raises(NotFound):
        await decisions.decide(
            store, uuid.uuid4(), "U1", Decision.APPROVE, deciders=Deciders.only("U1")
        )


async def test_fifty_concurrent_decisions_make_exactly_one(store: Store) -> None:
    row, _ = await requests.create_request(store, held())
    approvers = [f"U{i}" for i in range(50)]

    async def attempt(i: int) -> str:
        decision = Decision.APPROVE if i % 2 else Decision.DENY
        try:
            await decisions.decide(
                store, row.id, approvers[i], decision, "no", deciders=Deciders.only(approvers[i])
            )
        except IllegalTransition:
            return "conflict"
        return "decided"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(50)))
    assert outcomes.count("decided") == 1
    assert outcomes.count("conflict") == 49
    assert await count(store, ApprovalRow, request_id=row.id) == 1
    final = await requests.get_request(store, row.id)
    assert final.status in ("approved", "denied")
    decided_events = await count(store, AuditEventRow, request_id=row.id)
    assert decided_events == 2  # held + the one decision


async def test_concurrent_decisions_across_separate_engines(database: Dsn) -> None:
    """Two processes (two pools) racing on one row still give one outcome."""
    stores = [Store(database, pool_size=5), Store(database, pool_size=5)]
    try:
        row, _ = await requests.create_request(stores[0], held())

        async def attempt(i: int) -> bool:
            try:
                await decisions.decide(
                    stores[i % 2],
                    row.id,
                    f"U{i}",
                    Decision.APPROVE,
                    deciders=Deciders.only(f"U{i}"),
                )
            except IllegalTransition:
                return False
            return True

        assert sum(await asyncio.gather(*(attempt(i) for i in range(20)))) == 1
    finally:
        for s in stores:
            await s.close()


async def test_expire_due_requests(store: Store) -> None:
    due, _ = await requests.create_request(store, held(pending_ttl=timedelta(milliseconds=1)))
    fresh, _ = await requests.create_request(store, held())
    await asyncio.sleep(0.01)
    expired = await decisions.expire_due_requests(store)
    assert [r.id for r in expired] == [due.id]
    assert (await requests.get_request(store, fresh.id)).status == "pending"
    assert await decisions.expire_due_requests(store) == []
    with pytest.raises(IllegalTransition):
        await decisions.decide(store, due.id, "U1", Decision.APPROVE, deciders=Deciders.only("U1"))


async def test_execution_claims_the_approval_once(store: Store) -> None:
    row, _ = await requests.create_request(store, held())
    await decisions.decide(store, row.id, "U1", Decision.APPROVE, deciders=Deciders.only("U1"))
    claims = await asyncio.gather(
        *(executions.start_execution(store, row.id, row.command_sha256) for _ in range(5)),
        return_exceptions=True,
    )
    assert sum(not isinstance(c, BaseException) for c in claims) == 1
    done = await executions.finish_execution(store, row.id, result={"rows": 1})
    assert done.status == "executed" and done.result == {"rows": 1}


async def test_grants_expire_revoke_extend(store: Store) -> None:
    """The grant store ends leases in Vault first (here a recorder), then the rows."""
    revoked: list[str | None] = []

    async def revoke_lease(row: GrantRow) -> None:
        revoked.append(row.lease_id)

    async def renew_lease(row: GrantRow, ttl: timedelta) -> timedelta:
        return ttl

    short = await _approved_grant(store, timedelta(milliseconds=1), "L1")
    long = await _approved_grant(store, timedelta(minutes=5), "L2")
    await asyncio.sleep(0.01)
    ended = await endings.end_grants(store, endings.Ending.DUE, revoke_lease)
    assert [g.id for g in ended] == [short.id] and revoked == ["L1"]
    # the request never ran: it fails, saying why
    assert (await requests.get_request(store, short.request_id)).status == "failed"  # type: ignore[arg-type]
    extended = await grants.extend(store, long.id, "U1", timedelta(minutes=5), renew_lease)
    assert extended.expires_at > long.expires_at
    with pytest.raises(InvalidInput):  # past the role's ceiling (max TTL 1 h)
        await grants.extend(store, long.id, "U1", timedelta(hours=2), renew_lease)
    gone = await grants.revoke(store, long.id, "U2", revoke_lease)
    assert gone.status == "revoked" and gone.ended_by == "U2" and revoked == ["L1", "L2"]
    with pytest.raises(IllegalTransition):
        await grants.revoke(store, long.id, "U2", revoke_lease)


async def _approved_grant(store: Store, ttl: timedelta, lease_id: str) -> GrantRow:
    row, _ = await requests.create_request(
        store, held(command=f"UPDATE t SET a = 1 WHERE id = '{lease_id}'")
    )
    await decisions.decide(store, row.id, "U1", Decision.APPROVE, deciders=Deciders.only("U1"))

    async def mint(_request: RequestRow) -> grants.Minted:
        return grants.Minted(
            "postgres",
            ttl,
            timedelta(hours=1),
            handoff_token="wrap-token",
            wrap_accessor="accessor",
            handoff_ttl=timedelta(minutes=1),
            lease_id=lease_id,
        )

    async def unmint(_minted: grants.Minted) -> None:
        raise AssertionError("recorded: nothing to undo")

    grant = await grants.issue(store, row.id, mint, unmint)
    assert grant is not None
    assert await grants.issue(store, row.id, mint, unmint) is None  # issued once
    return grant


async def test_sweeps_skip_rows_locked_by_another_replica(store: Store, database: Dsn) -> None:
    due, _ = await requests.create_request(store, held(pending_ttl=timedelta(milliseconds=1)))
    await asyncio.sleep(0.01)
    other = Store(database, pool_size=1)
    try:
        async with other.transaction() as tx:
            await tx.session.execute(
                text("SELECT 1 FROM requests WHERE id = :id FOR UPDATE"), {"id": due.id}
            )
            assert await decisions.expire_due_requests(store) == []  # skipped, not blocked
        assert [r.id for r in await decisions.expire_due_requests(store)] == [due.id]
    finally:
        await other.close()


async def test_a_run_stranded_by_a_dead_gateway_fails_once_its_credentials_are_dead(
    store: Store,
) -> None:
    async def revoke_lease(_row: GrantRow) -> None:
        return None

    grant = await _approved_grant(store, timedelta(minutes=5), "L9")
    handoff = await handoffs.claim_handoff(store)
    assert handoff is not None and handoff.token == "wrap-token"
    assert await handoffs.claim_handoff(store) is None  # taken once
    assert await endings.fail_stranded(store, timedelta(0)) == []  # credentials still alive
    await grants.revoke(store, grant.id, "U1", revoke_lease)
    assert await endings.fail_stranded(store, timedelta(minutes=1)) == []  # not for long enough
    assert await endings.fail_stranded(store, timedelta(0)) == [grant.request_id]
    row = await requests.get_request(store, grant.request_id)  # type: ignore[arg-type]
    assert row.status == "failed" and "stopped before recording" in (row.error or "")


async def test_grants_vault_keeps_refusing_do_not_hold_up_the_others(store: Store) -> None:
    """The attacker's story: enough grants whose revocation always fails (a role that cannot
    be dropped) would stand first in every pass, oldest first, and no other grant would ever
    end. Each failure now waits a backoff, so the next pass reaches the others."""
    now = store.clock.now()
    async with store.raw_connection() as conn:
        for i in range(130):
            await conn.execute(
                "INSERT INTO grants (id, subject, target, status, lease_id, created_at,"
                " expires_at) VALUES ($1, 'U1', 'shop', 'active', $2, $3, $3)",
                uuid.uuid4(),
                f"stuck-{i}",
                now - timedelta(hours=2, seconds=i),
            )
        good = uuid.uuid4()
        await conn.execute(
            "INSERT INTO grants (id, subject, target, status, lease_id, created_at, expires_at)"
            " VALUES ($1, 'crew', 'shop', 'active', 'good', $2, $2)",
            good,
            now - timedelta(seconds=1),
        )

    async def revoke(row: GrantRow) -> None:
        if str(row.lease_id).startswith("stuck-"):
            raise InvalidInput("role cannot be dropped because some objects depend on it")

    for _ in range(2):  # two passes of 64, as the revoker's drainers take them
        await endings.end_grants(store, endings.Ending.DUE, revoke, limit=64)
    await endings.end_grants(store, endings.Ending.DUE, revoke, limit=64)
    async with store.raw_connection() as conn:
        assert await conn.fetchval("SELECT status FROM grants WHERE id = $1", good) == "expired"
        waiting = await conn.fetchval(
            "SELECT count(*) FROM grants WHERE revoke_attempts = 1 AND revoke_after > now()"
        )
    assert waiting == 130
