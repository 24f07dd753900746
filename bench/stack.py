"""The real stack for benchmarks: throwaway Postgres and OpenBao, a bootstrapped target, a dev IdP.

Shared by the bench/*.py scripts so each measures its part against the same setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from keyturn.harness.idp import DevIdP
from keyturn.harness.openbao import OpenBaoDevServer
from keyturn.harness.postgres import PostgresCluster
from keyturn.policy import Config, parse_config
from keyturn.store import migrate
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
    postgres: PostgresCluster
    openbao: OpenBaoDevServer
    idp: DevIdP
    database: Dsn  # keyturn's own
    policy_data: dict[str, Any]
    approles: dict[str, tuple[str, str]]

    @property
    def policy(self) -> Config:
        return parse_config(self.policy_data)

    def vault(self, role: str) -> Vault:
        role_id, secret_id = self.approles[role]
        return Vault(self.openbao.addr, approle=AppRoleLogin(role_id, secret_id))

    def target_dsn(self, user: str = "postgres", password: str | None = None) -> str:
        return self.postgres.dsn("shop", user, password).url


@contextlib.asynccontextmanager
async def real_stack(**gateway: Any) -> AsyncIterator[Stack]:
    with PostgresCluster() as pg, OpenBaoDevServer() as bao:
        admin = await asyncpg.connect(pg.dsn().url)
        await admin.execute("CREATE DATABASE keyturn")
        await admin.execute("CREATE DATABASE shop")
        await admin.close()
        shop = await asyncpg.connect(pg.dsn("shop").url)
        await shop.execute(SCHEMA)
        await shop.close()
        database = pg.dsn("keyturn")
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
            yield Stack(pg, bao, idp, database, data, approles)
        finally:
            await idp.stop()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, value: float, unit: str, target: str, ok: bool) -> None:
    print(f"{name:<52} {value:>10.2f} {unit:<6} target {target:<12} {'PASS' if ok else 'FAIL'}")


def median(samples: list[float]) -> float:
    return statistics.median(samples)
