"""``keyturn dev``: the local stack on throwaway services, no accounts needed.

Starts a throwaway Postgres (keyturn's own database, migrated, plus a demo ``orders``
database), an OpenBao dev server bootstrapped for the demo config, a demo HTTP target (the
orders API over that database, its key in OpenBao only: :mod:`keyturn.harness.dev_api`), a
demo SSH target (this machine's sshd, where OpenSSH is installed), the Slack emulator with its
sandbox page, and the gateway and the bot as their own ``keyturn gateway`` / ``keyturn bot``
processes. Writes the addresses and a dev agent token to ``<state-dir>/stack.json`` (mode
0600: it holds dev-only secrets; its keys are a contract, see docs/dev.md) and waits for
Ctrl-C, which stops every process and deletes the throwaway data and the state files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from keyturn.config.loading import parse_config
from keyturn.config.policy import Config
from keyturn.errors import ConfigError, Unavailable
from keyturn.harness import dev_api
from keyturn.harness.dev_slack import Workspace, open_workspace
from keyturn.harness.idp import dev_token
from keyturn.harness.openbao import OpenBaoDevServer
from keyturn.harness.ports import free_port
from keyturn.harness.postgres import PostgresCluster
from keyturn.harness.services import KeyturnService
from keyturn.harness.sshd import SshServer, find_sshd, ssh_principal
from keyturn.harness.tls import ServerTls, make_server_tls
from keyturn.store import migrate
from keyturn.store.dsn import Dsn
from keyturn.vault import Vault
from keyturn.vault_setup import (
    REVOKE_RISKY_FUNCTIONS,
    REVOKE_STATISTICS_VIEWS,
    BootstrapReport,
    bootstrap,
)

DEMO_SCHEMA = (
    """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers,
                     total_cents int NOT NULL, status text NOT NULL DEFAULT 'open');
