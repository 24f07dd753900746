"""The gateway's background loops are supervised: a crash is logged, counted, retried, and
shown on /healthz while it lasts; the work it held up is done once the loop is back."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.bootstrap import application, build
from keyturn.harness.idp import DevIdP
from keyturn.harness.pytest_plugin import PostgresServer
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from keyturn.supervise import Loop
from tests.integration.conftest import (
    DeskFactory,
    GatewayFactory,
    Running,
    Shop,
    crashing,
)

UPDATE = {"target": "shop", "command": "UPDATE orders SET status = 'paid' WHERE id = 1"}


@pytest.fixture(autouse=True)
def _quick(quick_retries: None) -> None:
    """Every test here crashes loops and waits for them to come back."""


async def health(gw: Running, status: int, timeout: float = 20) -> dict[str, Any]:
    """/healthz's body once it answers ``status``."""
    async with asyncio.timeout(timeout):
        while True:
            resp = await gw.client.get("/healthz")
            if resp.status == status:
                return dict(await resp.json())
            await asyncio.sleep(0.05)


def loop_named(gw: Running, name: str) -> Loop:
    return next(loop for loop in gw.process.supervisor.loops if loop.name == name)


async def test_each_loop_that_crashes_turns_healthz_503_until_it_recovers(
    run_gateway: GatewayFactory,
) -> None:
    async with run_gateway(gateway={"poll_interval": "100ms", "readonly_idle": "1s"}) as gw:
        loops = gw.process.supervisor.loops
        assert {loop.name for loop in loops} == {
            "poller",
            "executor",
            "readonly-reaper",
            "readonly-revoker",
        }
        await health(gw, 200)
        for loop in loops:
            with crashing(loop):
                body = await health(gw, 503)
                assert body["error"]["code"] == "loops_down"
                assert body["error"]["loops"] == [loop.name]
            await health(gw, 200)
        metrics = await (await gw.client.get("/metrics")).text()
        for loop in loops:
            line = next(
                text
                for text in metrics.splitlines()
                if text.startswith(f'keyturn_loop_crashes_total{{loop="{loop.name}"}}')
            )
            assert float(line.rsplit(" ", 1)[1]) >= 1, line


async def test_a_request_expires_once_the_crashed_poller_is_back(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    async with run_gateway(gateway={"poll_interval": "100ms"}) as gw:
        poller = loop_named(gw, "poller")
        with crashing(poller):
            await health(gw, 503)
            status, body = await gw.post(token, UPDATE)
            assert status == 202 and body["status"] == "pending"
            async with gw.store.raw_connection() as conn:  # its pending TTL runs out now
                await conn.execute(
                    "UPDATE requests SET pending_expires_at = now() - interval '1 second'"
                )
            _, still = await gw.get(token, body["id"])
            assert still["status"] == "pending"  # nobody expired it: the poller is down
        _, ended = await gw.get(token, body["id"], wait=20)
        assert ended["status"] == "expired"


async def test_an_approval_made_while_the_executor_is_down_runs_once_it_is_back(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    async with run_desk() as desk:
        gw = desk.gateway
        with crashing(loop_named(gw, "executor")):
            await health(gw, 503)
            status, body = await gw.post(token, UPDATE)
            assert status == 202
            await desk.approve(body["id"])
            _, meanwhile = await gw.get(token, body["id"], wait=2)
            assert meanwhile["status"] in ("pending", "approved")  # handed off, never run
        _, ran = await gw.get(token, body["id"], wait=30)
        assert ran["status"] == "executed", ran


async def test_postgres_refusing_connections_is_a_dependency_away_not_a_crash(
    shop: Shop, database: Dsn, postgres_server: PostgresServer
) -> None:
    """keyturn's own Postgres out of connections (SQLSTATE 53300): every replica's liveness
    failing at once would get them all restarted into the same wall, dropping every agent's
    long-poll. /healthz stays 200; /readyz says Postgres is unavailable (found by an outside
    tester after the recut)."""
    name = database.database
    role = f"kt_lim_{uuid.uuid4().hex[:6]}"
    await postgres_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    await postgres_server.execute(
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
        f" GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
        f' GRANT ALL ON SCHEMA public TO {role}; GRANT ALL ON DATABASE "{name}" TO {role};'
        f" GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}",
        name,
    )
    store = Store(postgres_server.dsn(name, role, "pw"))
    process = build(shop.policy(gateway={"poll_interval": "200ms"}), store, shop.vault())
    client = TestClient(TestServer(application(process)))
    await client.start_server()
    try:
        running = Running(client, process, store)
        await health(running, 200)
        await postgres_server.execute(f"ALTER ROLE {role} CONNECTION LIMIT 0")
        await postgres_server.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        )
        poller = loop_named(running, "poller")
        passes = poller.passes
        async with asyncio.timeout(20):  # several passes meet the refusal
            while not await _refused(client):
                await asyncio.sleep(0.1)
        assert (await client.get("/healthz")).status == 200
        assert poller.failing_since is None and poller.passes == passes
        metrics = await (await client.get("/metrics")).text()
        assert 'keyturn_loop_crashes_total{loop="poller"} 0.0' in metrics
    finally:
        await postgres_server.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        await client.close()


async def _refused(client: TestClient[Any, Any]) -> bool:
    ready = await client.get("/readyz")
    body = await ready.json()
    return ready.status == 503 and "Postgres" in body["error"]["message"]
