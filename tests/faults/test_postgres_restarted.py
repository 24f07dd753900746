"""keyturn's own Postgres restarted (a fast shutdown: every session cut, open transactions
rolled back, nothing listening for a few seconds) with requests in every state at once: one
pending, one approved and waiting for its credentials, one executing on the target, and 1,000
grants falling due while it is down. Afterwards every request reaches exactly one terminal
state, no card is posted twice, no grant is issued twice, every grant ends once, and both
processes' listeners are back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from bot.credentials import Issuer
from keyturn.agent.client import AsyncClient
from keyturn.config.loading import parse_config
from keyturn.domain import Deciders, Decision
from keyturn.harness.idp import DevIdP
from keyturn.harness.postgres import PostgresCluster
from keyturn.harness.slack import SlackEmulator
from keyturn.store import decisions, grants, migrate, requests
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from keyturn.store.models import RequestRow
from keyturn.vault import AppRoleLogin, Vault
from tests.faults.conftest import (
    WRITE_LEASES,
    VaultGate,
    approve,
    card_of,
    desk_policy,
    leases_under,
    order_total,
    served_gateway,
    status_of,
)
from tests.integration.conftest import APPROVALS, Shop, serve_bot

pytestmark = pytest.mark.slow

PENDING, WAITING, EXECUTING, AFTER = 430, 431, 432, 433  # orders no other test touches
DUE = 1000
DOWN = 5.0  # seconds with nothing listening


@contextlib.asynccontextmanager
async def _keyturn_postgres() -> AsyncIterator[tuple[PostgresCluster, Dsn]]:
    """keyturn's database on a cluster of its own: restarting it leaves the target running."""
    cluster = await asyncio.to_thread(PostgresCluster().start)
    try:
        admin = await asyncpg.connect(cluster.dsn().url)
        await admin.execute("CREATE DATABASE keyturn")
        await admin.close()
        dsn = cluster.dsn("keyturn")
        await asyncio.to_thread(migrate.upgrade, dsn)
        yield cluster, dsn
    finally:
        await asyncio.to_thread(cluster.stop)


async def _issue_due(store: Store, issuer: Issuer) -> list[uuid.UUID]:
    """``DUE`` people's database access, each a grant on a real Vault lease (a person's grant
    is never a gateway's to run, so they wait only to fall due), 16 at a time."""
    target = issuer.config.policy.postgres_targets()["shop"]
    gate = asyncio.Semaphore(16)

    async def mint(request: RequestRow) -> grants.Minted:
        login = await issuer.access_login(request, target, target.vault.max_ttl, datetime.now(UTC))
        return login.minted  # its wrapping token is dropped: nobody will unwrap it

    async def one(i: int) -> uuid.UUID:
        new = requests.NewRequest(
            "shop",
            f"access #{i}",
            f"U_ONCALL{i}",  # a person has one open access per target
            timedelta(minutes=15),
            rule="writes",
            grant_ttl=timedelta(minutes=10),
            access=True,
        )
        async with gate:
            row, _ = await requests.create_request(store, new)
            await decisions.decide(
                store, row.id, "U_APPROVER", Decision.APPROVE, deciders=Deciders.only("U_APPROVER")
            )
            grant = await grants.issue(store, row.id, mint, issuer.unmint)
        assert grant is not None
        return grant.id

    return await asyncio.gather(*(one(i) for i in range(1, DUE + 1)))


