"""``keyturn dev``: the local stack on throwaway services, no accounts needed.

Starts a throwaway Postgres (keyturn's own database, migrated, plus a demo ``orders``
database), an OpenBao dev server bootstrapped for the demo policy, and the gateway as its own
``keyturn gateway`` process with a development token secret. Writes the addresses and a dev
agent token to ``<state-dir>/stack.json`` (mode 0600: it holds dev-only secrets) and waits for
Ctrl-C. The bot and the Slack sandbox join this stack as they land (docs/roadmap.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from keyturn.errors import Unavailable
from keyturn.policy import parse_policy
from keyturn.store import migrate
from keyturn.store.dsn import Dsn
from keyturn.testing.idp import dev_token
from keyturn.testing.openbao import OpenBaoDevServer
from keyturn.testing.ports import free_port
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
DEMO_AGENT = "crew-demo"


def demo_policy(pg_port: int, vault_addr: str, gateway_port: int) -> dict[str, Any]:
    return {
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
        "vault": {"addr": vault_addr},
        "gateway": {
            "listen": f"127.0.0.1:{gateway_port}",
            "auth": {"algorithms": ["HS256"]},
        },
    }


@dataclass
class DevStack:
    postgres: PostgresCluster
    openbao: OpenBaoDevServer
    database: Dsn
    policy_file: Path
    vault: BootstrapReport
    gateway_url: str
    dev_secret: str

    def agent_token(self) -> str:
        return dev_token(self.dev_secret, DEMO_AGENT)

    def describe(self) -> dict[str, Any]:
        return {
            "gateway_url": self.gateway_url,
            "agent_token": self.agent_token(),
            "dev_secret": self.dev_secret,
            "policy_file": str(self.policy_file),
            "database_url": self.database.url,
            "vault_addr": self.openbao.addr,
            "vault_root_token": self.openbao.root_token,
            "approles": {
                role: {"role_id": rid, "secret_id": self.vault.secret_ids.get(role)}
                for role, rid in self.vault.role_ids.items()
            },
        }


async def _prepare(
    pg: PostgresCluster, bao: OpenBaoDevServer, state_dir: Path
) -> tuple[Dsn, Path, BootstrapReport]:
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
    data = demo_policy(pg.port, bao.addr, free_port())
    policy_file = state_dir / "policy.yml"
    policy_file.write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["KEYTURN_TARGET_ORDERS_DB_USERNAME"] = "postgres"
    os.environ["KEYTURN_TARGET_ORDERS_DB_PASSWORD"] = pg.password
    vault = Vault(bao.addr, token=bao.root_token)
    try:
        report = await bootstrap(vault, parse_policy(data), issue_secret_ids=True)
    finally:
        await vault.close()
    return database, policy_file, report


@contextlib.contextmanager
def _gateway(stack_env: dict[str, str], policy_file: Path, url: str) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")} | stack_env
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyturn.cli", "gateway", "--config", str(policy_file)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise Unavailable("the gateway exited at start; run it alone to see why")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):  # noqa: S310
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise Unavailable("the gateway did not answer /healthz in 30 s") from None
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _smoke(stack: DevStack) -> str:
    """One allowed SELECT through the gateway, as an agent would send it."""
    body = json.dumps({"target": "orders-db", "command": "SELECT id, email FROM customers"})
    request = urllib.request.Request(  # noqa: S310 (loopback)
        f"{stack.gateway_url}/v1/commands",
        data=body.encode(),
        headers={
            "Authorization": f"Bearer {stack.agent_token()}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        answer = json.load(resp)
    return f"{resp.status} {answer['status']}, rows {answer['result']['rows']}"


def run_dev_stack(state_dir: Path, *, once: bool = False) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    with PostgresCluster() as pg, OpenBaoDevServer() as bao:
        database, policy_file, report = asyncio.run(_prepare(pg, bao, state_dir))
        policy = parse_policy(yaml.safe_load(policy_file.read_text()))
        stack = DevStack(
            pg,
            bao,
            database,
            policy_file,
            report,
            gateway_url=f"http://{policy.gateway.listen}",
            dev_secret=secrets.token_urlsafe(32),
        )
        gateway_role = report.role_ids[policy.vault.gateway_approle]
        env = {
            "KEYTURN_DATABASE_URL": database.url,
            "KEYTURN_GATEWAY_ROLE_ID": gateway_role,
            "KEYTURN_GATEWAY_SECRET_ID": report.secret_ids[policy.vault.gateway_approle],
            "KEYTURN_GATEWAY_DEV_SECRET": stack.dev_secret,
        }
        with _gateway(env, policy_file, stack.gateway_url):
            state = state_dir / "stack.json"
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(stack.describe(), out, indent=2)
            print(f"keyturn dev stack is up (state, with a dev agent token: {state})")
            print(f"  gateway    {stack.gateway_url}  (agent {DEMO_AGENT}, policy {policy_file})")
            print(f"  postgres   {database.redacted}  (demo target: orders-db)")
            print(f"  openbao    {bao.addr}  (bootstrapped: {len(report.actions)} steps)")
            print("  bot and Slack sandbox: not part of this build yet (docs/roadmap.md)")
            print(
                '  try: curl -s -X POST -H "Authorization: Bearer $(jq -r .agent_token '
                f'{state})" -d \'{{"target":"orders-db","command":"SELECT * FROM orders"}}\''
                f" {stack.gateway_url}/v1/commands"
            )
            if once:
                print(f"  smoke test: allowed SELECT -> {_smoke(stack)}")
                return 0
            print("Ctrl-C stops everything and deletes the throwaway data.")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
    return 0
