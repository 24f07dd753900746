"""Soak: ``python bench/soak.py [--minutes 10] [--agents 200] [--think 10]`` (after scripts/test
has set up .venv). Not part of the test command.

200 agent identities send a mix for ``--minutes``: allowed reads (80 %), writes held for a
person (15 %; Ada approves five in six and denies the rest with a reason, through the Slack
emulator) and blocked commands (5 %), each agent pausing ``--think`` seconds on average
(10: a model's turn between tool calls; 200 agents then send ~20 commands a second). The
gateway and the bot are real ``keyturn`` processes; keyturn's Postgres and OpenBao keep their
state on disk. Three faults strike at set points: keyturn's Postgres restarted (30 %),
OpenBao restarted (50 %) and the bot SIGKILLed and started again 2 s later, as a supervisor
would (70 %).

Then every held write is held against keyturn's database and the target, and the soak prints,
beside targets: requests lost, requests with two outcomes, commands run twice or recorded
other than they ran, leases and database roles left, grants that outlived their end by more
than the sweep plus the downtime, p50/p99 per path before, during and after each fault, the
time agents took to be whole again after each, and the processes' memory.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

import asyncpg

from bench.soak_load import APPROVALS, APPROVER, Approver, Load, agent
from bench.soak_report import TERMINAL, Fault, Outcomes, print_report
from bench.stack import Stack, real_stack
from keyturn.agent.client import AsyncClient
from keyturn.errors import NotFound
from keyturn.harness.ports import free_port
from keyturn.harness.services import KeyturnService
from keyturn.harness.slack import SlackEmulator
from keyturn.vault import Vault

WRITES = 200_000  # rows a held write may add one to: one per write
SETTLE = 300.0  # seconds the end waits for every request and grant to be over
ORPHANS = 90.0  # then: the bot's sweep (15 s) and orphan grace (60 s), at their defaults


@dataclass
class Processes:
    gateway: KeyturnService
    bot: KeyturnService
    bot_rss_killed: int = 0  # the first bot's memory just before its SIGKILL


def _policy(stack: Stack, gateway_port: int, bot_port: int) -> dict[str, Any]:
    data = copy.deepcopy(stack.policy_data)
    data["rules"].insert(
        0, {"name": "no-drop", "match": {"sql": ["drop", "truncate"]}, "action": "block"}
    )
    for rule in data["rules"]:
        if rule["name"] == "writes":
            rule["grant_ttl"] = "15m"  # a leaked login outlives the soak: the end sees it
    data["slack"] = {"approval_channel": APPROVALS}
    data["gateway"]["listen"] = f"127.0.0.1:{gateway_port}"
    # sized for 200 agents: a login each (200 connections to the target, not 50 of 2 with
    # logins evicted and made again, a role created in the target each time)
    data["gateway"] |= {"readonly_logins": 250, "readonly_pool_size": 1}
    data["bot"] = {"listen": f"127.0.0.1:{bot_port}"}  # every other bot setting its default
    return data


def _processes(stack: Stack, slack: SlackEmulator, work: Path) -> Processes:
    gateway_port, bot_port = free_port(), free_port()
    config = work / "keyturn.json"
    config.write_text(json.dumps(_policy(stack, gateway_port, bot_port)))
    database = {"KEYTURN_DATABASE_URL": stack.database.url}
    gateway_role, gateway_secret = stack.approles["keyturn-gateway"]
    bot_role, bot_secret = stack.approles["keyturn-bot"]
    gateway = KeyturnService(
        "gateway",
        config,
        database
        | {"KEYTURN_GATEWAY_ROLE_ID": gateway_role, "KEYTURN_GATEWAY_SECRET_ID": gateway_secret},
        f"http://127.0.0.1:{gateway_port}",
        ready="/readyz",
        log=work / "gateway.log",
    )
    bot = KeyturnService(
        "bot",
        config,
        database
        | {
            "KEYTURN_BOT_ROLE_ID": bot_role,
            "KEYTURN_BOT_SECRET_ID": bot_secret,
            "KEYTURN_SLACK_BOT_TOKEN": slack.bot_token,
            "KEYTURN_SLACK_SIGNING_SECRET": slack.signing_secret,
            "KEYTURN_SLACK_API_URL": slack.api_url,
        },
        f"http://127.0.0.1:{bot_port}",
        log=work / "bot.log",
    )
    slack.bot_url = f"{bot.url}/slack/events"
    return Processes(gateway, bot)


def _faults(stack: Stack, processes: Processes) -> list[tuple[float, str, Callable[[], None]]]:
    def bot_killed() -> None:
        processes.bot_rss_killed = processes.bot.rss_bytes()
        processes.bot.kill()
        time.sleep(2)  # a supervisor's restart delay
        processes.bot.start()

    return [
        (0.3, "keyturn's Postgres restarted (5 s down)", lambda: stack.own.restart(5)),
        (0.5, "OpenBao restarted (5 s down)", lambda: stack.openbao.restart(5)),
        (0.7, "bot SIGKILLed, restarted after 2 s", bot_killed),
    ]


async def _inject(
    schedule: list[tuple[float, str, Callable[[], None]]], t0: float, seconds: float
) -> list[Fault]:
    done = []
    for at, name, action in schedule:
        await asyncio.sleep(max(0.0, t0 + at * seconds - time.monotonic()))
        start, wall = time.monotonic(), time.time()
        print(f"  {start - t0:6.0f} s  {name}", flush=True)
        await asyncio.to_thread(action)
        done.append(Fault(name, start, time.monotonic(), wall))
    return done


async def _rss_at(process: KeyturnService, when: float) -> int:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    return process.rss_bytes()


async def _settle(stack: Stack) -> None:
    """Wait until no request waits for anything and no grant is active."""
    conn = await asyncpg.connect(stack.database.url)
    try:
        async with asyncio.timeout(SETTLE):
            while await conn.fetchval(
                "SELECT (SELECT count(*) FROM requests WHERE status <> ALL($1::text[]))"
                " + (SELECT count(*) FROM grants WHERE status = 'active')",
                list(TERMINAL),
            ):
                await asyncio.sleep(1)
    except TimeoutError:
        print(f"  not everything settled within {SETTLE:g} s; counting it as it stands")
    finally:
        await conn.close()


async def _outcomes(stack: Stack, load: Load, faults: list[Fault]) -> Outcomes:
    keyturn = await asyncpg.connect(stack.database.url)
    shop = await asyncpg.connect(stack.postgres.dsn("shop").url)
    try:
        ids = list(load.held)
        unsettled = await keyturn.fetchval(  # known to an agent or not (its submit failed)
            "SELECT count(*) FROM requests WHERE status <> ALL($1::text[])", list(TERMINAL)
        )
        statuses = dict(
            await keyturn.fetch(
                "SELECT id::text, status FROM requests WHERE id::text = ANY($1)", ids
            )
        )
        doubled = await keyturn.fetchval(
            "SELECT count(*) FROM (SELECT request_id FROM audit_events WHERE kind = ANY($1)"
            " GROUP BY request_id HAVING count(*) > 1) d",
            [f"request.{s}" for s in TERMINAL],
        )
        ends = await keyturn.fetch(
            "SELECT extract(epoch FROM g.ended_at)::float8,"
            " extract(epoch FROM least(g.expires_at, coalesce(e.at, g.expires_at)))::float8"
            " FROM grants g LEFT JOIN LATERAL (SELECT max(at) AS at FROM audit_events"
            "  WHERE request_id = g.request_id AND kind = ANY($1)) e ON true"
            " WHERE g.ended_at IS NOT NULL",
            [f"request.{s}" for s in TERMINAL],
        )
        ran = dict(await shop.fetch("SELECT id, n FROM soak_writes WHERE n > 0"))
        roles = await shop.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-%'")
        active = await keyturn.fetchval("SELECT count(*) FROM grants WHERE status = 'active'")
    finally:
        await keyturn.close()
        await shop.close()
    root = Vault(stack.openbao.addr, token=stack.openbao.root_token)
    try:
        leases = len(await root.lease_ids("database/creds/shop-rw/"))
    except NotFound:  # none at all
        leases = 0
    finally:
        await root.close()
    return Outcomes.of(load, statuses, unsettled, doubled, ends, ran, roles, leases, active, faults)


async def soak(minutes: float, agents: int, think: float) -> None:
    async with real_stack(restartable=True) as stack:
        shop = await asyncpg.connect(stack.postgres.dsn("shop").url)
        await shop.execute(
            "CREATE TABLE soak_writes (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);"
            f"INSERT INTO soak_writes (id) SELECT generate_series(1, {WRITES})"
        )
        await shop.close()
        slack = SlackEmulator()
        await slack.start()
        slack.add_user(APPROVER, "Ada Approver")
        work = Path(tempfile.mkdtemp(prefix="keyturn-soak-"))
        processes = _processes(stack, slack, work)
        print(f"soak: {agents} agents for {minutes:g} min (logs in {work})", flush=True)
        try:
            await asyncio.to_thread(processes.gateway.start)
            await asyncio.to_thread(processes.bot.start)
            await _soak(stack, slack, processes, minutes * 60, agents, think)
        finally:
            await asyncio.to_thread(processes.gateway.stop)
            await asyncio.to_thread(processes.bot.stop)
            await slack.stop()


async def _soak(
    stack: Stack,
    slack: SlackEmulator,
    processes: Processes,
    seconds: float,
    agents: int,
    think: float,
) -> None:
    ttl = int(seconds + SETTLE + 600)
    clients = [
        AsyncClient(processes.gateway.url, stack.idp.token(f"soak-{i:03}", ttl=ttl))
        for i in range(agents)
    ]
    load, approver, approving = Load(), Approver(slack), asyncio.Event()
    t0 = time.monotonic()
    running = [
        asyncio.create_task(agent(c, load, think, random.Random(i))) for i, c in enumerate(clients)
    ]
    clicking = asyncio.create_task(approver.run(approving))
    await asyncio.sleep(0.1 * seconds)  # warmed up: pools and logins at their size
    rss_start = (processes.gateway.rss_bytes(), processes.bot.rss_bytes())
    sampled = asyncio.create_task(_rss_at(processes.gateway, t0 + 0.5 * seconds))
    faults = await _inject(_faults(stack, processes), t0, seconds)
    await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
    rss_end = (processes.gateway.rss_bytes(), processes.bot.rss_bytes())
    rss_mid = await sampled
    load.stop.set()
    print(f"  {time.monotonic() - t0:6.0f} s  load stopped; waiting for what is held")
    await asyncio.gather(*running)
    await _settle(stack)
    approving.set()
    await clicking
    for client in clients:
        await client.aclose()
    await asyncio.to_thread(processes.gateway.stop)  # its read-only logins end with it
    await asyncio.sleep(ORPHANS)
    outcomes = await _outcomes(stack, load, faults)
    memory = {
        "gateway, warmed up (10 %) to the end": (rss_start[0], rss_end[0]),
        "gateway, caches full (50 %) to the end": (rss_mid, rss_end[0]),
        "bot, until its SIGKILL": (rss_start[1], processes.bot_rss_killed),
        "bot, restarted: at the end": (0, rss_end[1]),
    }
    print_report(load, outcomes, faults, t0, memory, approver)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument(
        "--think", type=float, default=10.0, help="mean seconds between an agent's commands"
    )
    args = parser.parse_args()
    asyncio.run(soak(args.minutes, args.agents, args.think))


if __name__ == "__main__":
    main()
