"""Approval benchmark: run ``python bench/approval.py`` (after scripts/test has set up .venv).

An approver clicks Approve on a posted card; the figure is the time from the click leaving
Slack (the emulator signs and sends it exactly as Slack does) to the approved state being
committed in Postgres (seen through LISTEN/NOTIFY), through the real Bolt app, signature
check, approver check and row-locked decision.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.stack import percentile, real_stack, report, serve_bot
from bot import card_store
from bot.cards import APPROVE
from keyturn.config.loading import parse_config
from keyturn.harness.slack import SlackEmulator
from keyturn.store import reads, requests
from keyturn.store.db import Store
from keyturn.store.listener import Listener

CLICKS = 300
CHANNEL = "CBENCH"


async def main() -> None:
    async with real_stack() as stack:
        slack = SlackEmulator()
        await slack.start()
        slack.add_user("U_APPROVER")
        data = dict(
            stack.policy_data, slack={"approval_channel": CHANNEL}, bot={"poll_interval": "1s"}
        )
        store = Store(stack.database)
        runner = await serve_bot(stack, parse_config(data), slack, store)
        watcher = Listener(stack.database)
        watcher.start()
        await watcher.connected.wait()
        probe = Store(stack.database, pool_size=2)
        samples = []
        try:
            for i in range(CLICKS + 20):
                row, _ = await requests.create_request(
                    probe,
                    requests.NewRequest(
                        "shop",
                        f"UPDATE orders SET status = 'paid' WHERE id = {i + 1}",
                        "crew-bench",
                        timedelta(minutes=15),
                        rule="writes",
                    ),
                )
                while (posted := await card_store.posted_at(probe, row.id)) is None:
                    await asyncio.sleep(0.005)
                ts = posted[1]
                with watcher.watch("request", row.id) as change:
                    started = time.perf_counter()
                    status, _ = await slack.click(CHANNEL, ts, APPROVE, "U_APPROVER")
                    assert status == 200
                    while (await reads.get_request_view(probe, row.id)).status != "approved":
                        await change.wait(5)
                    if i >= 20:  # the first clicks warm Bolt (auth.test) and the pools
                        samples.append(time.perf_counter() - started)
        finally:
            await watcher.stop()
            await probe.close()
            await runner.cleanup()
            await slack.stop()
        p50 = percentile(samples, 0.5) * 1000
        print("keyturn approval benchmark (real Postgres, Bolt over HTTP, Slack emulator)")
        print(f"  {len(samples)} clicks; p95 {percentile(samples, 0.95) * 1000:.1f} ms")
        report("approve click -> approved in Postgres, p50", p50, "ms", "<= 50 ms", p50 <= 50)


if __name__ == "__main__":
    asyncio.run(main())
