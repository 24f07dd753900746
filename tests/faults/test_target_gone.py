"""The target database gone at the moment an approved command runs: the agent gets a clear
failure, the card says so, and the credentials minted for it are revoked at once."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid

import pytest

from keyturn.agent.client import AsyncClient
from keyturn.harness.idp import DevIdP
from tests.faults.conftest import approve, order_total
from tests.integration.conftest import APPROVALS, DeskFactory, Shop, TcpProxy

pytestmark = pytest.mark.slow


async def test_a_target_gone_at_execution_fails_clearly_and_revokes_its_credentials(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop
) -> None:
    proxy = TcpProxy(shop.postgres.port)  # the gateway reaches the target through it
    await proxy.up()
    targets = copy.deepcopy(shop.base_policy["targets"])
    targets["shop"]["dsn"] = f"postgresql://127.0.0.1:{proxy.port}/{shop.database}"
    async with run_desk(targets=targets) as desk:
        async with AsyncClient(desk.gateway.url, idp.token("crew-billing")) as agent:
            held = await agent.submit("shop", "UPDATE orders SET total = total + 1 WHERE id = 449")
            ts = await desk.card(held.id)
            await proxy.down()  # Vault still mints (it reaches the target itself); we cannot
            await approve(desk.slack, desk.store, held.id)
            done = await agent.wait(held.id, 60)
        assert done.status == "failed" and done.error, done
        assert "shop" in done.error and "password" not in done.error.lower()
        async with desk.store.raw_connection() as conn, asyncio.timeout(30):
            while (
                await conn.fetchval(
                    "SELECT status FROM grants WHERE request_id = $1", uuid.UUID(held.id)
                )
                != "revoked"
            ):
                await asyncio.sleep(0.2)
        async with asyncio.timeout(30):  # the card says the run failed, and why
            while "Approved: failed" not in json.dumps(
                next(m.blocks for m in desk.slack.messages[APPROVALS] if m.ts == ts)
            ):
                await asyncio.sleep(0.2)


async def test_an_approved_command_past_the_deadline_says_so_and_changes_nothing(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop
) -> None:
    order = 429  # the shop's orders have ids 1..500; no other test touches this one
    before = await order_total(shop, order)
    slow = f"UPDATE orders SET total = total + 1 WHERE id = {order} AND pg_sleep(3) IS NOT NULL"
    async with (
        run_desk(gateway={"statement_timeout": "1s"}) as desk,
        AsyncClient(desk.gateway.url, idp.token("crew-billing")) as agent,
    ):
        held = await agent.submit("shop", slow)
        await desk.approve(held.id)
        done = await agent.wait(held.id, 60)
    assert done.status == "failed" and done.error, done
    assert done.error.startswith("deadline exceeded"), done.error  # not "TimeoutError: "
    assert await order_total(shop, order) == before  # cancelled, rolled back
