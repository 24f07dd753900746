"""Which Slack ``keyturn dev`` talks to: the local sandbox, or a real workspace when tokens are set.

With no ``KEYTURN_SLACK_BOT_TOKEN`` the bot talks to the Slack emulator, whose sandbox page a
person uses in a browser. With one, the bot talks to Slack itself: Socket Mode with
``KEYTURN_SLACK_APP_TOKEN`` (nothing to expose: the bot connects out), or HTTP with
``KEYTURN_SLACK_SIGNING_SECRET`` (Slack must reach the bot's port, e.g. through a tunnel).
The demo's cards then go to ``KEYTURN_DEV_SLACK_CHANNEL`` and are decided by the Slack user
ids in ``KEYTURN_DEV_APPROVERS``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from keyturn.errors import ConfigError
from keyturn.harness.slack import SlackEmulator

T = TypeVar("T")
SANDBOX_CHANNEL = "CAPPROVALS"
SANDBOX_APPROVER = "U_APPROVER"
SANDBOX_ONCALL = "U_ONCALL"
# Who the sandbox page can act as: (id, name, what they may do in the demo).
SANDBOX_PEOPLE = (
    (SANDBOX_APPROVER, "Ada Approver", "approver: decides the demo's held commands"),
    (SANDBOX_ONCALL, "Omar On-call", "on-call engineer: may request access for themselves"),
    ("U_VISITOR", "Vic Visitor", "no rights: clicks are refused"),
)


class LoopThread:
    """An event loop in a thread, for the in-process Slack emulator beside blocking code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()  # its selector's sockets with it


@dataclass
class Workspace:
    """The Slack side of the dev stack: what the bot is given, and where cards go."""

    bot_env: dict[str, str]
    channel: str
    approvers: list[str]
    oncall: str | None = None
    sandbox: SlackEmulator | None = None
    sandbox_url: str | None = None
    _loop: LoopThread | None = field(default=None, repr=False)

    def deliver_to(self, bot_url: str) -> None:
        """Where the sandbox sends clicks (a real workspace knows its request URL itself)."""
        if self.sandbox is not None:
            self.sandbox.bot_url = f"{bot_url}/slack/events"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the sandbox's loop (a click, from blocking code)."""
        assert self._loop is not None, "only the sandbox runs in-process"
        return self._loop.run(coro)

    def close(self) -> None:
        if self.sandbox is not None and self._loop is not None:
            self._loop.run(self.sandbox.stop())
            self._loop.close()


def open_workspace(environ: Mapping[str, str]) -> Workspace:
    """A real workspace when Slack tokens are set, else the local sandbox (started here)."""
    token = environ.get("KEYTURN_SLACK_BOT_TOKEN")
    return _real(environ, token) if token else _sandbox()


def _sandbox() -> Workspace:
    loop = LoopThread()
    slack = SlackEmulator()
    url = loop.run(slack.start()).removesuffix("/api/")
    for user, name, title in SANDBOX_PEOPLE:
        slack.add_user(user, name, title=title)
    slack.sandbox_user = SANDBOX_APPROVER
    slack.channel_names[SANDBOX_CHANNEL] = "approvals"
    env = {
        "KEYTURN_SLACK_BOT_TOKEN": slack.bot_token,
        "KEYTURN_SLACK_SIGNING_SECRET": slack.signing_secret,
        "KEYTURN_SLACK_API_URL": slack.api_url,
    }
    return Workspace(
        env, SANDBOX_CHANNEL, [SANDBOX_APPROVER], SANDBOX_ONCALL, slack, url, _loop=loop
    )


def _real(environ: Mapping[str, str], token: str) -> Workspace:
    app_token = environ.get("KEYTURN_SLACK_APP_TOKEN")
    signing = environ.get("KEYTURN_SLACK_SIGNING_SECRET")
    channel = environ.get("KEYTURN_DEV_SLACK_CHANNEL", "").strip()
    approvers = [u.strip() for u in environ.get("KEYTURN_DEV_APPROVERS", "").split(",")]
    approvers = [u for u in approvers if u]
    if not (app_token or signing):
        raise ConfigError(
            "KEYTURN_SLACK_BOT_TOKEN is set: also set KEYTURN_SLACK_APP_TOKEN (Socket Mode) or "
            "KEYTURN_SLACK_SIGNING_SECRET (HTTP), or unset it to use the local sandbox"
        )
    if not channel or not approvers:
        raise ConfigError(
            "with a real Slack workspace, set KEYTURN_DEV_SLACK_CHANNEL (the channel id for "
            "cards, the bot invited) and KEYTURN_DEV_APPROVERS (Slack user ids, comma-separated)"
        )
    passed = ("KEYTURN_SLACK_APP_TOKEN", "KEYTURN_SLACK_SIGNING_SECRET", "KEYTURN_SLACK_API_URL")
    env = {"KEYTURN_SLACK_BOT_TOKEN": token} | {k: environ[k] for k in passed if environ.get(k)}
    return Workspace(env, channel, approvers)
