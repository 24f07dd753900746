"""The example crew's work through `keyturn mcp`, driven by the MCP Python SDK's own client.

With `keyturn dev` running (scripts/dev), in another terminal:

    .venv/bin/python examples/mcp_client.py

It starts `keyturn mcp` over stdio with the dev stack's gateway and agent token, lists the
targets, runs a SELECT (at once, masked), then an UPDATE that waits for a click on Approve (or
Deny) in the Slack sandbox; while it waits it calls request_status as each result tells it to.
The last line is the final outcome: `UPDATE 1`, or the deny reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from keyturn.errors import ConfigError
from keyturn.harness.demo import load_stack

TARGET = "orders-db"


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    print(f"-> {tool} {json.dumps(arguments)}", flush=True)
    result = await session.call_tool(tool, arguments)
    text = "\n".join(c.text for c in result.content if c.type == "text")
    print(f"<- {text}", flush=True)
    return dict(result.structuredContent or {})


async def investigate(stack: dict[str, Any], order: int) -> str:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "keyturn.cli", "mcp"],
        env={
            **os.environ,
            "KEYTURN_GATEWAY_URL": stack["gateway_url"],
            "KEYTURN_AGENT_TOKEN": stack["agent_token"],
        },
    )
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = await session.list_tools()
        print(f"tools: {', '.join(t.name for t in tools.tools)}", flush=True)
        await call(session, "list_targets")
        await call(
            session,
            "run_sql",
            target=TARGET,
            sql=f"SELECT id, status, total_cents FROM orders WHERE id = {order}",
            reason=f"ticket: order {order} paid but shown as open",
        )
        outcome = await call(
            session,
            "run_sql",
            target=TARGET,
            sql=f"UPDATE orders SET status = 'paid' WHERE id = {order}",
            reason=f"customer paid order {order} by wire; mark it paid",
        )
        while outcome.get("next_call"):  # still waiting: do what the result says
            print(f"   waiting: approve or deny the card at {stack['sandbox_url']}", flush=True)
            outcome = await call(
                session, "request_status", request_id=outcome["request_id"], wait_seconds=25
            )
        return " ".join(str(outcome.get("text", "")).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", default=".keyturn/dev/stack.json", help="keyturn dev's state")
    parser.add_argument("--order", type=int, default=1, help="the order to investigate")
    args = parser.parse_args(argv)
    try:
        stack = load_stack(Path(args.stack))
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    print(asyncio.run(investigate(stack, args.order)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
