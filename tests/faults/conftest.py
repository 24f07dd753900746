"""Fault stories: real processes of keyturn killed (SIGKILL) or stopped at the worst moments,
on the integration tests' real services (their fixtures, imported here). Every test here is
marked ``slow``: ``scripts/test -m "not slow"`` leaves them out of a quick loop; CI runs them."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bot import card_store
from bot.cards import APPROVE
from gateway.bootstrap import application, build
from keyturn.config.loading import parse_config
from keyturn.errors import NotFound
from keyturn.harness.ports import free_port
from keyturn.harness.postgres import PostgresCluster
from keyturn.harness.pytest_plugin import (  # noqa: F401  (fixtures: on the cluster below)
    PostgresServer,
    database,
    template_database,
)
from keyturn.harness.services import KeyturnService
from keyturn.harness.slack import SlackEmulator
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.integration.conftest import *  # noqa: F403  (the services, as the integration tests have them)
from tests.integration.conftest import APPROVALS, APPROVER, Shop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A Postgres cluster of the stories' own: what they kill leaves database roles behind
    (a SIGKILLed gateway's read-only logins live until their leases end), and roles are the
    cluster's, which other tests count."""
    with PostgresCluster() as cluster:
        yield PostgresServer(cluster.dsn(), cluster.password, cluster.port)


async def order_total(shop: Shop, order: int) -> int:
    """An order's total on the target: what an approved ``total = total + 1`` changes, so a
    story can count how many times it ran."""
    rows = await shop.postgres.fetch(f"SELECT total FROM orders WHERE id = {order}", shop.database)
    return int(rows[0][0])


WRITE_LEASES = "database/creds/shop-rw/"  # where the bot's write logins live
READ_ONLY = "database/creds/shop-ro/"  # where the gateway's read-only logins live


def desk_policy(shop: Shop, grant_ttl: str | None = None, **bot: str) -> dict[str, Any]:
    """The shop's policy for a gateway and a bot that poll often and sweep every second."""
    data = copy.deepcopy(shop.base_policy)
    data["slack"] = {"approval_channel": APPROVALS}
    data["bot"] = {"poll_interval": "500ms", "sweep_interval": "1s", **bot}
    data["gateway"] = {**data["gateway"], "poll_interval": "500ms"}
    for rule in data["rules"]:
        if rule["name"] == "writes" and grant_ttl is not None:
            rule["grant_ttl"] = grant_ttl
    return data


@contextlib.asynccontextmanager
async def served_gateway(shop: Shop, data: dict[str, Any], dsn: Dsn) -> AsyncIterator[str]:
    """A gateway in this process on ``data`` and ``dsn``; its URL."""
    process = build(parse_config(data), Store(dsn), shop.vault())
    client = TestClient(TestServer(application(process)))
    await client.start_server()
    try:
        yield str(client.make_url("")).rstrip("/")
    finally:
        await client.close()


async def card_of(store: Store, request_id: str) -> str:
    """The ts of the request's card once the bot has posted it."""
    async with asyncio.timeout(30):
        while not (posted := await card_store.posted_at(store, uuid.UUID(request_id))):
            await asyncio.sleep(0.05)
    return posted[1]


async def approve(slack: SlackEmulator, store: Store, request_id: str) -> None:
    """Ada clicks Approve on the request's card once the bot has posted it."""
    status, _ = await slack.click(APPROVALS, await card_of(store, request_id), APPROVE, APPROVER)
    assert status == 200


async def status_of(store: Store, request_id: str) -> str:
    async with store.raw_connection() as conn:
        return str(
            await conn.fetchval("SELECT status FROM requests WHERE id = $1", uuid.UUID(request_id))
        )


async def grants_of(store: Store, request_id: str) -> list[tuple[str, str | None]]:
    """Each grant of the request: (status, lease id)."""
    async with store.raw_connection() as conn:
        rows = await conn.fetch(
            "SELECT status, lease_id FROM grants WHERE request_id = $1", uuid.UUID(request_id)
        )
    return [(r[0], r[1]) for r in rows]


async def leases_under(shop: Shop, prefix: str) -> set[str]:
    """The leases OpenBao holds under ``prefix`` now (none: an empty set)."""
    root = shop.root_vault()
    try:
        return set(await root.lease_ids(prefix))
    except NotFound:
        return set()
    finally:
        await root.close()


