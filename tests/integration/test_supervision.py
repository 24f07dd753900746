"""The gateway's background loops are supervised: a crash is logged, counted, retried, and
shown on /healthz while it lasts; the work it held up is done once the loop is back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from keyturn import supervise
from keyturn.harness.idp import DevIdP
from keyturn.supervise import Loop
from tests.integration.conftest import DeskFactory, GatewayFactory, Running

UPDATE = {"target": "shop", "command": "UPDATE orders SET status = 'paid' WHERE id = 1"}


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
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
        assert {loop.name for loop in loops} == {"poller", "executor", "readonly-reaper"}
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