INSERT INTO customers (name, email) VALUES ('Ada', 'ada@example.com'), ('Lin', 'lin@example.com');
INSERT INTO orders (customer_id, total_cents) VALUES (1, 1250), (2, 9900), (1, 300);
-- what docs/gateway.md asks of a DBA: no temporary tables or new objects for read-only logins
REVOKE TEMPORARY ON DATABASE orders FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
"""
    + REVOKE_RISKY_FUNCTIONS
    + REVOKE_STATISTICS_VIEWS
)
DEMO_AGENT = "crew-demo"
DEMO_SSH = "web-demo"


def demo_policy(
    pg_port: int,
    vault_addr: str,
    gateway_port: int,
    bot_port: int,
    slack: Workspace,
    wire: tuple[int, ServerTls] | None = None,
) -> dict[str, Any]:
    """The demo's policy; ``wire``: the port and TLS files of the Postgres protocol's edge."""
    postgres = {}
    if wire is not None:
        postgres = {
            "postgres_listen": f"127.0.0.1:{wire[0]}",
            "postgres_tls_cert": str(wire[1].cert_file),
            "postgres_tls_key": str(wire[1].key_file),
        }
    return {
        "targets": {
            "orders-db": {
                "kind": "postgres",
                "dsn": f"postgresql://127.0.0.1:{pg_port}/orders",
                "vault": {"readonly_role": "orders-ro", "write_role": "orders-rw"},
                "description": "the demo shop: customers(id, name, email) and "
                "orders(id, customer_id, total_cents, status)",
            }
        },
        "rules": [
            {"name": "no-drop", "match": {"sql": ["drop", "truncate"]}, "action": "block"},
            {
                "name": "writes",
                "match": {"sql": ["insert", "update", "delete", "alter"]},
                "action": "hold",
                "approvers": {"users": slack.approvers},
                "grant_ttl": "10m",
            },
            {"name": "reads", "match": {"sql": ["select"]}, "action": "allow"},
        ],
        # on-call engineers' own access: /keyturn db orders-db 15m <reason>, approved by
        # the approvers (with a real workspace, the approvers may ask each other)
        "access": [
            {
                "name": "on-call",
                "requesters": {"users": [slack.oncall] if slack.oncall else slack.approvers},
                "approvers": {"users": slack.approvers},
                "durations": ["15m", "30m", "1h"],
                "max_duration": "1h",
            }
        ],
        "masking": {"columns": ["*email*"], "detectors": ["email", "credit_card"]},
        "vault": {"addr": vault_addr},
        "slack": {"approval_channel": slack.channel},
        "gateway": {
            "listen": f"127.0.0.1:{gateway_port}",
            "auth": {"algorithms": ["HS256"]},
            **postgres,
        },
        "bot": {"listen": f"127.0.0.1:{bot_port}", "poll_interval": "1s"},
    }


@dataclass
class DevStack:
    postgres: PostgresCluster
    openbao: OpenBaoDevServer
    database: Dsn
    policy_file: Path
    vault: BootstrapReport
    gateway_url: str
    slack: Workspace
    dev_secret: str
    tls: ServerTls
    wire_port: int

    def agent_token(self) -> str:
        return dev_token(self.dev_secret, DEMO_AGENT)

    @property
    def wire_url(self) -> str:
        """A libpq URL for the demo Postgres target through keyturn (the password is the
        agent token)."""
        port = self.wire_port
        return (
            f"postgresql://{DEMO_AGENT}@127.0.0.1:{port}/orders-db"
            f"?sslmode=verify-full&sslrootcert={self.tls.ca_file}"
        )

    def describe(self, targets: Mapping[str, str]) -> dict[str, Any]:
        """stack.json: every key is documented in docs/dev.md (scripts rely on them)."""
        return {
            "gateway_url": self.gateway_url,
            "wire_url": self.wire_url,
            "ca_file": str(self.tls.ca_file),
            "sandbox_url": self.slack.sandbox_url,
            "agent_token": self.agent_token(),
            "agent": DEMO_AGENT,
            "approver_user": self.slack.approvers[0],
            "oncall_user": self.slack.oncall,
            "approval_channel": self.slack.channel,
            "targets": targets,
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


def _add_demo_ssh(data: dict[str, Any], approvers: list[str]) -> None:
    """Where OpenSSH is installed, a demo SSH target: this machine's own sshd, on a free port,
    trusting OpenBao's SSH CA (its port and host key are filled in once it runs)."""
    try:
        find_sshd()
        principal = ssh_principal()
    except (Unavailable, OSError, subprocess.CalledProcessError):
        return
    data["targets"][DEMO_SSH] = {
        "kind": "ssh",
        "host": "127.0.0.1",
        "principal": principal,
        "vault": {"ssh_role": DEMO_SSH},
    }
    data["rules"] += [
        {"name": "status", "target": DEMO_SSH, "match": {"shell": ["uptime"]}, "action": "allow"},
        {
            "name": "shell",
            "target": DEMO_SSH,
            "match": {"shell": ["id *", "echo *", "hostname"]},
            "action": "hold",
            "approvers": {"users": approvers},
            "grant_ttl": "5m",
        },
    ]


def _start_demo_ssh(
    stack: contextlib.ExitStack, bao: OpenBaoDevServer, policy_file: Path
) -> str | None:
    """Start the demo target's sshd and write its port and host key into the policy."""
    data = yaml.safe_load(policy_file.read_text())
    target = data["targets"].get(DEMO_SSH)
    if target is None:
        return None
    with urllib.request.urlopen(f"{bao.addr}/v1/ssh/public_key", timeout=5) as resp:  # noqa: S310
        ca = resp.read().decode()
    sshd = stack.enter_context(SshServer(ca))
    target.update(port=sshd.port, host_key=sshd.host_public_key)
    policy_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return f"127.0.0.1:{sshd.port} as {sshd.principal}"


async def _prepare(
    pg: PostgresCluster, bao: OpenBaoDevServer, state_dir: Path, slack: Workspace, api_port: int
) -> tuple[Dsn, Path, BootstrapReport, str]:
    """keyturn's database, the demo database, the policy file and Vault, ready; the demo
    API's key (from KV: the API process is given it, nothing else keeps it)."""
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
    tls = make_server_tls(state_dir / "tls")
    data = demo_policy(pg.port, bao.addr, free_port(), free_port(), slack, (free_port(), tls))
    _add_demo_ssh(data, slack.approvers)
    dev_api.add_to_policy(data, api_port, slack.approvers)
    policy_file = state_dir / "policy.yml"
    policy_file.write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["KEYTURN_TARGET_ORDERS_DB_USERNAME"] = "postgres"
    os.environ["KEYTURN_TARGET_ORDERS_DB_PASSWORD"] = pg.password
    vault = Vault(bao.addr, token=bao.root_token)
    try:
        report = await bootstrap(vault, parse_config(data), issue_secret_ids=True)
        await dev_api.store_key(vault)
        key = await dev_api.read_key(vault)
    finally:
        await vault.close()
    return database, policy_file, report, key


