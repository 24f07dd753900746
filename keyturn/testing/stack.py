"""``keyturn dev``: the local stack on throwaway services, no accounts needed.

Starts a throwaway Postgres (keyturn's own database, migrated, plus a demo ``orders``
database), an OpenBao dev server bootstrapped for the demo policy, writes everything to
``<state-dir>/stack.json`` (mode 0600: it holds dev-only secrets) and waits for Ctrl-C.
The gateway, bot and Slack sandbox join this stack as they land (see docs/roadmap.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from keyturn.policy import Policy, parse_policy
from keyturn.store import migrate
from keyturn.store.dsn import Dsn
from keyturn.testing.openbao import OpenBaoDevServer
from keyturn.testing.postgres import PostgresCluster
from keyturn.vault import Vault
from keyturn.vault_setup import BootstrapReport, bootstrap

DEMO_SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers,
                     total_cents int NOT NULL, status text NOT NULL DEFAULT 'open');
INSERT INTO customers (name, email) VALUES ('Ada', 'ada@example.com'), ('Lin', 'lin@example.com');
INSERT INTO orders (customer_id, total_cents) VALUES (1, 1250), (2, 9900), (1, 300);
"""


def demo_policy(pg_port: int) -> Policy:
    return parse_policy(
        {
            "targets": {
                "orders-db": {
                    "kind": "postgres",
                    "dsn": f"postgresql://127.0.0.1:{pg_port}/orders",
                    "vault": {"readonly_role": "orders-ro", "write_role": "orders-rw"},
                }
            },
            "rules": [
                {"name": "no-drop", "match": {"sql": ["drop", "truncate"]}, "action": "block"},
                {
                    "name": "writes",
                    "match": {"sql": ["insert", "update", "delete", "alter"]},
                    "action": "hold",
                    "approvers": {"users": ["U_APPROVER"]},
                    "grant_ttl": "10m",
                },
                {"name": "reads", "match": {"sql": ["select"]}, "action": "allow"},
            ],
            "masking": {"columns": ["*email*"], "detectors": ["email", "credit_card"]},
        },
        "demo policy",
    )


@dataclass
class DevStack:
    postgres: PostgresCluster
    openbao: OpenBaoDevServer
    database: Dsn
    policy: Policy
    vault: BootstrapReport

    def describe(self) -> dict[str, Any]:
        return {
            "database_url": self.database.url,
            "vault_addr": self.openbao.addr,
            "vault_root_token": self.openbao.root_token,
            "approles": {
                role: {"role_id": rid, "secret_id": self.vault.secret_ids.get(role)}
                for role, rid in self.vault.role_ids.items()
            },
            "targets": list(self.policy.targets),
        }


async def _prepare(pg: PostgresCluster, bao: OpenBaoDevServer) -> DevStack:
    admin = await asyncpg.connect(pg.dsn().url)
    try:
        await admin.execute("CREATE DATABASE keyturn")
        await admin.execute("CREATE DATABASE orders")
    finally:
        await admin.close()
    orders = await asyncpg.connect(pg.dsn("orders").url)
    try:
        await orders.execute(DEMO_SCHEMA)
    finally:
        await orders.close()
    database = pg.dsn("keyturn")
    await asyncio.to_thread(migrate.upgrade, database)
    policy = demo_policy(pg.port)
    os.environ["KEYTURN_TARGET_ORDERS_DB_USERNAME"] = "postgres"
    os.environ["KEYTURN_TARGET_ORDERS_DB_PASSWORD"] = pg.password
    vault = Vault(bao.addr, token=bao.root_token)
    try:
        report = await bootstrap(vault, policy, issue_secret_ids=True)
    finally:
        await vault.close()
    return DevStack(pg, bao, database, policy, report)


def run_dev_stack(state_dir: Path, *, once: bool = False) -> int:
    with PostgresCluster() as pg, OpenBaoDevServer() as bao:
        stack = asyncio.run(_prepare(pg, bao))
        state_dir.mkdir(parents=True, exist_ok=True)
        state = state_dir / "stack.json"
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(stack.describe(), out, indent=2)
        print(f"keyturn dev stack is up (state: {state})")
        print(f"  postgres   {stack.database.redacted}  (demo target: orders-db)")
        print(f"  openbao    {bao.addr}  (bootstrapped: {len(stack.vault.actions)} steps)")
        print("  gateway, bot and Slack sandbox: not part of this build yet (docs/roadmap.md)")
        if once:
            return 0
        print("Ctrl-C stops everything and deletes the throwaway data.")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        return 0
