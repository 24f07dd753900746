"""Recording benchmark: run ``python bench/recording.py`` (after scripts/test has set up .venv).

The allowed SELECT of bench/gateway.py, through two gateways on one stack that differ only in
``record.outputs``: ``none`` (each step still keeps its sizes and hashes in the audit chain)
and ``masked`` (the output as the agent saw it, too). Rounds alternate between them so both
meet the same machine. Then what a step costs in the store: bytes per recording row (median,
p99) for a small read and for a read at the 64 KiB cap, and recordings written per second.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.gateway import AGENTS, http_p50, http_rate
from bench.stack import Stack, real_stack, report, serve
from gateway.bootstrap import application, build
from keyturn.config.process import RecordConfig
from keyturn.store.db import Store

ROUNDS = 3
WIDE = "SELECT id, repeat(status, 200) AS note FROM orders ORDER BY id LIMIT 400"  # over 64 KiB


async def _gateway_figures(
    stack: Stack, outputs: str, http: aiohttp.ClientSession
) -> tuple[float, float]:
    config = stack.policy.model_copy(update={"record": RecordConfig(outputs=outputs)})  # type: ignore[arg-type]
    gw = build(config, Store(stack.database, pool_size=20), stack.vault("keyturn-gateway"))
    agents = [
        {"Authorization": f"Bearer {stack.idp.token(f'crew-{outputs}-{i}')}"} for i in range(AGENTS)
    ]
    async with serve(application(gw)) as base:
        url = f"{base}/v1/commands"
        p50 = await http_p50(http, url, agents[0])
        rate = await http_rate(http, url, agents)
    await gw.gw.journal.stop()
    await gw.gw.store.close()
    return p50, rate


async def _sizes(stack: Stack) -> None:
    store = Store(stack.database, pool_size=2)
    async with store.raw_connection() as conn:
        for label, where in (
            ("a small read", "NOT truncated"),
            ("a read at the cap", "truncated"),
            ("all steps of the bench", "true"),
        ):
            row = await conn.fetchrow(
                "SELECT count(*) AS n,"
                " percentile_cont(0.5) WITHIN GROUP (ORDER BY pg_column_size(k.*)) AS p50,"
                " percentile_cont(0.99) WITHIN GROUP (ORDER BY pg_column_size(k.*)) AS p99"
                f" FROM recordings k WHERE output IS NOT NULL AND {where}"
            )
            print(
                f"  bytes a recording row holds, {label}: median {row['p50']:,.0f},"
                f" p99 {row['p99']:,.0f} ({row['n']:,} rows; Postgres compresses long text)"
            )
    await store.close()


async def main() -> None:
    async with real_stack() as stack:
        print("keyturn recording benchmark (real Postgres, OpenBao, JWKS)")
        figures: dict[str, list[tuple[float, float]]] = {"none": [], "masked": []}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for _ in range(ROUNDS):
                for outputs in ("none", "masked"):
                    figures[outputs].append(await _gateway_figures(stack, outputs, http))
            token = {"Authorization": f"Bearer {stack.idp.token('crew-wide')}"}
            gw = build(
                stack.policy, Store(stack.database, pool_size=4), stack.vault("keyturn-gateway")
            )
            async with serve(application(gw)) as base:
                started = time.perf_counter()
                for _ in range(200):
                    async with http.post(
                        f"{base}/v1/commands",
                        json={"target": "shop", "command": WIDE},
                        headers=token,
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                wide_rate = 200 / (time.perf_counter() - started)
            await gw.gw.journal.stop()
        p50 = {k: statistics.median(f[0] for f in v) for k, v in figures.items()}
        rate = {k: statistics.median(f[1] for f in v) for k, v in figures.items()}
        print(
            f"  allowed SELECT p50: outputs none {p50['none'] * 1000:.3f} ms, masked"
            f" {p50['masked'] * 1000:.3f} ms; req/s none {rate['none']:,.0f}, masked"
            f" {rate['masked']:,.0f} (medians of {ROUNDS} alternating rounds)"
        )
        report(
            "allowed p50, outputs masked / none",
            p50["masked"] / p50["none"],
            "x",
            "<= 1.10",
            p50["masked"] <= 1.10 * p50["none"],
        )
        report(
            "allowed req/s, outputs masked / none",
            rate["masked"] / rate["none"],
            "x",
            ">= 0.90",
            rate["masked"] >= 0.90 * rate["none"],
        )
        print(
            f"  recordings written: {rate['masked']:,.0f} a second under load (one per step);"
            f" {wide_rate:,.0f} a second one at a time for outputs over the 64 KiB cap"
        )
        await _sizes(stack)


if __name__ == "__main__":
    asyncio.run(main())
