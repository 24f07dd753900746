"""A shop database with a bootstrapped Vault and a dev IdP, for gateway tests."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from bot import card_store
from bot.bootstrap import build as build_bot
from bot.bootstrap import slack_client, web_application
from bot.cards import APPROVE, DENY
from bot.service import Bot
from gateway.bootstrap import GatewayProcess, application, build
from gateway.drivers.postgres.driver import PostgresDriver
from gateway.drivers.postgres.logins import ReadOnlyLogins
from gateway.usecases.gateway import Gateway
from keyturn import supervise
from keyturn.clock import Clock
from keyturn.config.loading import parse_config
from keyturn.config.policy import Config
from keyturn.harness.http_servers import Httpbin, JsonServer
from keyturn.harness.idp import DevIdP
from keyturn.harness.openbao import OpenBaoDevServer
from keyturn.harness.ports import free_port
from keyturn.harness.pytest_plugin import PostgresServer
from keyturn.harness.slack import SlackEmulator
from keyturn.harness.sshd import SshServer, ssh_principal
from keyturn.harness.tls import ServerTls, make_server_tls
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from keyturn.supervise import Loop
from keyturn.vault import AppRoleLogin, Vault
from keyturn.vault_setup import bootstrap

SHOP_SCHEMA = """
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, note text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total int, status text);
INSERT INTO customers VALUES
  (1, 'Ada', 'ada@example.com', 'card 4111 1111 1111 1111, ssn 123-45-6789'),
  (2, 'Lin', 'lin@example.com', 'call (415) 555-2671');
INSERT INTO orders SELECT g, 1 + g % 2, g * 10, 'open' FROM generate_series(1, 500) g;
ANALYZE;
"""


@dataclass
class Shop:
    openbao: OpenBaoDevServer
    postgres: PostgresServer
    database: str
    base_policy: dict[str, Any]
    role_id: str
    secret_id: str
    bot_role_id: str
    bot_secret_id: str

    def policy(self, **overrides: Any) -> Config:
        data = copy.deepcopy(self.base_policy)
        for key, value in overrides.items():
            if key == "gateway":
                data["gateway"] = {**data["gateway"], **value}
            else:
                data[key] = value
        return parse_config(data)

    def vault(self) -> Vault:
        return Vault(self.openbao.addr, approle=AppRoleLogin(self.role_id, self.secret_id))

    def bot_vault(self) -> Vault:
        return Vault(self.openbao.addr, approle=AppRoleLogin(self.bot_role_id, self.bot_secret_id))

    def root_vault(self) -> Vault:
        return Vault(self.openbao.addr, token=self.openbao.root_token)

    async def dynamic_roles(self) -> list[str]:
        """Roles Vault created for write grants that still exist in the shop database."""
        rows = await self.postgres.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%shop-rw%' ORDER BY 1",
            self.database,
        )
        return [r[0] for r in rows]


@pytest.fixture(scope="session")
def gateway_openbao() -> Iterator[OpenBaoDevServer]:
    with OpenBaoDevServer() as server:
        yield server


@pytest_asyncio.fixture(scope="session")
async def idp() -> AsyncIterator[DevIdP]:
    provider = DevIdP()
    await provider.start()
    yield provider
    await provider.stop()


@pytest_asyncio.fixture(scope="session")
async def shop(
    gateway_openbao: OpenBaoDevServer, postgres_server: PostgresServer, idp: DevIdP
) -> AsyncIterator[Shop]:
    database = f"shop_{uuid.uuid4().hex[:8]}"
    await postgres_server.execute(f'CREATE DATABASE "{database}"')
    await postgres_server.execute(SHOP_SCHEMA, database)
    data: dict[str, Any] = {
        "targets": {
            "shop": {
                "kind": "postgres",
                "dsn": f"postgresql://127.0.0.1:{postgres_server.port}/{database}",
                "vault": {"readonly_role": "shop-ro", "write_role": "shop-rw"},
            },
            "web": {
                "kind": "ssh",
                "host": "127.0.0.1",
                "principal": ssh_principal(),
                "vault": {"ssh_role": "web-ops"},
            },
            "private": {
                "kind": "postgres",
                "dsn": f"postgresql://127.0.0.1:{postgres_server.port}/{database}",
                "vault": {"readonly_role": "shop-ro", "write_role": "shop-rw"},
                "subjects": ["agent:crew-vip", "group:sre"],
            },
        },
        "rules": [
            {
                "name": "no-drop",
                "match": {"sql": ["drop", "truncate"]},
                "action": "block",
                "message": "dropping tables is never allowed",
            },
            {
                "name": "unbounded",
                "match": {"sql": ["delete_without_where", "update_without_where"]},
                "action": "block",
            },
            {
                "name": "writes",
                "match": {"sql": ["insert", "update", "delete"]},
                "action": "hold",
                "approvers": {"users": ["U_APPROVER"]},
                "grant_ttl": "5m",
            },
            {"name": "reads", "match": {"sql": ["select"]}, "action": "allow"},
            {"name": "status", "target": "web", "match": {"shell": ["uptime"]}, "action": "allow"},
        ],
        "masking": {
            "columns": ["*email*"],
            "detectors": ["email", "credit_card", "us_ssn", "phone"],
        },
        "vault": {"addr": gateway_openbao.addr},
        "gateway": {"auth": {"jwks_url": idp.url, "issuer": idp.issuer}},
    }
    root = Vault(gateway_openbao.addr, token=gateway_openbao.root_token)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYTURN_TARGET_SHOP_USERNAME", "postgres")
        mp.setenv("KEYTURN_TARGET_SHOP_PASSWORD", postgres_server.password)
        mp.setenv("KEYTURN_TARGET_PRIVATE_USERNAME", "postgres")
        mp.setenv("KEYTURN_TARGET_PRIVATE_PASSWORD", postgres_server.password)
        report = await bootstrap(root, parse_config(data), issue_secret_ids=True)
    await root.close()
    yield Shop(
        gateway_openbao,
        postgres_server,
        database,
        data,
        report.role_ids["keyturn-gateway"],
        report.secret_ids["keyturn-gateway"],
        report.role_ids["keyturn-bot"],
        report.secret_ids["keyturn-bot"],
    )
    await postgres_server.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sshd(shop: Shop) -> Iterator[SshServer]:
    """A real sshd trusting the shop's Vault SSH CA. Fails (never skips) without OpenSSH."""
    import requests

    ca = requests.get(f"{shop.openbao.addr}/v1/ssh/public_key", timeout=5).text
    with SshServer(ca) as server:
        yield server