def policy_file(shop: Shop, tmp: Path, **gateway: Any) -> tuple[Path, dict[str, Any]]:
    data = copy.deepcopy(shop.base_policy)
    data["gateway"] = {**data["gateway"], "poll_interval": "500ms", **gateway}
    path = tmp / f"keyturn-{free_port()}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, data


@contextlib.asynccontextmanager
async def keyturn_process(
    command: str, config: Path, env: dict[str, str], url: str, ready: str
) -> AsyncIterator[KeyturnService]:
    """``keyturn <command>`` until the block ends, its output in a log beside its config."""
    service = KeyturnService(command, config, env, url, ready=ready, log=config.with_suffix(".log"))
    await asyncio.to_thread(service.start)
    try:
        yield service
    finally:
        await asyncio.to_thread(service.stop)


@contextlib.asynccontextmanager
async def gateway_process(
    shop: Shop, keyturn_db: Dsn, tmp: Path, rules: list[dict[str, Any]] | None = None
) -> AsyncIterator[KeyturnService]:
    port = free_port()
    path, data = policy_file(shop, tmp, listen=f"127.0.0.1:{port}")
    if rules is not None:
        data["rules"] = rules
        path.write_text(json.dumps(data), encoding="utf-8")
    env = {
        "KEYTURN_DATABASE_URL": keyturn_db.url,
        "KEYTURN_GATEWAY_ROLE_ID": shop.role_id,
        "KEYTURN_GATEWAY_SECRET_ID": shop.secret_id,
    }
    async with keyturn_process("gateway", path, env, f"http://127.0.0.1:{port}", "/readyz") as gw:
        yield gw


@contextlib.asynccontextmanager
async def bot_process(
    data: dict[str, Any], slack: SlackEmulator, keyturn_db: Dsn, shop: Shop, tmp: Path, vault: str
) -> AsyncIterator[KeyturnService]:
    """``keyturn bot`` in HTTP mode on ``data`` (a policy), reaching Vault at ``vault``; the
    emulator delivers clicks to it from now on."""
    port = free_port()
    data = copy.deepcopy(data) | {"bot": {**data.get("bot", {}), "listen": f"127.0.0.1:{port}"}}
    path = tmp / f"bot-{port}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    env = {
        "KEYTURN_DATABASE_URL": keyturn_db.url,
        "KEYTURN_BOT_ROLE_ID": shop.bot_role_id,
        "KEYTURN_BOT_SECRET_ID": shop.bot_secret_id,
        "KEYTURN_VAULT_ADDR": vault,
        "KEYTURN_SLACK_BOT_TOKEN": slack.bot_token,
        "KEYTURN_SLACK_SIGNING_SECRET": slack.signing_secret,
        "KEYTURN_SLACK_API_URL": slack.api_url,
    }
    url = f"http://127.0.0.1:{port}"
    async with keyturn_process("bot", path, env, url, "/healthz") as bot:
        slack.bot_url = f"{url}/slack/events"
        yield bot


class VaultGate:
    """An HTTP proxy in front of OpenBao that can hold calls to some paths. A held call is
    never forwarded: when the hold ends it is answered 503, as a call cut off by its caller's
    death would have been. So a story can kill a process with one exact Vault call in flight
    and know that call never happened."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.url = ""
        self._holds: dict[str, asyncio.Event] = {}
        self.held: list[str] = []  # paths of calls held so far
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> VaultGate:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for released in self._holds.values():
            released.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    @contextlib.contextmanager
    def hold(self, path: str) -> Iterator[None]:
        """Hold every call to ``/v1/<path>…`` until the block ends."""
        self._holds[path] = released = asyncio.Event()
        try:
            yield
        finally:
            del self._holds[path]
            released.set()

    async def wait_held(self, count: int = 1, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while len(self.held) < count:
                await asyncio.sleep(0.02)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None
        for path, released in list(self._holds.items()):
            if request.path.startswith(f"/v1/{path}"):
                self.held.append(request.path)
                await released.wait()
                return web.Response(status=503, text="held by the test, never forwarded")
        skip = ("host", "content-length", "transfer-encoding")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with self._http.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=await request.read(),
        ) as resp:
            body = await resp.read()
            drop = ("transfer-encoding", "content-length", "connection")
            out = {k: v for k, v in resp.headers.items() if k.lower() not in drop}
            return web.Response(status=resp.status, body=body, headers=out)
