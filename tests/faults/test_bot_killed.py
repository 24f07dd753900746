"""The bot SIGKILLed at each step of a grant's life. A restarted bot converges: the approved
command is issued and run once, its card catches up, every lease ends, and a lease Vault
issued that no grant ever recorded is found and revoked by the orphan sweep.

Each story kills ``keyturn bot`` (a real process) with one exact Vault or Slack call in flight:
the Vault calls go through a :class:`VaultGate` that holds them and never forwards them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from keyturn.agent.client import AsyncClient, Request
from keyturn.harness.idp import DevIdP
from keyturn.harness.slack import SlackEmulator
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.faults.conftest import (
    WRITE_LEASES,
    VaultGate,
    approve,
    bot_process,
    desk_policy,
    grants_of,
    leases_under,
    order_total,
)
from tests.integration.conftest import APPROVALS, GatewayFactory, Shop

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def _held(
    run_gateway: GatewayFactory, database: Dsn, idp: DevIdP, order: int
) -> AsyncIterator[tuple[Store, AsyncClient, Request]]:
    """A gateway, the store, and an agent whose write to ``order`` waits for Ada."""
    async with (
        run_gateway(gateway={"poll_interval": "500ms"}) as gw,
        Store(database) as store,
        AsyncClient(gw.url, idp.token("crew-billing")) as agent,
    ):
        held = await agent.submit("shop", f"UPDATE orders SET total = total + 1 WHERE id = {order}")
        yield store, agent, held


async def _events(store: Store, kind: str) -> list[dict[str, Any]]:
    async with store.raw_connection() as conn:
        rows = await conn.fetch("SELECT data FROM audit_events WHERE kind = $1", kind)
    return [json.loads(r[0]) if isinstance(r[0], str) else dict(r[0]) for r in rows]


async def test_killed_after_vault_issued_before_it_was_recorded_the_lease_is_an_orphan_revoked(
    shop: Shop,
    database: Dsn,
    idp: DevIdP,
    approvals_slack: SlackEmulator,
    run_gateway: GatewayFactory,
    tmp_path: Path,
) -> None:
    order = 436  # the shop's orders have ids 1..500; no other test touches this one
    before = await order_total(shop, order)
    data = desk_policy(shop, orphan_grace="2s")
    async with (
        VaultGate(shop.openbao.addr) as gate,
        _held(run_gateway, database, idp, order) as (store, agent, held),
    ):
        leases = await leases_under(shop, WRITE_LEASES)
        async with bot_process(data, approvals_slack, database, shop, tmp_path, gate.url) as bot:
            with gate.hold("sys/wrapping/wrap"):  # Vault made the login; its wrap is in flight
                await approve(approvals_slack, store, held.id)
                await gate.wait_held()
                bot.kill()
        orphans = await leases_under(shop, WRITE_LEASES) - leases
        assert len(orphans) == 1  # a live login nobody recorded
        assert await grants_of(store, held.id) == []
        async with bot_process(data, approvals_slack, database, shop, tmp_path, gate.url):
            done = await agent.wait(held.id, 60)
            async with asyncio.timeout(30):
                while orphans & await leases_under(shop, WRITE_LEASES):
                    await asyncio.sleep(0.2)
            async with asyncio.timeout(30):  # its own one-shot grant ends too
                while (await grants_of(store, held.id))[0][0] == "active":
                    await asyncio.sleep(0.2)
        recorded = [e["lease_id"] for e in await _events(store, "lease.orphan_revoked")]
        grant = await grants_of(store, held.id)
    assert done.status == "executed", done
    assert await order_total(shop, order) == before + 1  # run once
    assert len(grant) == 1 and grant[0][1] not in orphans  # issued once more, recorded once
    assert orphans <= set(recorded)  # and the audit log says which lease was revoked


async def test_killed_after_the_grant_was_recorded_before_the_card_said_so_the_card_catches_up(
    shop: Shop,
    database: Dsn,
    idp: DevIdP,
    approvals_slack: SlackEmulator,
    run_gateway: GatewayFactory,
    tmp_path: Path,
) -> None:
    order = 437
    before = await order_total(shop, order)
    data = desk_policy(shop, orphan_grace="2s")
    slack = approvals_slack
    async with (
        _held(run_gateway, database, idp, order) as (store, agent, held),
    ):
        async with bot_process(data, slack, database, shop, tmp_path, shop.openbao.addr) as bot:
            await approve(slack, store, held.id)
            slack.down()  # no card update can land
            async with asyncio.timeout(30):
                while not await grants_of(store, held.id):
                    await asyncio.sleep(0.05)
            bot.kill()
        slack.up()
        done = await agent.wait(held.id, 60)
        card = [m for m in slack.messages[APPROVALS] if m.thread_ts is None]
        assert len(card) == 1 and "Approved and run" not in json.dumps(card[0].blocks)
        async with bot_process(data, slack, database, shop, tmp_path, shop.openbao.addr):
            async with asyncio.timeout(30):
                while "Approved and run" not in json.dumps(card[0].blocks):
                    await asyncio.sleep(0.2)
            async with asyncio.timeout(30):
                while (await grants_of(store, held.id))[0][0] == "active":
                    await asyncio.sleep(0.2)
        grant = await grants_of(store, held.id)
    assert done.status == "executed", done
    assert await order_total(shop, order) == before + 1
    assert [m for m in slack.messages[APPROVALS] if m.thread_ts is None] == card  # one card
    assert len(grant) == 1 and grant[0][0] == "revoked"
    assert grant[0][1] not in await leases_under(shop, WRITE_LEASES)


async def test_killed_mid_revocation_the_next_bot_ends_the_grant_once(
    shop: Shop,
    database: Dsn,
    idp: DevIdP,
    approvals_slack: SlackEmulator,
    run_gateway: GatewayFactory,
    tmp_path: Path,
) -> None:
    order = 438
    data = desk_policy(shop, orphan_grace="2s")
    async with (
        VaultGate(shop.openbao.addr) as gate,
        _held(run_gateway, database, idp, order) as (store, agent, held),
    ):
        async with bot_process(data, approvals_slack, database, shop, tmp_path, gate.url) as bot:
            with gate.hold("sys/leases/revoke"):  # the ran command's login, being ended
                await approve(approvals_slack, store, held.id)
                done = await agent.wait(held.id, 60)
                await gate.wait_held()
                bot.kill()
        [(status, lease)] = await grants_of(store, held.id)
        assert status == "active" and lease in await leases_under(
            shop, WRITE_LEASES
        )  # Vault never heard it
        async with bot_process(data, approvals_slack, database, shop, tmp_path, gate.url):
            async with asyncio.timeout(30):
                while (await grants_of(store, held.id))[0][0] == "active":
                    await asyncio.sleep(0.2)
        ended = await _events(store, "grant.revoked")
    assert done.status == "executed", done
    assert lease not in await leases_under(
        shop, WRITE_LEASES
    )  # the login is gone from Vault and the target
    assert len(ended) == 1  # ended once
