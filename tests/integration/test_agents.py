"""CrewAI tools and the MCP server against the real stack (gateway, bot, Slack emulator,
Postgres, OpenBao): what a model reads for every outcome, and that no credential reaches it.

Tools block (they are sync), so they run in a worker thread beside the in-process gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from crewai import Agent, Crew, Task
from crewai.agents.parser import AgentAction
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult

from keyturn.agent.api import CommandOut
from keyturn.agent.client import AsyncClient
from keyturn.agent.crewai import KeyturnRequestStatusTool, KeyturnShellTool, KeyturnSQLTool
from keyturn.harness.crewai import FinalAnswer, ScriptedLLM, ToolCall
from keyturn.harness.idp import DevIdP
from keyturn.harness.ports import free_port
from tests.integration.conftest import Desk, DeskFactory, Shop, Spy, held

AGENT = "crew-tools"
SELECT = "SELECT id, email FROM customers ORDER BY id"


def update(order: int) -> str:
    return f"UPDATE orders SET status = 'paid' WHERE id = {order}"


async def tool(cls: type[Any], desk: Desk, token: str, **fields: Any) -> Any:
    """A tool built off the loop: building it asks the gateway for the targets."""
    return await asyncio.to_thread(cls, gateway_url=desk.gateway.url, token=token, **fields)


# ------------------------------------------------------------------ CrewAI tools


async def test_the_sql_tool_describes_its_targets_and_reads_at_once(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    async with run_desk() as desk:
        sql = await tool(KeyturnSQLTool, desk, idp.token(AGENT))
        assert "shop (" in sql.description and "private" not in sql.description
        assert "web" not in sql.targets  # an ssh target is the shell tool's
        text = await asyncio.to_thread(sql.run, target="shop", sql=SELECT, reason="look")
        assert text.startswith("Ran on shop (request ") and ": 2 rows." in text
        assert "id | email\n1 | ***\n2 | ***" in text and "example.com" not in text
        shell = await tool(KeyturnShellTool, desk, idp.token(AGENT))
        assert shell.targets == ["web"]
        again = KeyturnSQLTool.model_validate(sql.model_dump())  # as CrewAI copies tools
        assert again.description.count("Targets:") == 1
        # a live system: CrewAI must never answer a second identical call from its cache
        assert sql.cache_function({"target": "shop", "sql": SELECT}, text) is False


async def test_a_crew_s_tools_record_one_run(run_desk: DeskFactory, idp: DevIdP) -> None:
    token = idp.token(AGENT)
    async with run_desk() as desk:
        sql = await tool(KeyturnSQLTool, desk, token, run_id="crew-run-1", targets=["shop"])
        await sql.arun(target="shop", sql=SELECT, reason="look")
        await sql.arun(target="shop", sql="DROP TABLE orders", reason="tidy")
        async with AsyncClient(desk.gateway.url, token) as agent:
            ran = await agent.run_steps("crew-run-1")
    assert [(s.command, s.verdict) for s in ran.steps] == [
        (SELECT, "allowed"),
        ("DROP TABLE orders", "blocked"),
    ]
    assert ran.steps[1].output and ran.steps[1].output.value["error"]["rule"] == "no-drop"


async def test_a_held_update_waits_and_returns_its_command_tag(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    calls: list[CommandOut] = []
    async with run_desk() as desk:
        sql = await tool(KeyturnSQLTool, desk, idp.token(AGENT), on_pending=calls.append)
        running = asyncio.create_task(
            asyncio.to_thread(sql.run, target="shop", sql=update(11), reason="paid by wire")
        )
        await desk.approve((await held(calls)).id)
        text = await running
    assert text == f"Ran on shop (request {calls[0].id}): UPDATE 1."


async def test_a_denied_update_returns_the_reason_in_one_sentence(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    calls: list[CommandOut] = []
    async with run_desk() as desk:
        sql = await tool(KeyturnSQLTool, desk, idp.token(AGENT), on_pending=calls.append)
        running = asyncio.create_task(
            asyncio.to_thread(sql.run, target="shop", sql=update(12), reason="tidy")
        )
        await desk.deny(
            (await held(calls)).id, "add a WHERE clause limiting the update to order 42"
        )
        text = await running
    assert text == (
        "Denied by @U_APPROVER: add a WHERE clause limiting the update to order 42. "
        f"The command did not run (request {calls[0].id})."
    )


async def test_a_wait_that_runs_out_names_the_status_tool_which_finishes_the_job(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    calls: list[CommandOut] = []
    async with run_desk() as desk:
        token = idp.token(AGENT)
        sql = await tool(KeyturnSQLTool, desk, token, wait=0.5, on_pending=calls.append)
        text = await asyncio.to_thread(sql.run, target="shop", sql=update(13), reason="later")
        rid = calls[0].id
        assert text.startswith(f"Still waiting for approval as request {rid} (")
        assert text.endswith(f"check it with keyturn_request_status with request_id {rid}.")
        await desk.approve(rid)
        status = await tool(KeyturnRequestStatusTool, desk, token)
        done = await status.arun(request_id=rid, wait_seconds=30)  # the async path
        assert done == f"Ran on shop (request {rid}): UPDATE 1."


async def test_bad_input_is_a_sentence_and_creates_nothing(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    async with run_desk() as desk:
        sql = await tool(KeyturnSQLTool, desk, idp.token(AGENT))
        unknown = await sql.arun(target="nowhere", sql="SELECT 1", reason="")
        assert unknown == (
            "keyturn refused the call: unknown target 'nowhere'. Nothing ran. "
            "Targets you may use: shop."
        )
        empty = await sql.arun(target="shop", sql="", reason="")
        assert empty.startswith("keyturn refused the call: command:") and "Nothing ran" in empty
        blocked = await sql.arun(target="shop", sql="DROP TABLE orders", reason="")
        assert blocked == (
            "Blocked by rule no-drop: dropping tables is never allowed. keyturn will never run "
            "this command; do not retry it."
        )
        assert await desk.requests() == 0
        wrong = await tool(KeyturnSQLTool, desk, "not-a-token", targets=["shop"])
        said = await asyncio.to_thread(wrong.run, target="shop", sql="SELECT 1", reason="")
        assert said.startswith("keyturn refused this agent's credentials (")
        status = await tool(KeyturnRequestStatusTool, desk, idp.token(AGENT))
        missing = await status.arun(request_id="no-such-request", wait_seconds=1)
        assert missing.startswith("keyturn refused the call: request no-such-request not found")
    down = KeyturnSQLTool(
        gateway_url=f"http://127.0.0.1:{free_port()}", token="t", targets=[], retry_for=1
    )
    down_text = await down.arun(target="shop", sql="SELECT 1", reason="")
    assert down_text.startswith("keyturn could not be reached (")
    bare = KeyturnSQLTool(targets=["shop"])  # no URL, no token, no environment
    assert (await bare.arun(target="shop", sql="SELECT 1", reason="")).startswith(
        "keyturn is not configured: no gateway URL"
    )


async def test_a_crew_reads_a_block_and_goes_on(run_desk: DeskFactory, idp: DevIdP) -> None:
    steps: list[Any] = []
    async with run_desk() as desk:
        sql = await tool(KeyturnSQLTool, desk, idp.token(AGENT))
        llm = ScriptedLLM(
            [
                ToolCall("keyturn_sql", {"target": "shop", "sql": "DROP TABLE orders"}),
                ToolCall("keyturn_sql", {"target": "shop", "sql": "SELECT count(*) FROM orders"}),
                FinalAnswer("Counted instead: {observation}"),
            ]
        )
        agent = Agent(
            role="ops", goal="count orders", backstory="careful", tools=[sql], llm=llm,
            step_callback=steps.append, max_iter=5,
        )  # fmt: skip
        task = Task(description="Count the orders.", expected_output="a count", agent=agent)
        answer = await asyncio.to_thread(Crew(agents=[agent], tasks=[task]).kickoff)
    results = [s.result for s in steps if isinstance(s, AgentAction)]
    assert results[0].startswith("Blocked by rule no-drop: dropping tables is never allowed.")
    assert "count\n500" in results[1]
    assert str(answer.raw).startswith("Counted instead: Ran on shop (request ")


# ------------------------------------------------------------------ the MCP server


@contextlib.asynccontextmanager
async def mcp_session(url: str, token: str, log: Path, *more: str) -> AsyncIterator[ClientSession]:
    """``keyturn mcp`` in its own process, driven by the MCP SDK's stdio client."""
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "keyturn.cli", "-v", "mcp", "--max-wait", "2", *more],
        env={"KEYTURN_GATEWAY_URL": url, "KEYTURN_AGENT_TOKEN": token, "PATH": "/usr/bin:/bin"},
    )
    with log.open("w") as errlog:
        async with (
            stdio_client(server, errlog=errlog) as (read, write),
            # as MCP clients do (CrewAI's after 30 s): a tool call that takes longer is lost
            ClientSession(read, write, read_timeout_seconds=timedelta(seconds=15)) as session,
        ):
            await session.initialize()
            yield session


