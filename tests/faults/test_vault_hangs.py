"""OpenBao hung (SIGSTOP: it accepts connections and answers nothing) at the moment of an
approval: issuing the credentials times out and is retried with backoff, the card says what is
happening, and once OpenBao answers again the command is issued and run exactly once."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from bot import card_store
from keyturn.agent.client import AsyncClient
from keyturn.harness.idp import DevIdP
from keyturn.harness.openbao import OpenBaoDevServer
from tests.faults.conftest import order_total
from tests.integration.conftest import APPROVALS, DeskFactory, Shop

pytestmark = pytest.mark.slow

ORDER = 443  # the shop's orders have ids 1..500; no other test touches this one


async def test_vault_hung_at_approval_issues_once_it_answers_and_runs_once(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop, gateway_openbao: OpenBaoDevServer
) -> None:
    before = await order_total(shop, ORDER)
    command = f"UPDATE orders SET total = total + 1 WHERE id = {ORDER}"
    async with (
        run_desk() as desk,
        AsyncClient(desk.gateway.url, idp.token("crew-billing")) as agent,
    ):
        held = await agent.submit("shop", command)
        assert held.status == "pending"
        ts = await desk.card(held.id)
        with gateway_openbao.hung():
            await desk.approve(held.id)  # the decision needs Postgres only: it is recorded
            async with desk.store.raw_connection() as conn, asyncio.timeout(60):
                while not await conn.fetchval(  # the first issue timed out and is retried
                    "SELECT issue_attempts FROM requests WHERE id = $1", uuid.UUID(held.id)
                ):
                    await asyncio.sleep(0.2)
            async with asyncio.timeout(30):  # and the card says so, while Vault is away
                while "Credentials pending" not in json.dumps(
                    next(m.blocks for m in desk.slack.messages[APPROVALS] if m.ts == ts)
                ):
                    await asyncio.sleep(0.2)
        done = await agent.wait(held.id, 60)
        async with desk.store.raw_connection() as conn:
            grants = await conn.fetch(
                "SELECT status FROM grants WHERE request_id = $1", uuid.UUID(held.id)
            )
        posted = await card_store.posted_at(desk.store, uuid.UUID(held.id))
    assert done.status == "executed", done
    assert await order_total(shop, ORDER) == before + 1  # run exactly once
    assert len(grants) == 1  # issued exactly once
    assert posted is not None and posted[1] == ts  # one card, updated in place