# ------------------------------------------------------------------ HTTP API targets

NODE_DIR = Path(__file__).parents[1] / "node"
CRUD_DATA = {
    "customers": [
        {"id": 1, "name": "Ada", "contact": {"email": "ada@example.com", "phone": "x"}},
        {"id": 2, "name": "Lin", "contact": {"email": "lin@example.com"}},
    ],
    "orders": [{"id": 1, "customerId": 1, "status": "open"}],
}
API_KEY_NAMES = ("httpbin", "crud", "hostile")
MINTED_ROLE = "hostile-caller"  # an identity-token role: the gateway mints a JWT per call


@dataclass
class Apis:
    """Real HTTP APIs as targets, each with a key only OpenBao's KV (and the test) knows."""

    httpbin: Httpbin
    crud: JsonServer
    keys: dict[str, str]  # target -> its API key
    targets: dict[str, Any]

    def policy(
        self, hostile: str = "http://127.0.0.1:9", **hostile_settings: Any
    ) -> dict[str, Any]:
        """Targets and rules for run_gateway / run_desk: the shop's, and the APIs'; the
        hostile target at ``hostile`` (a server the test runs)."""
        targets = copy.deepcopy(self.targets)
        targets["hostile"] |= {"base_url": hostile, **hostile_settings}
        targets["minted"]["base_url"] = hostile  # the same server, with identity tokens
        return {"targets": targets, "rules": API_RULES}

    async def rotate(self, shop: Shop, target: str) -> str:
        key = secrets.token_urlsafe(24)
        root = shop.root_vault()
        try:
            await root.write(f"secret/data/{target}", {"data": {"token": key}})
        finally:
            await root.close()
        self.keys[target] = key
        return key


API_RULES: list[dict[str, Any]] = [
    {"name": "no-deletes", "match": {"http": ["DELETE /**"]}, "action": "block"},
    {"name": "api-reads", "match": {"http": ["GET /**"]}, "action": "allow"},
    {
        "name": "echo",
        "target": "httpbin",
        "match": {"http": ["POST /anything/**"]},
        "action": "allow",
    },
    {
        "name": "writes",  # run_desk's writes= overrides apply here too
        "match": {"http": ["* /**"], "sql": ["insert", "update", "delete"]},
        "action": "hold",
        "approvers": {"users": ["U_APPROVER"]},
        "grant_ttl": "5m",
    },
]


