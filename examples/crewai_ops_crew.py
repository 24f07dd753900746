"""A support-ops crew: its agent investigates an order and fixes its status, through keyturn.

With `keyturn dev` running (scripts/dev), in another terminal:

    .venv/bin/python examples/crewai_ops_crew.py

The SELECT runs at once (the customer's email comes back masked); the UPDATE is held until
someone clicks Approve (or Deny) on its card in the Slack sandbox page that `keyturn dev`
printed. The crew's final answer is the last line: it holds `UPDATE 1`, or the deny reason.

Offline by default: a scripted model plays the agent's tool calls, so no API key is needed.
Set KEYTURN_EXAMPLE_MODEL to a CrewAI model name (e.g. openai/gpt-4o-mini, with that
provider's API key in the environment) to let a real model drive the same tools.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

for name, value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
}.items():
    os.environ.setdefault(name, value)  # before crewai is imported: an offline example

from crewai import LLM, Agent, Crew, Task  # noqa: E402
from crewai.agents.parser import AgentAction, AgentFinish  # noqa: E402

from keyturn.agent.api import CommandOut  # noqa: E402
from keyturn.crewai import KeyturnRequestStatusTool, KeyturnSQLTool  # noqa: E402
from keyturn.errors import ConfigError  # noqa: E402
from keyturn.harness.crewai import FinalAnswer, ScriptedLLM, ToolCall  # noqa: E402
from keyturn.harness.demo import load_stack  # noqa: E402

TARGET = "orders-db"


def script(order: int) -> list[ToolCall | FinalAnswer]:
    """What the offline agent does: look first, then ask to fix, then report what happened."""
    return [
        ToolCall(
            "keyturn_sql",
            {
                "target": TARGET,
                "sql": "SELECT o.id, o.status, o.total_cents, c.email FROM orders o "
                f"JOIN customers c ON c.id = o.customer_id WHERE o.id = {order}",
                "reason": f"ticket: order {order} paid but shown as open",
            },
            thought=f"First I look at order {order} and its customer.",
        ),
        ToolCall(
            "keyturn_sql",
            {
                "target": TARGET,
                "sql": f"UPDATE orders SET status = 'paid' WHERE id = {order}",
                "reason": f"customer paid order {order} by wire; mark it paid",
            },
            thought="The order is still open; I ask to mark it paid.",
        ),
        FinalAnswer(f"Order {order}: {{observation}}"),
    ]


def show_step(step: Any) -> None:
    if isinstance(step, AgentAction):
        print(f"-> {step.tool} {step.tool_input}", flush=True)
        print(f"<- {step.result}", flush=True)
    elif isinstance(step, AgentFinish):
        print("-> final answer", flush=True)


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
    sandbox = stack.get("sandbox_url", "the Slack sandbox")

    def held(request: CommandOut) -> None:
        print(f"   held as request {request.id}: approve or deny its card at {sandbox}", flush=True)

    connection = {"gateway_url": stack["gateway_url"], "token": stack["agent_token"]}
    model = os.environ.get("KEYTURN_EXAMPLE_MODEL")
    agent = Agent(
        role="Support operations engineer",
        goal="Resolve order tickets with the smallest safe change to the database",
        backstory="You fix order data through keyturn; changes wait for a human's approval.",
        tools=[
            KeyturnSQLTool(on_pending=held, **connection),
            KeyturnRequestStatusTool(**connection),
        ],
        llm=LLM(model=model) if model else ScriptedLLM(script=script(args.order)),
        step_callback=show_step,
        max_iter=6,
        verbose=False,
    )
    task = Task(
        description=f"A customer says order {args.order} was paid by wire but still shows as "
        "open. Check the order on orders-db and, if it is open, mark it paid.",
        expected_output="What you found and what changed, with the database's answer.",
        agent=agent,
    )
    answer = Crew(agents=[agent], tasks=[task], verbose=False).kickoff()
    print(" ".join(str(answer.raw).split()), flush=True)  # the answer, as one last line
    return 0


if __name__ == "__main__":
    sys.exit(main())
