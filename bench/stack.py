"""The real stack for benchmarks: throwaway Postgres and OpenBao, a bootstrapped target, a dev IdP.

Shared by the bench/*.py scripts so each measures its part against the same setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.web import AppRunner, TCPSite
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot.bootstrap import build as build_bot
from bot.bootstrap import slack_client, web_application
from bot.credentials import Issuer
from bot.revocation import Revoker
from keyturn.config.loading import parse_config
from keyturn.config.policy import Config
from keyturn.domain import Deciders, Decision
from keyturn.harness.idp import DevIdP
from keyturn.harness.openbao import OpenBaoDevServer, OpenBaoServer
from keyturn.harness.ports import free_port
from keyturn.harness.postgres import PostgresCluster
from keyturn.harness.slack import SlackEmulator
from keyturn.store import decisions, grants, migrate, requests
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from keyturn.vault import AppRoleLogin, Vault
from keyturn.vault_setup import bootstrap

SCHEMA = """
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total int, status text);
INSERT INTO orders SELECT g, g % 100, g * 10, 'open' FROM generate_series(1, 10000) g;
ANALYZE;
"""


@dataclass
class Stack:
    postgres: PostgresCluster  # the target's
    openbao: OpenBaoDevServer
    idp: DevIdP
    database: Dsn  # keyturn's own
    policy_data: dict[str, Any]
    approles: dict[str, tuple[str, str]]
    own: PostgresCluster  # keyturn's (the target's own cluster unless restartable)

    @property
    def policy(self) -> Config:
        return parse_config(self.policy_data)

    def vault(self, role: str) -> Vault:
        role_id, secret_id = self.approles[role]
        return Vault(self.openbao.addr, approle=AppRoleLogin(role_id, secret_id))

    def target_dsn(self, user: str = "postgres", password: str | None = None) -> str:
        return self.postgres.dsn("shop", user, password).url


@contextlib.asynccontextmanager
async def real_stack(*, restartable: bool = False, **gateway: Any) -> AsyncIterator[Stack]:
    """The stack; ``restartable``: OpenBao keeps its state across a restart, and keyturn's
    database has a cluster of its own, so restarting it leaves the target running."""
    with contextlib.ExitStack() as services:
        pg = services.enter_context(PostgresCluster())
        bao = services.enter_context(OpenBaoServer() if restartable else OpenBaoDevServer())
        own = services.enter_context(PostgresCluster()) if restartable else pg
        admin = await asyncpg.connect(own.dsn().url)
        await admin.execute("CREATE DATABASE keyturn")
        await admin.close()
        admin = await asyncpg.connect(pg.dsn().url)
        await admin.execute("CREATE DATABASE shop")
        await admin.close()
        shop = await asyncpg.connect(pg.dsn("shop").url)
        await shop.execute(SCHEMA)
        await shop.close()
        database = own.dsn("keyturn")
        await asyncio.to_thread(migrate.upgrade, database)
        idp = DevIdP()
        await idp.start()
        data: dict[str, Any] = {
            "targets": {
                "shop": {
                    "kind": "postgres",
                    "dsn": f"postgresql://127.0.0.1:{pg.port}/shop",
                    "vault": {"readonly_role": "shop-ro", "write_role": "shop-rw"},
                }
            },
            "rules": [
                {
                    "name": "writes",
                    "match": {"sql": ["insert", "update", "delete"]},
                    "action": "hold",
                    "approvers": {"users": ["U_APPROVER"]},
                },
                {"name": "reads", "match": {"sql": ["select"]}, "action": "allow"},
            ],
            "vault": {"addr": bao.addr},
            "gateway": {
                "auth": {"jwks_url": idp.url, "issuer": idp.issuer},
                "rate_per_second": 1_000_000,
                "rate_burst": 1_000_000,
                **gateway,
            },
        }
        os.environ["KEYTURN_TARGET_SHOP_USERNAME"] = "postgres"
        os.environ["KEYTURN_TARGET_SHOP_PASSWORD"] = pg.password
        root = Vault(bao.addr, token=bao.root_token)
        report = await bootstrap(root, parse_config(data), issue_secret_ids=True)
        await root.close()
        approles = {r: (report.role_ids[r], report.secret_ids[r]) for r in report.role_ids}
        try:
            yield Stack(pg, bao, idp, database, data, approles, own)
        finally:
            await idp.stop()


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port until the block ends; its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, value: float, unit: str, target: str, ok: bool) -> None:
    print(f"{name:<52} {value:>10.2f} {unit:<6} target {target:<12} {'PASS' if ok else 'FAIL'}")


def median(samples: list[float]) -> float:
    return statistics.median(samples)


async def serve_bot(stack: Stack, config: Config, slack: SlackEmulator, store: Store) -> AppRunner:
    """A real bot (Bolt over HTTP on a free port) for ``slack``; clean up the runner after."""
    process = build_bot(
        config,
        store,
        slack_client(slack.bot_token, slack.api_url),
        slack.signing_secret,
        stack.vault("keyturn-bot"),
    )
    runner = AppRunner(web_application(process), access_log=None)
    await runner.setup()
    port = free_port()
    await TCPSite(runner, "127.0.0.1", port).start()
    slack.bot_url = f"http://127.0.0.1:{port}/slack/events"
    return runner


async def expire_together(
    store: Store, issuer: Issuer, config: Config
) -> tuple[list[float], float]:
    """Make every active grant fall due in the same second, a few seconds from now, and let a
    starting bot's revoker end them: each one's lag (ended - due, seconds) and how long it
    took from the first due to the last ended."""
    async with store.raw_connection() as conn:
        due = await conn.fetchval(
            "UPDATE grants SET expires_at = date_trunc('second', now()) + interval '5 seconds'"
            " + random() * interval '1 second' WHERE status = 'active'"
            " RETURNING date_trunc('second', now()) + interval '5 seconds'"
        )
    revoker = Revoker(store, issuer, config.bot, AsyncIOScheduler(timezone=UTC))
    revoker.start()
    await revoker.rebuild_once()  # one date job per grant, as a starting bot does
    async with asyncio.timeout(120):
        while await grants.active_grants(store):
            await asyncio.sleep(0.1)
    revoker.stop()
    async with store.raw_connection() as conn:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM ended_at - expires_at)::float8, ended_at FROM grants"
            " WHERE expires_at >= $1",
            due,
        )
    return [r[0] for r in rows], (max(r[1] for r in rows) - due).total_seconds()


async def issue_many(
    store: Store,
    count: int,
    new: Callable[[int], requests.NewRequest],
    mint: grants.Mint,
    unmint: grants.Unmint,
) -> None:
    """``count`` requests (``new(i)``), approved and issued with real leases, 16 at a time."""
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with gate:
            row, _ = await requests.create_request(store, new(i))
            await decisions.decide(
                store, row.id, "U_APPROVER", Decision.APPROVE, deciders=Deciders.only("U_APPROVER")
            )
            assert await grants.issue(store, row.id, mint, unmint) is not None

    await asyncio.gather(*(one(i) for i in range(count)))
