"""Gateway benchmark: run ``python bench/gateway.py`` (after scripts/test has set up .venv).

1. Added latency: the same allowed SELECT through the gateway (HTTP + JWT + policy + Vault
   read-only pool + journal) versus directly over asyncpg with the same read-only login.
2. Throughput: allowed requests per second with 50 concurrent clients.
3. Memory: 10,000 concurrent held long-polls; RSS of the gateway process (run as its own
   ``keyturn gateway`` process so its memory is measured alone).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import yaml

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.floor import floor_app
from bench.stack import Stack, percentile, real_stack, report, serve
from gateway.bootstrap import application, build
from keyturn.harness.ports import free_port
from keyturn.store.db import Store

QUERY = "SELECT id, total, status FROM orders WHERE id = 4242"
ITERATIONS = 2000
AGENTS = 10
CLIENTS = 50
THROUGHPUT_SECONDS = 8
LONG_POLLS = 10_000


async def direct_p50(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    samples = []
    for _ in range(200):
        await conn.fetch(QUERY)
    for _ in range(ITERATIONS):
        start = time.perf_counter()
        await conn.fetch(QUERY)
        samples.append(time.perf_counter() - start)
    await conn.close()
    return percentile(samples, 0.5)


async def http_p50(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    body = {"target": "shop", "command": QUERY}
    for _ in range(200):  # warm: Vault login, read-only logins, caches
        async with http.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    samples = []
    for _ in range(ITERATIONS):
        start = time.perf_counter()
        async with http.post(url, json=body, headers=headers) as resp:
            await resp.read()
        samples.append(time.perf_counter() - start)
    return percentile(samples, 0.5)


async def http_rate(http: aiohttp.ClientSession, url: str, headers: list[dict[str, str]]) -> float:
    """Requests per second from CLIENTS concurrent clients, client i as identity i % len."""
    body = {"target": "shop", "command": QUERY}
    done = 0
    stop_at = time.perf_counter() + THROUGHPUT_SECONDS

    async def client(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            async with http.post(url, json=body, headers=headers[i % len(headers)]) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return done / (time.perf_counter() - started)


async def in_process(stack: Stack) -> None:
    vault = stack.vault("keyturn-gateway")
    await vault.login()
    lease = await vault.creds("database/creds/shop-ro")  # a read-only login like the gateway's
    await vault.close()
    dsn = stack.target_dsn(lease.data["username"], lease.data["password"])
    direct = await direct_p50(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
    gw = build(stack.policy, Store(stack.database, pool_size=20), stack.vault("keyturn-gateway"))
    agents = [
        {"Authorization": f"Bearer {stack.idp.token(f'crew-bench-{i}')}"} for i in range(AGENTS)
    ]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with serve(floor_app(pool)) as base:
            url = f"{base}/v1/commands"
            floor_p50 = await http_p50(http, url, {})
            floor_rate = await http_rate(http, url, [{}])
        async with serve(application(gw)) as base:
            url = f"{base}/v1/commands"
            gw_p50 = await http_p50(http, url, agents[0])
            gw_rate = await http_rate(http, url, agents)
    await pool.close()
    floor_added, gw_added = (floor_p50 - direct) * 1000, (gw_p50 - direct) * 1000
    print(
        f"  direct asyncpg p50 {direct * 1000:.3f} ms; floor proxy p50 {floor_p50 * 1000:.3f} ms"
        f" (adds {floor_added:.3f} ms, {floor_rate:,.0f} req/s); gateway p50"
        f" {gw_p50 * 1000:.3f} ms (adds {gw_added:.3f} ms)"
    )
    report(
        "allowed SELECT: added p50 latency / floor's",
        gw_added / floor_added,
        "x",
        "<= 2",
        gw_added <= 2 * floor_added,
    )
    report(
        f"allowed req/s at {CLIENTS} clients / floor's",
        gw_rate / floor_rate,
        "x",
        ">= 0.8",
        gw_rate >= 0.8 * floor_rate,
    )
    commits = gw.gw.journal.commits
    print(f"  gateway {gw_rate:,.0f} req/s ({AGENTS} agents); journal {commits} commits")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def long_polls(stack: Stack) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "policy.yml"
        data = dict(stack.policy_data)
        data["gateway"] = dict(
            data["gateway"],
            listen=f"127.0.0.1:{port}",
            max_wait="600s",
            poll_interval="10s",
            max_pending_per_agent=100,  # the 100 held requests the long-polls wait on
        )
        config.write_text(yaml.safe_dump(data))
        role_id, secret_id = stack.approles["keyturn-gateway"]
        env = os.environ | {
            "KEYTURN_DATABASE_URL": stack.database.url,
            "KEYTURN_GATEWAY_ROLE_ID": role_id,
            "KEYTURN_GATEWAY_SECRET_ID": secret_id,
        }
        proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before any load)
            [
                sys.executable,
                "-c",
                "import resource,sys;h=resource.getrlimit(resource.RLIMIT_NOFILE)[1];"
                "resource.setrlimit(resource.RLIMIT_NOFILE,(h,h));"
                "from keyturn.cli import main;sys.exit(main(sys.argv[1:]))",
                "gateway",
                "--config",
                str(config),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            ) as http:
                for _ in range(200):
                    try:
                        async with http.get(f"{base}/healthz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                idle = _rss_mb(proc.pid)
                token = stack.idp.token("crew-bench")
                headers = {"Authorization": f"Bearer {token}"}
                ids = []
                for i in range(100):
                    async with http.post(
                        f"{base}/v1/commands",
                        headers=headers,
                        json={
                            "target": "shop",
                            "run_id": str(i),
                            "command": f"UPDATE orders SET status = 'paid' WHERE id = {i + 1}",
                        },
                    ) as resp:
                        ids.append((await resp.json())["id"])

                async def poll(i: int) -> int:
                    async with http.get(
                        f"{base}/v1/commands/{ids[i % 100]}?wait=600", headers=headers
                    ) as resp:
                        await resp.read()
                        return resp.status

                started = time.perf_counter()
                polls = [asyncio.create_task(poll(i)) for i in range(LONG_POLLS)]
                metrics = ""
                for _ in range(600):
                    await asyncio.sleep(0.5)
                    async with http.get(f"{base}/metrics") as resp:
                        metrics = await resp.text()
                    waiting = next(
                        (
                            float(line.split()[1])
                            for line in metrics.splitlines()
                            if line.startswith("keyturn_gateway_waiting_polls ")
                        ),
                        0.0,
                    )
                    if waiting >= LONG_POLLS:
                        break
                ramp = time.perf_counter() - started
                rss = _rss_mb(proc.pid)
                print(
                    f"  {int(waiting)} long-polls waiting after {ramp:.1f} s;"
                    f" gateway RSS idle {idle:.0f} MB"
                )
                report(
                    f"gateway RSS with {LONG_POLLS} held long-polls",
                    rss,
                    "MB",
                    "<= 300 MB",
                    rss <= 300 and waiting >= LONG_POLLS,
                )
                # release them all through the real path: a decision wakes the waiters
                from keyturn.domain import Deciders, Decision
                from keyturn.store import decisions

                store = Store(stack.database, pool_size=2)
                released = time.perf_counter()
                for ident in ids:
                    await decisions.decide(
                        store,
                        uuid.UUID(ident),
                        "U_APPROVER",
                        Decision.DENY,
                        "bench",
                        deciders=Deciders.only("U_APPROVER"),
                    )
                statuses = await asyncio.gather(*polls)
                await store.close()
                print(
                    f"  all {len(statuses)} long-polls answered"
                    f" {time.perf_counter() - released:.1f} s after the decisions"
                    f" ({statuses.count(200)} x 200)"
                )
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def main() -> None:
    async with real_stack() as stack:
        print("keyturn gateway benchmark (real Postgres, OpenBao, JWKS; 2-core machine)")
        await in_process(stack)
        await long_polls(stack)


if __name__ == "__main__":
    asyncio.run(main())  # plain asyncio: `keyturn gateway` itself runs on uvloop, faster still