def _call(stack: DevStack, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 (loopback)
        f"{stack.gateway_url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={
            "Authorization": f"Bearer {stack.agent_token()}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        return json.load(resp)


def _tls_of(config: Config, state_dir: Path) -> ServerTls:
    cert, key = config.gateway.postgres_tls_cert, config.gateway.postgres_tls_key
    assert cert is not None and key is not None
    return ServerTls(state_dir / "tls" / "ca.pem", cert, key)


async def _wire_smoke(stack: DevStack) -> list[str]:
    """What a Postgres client sees through keyturn: a masked read, a refused DROP."""
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=stack.wire_port,
        user=DEMO_AGENT,
        password=stack.agent_token(),
        database="orders-db",
        ssl=ssl.create_default_context(cafile=str(stack.tls.ca_file)),
    )
    try:
        rows = await conn.fetch("SELECT id, email FROM customers ORDER BY id")
        lines = [f"Postgres protocol: SELECT -> {[tuple(r) for r in rows]}"]
        try:
            await conn.execute("DROP TABLE orders")
        except asyncpg.InsufficientPrivilegeError as exc:
            lines.append(f"Postgres protocol: DROP TABLE -> SQLSTATE {exc.sqlstate}: {exc}")
    finally:
        await conn.close()
    return lines


def _keyturn() -> str:
    """How to run this installation's ``keyturn`` from here (``.venv/bin/keyturn``)."""
    command = Path(sys.executable).parent / "keyturn"
    with contextlib.suppress(ValueError):
        return str(command.relative_to(Path.cwd()))
    return str(command)


def _forget(*files: Path) -> None:
    """The state files go with the stack: they name ports and hold dev secrets of a stack
    that no longer runs."""
    for path in files:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the directory too, when nothing else is in it
        files[0].parent.rmdir()


def _approve(stack: DevStack, request_id: str) -> str:
    """Click Approve on the request's card in the local sandbox, as the first approver."""
    slack, channel, approver = stack.slack.sandbox, stack.slack.channel, stack.slack.approvers[0]
    assert slack is not None, "the smoke test clicks in the local sandbox"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cards = [m for m in slack.channel(channel) if request_id in json.dumps(m.blocks)]
        if cards:
            stack.slack.run(slack.click(channel, cards[0].ts, "keyturn_approve", approver))
            return approver
        time.sleep(0.1)
    raise Unavailable(f"no card for request {request_id} in #{channel} within 30 s")


def _smoke(stack: DevStack, *, ssh: bool) -> list[str]:
    """What an agent and an approver would do: a read, then a held write approved in Slack."""
    read = _call(
        stack,
        "POST",
        "/v1/commands",
        {"target": "orders-db", "command": "SELECT id, email FROM customers"},
    )
    lines = [f"allowed SELECT -> {read['status']}, rows {read['result']['rows']}"]
    held = _call(
        stack,
        "POST",
        "/v1/commands",
        {
            "target": "orders-db",
            "command": "UPDATE orders SET status = 'paid' WHERE id = 1",
            "reason": "dev smoke test",
        },
    )
    lines.append(f"held UPDATE -> {held['status']}")
    approver = _approve(stack, held["id"])
    done = _call(stack, "GET", f"/v1/commands/{held['id']}?wait=30")
    outcome = (done.get("result") or {}).get("tags") or done.get("error")
    lines.append(
        f"card posted in #{stack.slack.channel}, approved by {approver} -> {done['status']}"
        f" ({outcome}) with one-shot credentials from Vault"
    )
    lines += dev_api.smoke(
        lambda method, path, body: _call(stack, method, path, body),
        lambda request_id: _approve(stack, request_id),
    )
    if ssh:
        shell = _call(stack, "POST", "/v1/commands", {"target": DEMO_SSH, "command": "uptime"})
        ran = _call(stack, "GET", f"/v1/commands/{shell['id']}?wait=30")
        exit_status = (ran.get("result") or {}).get("exit_status")
        lines.append(
            f"allowed uptime on {DEMO_SSH} -> {ran['status']} (exit {exit_status}) with a"
            " one-off SSH certificate"
        )
    return lines


