"""Slack at its worst while several agents wait: a storm of 429s (with Retry-After) on posting,
5 s answers on updating (past the 3 s Slack gives an ack), and an outage while approvers click.
No decision is lost, no card is posted twice, every approved command runs once, and every card
catches up once Slack is back."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from bot import card_store
from keyturn.agent.client import AsyncClient
from keyturn.harness.idp import DevIdP
from tests.faults.conftest import order_total
from tests.integration.conftest import APPROVALS, DeskFactory, Shop

pytestmark = pytest.mark.slow

ORDERS = range(444, 448)  # the shop's orders have ids 1..500; no other test touches these


async def _totals(shop: Shop) -> list[int]:
    rows = await shop.postgres.fetch(
        f"SELECT total FROM orders WHERE id BETWEEN {ORDERS[0]} AND {ORDERS[-1]} ORDER BY id",
        shop.database,
    )
    return [int(r[0]) for r in rows]


async def test_slack_storms_and_an_outage_lose_no_decision_and_post_no_card_twice(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop
) -> None:
    before = await _totals(shop)
    async with run_desk() as desk:
        slack = desk.slack
        slack.fail("chat.postMessage", 429, times=8, retry_after=1)  # a storm on posting
        slack.delay("chat.update", 5.0)  # every update answered after Slack's own ack limit
        agents = [AsyncClient(desk.gateway.url, idp.token(f"crew-{n}")) for n in ORDERS]
        try:
            held = await asyncio.gather(
                *(
                    agent.submit("shop", f"UPDATE orders SET total = total + 1 WHERE id = {n}")
                    for agent, n in zip(agents, ORDERS, strict=True)
                )
            )
            assert {h.status for h in held} == {"pending"}
            cards = [await desk.card(h.id, timeout=60) for h in held]
            assert len(set(cards)) == len(held)
            slack.down()  # an outage: the clicks still reach the bot, which answers later
            await asyncio.gather(*(desk.approve(h.id) for h in held[:2]))
            await asyncio.sleep(3)
            slack.up()
            await asyncio.gather(*(desk.approve(h.id) for h in held[2:]))
            done = await asyncio.gather(
                *(agent.wait(h.id, 120) for agent, h in zip(agents, held, strict=True))
            )
        finally:
            for agent in agents:
                await agent.aclose()
        assert [d.status for d in done] == ["executed"] * len(held)
        top = [m for m in slack.messages[APPROVALS] if m.thread_ts is None]
        assert len(top) == len(held)  # one card each, never a second
        async with asyncio.timeout(90):  # each card catches up, in place
            while sum("Approved and run" in json.dumps(m.blocks) for m in top) < len(held):
                await asyncio.sleep(0.5)
    assert await _totals(shop) == [t + 1 for t in before]  # every approved command ran once


async def test_a_minute_without_slack_loses_no_card_and_no_decision(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop
) -> None:
    """Slack's Web API down for 60 s: a request held meanwhile gets its card once Slack is
    back (one card, not one per retry), and a click that reached the bot during the outage
    is kept, run, and shown."""
    first, second = 424, 425  # orders no other test touches
    before = [await order_total(shop, n) for n in (first, second)]
    async with (
        run_desk() as desk,
        AsyncClient(desk.gateway.url, idp.token("crew-outage")) as agent,
    ):
        slack = desk.slack
        early = await agent.submit(
            "shop", f"UPDATE orders SET total = total + 1 WHERE id = {first}"
        )
        await desk.card(early.id)
        slack.down(60)
        started = asyncio.get_running_loop().time()
        late = await agent.submit(
            "shop", f"UPDATE orders SET total = total + 1 WHERE id = {second}"
        )
        await desk.approve(early.id)  # the click reaches the bot; the bot cannot reach Slack
        done = await agent.wait(early.id, 60)
        assert done.status == "executed", done  # decided and run while Slack was away
        assert await card_store.posted_at(desk.store, uuid.UUID(late.id)) is None
        await asyncio.sleep(max(0.0, started + 60 - asyncio.get_running_loop().time()))
        await desk.approve(late.id)  # its card arrives once Slack is back
        assert (await agent.wait(late.id, 60)).status == "executed"
        top = [m for m in slack.messages[APPROVALS] if m.thread_ts is None]
        assert len(top) == 2  # one card each
        async with asyncio.timeout(60):  # and both say what happened
            while sum("Approved and run" in json.dumps(m.blocks) for m in top) < 2:
                await asyncio.sleep(0.5)
    assert [await order_total(shop, n) for n in (first, second)] == [t + 1 for t in before]
