"""``keyturn gateway`` and ``keyturn bot`` as processes of their own, as an operator runs them:
for ``keyturn dev``, the fault stories (which SIGKILL them) and the soak (which also weighs
them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from keyturn.errors import Unavailable

START_WITHIN = 60.0  # seconds a process may take to answer its readiness path
STOP_WITHIN = 70.0  # seconds it may take to drain after SIGTERM (aiohttp waits up to 60)


class KeyturnService:
    """``keyturn <command> --config <config>`` with ``env`` (ambient ``KEYTURN_*`` variables
    left out), ready once ``url + ready`` answers 200. Output goes to ``log`` or nowhere."""

    def __init__(
        self,
        command: str,
        config: Path,
        env: dict[str, str],
        url: str,
        *,
        ready: str = "/healthz",
        log: Path | None = None,
    ) -> None:
        self.command = command
        self.config = config
        self.env = env
        self.url = url
        self.ready = ready
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KeyturnService:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")} | self.env
        out = self.log.open("ab") if self.log else None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "keyturn.cli", self.command, "--config", str(self.config)],
                env=env,
                stdout=out or subprocess.DEVNULL,
                stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out:
                out.close()
        try:
            self._wait_ready()
        except BaseException:
            self.kill()  # never a process left behind by a start that failed
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_WITHIN
        where = f"see {self.log}" if self.log else "run it alone to see why"
        while True:
            if self.proc.poll() is not None:
                raise Unavailable(f"keyturn {self.command} exited at start: {where}")
            try:
                with urllib.request.urlopen(self.url + self.ready, timeout=1):  # noqa: S310
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"keyturn {self.command} did not answer {self.ready} in "
                        f"{START_WITHIN:g} s: {where}"
                    ) from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, connections cut mid-way."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, as an operator stops it (it drains, long-polls included); SIGKILL if it
        takes longer than ``STOP_WITHIN``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_WITHIN)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_bytes(self) -> int:
        """Resident memory now (Linux ``/proc``), 0 once it has exited."""
        if self.proc is None or self.proc.poll() is not None:
            return 0
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> KeyturnService:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
