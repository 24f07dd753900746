"""The agent surfaces on HTTP targets: ``Client.http`` (async and sync), the CrewAI tool and
the MCP server's ``call_api`` and ``list_targets``, against json-server through the whole
stack (gateway, bot, Slack emulator, OpenBao)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from keyturn.agent.client import AsyncClient, Client, Denied, HttpResult
from keyturn.agent.crewai import KeyturnHTTPTool
from keyturn.harness.idp import DevIdP
from keyturn.openapi import Spec
from tests.integration.conftest import Apis, DeskFactory, held
from tests.integration.test_agents import mcp_session, told

AGENT = "crew-http"
SPEC = Path(__file__).parents[2] / "keyturn" / "harness" / "orders-api.yaml"


def policy(apis: Apis) -> dict[str, Any]:
    """The APIs, and one described by an OpenAPI file (never called: for its operations)."""
    data = apis.policy()
    data["targets"]["described"] = {
        "kind": "http",
        "base_url": "http://127.0.0.1:9",
        "openapi": str(SPEC),
    }
    return data


async def test_client_http_reads_at_once_and_waits_for_a_held_change(
    apis: Apis, run_desk: DeskFactory, idp: DevIdP
) -> None:
    pending: list[Any] = []
    async with run_desk(**policy(apis)) as desk:
        async with AsyncClient(desk.gateway.url, idp.token(AGENT)) as kt:
            read = await kt.http("crud", "GET", "/customers", params={"id": 1}, timeout=10)
            assert isinstance(read, HttpResult) and read.status == 200
            assert read.json == [
                {"id": 1, "name": "Ada", "contact": {"email": "***", "phone": "x"}}
            ]
            running = asyncio.create_task(
                kt.http("crud", "PATCH", "/orders/1", json={"status": "shipped"},
                        reason="it left", timeout=60, on_pending=pending.append)
            )  # fmt: skip
            await desk.approve((await held(pending)).id)
            changed = await running
            assert changed.status == 200 and changed.json["status"] == "shipped"
            assert changed.request_id == pending[0].id

        def denied() -> None:
            with Client(desk.gateway.url, idp.token(AGENT)) as sync:
                sync.http("crud", "PATCH", "/orders/1", json={"status": "lost"}, timeout=60,
                          on_pending=pending.append)  # fmt: skip

        running_sync = asyncio.create_task(asyncio.to_thread(denied))
        async with asyncio.timeout(30):
            while len(pending) < 2 and not running_sync.done():
                await asyncio.sleep(0.05)
        await desk.deny(pending[1].id, "it is not lost")
        with pytest.raises(Denied, match="it is not lost"):
            await running_sync


async def test_the_crewai_http_tool_lists_its_targets_and_reports_the_answer(
    apis: Apis, run_desk: DeskFactory, idp: DevIdP
) -> None:
    async with run_desk(**policy(apis)) as desk:
        tool = await asyncio.to_thread(
            KeyturnHTTPTool, gateway_url=desk.gateway.url, token=idp.token(AGENT)
        )
        assert set(tool.targets or []) == {"httpbin", "crud", "hostile", "minted", "described"}
        text = await asyncio.to_thread(
            tool.run, target="crud", method="GET", path="/customers/2", reason="who"
        )
        assert text.startswith("Ran on crud (request ") and "the API answered HTTP 200" in text
        assert '"email": "***"' in text and "lin@example.com" not in text
        refused = await asyncio.to_thread(
            tool.run, target="crud", method="DELETE", path="/customers/2", reason="tidy"
        )
        assert refused.startswith("Blocked by rule no-deletes") and "do not retry" in refused


async def test_mcp_lists_an_apis_operations_and_calls_it(
    apis: Apis, run_desk: DeskFactory, idp: DevIdP, tmp_path: Path
) -> None:
    async with (
        run_desk(**policy(apis)) as desk,
        mcp_session(desk.gateway.url, idp.token(AGENT), tmp_path / "mcp.log") as mcp,
    ):
        text, data = told(await mcp.call_tool("list_targets", {}))
        described = next(t for t in data["targets"] if t["name"] == "described")
        spec = Spec.load(SPEC)
        assert described["kind"] == "http"
        assert described["operations"] == [
            {"method": op.method, "path": op.path, "operation_id": op.operation_id,
             "summary": op.summary}
            for op in spec.operations
        ]  # fmt: skip
        assert len(described["operations"]) == 5
        assert "POST /orders/{id}/refunds createRefund" in text
        result = await mcp.call_tool(
            "call_api", {"target": "crud", "method": "GET", "path": "/customers", "reason": "x"}
        )
        text, data = told(result)
        assert not result.isError and data["status"] == "executed"
        assert data["result"]["json"][0]["contact"]["email"] == "***"
        for key in apis.keys.values():
            assert key not in json.dumps(data) and key not in text
