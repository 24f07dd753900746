"""Agent-side benchmark: run ``python bench/agents.py`` (after scripts/test has set up .venv).

Against ``keyturn dev`` (its own processes: gateway, bot, Slack sandbox, Postgres, OpenBao):

1. What ``Client.run`` adds over a raw HTTP call for the same allowed SELECT (both keep their
   connection alive): the floor is the raw call, measured in the same run.
2. Click → tool result: a CrewAI ``KeyturnSQLTool`` waits on a held UPDATE; the time from the
   approver's click leaving the Slack sandbox to the tool returning ``UPDATE 1`` (approval,
   Vault credentials, the wrapped hand-off, the run, the long-poll's answer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

for name, value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
}.items():
    os.environ.setdefault(name, value)  # before crewai is imported: nothing phones home

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.stack import percentile  # noqa: E402
from keyturn.client import Client  # noqa: E402
from keyturn.crewai import KeyturnSQLTool  # noqa: E402
from keyturn.harness.sandbox import find_card  # noqa: E402

SELECT = "SELECT id, status, total_cents FROM orders WHERE id = 1"
ITERATIONS = 300
CLICKS = 20
PACE = 0.06  # under the dev gateway's 20 requests/s per identity: latency, not rate limiting


def start_dev(state: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyturn.cli", "dev", "--state-dir", str(state)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ctrl-C stops everything" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep it draining
            return proc
    raise SystemExit("keyturn dev did not start")


def p50_ms(call: Any, n: int = ITERATIONS) -> float:
    for _ in range(30):
        time.sleep(PACE)
        call()
    samples = []
    for _ in range(n):
        time.sleep(PACE)
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return percentile(samples, 0.5) * 1000


def one_click(stack: dict[str, Any], n: int) -> float:
    """A tool waits on a held UPDATE; seconds from the click to its answer."""
    held: list[str] = []
    said: list[str] = []
    tool = KeyturnSQLTool(
        gateway_url=stack["gateway_url"],
        token=stack["agent_token"],
        targets=["orders-db"],
        on_pending=lambda r: held.append(r.id),
    )
    update = f"UPDATE orders SET total_cents = {1000 + n} WHERE id = 2"
    worker = threading.Thread(
        target=lambda: said.append(tool.run(target="orders-db", sql=update, reason="bench"))
    )
    worker.start()
    deadline = time.monotonic() + 30
    while not held:
        if time.monotonic() > deadline or not worker.is_alive():
            raise SystemExit(f"the UPDATE was not held: {said}")
        time.sleep(0.01)
    ts = find_card(stack["sandbox_url"], held[0], poll=0.02)
    time.sleep(0.3)  # let the tool's long-poll settle in the gateway
    started = time.perf_counter()
    body = {"ts": ts, "action_id": "keyturn_approve", "user": "U_APPROVER"}
    httpx.post(f"{stack['sandbox_url']}/sandbox/click", json=body, timeout=10)
    worker.join(60)
    if not said or not said[0].endswith("UPDATE 1."):
        raise SystemExit(f"the approved UPDATE did not finish: {said}")
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as state:
        dev = start_dev(Path(state))
        try:
            stack = json.loads((Path(state) / "stack.json").read_text())
            headers = {"Authorization": f"Bearer {stack['agent_token']}"}
            body = {"target": "orders-db", "command": SELECT}
            with httpx.Client(base_url=stack["gateway_url"], headers=headers) as http:
                raw = p50_ms(lambda: http.post("/v1/commands", json=body).raise_for_status())
                keyed = p50_ms(
                    lambda: http.post(
                        "/v1/commands", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}
                    ).raise_for_status()
                )
            with Client(stack["gateway_url"], stack["agent_token"]) as kt:
                client = p50_ms(lambda: kt.run("orders-db", SELECT, timeout=10))
            clicks = [one_click(stack, n) for n in range(CLICKS)]
        finally:
            dev.send_signal(signal.SIGINT)
            dev.wait(60)
    print("keyturn agents benchmark (keyturn dev: its own gateway, bot, Postgres, OpenBao)")
    print(f"  allowed SELECT, raw HTTP (floor)            p50 {raw:.2f} ms")
    print(
        f"  allowed SELECT, raw HTTP + Idempotency-Key  p50 {keyed:.2f} ms  "
        f"(the gateway commits a keyed outcome before answering: {keyed - raw:+.2f} ms)"
    )
    print(
        f"  allowed SELECT, Client.run (always keyed)   p50 {client:.2f} ms  "
        f"(adds {client - raw:+.2f} ms, {client / raw:.2f}x the floor; "
        f"{client - keyed:+.2f} ms over the keyed raw call)"
    )
    ms = sorted(c * 1000 for c in clicks)
    print(
        f"  click -> KeyturnSQLTool result              p50 {percentile(ms, 0.5):.0f} ms "
        f"(min {ms[0]:.0f}, max {ms[-1]:.0f}, {CLICKS} approvals; target <= 250 ms p50, as "
        "bench/expiry.py's click -> result)"
    )


if __name__ == "__main__":
    main()
