"""``keyturn dev`` as a new user runs it, for tests: its own process, its printed lines, its
stack.json, and a person's clicks in the Slack sandbox through the page's own HTTP routes."""

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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from keyturn.harness.sandbox import find_card

ROOT = Path(__file__).parents[2]
UP = "Ctrl-C stops everything"


class Spawned:
    """A process whose output lines are read as they come, with a deadline per wait."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=clean | (env or {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

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

    def finish(self, timeout: float = 60, code: int = 0) -> list[str]:
        """Every line once the process has exited (with ``code``)."""
        exited = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        assert exited == code, "\n".join(self.lines)
        return self.lines

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def stop(self) -> None:
        """Stop the process (Ctrl-C, then SIGKILL) and let go of its output pipe."""
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=10)  # reads to the end the process left
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextmanager
def running_dev(
    state: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[Spawned, dict[str, Any]]]:
    """``keyturn dev --state-dir state`` until the block ends; its stack.json (plus ``file``)."""
    dev = Spawned("-m", "keyturn.cli", "dev", "--state-dir", str(state), env=env)
    try:
        dev.until(UP, timeout=180)
        stack = json.loads((state / "stack.json").read_text())
        yield dev, stack | {"file": str(state / "stack.json")}
    finally:
        dev.stop()


def click(stack: dict[str, Any], card: str, action: str, reason: str | None = None) -> None:
    """Click a button on the card that names ``card`` (a request id or its command text)."""
    sandbox = stack["sandbox_url"]
    ts = find_card(sandbox, card, poll=0.2)
    body = {"ts": ts, "action_id": action, "user": stack["approver_user"]}
    assert httpx.post(f"{sandbox}/sandbox/click", json=body, timeout=10).json()["status"] == 200
    if reason is not None:
        deadline = time.monotonic() + 10
        while True:  # the deny modal opens once the bot has handled the click
            answer = httpx.post(
                f"{sandbox}/sandbox/submit",
                json={"user": stack["approver_user"], "values": {"reason": reason}},
                timeout=10,
            )
            if answer.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer.status_code == 200, answer.text
