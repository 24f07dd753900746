"""OpenBao not answering at the hand-off (the gateway's unwrap) and at revocation (the bot's
revoke): both calls hang, then fail, and are retried with backoff. The approved command runs
exactly once after all; the grant ends once Vault answers, and its lease does not outlive it.

The calls go through a :class:`VaultGate`, which holds them and never forwards them: Vault
never heard the first attempt, as when it is hung or behind a dead load balancer."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from keyturn.agent.client import AsyncClient
from keyturn.harness.idp import DevIdP
from keyturn.vault import AppRoleLogin, Vault
from tests.faults.conftest import (
    READ_ONLY,
    WRITE_LEASES,
    VaultGate,
    grants_of,
    leases_under,
    order_total,
)
from tests.integration.conftest import DeskFactory, GatewayFactory, Shop

pytestmark = pytest.mark.slow

HANG = 4.0  # seconds Vault answers nothing


async def test_vault_hung_at_the_hand_off_the_gateway_retries_and_runs_once(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop
) -> None:
    order = 427  # the shop's orders have ids 1..500; no other test touches this one
    before = await order_total(shop, order)
    async with VaultGate(shop.openbao.addr) as gate:
        gateway_vault = Vault(gate.url, approle=AppRoleLogin(shop.role_id, shop.secret_id))
        async with (
            run_desk(vault=gateway_vault) as desk,
            AsyncClient(desk.gateway.url, idp.token("crew-billing")) as agent,
        ):
            held = await agent.submit(
                "shop", f"UPDATE orders SET total = total + 1 WHERE id = {order}"
            )
            with gate.hold("sys/wrapping/"):  # lookup and unwrap alike
                await desk.approve(held.id)
                await gate.wait_held()
                await asyncio.sleep(HANG)
            done = await agent.wait(held.id, 60)
    assert done.status == "executed", done
    assert await order_total(shop, order) == before + 1  # once


async def test_vault_hung_at_revocation_the_grant_ends_once_it_answers(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop
) -> None:
    order = 426
    async with VaultGate(shop.openbao.addr) as gate:
        bot_vault = Vault(gate.url, approle=AppRoleLogin(shop.bot_role_id, shop.bot_secret_id))
        async with (
            run_desk(bot_vault=bot_vault) as desk,
            AsyncClient(desk.gateway.url, idp.token("crew-billing")) as agent,
        ):
            held = await agent.submit(
                "shop", f"UPDATE orders SET total = total + 1 WHERE id = {order}"
            )
            with gate.hold("sys/leases/revoke"):
                await desk.approve(held.id)
                done = await agent.wait(held.id, 60)
                await gate.wait_held()  # the one-shot grant's end, which Vault never hears
                await asyncio.sleep(HANG)
                [(status, lease)] = await grants_of(desk.store, held.id)
                assert status == "active" and lease in await leases_under(
                    shop, WRITE_LEASES
                )  # never claimed ended
            async with asyncio.timeout(60):
                while (await grants_of(desk.store, held.id))[0][0] == "active":
                    await asyncio.sleep(0.2)
            async with desk.store.raw_connection() as conn:
                ended = await conn.fetchval(
                    "SELECT count(*) FROM audit_events WHERE request_id = $1"
                    " AND kind IN ('grant.revoked', 'grant.expired')",
                    uuid.UUID(held.id),
                )
    assert done.status == "executed", done
    assert lease not in await leases_under(shop, WRITE_LEASES)
    assert ended == 1


async def test_vault_away_when_a_read_only_login_retires_its_role_leaves_once_vault_is_back(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    """The soak found it: a read-only login closed while OpenBao restarted kept its role on
    the target until its lease ran out (the revocation was tried once)."""
    async with VaultGate(shop.openbao.addr) as gate:
        vault = Vault(gate.url, approle=AppRoleLogin(shop.role_id, shop.secret_id))
        async with (
            run_gateway(vault=vault, gateway={"readonly_idle": "1s"}) as gw,
            AsyncClient(gw.url, idp.token("crew-idle")) as agent,
        ):
            before = await leases_under(shop, READ_ONLY)
            assert (await agent.submit("shop", "SELECT 1")).status == "executed"
            made = await leases_under(shop, READ_ONLY) - before  # the agent's login
            assert made
            with gate.hold("sys/leases/revoke"):  # idle: the login closes, Vault is away
                await gate.wait_held()
                await asyncio.sleep(HANG)
            async with asyncio.timeout(30):  # tried again, and gone
                while made & await leases_under(shop, READ_ONLY):
                    await asyncio.sleep(0.2)
