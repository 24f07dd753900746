"""The emulated workspace's state: users, channels and their messages, ephemerals, views,
and what the bot called; the test controls that inject faults and read it all back."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TEAM = {"id": "T0KEYTURN", "domain": "keyturn"}


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


@dataclass
class Fault:
    status: int
    times: int
    retry_after: int = 1


@dataclass(frozen=True)
class Origin:
    """Where an interaction came from: whom a ``response_url`` or a ``trigger_id`` answers."""

    user: str
    channel: str | None = None
    ts: str | None = None  # the message clicked, which ``replace_original`` replaces


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    user: str
    thread_ts: str | None = None
    metadata: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "message",
            "ts": self.ts,
            "text": self.text,
            "blocks": self.blocks,
            "user": self.user,
        }
        if self.thread_ts:
            out["thread_ts"] = self.thread_ts
        if self.metadata:
            out["metadata"] = self.metadata
        return out


class Workspace:
    """Everything Slack would know; the Web API, Socket Mode and interactivity act on it."""

    def __init__(
        self,
        *,
        bot_token: str | None = None,
        signing_secret: str | None = None,
        bot_user: str = "UKEYTURNBOT",
    ) -> None:
        self.bot_token = bot_token or f"xoxb-{secrets.token_hex(12)}"
        self.app_token = f"xapp-{secrets.token_hex(12)}"  # Socket Mode
        self.signing_secret = signing_secret or secrets.token_hex(16)
        self.bot_user = bot_user
        self.calls: list[Call] = []
        self.faulted: list[Call] = []  # calls answered with an injected fault, when
        self.messages: dict[str, list[Message]] = {}
        self.channel_names: dict[str, str] = {}  # id -> name, as the sandbox shows them
        self.ephemerals: list[dict[str, Any]] = []
        self.views: dict[str, dict[str, Any]] = {}  # every view opened, by id
        self.modals: dict[str, list[str]] = {}  # user -> the ids of their open modals (a stack)
        self.home: dict[str, dict[str, Any]] = {}  # user -> their published App Home
        self.users: dict[str, dict[str, Any]] = {}
        self.usergroups: dict[str, list[str]] = {}
        self.responses: list[dict[str, Any]] = []  # what the bot sent to response_url
        self.version = 0  # grows whenever something a person would see changes
        self.refused = 0  # calls answered 503 during an outage
        self.bot_url: str | None = None  # where interactions are delivered (HTTP mode)
        self.sandbox_user = ""  # whom the sandbox page acts as until someone switches
        self._faults: dict[str, list[Fault]] = {}
        self._down_until = 0.0
        self._delays: dict[str, float] = {}
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self._called = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._sockets: list[web.WebSocketResponse] = []
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._triggers: dict[str, Origin] = {}
        self._response_urls: dict[str, Origin] = {}
        self.url = ""

    # ------------------------------------------------------------------ test controls

    def add_user(self, user_id: str, name: str | None = None, *, title: str = "") -> None:
        """A workspace member; ``title`` (their profile's) says who they are on the page."""
        real_name = name or user_id
        self.users[user_id] = {
            "id": user_id,
            "name": real_name.lower().replace(" ", "."),
            "real_name": real_name,
            "team_id": TEAM["id"],
            "profile": {"real_name": real_name, "display_name": real_name, "title": title},
        }

    def fail(self, method: str, status: int, *, times: int = 1, retry_after: int = 1) -> None:
        """The next ``times`` calls of ``method`` (or ``*``) answer ``status``."""
        self._faults.setdefault(method, []).append(Fault(status, times, retry_after))

    def down(self, seconds: float = float("inf")) -> None:
        """Every method answers 503 for ``seconds``, or until :meth:`up` (an outage)."""
        self._down_until = time.monotonic() + seconds

    def up(self) -> None:
        self._down_until = 0.0

    def delay(self, method: str, seconds: float) -> None:
        self._delays[method] = seconds

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    async def wait_for(self, method: str, count: int = 1, timeout: float = 15) -> list[Call]:
        """Wait until ``method`` was called (successfully) at least ``count`` times."""
        async with asyncio.timeout(timeout), self._called:
            await self._called.wait_for(lambda: len(self.calls_to(method)) >= count)
        return self.calls_to(method)

    def channel(self, channel: str) -> list[Message]:
        return [m for m in self.messages.get(channel, []) if m.thread_ts is None]

    def thread(self, channel: str, ts: str) -> list[Message]:
        return [m for m in self.messages.get(channel, []) if m.thread_ts == ts]

    def message(self, channel: str, ts: str) -> Message:
        for m in self.messages.get(channel, []):
            if m.ts == ts:
                return m
        raise KeyError(f"no message {ts} in {channel}")

    def find(self, ts: str) -> Message:
        """The message ``ts`` in whichever conversation holds it."""
        for messages in self.messages.values():
            for message in messages:
                if message.ts == ts:
                    return message
        raise KeyError(f"no message {ts}")

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    def _ephemeral(self, channel: str, user: str, text: str, blocks: Any) -> str:
        ts = self._next_ts()
        self.ephemerals.append(
            {
                "channel": channel,
                "user": user,
                "ts": ts,
                "text": text,
                "blocks": json_arg(blocks),
            }
        )
        return ts

    def open_modal(self, user: str) -> str | None:
        """The id of the modal ``user`` sees on top, if any."""
        stack = self.modals.get(user)
        return stack[-1] if stack else None

    def close_modal(self, view_id: str, user: str) -> None:
        stack = self.modals.get(user, [])
        if view_id in stack:
            del stack[stack.index(view_id) :]
            self.version += 1


def json_arg(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value
