"""keyturn's own Postgres gone (every connection cut, new ones refused, as in a restart) while
an approved command runs on the target: the gateway keeps the outcome and records it once
Postgres is back. The command ran, so the request must say executed, never failed."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from keyturn.agent.client import AsyncClient
from keyturn.config.loading import parse_config
from keyturn.harness.idp import DevIdP
from keyturn.harness.slack import SlackEmulator
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.faults.conftest import approve, desk_policy, order_total, served_gateway, status_of
from tests.integration.conftest import Shop, TcpProxy, serve_bot

pytestmark = pytest.mark.slow

ORDER = 448  # the shop's orders have ids 1..500; no other test touches this one


async def test_postgres_away_while_an_approved_command_runs_keeps_its_outcome(
    shop: Shop, database: Dsn, idp: DevIdP, approvals_slack: SlackEmulator
) -> None:
    proxy = TcpProxy(int(database.url.rsplit(":", 1)[1].split("/", 1)[0]))
    await proxy.up()
    through = proxy.dsn(database)
    data = desk_policy(shop)
    before = await order_total(shop, ORDER)
    slow = f"UPDATE orders SET total = total + 1 WHERE id = {ORDER} AND pg_sleep(2) IS NOT NULL"
    async with (
        Store(database) as store,
        serve_bot(approvals_slack, parse_config(data), through, shop.bot_vault()),
        served_gateway(shop, data, through) as url,
        AsyncClient(url, idp.token("crew-billing")) as agent,
    ):
        held = await agent.submit("shop", slow)
        await approve(approvals_slack, store, held.id)
        async with asyncio.timeout(30):
            while await status_of(store, held.id) != "executing":
                await asyncio.sleep(0.05)
        await proxy.down()  # the command is running on the target; its record cannot be made
        await asyncio.sleep(5)
        await proxy.up()
        done = await agent.wait(held.id, 60)
        assert done.status == "executed", done
        assert getattr(done.result, "tags", None) == ["UPDATE 1"]
        async with asyncio.timeout(30):  # and its one-shot credentials end, the bot caught up
            while await _grant(store, held.id) != "revoked":
                await asyncio.sleep(0.2)
    assert await order_total(shop, ORDER) == before + 1
    await proxy.down()


async def _grant(store: Store, request_id: str) -> str | None:
    async with store.raw_connection() as conn:
        found = await conn.fetchval(
            "SELECT status FROM grants WHERE request_id = $1", uuid.UUID(request_id)
        )
    return None if found is None else str(found)