def told(result: CallToolResult) -> tuple[str, dict[str, Any]]:
    text = "\n".join(c.text for c in result.content if c.type == "text")
    return text, dict(result.structuredContent or {})


async def test_mcp_tools_from_a_read_to_an_approved_update(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop, spy: Spy, tmp_path: Path
) -> None:
    said: list[Any] = []
    async with (
        run_desk(bot_vault=spy.watch(shop.bot_vault())) as desk,
        mcp_session(desk.gateway.url, idp.token(AGENT), tmp_path / "mcp.log") as mcp,
    ):
        tools = await mcp.list_tools()
        assert [t.name for t in tools.tools] == [
            "list_targets", "run_sql", "run_shell", "call_api", "request_status",
        ]  # fmt: skip
        text, data = told(await mcp.call_tool("list_targets", {}))
        assert [t["name"] for t in data["targets"]] == ["shop", "web"] and "shop (postgres)" in text
        read = await mcp.call_tool("run_sql", {"target": "shop", "sql": SELECT, "reason": "x"})
        text, data = told(read)
        assert not read.isError and data["status"] == "executed"
        assert data["result"]["rows"] == [[1, "***"], [2, "***"]] and "2 rows" in text
        held = await mcp.call_tool("run_sql", {"target": "shop", "sql": update(14), "reason": "y"})
        text, data = told(held)
        rid = data["request_id"]
        assert not held.isError and data["status"] == "pending"
        assert data["next_call"] == f'request_status(request_id="{rid}", wait_seconds=25)'
        assert data["next_call"] in text
        await desk.approve(rid)
        done = await mcp.call_tool("request_status", {"request_id": rid, "wait_seconds": 25})
        text, data = told(done)
        assert data["status"] == "executed" and data["result"]["tags"] == ["UPDATE 1"]
        assert text == f"Ran on shop (request {rid}): UPDATE 1."
        said += [r.model_dump(mode="json") for r in (read, held, done)]
    log = (tmp_path / "mcp.log").read_text()
    assert spy.secrets, "the approval minted a password"
    for secret in spy.secrets:
        assert secret not in json.dumps(said) and secret not in log