def run_dev_stack(state_dir: Path, *, once: bool = False) -> int:
    slack = open_workspace(os.environ)
    try:
        if once and slack.sandbox is None:
            raise ConfigError("--once clicks in the local sandbox: unset the Slack tokens")
        state_dir.mkdir(parents=True, exist_ok=True)
        with PostgresCluster() as pg, OpenBaoDevServer() as bao, contextlib.ExitStack() as more:
            code = _run(state_dir, pg, bao, slack, more, once=once)
    finally:
        slack.close()
    if not once:
        print("keyturn dev stopped: every process ended, the throwaway data is deleted")
    return code


def _run(
    state_dir: Path,
    pg: PostgresCluster,
    bao: OpenBaoDevServer,
    slack: Workspace,
    services: contextlib.ExitStack,
    *,
    once: bool,
) -> int:
    state = state_dir / "stack.json"
    services.callback(_forget, state, state_dir / "policy.yml")
    services.callback(shutil.rmtree, state_dir / "tls", ignore_errors=True)  # runs first
    api_port = free_port()
    database, policy_file, report, key = asyncio.run(_prepare(pg, bao, state_dir, slack, api_port))
    api_url = services.enter_context(dev_api.serving(pg, key, api_port))
    del key  # the API process has it; keyturn reads it from OpenBao when it sends a call
    demo_ssh = _start_demo_ssh(services, bao, policy_file)
    config = parse_config(yaml.safe_load(policy_file.read_text()))
    stack = DevStack(
        pg,
        bao,
        database,
        policy_file,
        report,
        gateway_url=f"http://{config.gateway.listen}",
        slack=slack,
        dev_secret=secrets.token_urlsafe(32),
        tls=_tls_of(config, state_dir),
        wire_port=int((config.gateway.postgres_listen or ":0").rpartition(":")[2]),
    )
    gateway = config.vault.gateway_approle
    common = {"KEYTURN_DATABASE_URL": database.url}
    gateway_env = common | {
        "KEYTURN_GATEWAY_ROLE_ID": report.role_ids[gateway],
        "KEYTURN_GATEWAY_SECRET_ID": report.secret_ids[gateway],
        "KEYTURN_GATEWAY_DEV_SECRET": stack.dev_secret,
    }
    bot_env = (
        common
        | slack.bot_env
        | {
            "KEYTURN_BOT_ROLE_ID": report.role_ids[config.vault.bot_approle],
            "KEYTURN_BOT_SECRET_ID": report.secret_ids[config.vault.bot_approle],
        }
    )
    bot_url = f"http://{config.bot.listen}"
    slack.deliver_to(bot_url)
    with (
        KeyturnService("gateway", policy_file, gateway_env, stack.gateway_url),
        KeyturnService("bot", policy_file, bot_env, bot_url),
    ):
        targets = {name: target.kind for name, target in config.policy.targets.items()}
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(stack.describe(targets), out, indent=2)
        print(f"keyturn dev stack is up (state, with a dev agent token: {state})")
        if slack.sandbox_url:
            print(f"  sandbox    {slack.sandbox_url}/  (open it: Slack, as Ada Approver)")
        else:
            print(f"  slack      your workspace: cards in {slack.channel}, for {slack.approvers}")
        print(f"  gateway    {stack.gateway_url}  (agent {DEMO_AGENT}, policy {policy_file})")
        print(f"  psql       psql '{stack.wire_url}'  (sign in with stack.json's agent_token)")
        print(f"  postgres   {database.redacted}  (demo target: orders-db)")
        print(f"  openbao    {bao.addr}  (bootstrapped: {len(report.actions)} steps)")
        print(f"  orders api {api_url}  (demo target: {dev_api.TARGET}, its key only in OpenBao)")
        if demo_ssh:
            print(f"  sshd       {demo_ssh}  (demo target: {DEMO_SSH}, trusts OpenBao's SSH CA)")
        print(f"  try it     {_keyturn()} demo   (in another terminal; then click Approve)")
        if once:
            for line in _smoke(stack, ssh=demo_ssh is not None) + asyncio.run(_wire_smoke(stack)):
                print(f"  smoke test: {line}")
            return 0
        print("Ctrl-C stops everything and deletes the throwaway data.")
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
        print("stopping keyturn dev...", flush=True)
    return 0
