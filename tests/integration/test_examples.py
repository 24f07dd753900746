"""The README's agent examples, run as a new user runs them: `keyturn dev` in one process, the
example in another, and a person clicking in the Slack sandbox (through its own HTTP routes,
as the page does)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).parents[2]


class Spawned:
    """A process whose output lines are read as they come, with a deadline per wait."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, fragment: str, timeout: float = 120) -> str:
        """The first new line containing ``fragment``; fails with the output so far."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if fragment in line:
                return line
        raise AssertionError(f"no line with {fragment!r} in:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 60) -> list[str]:
        """Every line once the process has exited with 0."""
        code = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        assert code == 0, "\n".join(self.lines)
        return self.lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("dev")
    dev = Spawned("-m", "keyturn.cli", "dev", "--state-dir", str(state))
    try:
        dev.until("Ctrl-C stops everything", timeout=180)
        stack = json.loads((state / "stack.json").read_text())
        yield stack | {"file": str(state / "stack.json")}
    finally:
        dev.stop()


def card_for(stack: dict[str, Any], request_id: str) -> str:
    """The ts of the card that names ``request_id`` (or shows that text) on the sandbox page."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        page = httpx.get(f"{stack['slack_sandbox']}/sandbox/messages", timeout=5).json()
        for messages in page["channels"].values():
            for message in messages:
                if request_id in json.dumps(message) and message.get("blocks"):
                    return str(message["ts"])
        time.sleep(0.2)
    raise AssertionError(f"no card for {request_id}")


def click(stack: dict[str, Any], card: str, action: str, reason: str | None = None) -> None:
    """Click a button on the card that names ``card`` (a request id or its command text)."""
    sandbox = stack["slack_sandbox"]
    body = {"ts": card_for(stack, card), "action_id": action, "user": "U_APPROVER"}
    assert httpx.post(f"{sandbox}/sandbox/click", json=body, timeout=10).json()["status"] == 200
    if reason is not None:
        deadline = time.monotonic() + 10
        while True:  # the deny modal opens once the bot has handled the click
            answer = httpx.post(
                f"{sandbox}/sandbox/submit",
                json={"user": "U_APPROVER", "values": {"reason": reason}},
                timeout=10,
            )
            if answer.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer.status_code == 200, answer.text


def held_id(line: str) -> str:
    return line.split("request ", 1)[1].split(":", 1)[0].split()[0]


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_the_example_crew_waits_for_the_click(dev_stack: dict[str, Any], decision: str) -> None:
    order = 1 if decision == "approve" else 2
    crew = Spawned(
        "examples/crewai_ops_crew.py", "--stack", dev_stack["file"], "--order", str(order)
    )
    try:
        read = crew.until("<- Ran on orders-db")
        assert ": 1 row." in read
        assert crew.until("| ***").startswith(f"{order} | open | ")  # the email, masked
        held = crew.until("held as request")
        if decision == "approve":
            click(dev_stack, held_id(held), "keyturn_approve")
        else:
            click(dev_stack, held_id(held), "keyturn_deny", "order 2 was refunded; leave it open")
        lines = crew.finish()
    finally:
        crew.stop()
    if decision == "approve":
        assert lines[-1].startswith(f"Order {order}: Ran on orders-db (request ")
        assert lines[-1].endswith("UPDATE 1.")
    else:
        assert "Denied by @U_APPROVER: order 2 was refunded; leave it open." in lines[-1]
    assert dev_stack["agent_token"] not in "\n".join(lines)


def test_the_mcp_example_waits_for_the_click(dev_stack: dict[str, Any]) -> None:
    client = Spawned("examples/mcp_client.py", "--stack", dev_stack["file"], "--order", "3")
    try:
        assert client.until("tools: ") == "tools: list_targets, run_sql, run_shell, request_status"
        assert "3 | open | 300" in client.until("3 | open")
        client.until('-> run_sql {"target": "orders-db", "sql": "UPDATE')
        # run_sql waits up to keyturn mcp's --max-wait: a click meanwhile finishes it at once
        click(dev_stack, "WHERE id = 3", "keyturn_approve")
        lines = client.finish()
    finally:
        client.stop()
    assert lines[-1].startswith("Ran on orders-db (request ") and lines[-1].endswith("UPDATE 1.")