async def test_mcp_denial_and_bad_input_are_tool_results(
    run_desk: DeskFactory, idp: DevIdP, tmp_path: Path
) -> None:
    async with (
        run_desk() as desk,
        mcp_session(desk.gateway.url, idp.token(AGENT), tmp_path / "mcp.log") as mcp,
    ):
        held = await mcp.call_tool("run_sql", {"target": "shop", "sql": update(15), "reason": "z"})
        rid = told(held)[1]["request_id"]
        await desk.deny(rid, "order 15 was refunded")
        denied = await mcp.call_tool("request_status", {"request_id": rid, "wait_seconds": 60})
        text, data = told(denied)
        assert not denied.isError and data["status"] == "denied"
        assert data["deny_reason"] == "order 15 was refunded" and data["denied_by"] == "U_APPROVER"
        assert text.startswith("Denied by @U_APPROVER: order 15 was refunded.")
        before = await desk.requests()
        for arguments, expected, is_error in [
            ({"target": "nowhere", "sql": "SELECT 1", "reason": ""}, "may use: shop.", True),
            ({"target": "shop", "sql": "", "reason": ""}, "refused the call: command:", True),
            # a block is a decision, not a failure
            ({"target": "shop", "sql": "DROP TABLE orders", "reason": ""}, "never allowed", False),
        ]:
            result = await mcp.call_tool("run_sql", arguments)
            assert expected in told(result)[0] and result.isError is is_error, told(result)
        assert await desk.requests() == before
        async with mcp_session(desk.gateway.url, "not-a-token", tmp_path / "bad.log") as bad:
            result = await bad.call_tool("list_targets", {})
            assert result.isError and told(result)[1]["status"] == "unauthorized"
    down = f"http://127.0.0.1:{free_port()}"
    async with mcp_session(down, idp.token(AGENT), tmp_path / "down.log") as mcp:
        result = await mcp.call_tool("run_sql", {"target": "shop", "sql": SELECT, "reason": ""})
        assert result.isError and told(result)[1]["status"] == "unavailable"


async def test_an_mcp_session_is_one_run_and_lists_what_still_waits(
    run_desk: DeskFactory, idp: DevIdP, tmp_path: Path
) -> None:
    log = tmp_path / "mcp.log"
    async with (
        run_desk() as desk,
        mcp_session(desk.gateway.url, idp.token(AGENT), log, "--run-id", "mcp-run-1") as mcp,
    ):
        nothing = await mcp.call_tool("request_status", {})
        assert told(nothing) == ("Nothing of run mcp-run-1 is waiting.", told(nothing)[1])
        assert not nothing.isError and told(nothing)[1]["status"] == "ok"
        await mcp.call_tool("run_sql", {"target": "shop", "sql": SELECT, "reason": "look"})
        held = await mcp.call_tool("run_sql", {"target": "shop", "sql": update(16), "reason": "z"})
        rid = told(held)[1]["request_id"]
        text, data = told(await mcp.call_tool("request_status", {}))
        assert data["status"] == "pending" and text.startswith("1 of run mcp-run-1 waiting:")
        assert f'request_status(request_id="{rid}", wait_seconds=25)' in text
        async with AsyncClient(desk.gateway.url, idp.token(AGENT)) as agent:
            ran = await agent.run_steps("mcp-run-1")
        assert [s.command for s in ran.steps] == [SELECT, update(16)]
        assert [s.verdict for s in ran.steps] == ["allowed", "held"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run-id", "auto-mine"], "keyturn's own runs"),
        (["--http", "0.0.0.0:8765"], "listens on loopback only"),
        (["--http", "127.0.0.1:http"], "expected HOST:PORT"),
        (["--max-wait", "60"], "--max-wait must be 0 to 25 seconds"),
        ([], "needs KEYTURN_GATEWAY_URL and KEYTURN_AGENT_TOKEN"),
    ],
)
async def test_keyturn_mcp_refuses_bad_arguments_in_one_line(args: list[str], message: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keyturn.cli", "mcp", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)  # a server that starts fails
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 2 and out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
