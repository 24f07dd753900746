"""A gateway SIGKILLed while an agent waits on a held request, and while it runs an approved
one: the agent, asking another replica with the same Idempotency-Key, gets the one true
outcome, and an approved command never runs twice."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from keyturn.agent.client import AsyncClient
from keyturn.config.loading import parse_config
from keyturn.harness.idp import DevIdP
from keyturn.harness.slack import SlackEmulator
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.faults.conftest import approve, desk_policy, gateway_process, order_total, status_of
from tests.integration.conftest import Shop, serve_bot

pytestmark = pytest.mark.slow

AGENT = "crew-billing"
ORDER = 442  # the shop's orders have ids 1..500; no other test touches this one


async def test_a_gateway_killed_while_its_agent_waits_leaves_the_request_to_another_replica(
    shop: Shop, database: Dsn, idp: DevIdP, approvals_slack: SlackEmulator, tmp_path: Path
) -> None:
    data = desk_policy(shop, stranded_after="1s")
    command = f"UPDATE orders SET total = total + 1 WHERE id = {ORDER}"
    key = f"fault-{uuid.uuid4()}"
    before = await order_total(shop, ORDER)
    token = idp.token(AGENT)
    async with (
        Store(database) as store,
        serve_bot(approvals_slack, parse_config(data), database, shop.bot_vault()),
        gateway_process(shop, database, tmp_path, data["rules"]) as first,
        gateway_process(shop, database, tmp_path, data["rules"]) as second,
    ):
        async with AsyncClient(first.url, token) as agent:
            held = await agent.submit("shop", command, idempotency_key=key)
        assert held.status == "pending"
        first.kill()  # the agent's long-poll and the replica with it
        async with AsyncClient(second.url, token) as agent:
            again = await agent.submit("shop", command, idempotency_key=key)
            assert again.id == held.id  # the same request, not a second one
            await approve(approvals_slack, store, held.id)
            done = await agent.wait(held.id, 60)
    assert done.status == "executed" and done.result is not None
    assert getattr(done.result, "tags", None) == ["UPDATE 1"]
    assert await order_total(shop, ORDER) == before + 1  # ran once


async def test_a_gateway_killed_while_it_runs_an_approved_command_never_runs_it_twice(
    shop: Shop, database: Dsn, idp: DevIdP, approvals_slack: SlackEmulator, tmp_path: Path
) -> None:
    # the grant's end is what settles a lost run
    data = desk_policy(shop, grant_ttl="4s", stranded_after="1s")
    command = f"UPDATE orders SET total = total + 1 WHERE id = {ORDER} AND pg_sleep(4) IS NOT NULL"
    key = f"fault-{uuid.uuid4()}"
    before = await order_total(shop, ORDER)
    token = idp.token(AGENT)
    async with (
        Store(database) as store,
        serve_bot(approvals_slack, parse_config(data), database, shop.bot_vault()),
    ):
        async with gateway_process(shop, database, tmp_path, data["rules"]) as first:
            async with AsyncClient(first.url, token) as agent:
                held = await agent.submit("shop", command, idempotency_key=key)
            await approve(approvals_slack, store, held.id)
            async with asyncio.timeout(30):  # the first replica's executor has it
                while await status_of(store, held.id) != "executing":
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1)  # in the middle of its pg_sleep on the target
            first.kill()
        async with (
            gateway_process(shop, database, tmp_path, data["rules"]) as second,
            AsyncClient(second.url, token) as agent,
        ):
            again = await agent.submit("shop", command, idempotency_key=key)
            assert again.id == held.id
            async with asyncio.timeout(60):  # one final outcome, whatever replica answers
                while (done := await agent.wait(held.id, 20)).status not in ("executed", "failed"):
                    pass
    assert done.status == "failed" and done.error, done
    # killed before its transaction committed: the target rolled it back, and nothing ran it
    # again (the approval was used once)
    assert await order_total(shop, ORDER) == before
    async with Store(database) as reader, asyncio.timeout(30):  # its credentials end with it
        while True:
            async with reader.raw_connection() as conn:
                ended = await conn.fetchval(
                    "SELECT status FROM grants WHERE request_id = $1", uuid.UUID(held.id)
                )
            if ended in ("revoked", "expired"):
                break
            await asyncio.sleep(0.2)