@pytest_asyncio.fixture(scope="session")
async def apis(shop: Shop) -> AsyncIterator[Apis]:
    """httpbin and json-server running, their keys in KV, the gateway's Vault policy grown
    by their secrets (vault-bootstrap again, as an operator adding targets would)."""
    with Httpbin() as httpbin, JsonServer(NODE_DIR, CRUD_DATA) as crud:
        keys = {name: secrets.token_urlsafe(24) for name in API_KEY_NAMES}
        targets = copy.deepcopy(shop.base_policy["targets"])
        for name, url in (("httpbin", httpbin.url), ("crud", crud.url), ("hostile", "")):
            targets[name] = {
                "kind": "http",
                "base_url": url or "http://127.0.0.1:9",
                "vault": {"kv": f"secret/{name}"},
                "timeout": "3s",
                "max_response_bytes": 65536,
            }
        targets["minted"] = targets["hostile"] | {"vault": {"identity_token": MINTED_ROLE}}
        root = shop.root_vault()
        try:
            for name, key in keys.items():
                await root.write(f"secret/data/{name}", {"data": {"token": key}})
            with pytest.MonkeyPatch.context() as mp:
                for target in ("SHOP", "PRIVATE"):
                    mp.setenv(f"KEYTURN_TARGET_{target}_USERNAME", "postgres")
                    mp.setenv(f"KEYTURN_TARGET_{target}_PASSWORD", shop.postgres.password)
                await bootstrap(root, shop.policy(targets=targets))
        finally:
            await root.close()
        yield Apis(httpbin, crud, keys, targets)


class TcpProxy:
    """A TCP forwarder we can switch off: a dependency (Vault, Postgres) as keyturn sees it,
    down or up. Down refuses new connections and cuts the open ones, as a crash would."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def dsn(self, through: Dsn) -> Dsn:
        """``through`` with its port replaced by this proxy's."""
        parts = urlsplit(through.url)
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{self.port}"
        return Dsn(urlunsplit(parts._replace(netloc=netloc)), through.connect_args)

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._open |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()
            self._open.discard(dst)

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


@contextlib.asynccontextmanager
async def serve_bot(
    slack: SlackEmulator, config: Config, database: Dsn, vault: Vault, clock: Clock | None = None
) -> AsyncIterator[Bot]:
    """A real bot (Bolt over HTTP) on ``database``, receiving the emulator's signed clicks."""
    client = slack_client(slack.bot_token, slack.api_url)
    store = Store(database, clock=clock)
    process = build_bot(config, store, client, slack.signing_secret, vault)
    server = TestServer(web_application(process))
    await server.start_server()
    slack.bot_url = str(server.make_url("/slack/events"))
    try:
        yield process.bot
    finally:
        await server.close()


@dataclass
class Running:
    client: TestClient[Any, Any]
    process: GatewayProcess
    store: Store

    @property
    def gw(self) -> Gateway:
        """The use cases' view of this gateway."""
        return self.process.gw

    @property
    def logins(self) -> ReadOnlyLogins | None:
        """The postgres driver's read-only logins (None without the gateway's Vault)."""
        return cast(PostgresDriver, self.gw.drivers.kind("postgres")).logins

    async def post(self, token: str, body: Any, **headers: str) -> tuple[int, dict[str, Any]]:
        resp = await self.client.post(
            "/v1/commands", json=body, headers={"Authorization": f"Bearer {token}", **headers}
        )
        return resp.status, await resp.json()

    @property
    def url(self) -> str:
        """Where an out-of-process agent (or an HTTP client) reaches this gateway."""
        return f"http://{self.client.host}:{self.client.port}"

    async def get(
        self, token: str, ident: str, wait: float | str = 0
    ) -> tuple[int, dict[str, Any]]:
        resp = await self.client.get(
            f"/v1/commands/{ident}?wait={wait}", headers={"Authorization": f"Bearer {token}"}
        )
        return resp.status, await resp.json()


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[Running]]


@pytest.fixture
def run_gateway(shop: Shop, database: Dsn) -> GatewayFactory:
    """``async with run_gateway(**policy_overrides) as gw:`` a real gateway on a fresh DB."""

    @contextlib.asynccontextmanager
    async def start(
        dev_secret: str | None = None,
        vault: Vault | None = None,
        port: int | None = None,
        clock: Clock | None = None,
        **overrides: Any,
    ) -> AsyncIterator[Running]:
        store = Store(database, clock=clock)
        gw = build(shop.policy(**overrides), store, vault or shop.vault(), dev_secret=dev_secret)
        server = TestServer(application(gw), port=port)
        client = TestClient(server)
        await client.start_server()
        try:
            yield Running(client, gw, store)
        finally:
            await client.close()

    return start


@pytest.fixture(autouse=True)
def _no_ambient_keyturn_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KEYTURN_") and name != "KEYTURN_TEST_DATABASE_URL":
            monkeypatch.delenv(name)


@dataclass
class Spy:
    """Records what the bot wraps for the gateway: the real secrets the scans look for."""

    secrets: list[str] = field(default_factory=list)

    def watch(self, vault: Vault) -> Vault:
        original = vault.wrap

        async def wrap(data: dict[str, Any], ttl: timedelta) -> Any:
            self.secrets += [str(data[k]) for k in ("password", "private_key") if k in data]
            return await original(data, ttl)

        vault.wrap = wrap  # type: ignore[method-assign]
        return vault


