"""Expiry benchmark: run ``python bench/expiry.py`` (after scripts/test has set up .venv).

1. Revocation under load: 1,000 grants with real Vault leases (real Postgres roles) all fall
   due in the same second. The bot's revoker (APScheduler date jobs, batched passes) ends
   them; the figure is the lag from each grant's ``expires_at`` to its revocation being
   committed, and afterwards no lease and no role may remain.
2. Approval to result: an agent's held UPDATE waits in a long-poll; an approver clicks
   Approve in the Slack emulator; the figure is the time from the click to the agent holding
   the executed result (bot decides, Vault mints and wraps, the gateway unwraps, logs in and
   runs the command, the long-poll answers).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.stack import (
    Stack,
    expire_together,
    issue_many,
    percentile,
    real_stack,
    report,
    serve_bot,
)
from bot import card_store
from bot.cards import APPROVE
from bot.credentials import Issuer
from gateway.bootstrap import application
from gateway.bootstrap import build as build_gateway
from keyturn.config.loading import parse_config
from keyturn.harness.ports import free_port
from keyturn.harness.slack import SlackEmulator
from keyturn.store import requests
from keyturn.store.db import Store

GRANTS = 1000
CLICKS = 50
CHANNEL = "CBENCH"


def bench_policy(stack: Stack) -> dict[str, Any]:
    data = dict(stack.policy_data)
    data["slack"] = {"approval_channel": CHANNEL}
    data["bot"] = {"poll_interval": "1s"}
    data["vault"] = {**data["vault"], "wrap_ttl": "10m"}  # no hand-off is taken in part 1
    return data


async def leftovers(stack: Stack) -> tuple[int, int]:
    """(leases under the write role in Vault, dynamic write roles in Postgres)."""
    root = stack.vault("keyturn-bot")
    await root.login()
    try:
        leases = len(await root.lease_ids("database/creds/shop-rw/"))
    except Exception:
        leases = 0
    finally:
        await root.close()
    conn = await asyncpg.connect(stack.target_dsn())
    try:
        roles = await conn.fetchval(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-%shop-rw%'"
        )
    finally:
        await conn.close()
    return leases, int(roles)


def held_update(i: int) -> requests.NewRequest:
    return requests.NewRequest(
        "shop",
        f"UPDATE orders SET status = 'x' WHERE id = {i + 1}",
        "crew-bench",
        timedelta(minutes=15),
        rule="writes",
        grant_ttl=timedelta(minutes=10),
    )


async def revocation(stack: Stack) -> tuple[list[float], tuple[int, int]]:
    config = parse_config(bench_policy(stack))
    store = Store(stack.database, pool_size=20)
    issuer = Issuer(config, stack.vault("keyturn-bot"))
    started = time.perf_counter()
    await issue_many(store, GRANTS, held_update, issuer.mint, issuer.unmint)
    print(f"  issued {GRANTS} grants with real leases in {time.perf_counter() - started:.1f} s")
    lags, _ = await expire_together(store, issuer, config)
    await issuer.vault.close()
    await store.close()
    return lags, await leftovers(stack)


async def click_to_result(stack: Stack) -> list[float]:
    slack = SlackEmulator()
    await slack.start()
    slack.add_user("U_APPROVER")
    config = parse_config(bench_policy(stack) | {"vault": stack.policy_data["vault"]})
    bot_store, gw_store = Store(stack.database), Store(stack.database, pool_size=20)
    bot_runner = await serve_bot(stack, config, slack, bot_store)
    gw = build_gateway(config, gw_store, stack.vault("keyturn-gateway"))
    gw_runner = web.AppRunner(application(gw), access_log=None)
    await gw_runner.setup()
    port = free_port()
    await web.TCPSite(gw_runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/v1/commands"
    headers = {"Authorization": f"Bearer {stack.idp.token('crew-bench', ttl=3600)}"}
    samples = []
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(CLICKS + 5):
                command = f"UPDATE orders SET status = 'paid' WHERE id = {5000 + i}"
                async with http.post(
                    url, json={"target": "shop", "command": command}, headers=headers
                ) as resp:
                    held = await resp.json()
                    assert resp.status == 202, held
                request_id = uuid.UUID(held["id"])
                while (posted := await card_store.posted_at(bot_store, request_id)) is None:
                    await asyncio.sleep(0.005)
                ts = posted[1]
                poll = asyncio.create_task(_wait(http, f"{url}/{held['id']}?wait=30", headers))
                await asyncio.sleep(0.05)  # the long-poll is waiting
                start = time.perf_counter()
                status, _ = await slack.click(CHANNEL, ts, APPROVE, "U_APPROVER")
                assert status == 200
                done = await poll
                elapsed = time.perf_counter() - start
                assert done["status"] == "executed", done
                if i >= 5:  # the first runs warm logins and pools
                    samples.append(elapsed)
    finally:
        await gw_runner.cleanup()
        await bot_runner.cleanup()
        await slack.stop()
    return samples


async def _wait(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with http.get(url, headers=headers) as resp:
        return await resp.json()


async def main() -> None:
    async with real_stack() as stack:
        print("keyturn expiry benchmark (real Postgres, real OpenBao, Bolt over HTTP)")
        lags, (leases, roles) = await revocation(stack)
        p99 = percentile(lags, 0.99)
        print(f"  revocation lag p50 {percentile(lags, 0.5):.2f} s, max {max(lags):.2f} s")
        report(
            f"{GRANTS} grants due in one second: revocation lag p99", p99, "s", "<= 5 s", p99 <= 5
        )
        report("leases left in Vault afterwards", leases, "", "0", leases == 0)
        report("dynamic roles left in Postgres afterwards", roles, "", "0", roles == 0)
        samples = await click_to_result(stack)
        p50 = percentile(samples, 0.5) * 1000
        print(f"  {len(samples)} approvals; p95 {percentile(samples, 0.95) * 1000:.0f} ms")
        report("approve click -> agent holds the result, p50", p50, "ms", "<= 250 ms", p50 <= 250)


if __name__ == "__main__":
    asyncio.run(main())
