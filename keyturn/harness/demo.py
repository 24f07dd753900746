"""``keyturn demo``: play an agent against a running ``keyturn dev`` stack, narrated for a person.

On the database, three commands show the three outcomes: an allowed read (run at once,
emails masked), a forbidden ``DROP TABLE`` (refused by a rule) and a held ``UPDATE`` that
waits until someone clicks Approve or Deny on its card in the Slack sandbox. Then the same on
the orders API: an allowed GET (emails masked in its JSON), a refund too large to run
without a human, held until the click. Uses the public agent client, as an agent would; reads
the stack's addresses and dev token from its stack.json.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from keyturn.agent.api import HttpResultOut, SqlResultOut
from keyturn.agent.client import Client, ClientError, CommandBlocked, Denied, Request, http_call
from keyturn.errors import ConfigError

TARGET = "orders-db"
READ = "SELECT id, name, email FROM customers ORDER BY id"
FORBIDDEN = "DROP TABLE orders"
HELD = "UPDATE orders SET status = 'shipped' WHERE id = 2"
REASON = "keyturn demo: order 2 left the warehouse"
API = "orders-api"
REFUND = 500  # cents: over the demo policy's 100 that run without a human
EXIT_UNDECIDED = 1


def load_stack(path: Path) -> dict[str, Any]:
    """stack.json of a running dev stack (docs/dev.md), or a ConfigError saying how to get one."""
    try:
        stack = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"no running dev stack ({path} is missing): start one with scripts/dev first"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a keyturn dev stack file: {exc}") from None
    missing = [k for k in ("gateway_url", "agent_token") if k not in stack]
    if not isinstance(stack, dict) or missing:
        raise ConfigError(f"{path} is not a keyturn dev stack file (missing {missing})")
    return stack


def grid(result: SqlResultOut) -> list[str]:
    """Rows as aligned text columns, for a terminal."""
    cells = [result.columns] + [["NULL" if v is None else str(v) for v in r] for r in result.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(result.columns))]
    lines = [
        " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


def run_demo(stack: dict[str, Any], *, timeout: float, out: TextIO = sys.stdout) -> int:
    """0 once the held command is decided (approved and run, or denied); 1 otherwise."""

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    run = f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"  # every step below is one run
    with Client(stack["gateway_url"], stack["agent_token"]) as agent:
        say(f"1. An allowed read on {TARGET} runs at once, with a read-only login:")
        say(f"   {READ}")
        read = agent.submit(TARGET, READ, reason="keyturn demo: who are our customers?", run_id=run)
        if isinstance(read.result, SqlResultOut):
            say("\n".join("     " + line for line in grid(read.result)))
        say("   The emails are masked by the policy's masking rules; the agent never sees them.")
        say()
        say("2. A forbidden command is refused before anything runs:")
        say(f"   {FORBIDDEN}")
        try:
            agent.submit(TARGET, FORBIDDEN, reason="keyturn demo", run_id=run)
            say("   (it ran: the demo policy's no-drop rule is missing)")
        except CommandBlocked as exc:
            say(f"   {exc.message}")
        say()
        say("3. A risky write waits for a person:")
        say(f"   {HELD}")
        held = agent.submit(TARGET, HELD, reason=REASON, run_id=run)
        if held.status != "pending":
            say(f"   not held but {held.status}: is this the demo policy?")
            return EXIT_UNDECIDED
        if stack.get("sandbox_url"):
            say(f"   held as request {held.id}. Now open the Slack sandbox:")
            say(f"     {stack['sandbox_url']}/")
            say("   (it acts as the demo's approver), find the card in #approvals, click Approve")
        else:
            say(f"   held as request {held.id}: its card is in your Slack channel; click Approve")
        say("   (or Deny, and type a reason: the agent reads it). Waiting for the click...")
        decided = _outcome(agent.wait(held.id, timeout), say)
        if decided == 0 and API in stack.get("targets", {}):
            say()
            decided = _api(agent, run, timeout, say)
    say()
    say(f"Every step was recorded as run {run}, outputs as the agent saw them:")
    say(f"   keyturn runs show {run}      (or replay it: keyturn runs replay {run})")
    return decided


def _api(agent: Client, run: str, timeout: float, say: Callable[[str], None]) -> int:
    say(f"4. An HTTP API is guarded the same way. A GET on {API} runs at once; keyturn adds")
    say("   the API key from OpenBao when it sends the call: the agent never holds it.")
    say("   GET /customers")
    call = http_call("GET", "/customers")
    read = agent.submit(API, call, reason="keyturn demo: customers", run_id=run)
    if isinstance(read.result, HttpResultOut):
        say(f"     HTTP {read.result.status} {json.dumps(read.result.json_body)}")
    say("   The emails in the JSON are masked by the same masking rules.")
    say("")
    say(f"5. A refund of {REFUND} is over what runs without a human (100), so it is held:")
    say(f'   POST /orders/1/refunds {{"amount": {REFUND}}}')
    call = http_call("POST", "/orders/1/refunds", json={"amount": REFUND})
    held = agent.submit(API, call, reason="keyturn demo: a customer asked for a refund", run_id=run)
    if held.status != "pending":
        say(f"   not held but {held.status}: is this the demo policy?")
        return EXIT_UNDECIDED
    say(f"   held as request {held.id}. Its card shows the exact request and the run's")
    say("   earlier steps; click Approve (or Deny). Waiting for the click...")
    return _outcome(agent.wait(held.id, timeout), say)


def _outcome(request: Request, say: Callable[[str], None]) -> int:
    if request.status == "executed" and isinstance(request.result, SqlResultOut):
        say(
            f"   approved: the gateway ran it with one-shot credentials from Vault -> "
            f"{', '.join(request.result.tags or [])}"
        )
        return 0
    if request.status == "executed" and isinstance(request.result, HttpResultOut):
        status, body = request.result.status, request.result.json_body
        say(f"   approved: the gateway sent exactly that call -> HTTP {status} {json.dumps(body)}")
        return 0
    if request.status == "denied":
        say(f"   {Denied(request.id, request.denied_by, request.deny_reason).message}")
        say("   (an agent gets this reason back and can adjust its command)")
        return 0
    if request.status in ("pending", "approved", "executing"):
        say(f"   still {request.status} after the wait: request {request.id} goes on without us")
    else:
        say(f"   {request.status}" + (f": {request.error}" if request.error else ""))
    return EXIT_UNDECIDED


def demo(stack_file: Path, timeout: float) -> int:
    stack = load_stack(stack_file)
    try:
        return run_demo(stack, timeout=timeout)
    except ClientError as exc:
        raise ConfigError(
            f"the dev stack at {stack['gateway_url']} did not answer as expected ({exc.message});"
            " is keyturn dev still running?"
        ) from None
