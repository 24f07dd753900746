"""keyturn.agent.client against the real stack: gateway, bot, Slack emulator, Postgres, OpenBao.

Each outcome an agent can meet, typed; and the network failing in the ways that would make a
naive client lose the outcome or make a second card.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keyturn.agent.api import SqlResultOut
from keyturn.agent.client import (
    AsyncClient,
    AuthError,
    Client,
    CommandBlocked,
    Denied,
    Expired,
    GatewayUnavailable,
    Rejected,
    Request,
    StillPending,
)
from keyturn.harness.idp import DevIdP
from keyturn.harness.ports import free_port
from tests.integration.conftest import Desk, DeskFactory, Shop, held

AGENT = "crew-client"
UPDATE = "UPDATE orders SET status = 'paid' WHERE id = 7"


class Recording(httpx.AsyncHTTPTransport):
    """The real transport, noting each answer's status: what the client saw on the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.statuses.append(response.status_code)
        return response


class DroppingProxy:
    """A TCP proxy that can drop the gateway's next answer after the gateway has acted on
    the request: the client sees a broken connection for a call that did happen."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.drop_next = False
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if self.drop_next:
                    self.drop_next = False
                    self.dropped += 1
                    return
                writer.write(data)
                await writer.drain()

        pumps = {asyncio.create_task(upstream()), asyncio.create_task(downstream())}
        self._tasks |= pumps
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            self._tasks -= pumps
            for w in (writer, up_writer):
                w.close()


@contextlib.asynccontextmanager
async def client(desk: Desk, token: str, **kwargs: Any) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(desk.gateway.url, token, **kwargs) as kt:
        yield kt


async def test_an_allowed_select_returns_its_masked_rows(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    async with run_desk() as desk, client(desk, idp.token(AGENT)) as kt:
        result = await kt.run("shop", "SELECT id, email FROM customers ORDER BY id", timeout=10)
        assert isinstance(result, SqlResultOut)
        assert result.columns == ["id", "email"] and result.rows[0][0] == 1
        assert "ada@example.com" not in str(result.rows)


async def test_a_held_update_runs_once_approved(run_desk: DeskFactory, idp: DevIdP) -> None:
    calls: list[Request] = []
    async with run_desk() as desk, client(desk, idp.token(AGENT)) as kt:
        running = asyncio.create_task(
            kt.run("shop", UPDATE, reason="paid by wire", timeout=60, on_pending=calls.append)
        )
        pending = await held(calls)
        await desk.approve(pending.id)
        result = await running
        assert isinstance(result, SqlResultOut) and result.tags == ["UPDATE 1"]
        assert pending.status == "pending" and pending.wait_url


async def test_the_sync_client_raises_denied_with_the_reason(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    calls: list[Request] = []
    async with run_desk() as desk:
        with Client(desk.gateway.url, idp.token(AGENT)) as kt:
            running = asyncio.create_task(
                asyncio.to_thread(kt.run, "shop", UPDATE, "tidy up", on_pending=calls.append)
            )
            await desk.deny((await held(calls)).id, "add a WHERE clause limiting it to order 42")
            with pytest.raises(Denied) as denied:
                await running
        assert await desk.requests() == 1
    assert denied.value.denied_by == "U_APPROVER"
    assert denied.value.reason == "add a WHERE clause limiting it to order 42"
    assert denied.value.request_id == calls[0].id


async def test_blocked_expired_and_still_pending(run_desk: DeskFactory, idp: DevIdP) -> None:
    async with (
        run_desk(writes={"pending_ttl": "2s"}) as desk,
        client(desk, idp.token(AGENT)) as kt,
    ):
        with pytest.raises(CommandBlocked) as blocked:
            await kt.run("shop", "DROP TABLE orders", timeout=5)
        assert blocked.value.rule == "no-drop" and "never allowed" in blocked.value.message
        with pytest.raises(StillPending) as pending:
            await kt.run("shop", UPDATE, timeout=0.5)
        assert pending.value.status == "pending" and pending.value.request_id
        with pytest.raises(Expired) as expired:
            await kt.run("shop", UPDATE + " AND true", timeout=30)
        assert expired.value.request_id


async def test_bad_input_is_rejected_and_creates_nothing(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    async with run_desk() as desk, client(desk, idp.token(AGENT)) as kt:
        with pytest.raises(Rejected) as unknown:
            await kt.submit("nowhere", "SELECT 1")
        assert unknown.value.status == 404 and "nowhere" in unknown.value.message
        with pytest.raises(Rejected) as empty:
            await kt.submit("shop", "")
        assert empty.value.status == 400 and empty.value.code == "invalid_input"
        with pytest.raises(Rejected) as private:
            await kt.submit("private", "SELECT 1")
        assert private.value.code == "not_allowed"
        assert await desk.requests() == 0


async def test_a_wrong_token_is_an_auth_error_at_once(run_desk: DeskFactory) -> None:
    transport = Recording()
    async with run_desk() as desk, client(desk, "not-a-jwt", transport=transport) as kt:
        with pytest.raises(AuthError):
            await kt.run("shop", "SELECT 1", timeout=30)
        assert transport.statuses == [401]  # never retried
        assert await desk.requests() == 0


async def test_a_gateway_that_is_down_is_unavailable(idp: DevIdP) -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", idp.token(AGENT)) as kt:
        with pytest.raises(GatewayUnavailable) as down:
            await kt.run("shop", "SELECT 1", timeout=1)
    assert "no connection" in down.value.message


async def test_429_is_waited_out_with_retry_after(run_desk: DeskFactory, idp: DevIdP) -> None:
    transport = Recording()
    limits = {"rate_per_second": 1, "rate_burst": 1}  # the second call comes within 1 s
    async with (
        run_desk(gateway=limits) as desk,
        client(desk, idp.token(AGENT), transport=transport) as kt,
    ):
        for _ in range(3):
            await kt.run("shop", "SELECT 1", timeout=30)
        assert 429 in transport.statuses  # rate limited, waited, then served
        assert transport.statuses.count(200) == 3
        assert await desk.requests() == 3


async def test_a_long_poll_survives_a_gateway_restart(
    run_desk: DeskFactory, run_gateway: Any, idp: DevIdP, shop: Shop
) -> None:
    port = free_port()
    async with run_desk(port=port) as desk, client(desk, idp.token(AGENT)) as kt:
        pending = await kt.submit("shop", UPDATE, reason="restart test")
        waiting = asyncio.create_task(kt.wait(pending.id, 60))
        while not desk.gateway.gw.listener.watched("request"):  # the long-poll is in
            await asyncio.sleep(0.02)
        await desk.gateway.client.close()  # the gateway goes away mid-poll
        await asyncio.sleep(1)
        assert not waiting.done()
        async with run_gateway(
            port=port, rules=shop.base_policy["rules"], gateway={"poll_interval": "500ms"}
        ):
            await desk.approve(pending.id)
            done = await waiting
    assert done.status == "executed", done
    assert isinstance(done.result, SqlResultOut) and done.result.tags == ["UPDATE 1"]


async def test_a_submit_retried_after_a_dropped_answer_makes_one_request(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    async with run_desk() as desk:
        proxy = DroppingProxy(desk.gateway.client.port or 0)
        async with proxy as url, AsyncClient(url, idp.token(AGENT)) as kt:
            proxy.drop_next = True
            pending = await kt.submit("shop", UPDATE, reason="once")
            assert proxy.dropped == 1 and pending.status == "pending"
            await desk.card(pending.id)
            proxy.drop_next = True
            result = await kt.run("shop", "SELECT count(*) FROM orders", timeout=10)
            assert proxy.dropped == 2 and isinstance(result, SqlResultOut)
        assert await desk.requests() == 2  # one held, one allowed: no twin of either
        assert len(desk.slack.channel("CAPPROVALS")) == 1  # and one card