@pytest.fixture
def spy() -> Spy:
    return Spy()


APPROVALS = "CAPPROVALS"
APPROVER = "U_APPROVER"


@dataclass
class Desk:
    """The whole approval path as an agent meets it: a gateway on a real port, the bot, the
    Slack emulator where ``APPROVER`` clicks."""

    gateway: Running
    slack: SlackEmulator
    store: Store

    async def card(self, request_id: str, timeout: float = 20) -> str:
        """The ts of the request's card once the bot has posted it."""
        async with asyncio.timeout(timeout):
            while not (posted := await card_store.posted_at(self.store, uuid.UUID(request_id))):
                await asyncio.sleep(0.05)
        return posted[1]

    async def approve(self, request_id: str) -> None:
        status, _ = await self.slack.click(
            APPROVALS, await self.card(request_id), APPROVE, APPROVER
        )
        assert status == 200

    async def deny(self, request_id: str, reason: str) -> None:
        ts = await self.card(request_id)
        opened = len(self.slack.views)
        await self.slack.click(APPROVALS, ts, DENY, APPROVER)
        async with asyncio.timeout(10):
            while len(self.slack.views) == opened:
                await asyncio.sleep(0.05)
        status, _ = await self.slack.submit(
            list(self.slack.views)[-1], APPROVER, {"reason": reason}
        )
        assert status == 200

    async def requests(self) -> int:
        """How many requests keyturn recorded (held, allowed and blocked alike)."""
        async with self.store.raw_connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM requests"))


DeskFactory = Callable[..., contextlib.AbstractAsyncContextManager[Desk]]


async def held(calls: list[Any], timeout: float = 20) -> Any:
    """The first thing an ``on_pending`` callback was given (a held request)."""
    async with asyncio.timeout(timeout):
        while not calls:
            await asyncio.sleep(0.05)
    return calls[0]


@pytest_asyncio.fixture
async def approvals_slack() -> AsyncIterator[SlackEmulator]:
    emulator = SlackEmulator()
    await emulator.start()
    emulator.add_user(APPROVER, "Ada Approver")
    yield emulator
    await emulator.stop()


@pytest_asyncio.fixture
async def reopened_orders(shop: Shop) -> AsyncIterator[None]:
    """Approved UPDATEs mark orders paid in the shared shop database: every order is open
    when the test starts, and open again after it."""
    reopen = "UPDATE orders SET status = 'open' WHERE status <> 'open'"
    await shop.postgres.execute(reopen, shop.database)
    yield
    await shop.postgres.execute(reopen, shop.database)


@pytest.fixture
def run_desk(
    shop: Shop,
    database: Dsn,
    run_gateway: GatewayFactory,
    approvals_slack: SlackEmulator,
    reopened_orders: None,
) -> DeskFactory:
    """``async with run_desk(**gateway_overrides) as desk:`` gateway, bot and Slack together."""

    @contextlib.asynccontextmanager
    async def start(
        bot_vault: Vault | None = None, writes: dict[str, Any] | None = None, **overrides: Any
    ) -> AsyncIterator[Desk]:
        data = copy.deepcopy(shop.base_policy)
        for key in ("targets", "rules", "masking"):  # the bot's policy is the gateway's
            if key in overrides:
                data[key] = overrides.pop(key)
        data["slack"] = {"approval_channel": APPROVALS}
        data["bot"] = {"poll_interval": "500ms"}
        data["gateway"] = {**data["gateway"], "poll_interval": "500ms"}
        for rule in data["rules"]:
            if rule["name"] == "writes":
                rule.update(writes or {})
        config = parse_config(data)
        gateway = {"poll_interval": "500ms", **overrides.pop("gateway", {})}
        policy = {key: data[key] for key in ("targets", "rules", "masking")}
        async with (
            serve_bot(approvals_slack, config, database, bot_vault or shop.bot_vault()),
            run_gateway(gateway=gateway, **policy, **overrides) as running,
            Store(database) as store,
        ):
            yield Desk(running, approvals_slack, store)

    return start


# ------------------------------------------------------------------ supervised loops


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTls:
    """A throwaway CA and a certificate for 127.0.0.1: the Postgres edge's TLS."""
    return make_server_tls(tmp_path_factory.mktemp("wire-tls"))


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Crashed loops come back within a second (the shared backoff, shortened)."""
    monkeypatch.setattr(supervise, "FIRST_RETRY", 0.2)
    monkeypatch.setattr(supervise, "RETRY_CAP", 0.5)


@contextlib.contextmanager
def crashing(loop: Loop) -> Iterator[None]:
    """Every pass of ``loop`` raises what no loop expects, until the block ends."""
    step = loop.step

    async def broken() -> None:
        raise RuntimeError(f"injected into {loop.name}")

    loop.step = broken
    try:
        yield
    finally:
        loop.step = step