async def test_postgres_restarted_with_requests_in_every_state_and_1000_grants_due(
    shop: Shop, idp: DevIdP, approvals_slack: SlackEmulator
) -> None:
    data = desk_policy(shop)
    data["gateway"]["statement_timeout"] = "30s"  # the executing command waits out a lock
    config = parse_config(data)
    slack = approvals_slack
    before = {n: await order_total(shop, n) for n in (PENDING, WAITING, EXECUTING, AFTER)}
    update = "UPDATE orders SET total = total + 1 WHERE id = {}"
    async with (
        _keyturn_postgres() as (cluster, dsn),
        Store(dsn) as store,
        VaultGate(shop.openbao.addr) as gate,
    ):
        issuer = Issuer(config, shop.bot_vault())
        due = await _issue_due(store, issuer)
        await issuer.vault.close()
        bot_vault = Vault(gate.url, approle=AppRoleLogin(shop.bot_role_id, shop.bot_secret_id))
        async with (
            serve_bot(slack, config, dsn, bot_vault),
            served_gateway(shop, data, dsn) as url,
            AsyncClient(url, idp.token("crew-billing")) as agent,
        ):
            lock = await asyncpg.connect(  # the approved command waits on this row lock
                shop.postgres.dsn(shop.database).url, **shop.postgres.admin.connect_args
            )
            await lock.execute("BEGIN")
            await lock.execute(f"SELECT 1 FROM orders WHERE id = {EXECUTING} FOR UPDATE")
            executing = await agent.submit("shop", update.format(EXECUTING))
            await approve(slack, store, executing.id)
            async with asyncio.timeout(30):
                while await status_of(store, executing.id) != "executing":
                    await asyncio.sleep(0.05)
            pending = await agent.submit("shop", update.format(PENDING))
            waiting = await agent.submit("shop", update.format(WAITING))
            with gate.hold("database/creds/shop-rw"):  # its credentials are being made
                await approve(slack, store, waiting.id)
                await gate.wait_held()
                await card_of(store, pending.id)  # posted; no click yet
                async with store.raw_connection() as conn:  # the 1,000 fall due while it is down
                    await conn.execute(
                        "UPDATE grants SET expires_at = now() + interval '1 second'"
                        " WHERE id = ANY($1)",
                        due,
                    )
                restart = asyncio.create_task(asyncio.to_thread(cluster.restart, DOWN))
                await asyncio.sleep(1)  # keyturn's Postgres is down now:
                await lock.execute("COMMIT")  # the command completes; its record must wait
                await lock.close()
                await restart
            await approve(slack, store, pending.id)  # a card posted before the restart
            after = await agent.submit("shop", update.format(AFTER))
            await approve(slack, store, after.id)
            done = [await agent.wait(r.id, 120) for r in (executing, waiting, pending, after)]
            async with asyncio.timeout(180):
                while await _active(store, due):
                    await asyncio.sleep(0.5)
            async with asyncio.timeout(30):  # both processes listen again
                while await _listeners(store) < 2:
                    await asyncio.sleep(0.2)
        async with store.raw_connection() as conn:
            endings = await conn.fetch(
                "SELECT grant_id, count(*) FROM audit_events WHERE kind LIKE 'grant.%'"
                " AND kind <> 'grant.issued' AND grant_id IS NOT NULL GROUP BY grant_id"
            )
            issued = await conn.fetch(
                "SELECT request_id, count(*) FROM grants GROUP BY request_id HAVING count(*) > 1"
            )
            cards = await conn.fetchval("SELECT count(*) FROM cards WHERE ts IS NOT NULL")
            leases = await conn.fetch("SELECT lease_id FROM grants WHERE id = ANY($1)", due)
    assert [d.status for d in done] == ["executed"] * 4, done
    for n in (PENDING, WAITING, EXECUTING, AFTER):  # each ran exactly once
        assert await order_total(shop, n) == before[n] + 1, n
    assert issued == []  # no request was given two grants
    ended = {r[0]: r[1] for r in endings}
    assert set(due) <= set(ended) and max(ended.values()) == 1  # every grant ended, once
    top = [m for m in slack.messages[APPROVALS] if m.thread_ts is None]
    assert len(top) == cards  # no card posted twice
    assert not await leases_under(shop, WRITE_LEASES) & {r[0] for r in leases}  # and Vault agrees


async def _active(store: Store, ids: list[uuid.UUID]) -> int:
    async with store.raw_connection() as conn:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM grants WHERE id = ANY($1) AND status = 'active'", ids
            )
        )


async def _listeners(store: Store) -> int:
    async with store.raw_connection() as conn:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'keyturn-listener'"
            )
        )
