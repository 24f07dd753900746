"""A Slack Web API emulator, and Slack's side of interactivity, for tests and ``keyturn dev``.

The bot's ``AsyncWebClient(base_url=emulator.api_url)`` talks to it as to Slack: it checks the
bot token, keeps channels, messages (with metadata), ephemerals, views and DMs, and records
every call with its decoded arguments. Tests inject 429s (with Retry-After), 5xx, delays or a
whole outage. Clicks, modal submissions and slash commands reach the bot signed exactly as
Slack signs them (``v0=`` HMAC-SHA256 of ``v0:{timestamp}:{body}``), so Bolt's real request
verification runs; ``response_url`` points back here. Its sandbox page lets a person act as
any of its users (:mod:`keyturn.harness.sandbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

from keyturn.harness.sandbox import add_sandbox_routes

TEAM = {"id": "T0KEYTURN", "domain": "keyturn"}
# Web API methods that change what a person would see (the sandbox page redraws on them).
_VISIBLE = {
    "chat.postMessage",
    "chat.update",
    "chat.delete",
    "chat.postEphemeral",
    "views.open",
    "views.update",
    "views.push",
    "views.publish",
}


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


class SlackEmulator:
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

    # ------------------------------------------------------------------ lifecycle

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)  # the SDK GETs some methods
        app.router.add_post("/respond/{ident}", self._respond)
        app.router.add_get("/socket", self._socket)
        add_sandbox_routes(app, self)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.api_url

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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

    # ------------------------------------------------------------------ Web API

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await _args(request)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or args.get(
            "token", ""
        )
        if delay := self._delays.get(method):
            await asyncio.sleep(delay)
        if time.monotonic() < self._down_until:
            self.refused += 1
            return web.json_response({"ok": False, "error": "service_unavailable"}, status=503)
        for key in (method, "*"):
            faults = self._faults.get(key)
            if faults:
                fault = faults[0]
                fault.times -= 1
                if fault.times <= 0:
                    faults.pop(0)
                headers = {"Retry-After": str(fault.retry_after)} if fault.status == 429 else {}
                error = "ratelimited" if fault.status == 429 else "internal_error"
                return web.json_response(
                    {"ok": False, "error": error}, status=fault.status, headers=headers
                )
        if method == "apps.connections.open":
            if self.app_token not in (token, args.get("token")):
                return web.json_response({"ok": False, "error": "invalid_auth"})
            self.calls.append(Call(method, {}))
            return web.json_response(
                {"ok": True, "url": self.url.replace("http", "ws") + "/socket"}
            )
        if token != self.bot_token:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        body: dict[str, Any] = handler(args)
        if body.get("ok"):
            if method in _VISIBLE:
                self.version += 1
            async with self._called:
                self.calls.append(Call(method, args))
                self._called.notify_all()
        return web.json_response(body)

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    def _m_auth_test(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://keyturn.slack.com/",
            "team": "keyturn",
            "user": "keyturn",
            "team_id": TEAM["id"],
            "user_id": self.bot_user,
            "bot_id": "BKEYTURN",
        }

    def _m_chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = args.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        message = Message(
            channel,
            self._next_ts(),
            args.get("text", ""),
            _json_arg(args.get("blocks")) or [],
            self.bot_user,
            args.get("thread_ts"),
            _json_arg(args.get("metadata")),
        )
        self.messages.setdefault(channel, []).append(message)
        return {"ok": True, "channel": channel, "ts": message.ts, "message": message.as_json()}

    def _m_chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            message = self.message(args["channel"], args["ts"])
        except KeyError:
            return {"ok": False, "error": "message_not_found"}
        message.text = args.get("text", message.text)
        if "blocks" in args:
            message.blocks = _json_arg(args["blocks"]) or []
        return {
            "ok": True,
            "channel": message.channel,
            "ts": message.ts,
            "message": message.as_json(),
        }

    def _m_chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("channel") or not args.get("user"):
            return {"ok": False, "error": "channel_not_found"}
        ts = self._ephemeral(
            args["channel"], args["user"], args.get("text", ""), args.get("blocks")
        )
        return {"ok": True, "message_ts": ts}

    def _ephemeral(self, channel: str, user: str, text: str, blocks: Any) -> str:
        ts = self._next_ts()
        self.ephemerals.append(
            {
                "channel": channel,
                "user": user,
                "ts": ts,
                "text": text,
                "blocks": _json_arg(blocks),
            }
        )
        return ts

    def _m_conversations_open(self, args: dict[str, Any]) -> dict[str, Any]:
        users = str(args.get("users", ""))
        return {"ok": True, "channel": {"id": "D" + users.replace(",", "")}}

    def _m_conversations_history(self, args: dict[str, Any]) -> dict[str, Any]:
        found = [m.as_json() for m in reversed(self.channel(args.get("channel", "")))]
        return {"ok": True, "messages": found[: int(args.get("limit", 100))], "has_more": False}

    def _m_users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = self.users.get(args.get("user", ""))
        return {"ok": True, "user": user} if user else {"ok": False, "error": "user_not_found"}

    def _m_usergroups_users_list(self, args: dict[str, Any]) -> dict[str, Any]:
        members = self.usergroups.get(args.get("usergroup", ""))
        if members is None:
            return {"ok": False, "error": "no_such_subteam"}
        return {"ok": True, "users": members}

    def _m_views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        origin = self._triggers.pop(str(args.get("trigger_id", "")), None)
        if origin is None:  # Slack: a trigger_id from an interaction, used once
            return {"ok": False, "error": "invalid_trigger_id"}
        view = dict(_json_arg(args.get("view")) or {})
        view["id"] = f"V{next(self._ids):08d}"
        self.views[view["id"]] = view
        self.modals.setdefault(origin.user, []).append(view["id"])
        return {"ok": True, "view": view}

    def _m_views_update(self, args: dict[str, Any]) -> dict[str, Any]:
        view_id = args.get("view_id", "")
        if view_id not in self.views:
            return {"ok": False, "error": "not_found"}
        self.views[view_id] = dict(_json_arg(args.get("view")) or {}, id=view_id)
        return {"ok": True, "view": self.views[view_id]}

    def _m_views_publish(self, args: dict[str, Any]) -> dict[str, Any]:
        user = str(args.get("user_id", ""))
        if user not in self.users:
            return {"ok": False, "error": "user_not_found"}
        view = dict(_json_arg(args.get("view")) or {}, id=f"VHOME{user}")
        self.home[user] = view
        return {"ok": True, "view": view}

    def open_modal(self, user: str) -> str | None:
        """The id of the modal ``user`` sees on top, if any."""
        stack = self.modals.get(user)
        return stack[-1] if stack else None

    def close_modal(self, view_id: str, user: str) -> None:
        stack = self.modals.get(user, [])
        if view_id in stack:
            del stack[stack.index(view_id) :]
            self.version += 1

    async def _respond(self, request: web.Request) -> web.Response:
        """A message sent to a ``response_url``: ephemeral to the user who acted (the
        default), in the channel, or replacing or deleting the message they clicked."""
        origin = self._response_urls.get(request.match_info["ident"])
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        if origin is None or not isinstance(body, dict):
            return web.json_response({"ok": False, "error": "invalid_response_url"}, status=404)
        self.responses.append(body)
        channel = origin.channel or ""
        if body.get("delete_original") and origin.ts:
            self.messages[channel] = [
                m for m in self.messages.get(channel, []) if m.ts != origin.ts
            ]
        elif body.get("replace_original") and origin.ts:
            self._m_chat_update(
                {"channel": channel, "ts": origin.ts, "text": body.get("text", "")}
                | ({"blocks": body["blocks"]} if "blocks" in body else {})
            )
        elif body.get("response_type") == "in_channel":
            self._m_chat_postMessage(
                {"channel": channel, "text": body.get("text", ""), "blocks": body.get("blocks")}
            )
        else:
            self._ephemeral(channel, origin.user, body.get("text", ""), body.get("blocks"))
        self.version += 1
        return web.json_response({"ok": True})

    # ------------------------------------------------------------------ Socket Mode

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_json(
            {
                "type": "hello",
                "num_connections": len(self._sockets),
                "connection_info": {"app_id": "AKEYTURN"},
            }
        )
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    ack = json.loads(message.data)
                    future = self._acks.pop(ack.get("envelope_id", ""), None)
                    if future is not None and not future.done():
                        future.set_result(ack)
        finally:
            self._sockets.remove(ws)
        return ws

    @property
    def socket_connected(self) -> bool:
        return bool(self._sockets)

    async def _over_socket(self, kind: str, payload: dict[str, Any]) -> tuple[int, str]:
        """Send an envelope to the connected app and wait for its ack, as Slack does."""
        envelope_id = f"env-{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[envelope_id] = future
        await self._sockets[-1].send_json(
            {
                "envelope_id": envelope_id,
                "type": kind,
                "payload": payload,
                "accepts_response_payload": True,
            }
        )
        async with asyncio.timeout(10):
            ack = await future
        return 200, json.dumps(ack.get("payload") or {})

    # ------------------------------------------------------------------ interactivity

    def signed_headers(self, body: str, timestamp: int | None = None) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = SignatureVerifier(self.signing_secret).generate_signature(
            timestamp=ts, body=body
        )
        return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature or ""}

    async def deliver(
        self,
        body: str,
        content_type: str,
        *,
        timestamp: int | None = None,
        signature: str | None = None,
    ) -> tuple[int, str]:
        """POST ``body`` to the bot as Slack would; returns (status, response text)."""
        assert self.bot_url, "set emulator.bot_url to the bot's /slack/events"
        headers = self.signed_headers(body, timestamp) | {"Content-Type": content_type}
        if signature is not None:
            headers["X-Slack-Signature"] = signature
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.bot_url, data=body.encode(), headers=headers) as resp,
        ):
            return resp.status, await resp.text()

    def _user(self, user: str) -> dict[str, Any]:
        return {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM["id"]}

    def _trigger(self, origin: Origin) -> str:
        trigger_id = f"trigger-{next(self._ids)}"
        self._triggers[trigger_id] = origin
        return trigger_id

    def _response_url(self, origin: Origin) -> str:
        ident = str(next(self._ids))
        self._response_urls[ident] = origin
        return f"{self.url}/respond/{ident}"

    async def _interact(self, payload: dict[str, Any]) -> tuple[int, str]:
        if self.bot_url is None and self._sockets:
            return await self._over_socket("interactive", payload)
        body = "payload=" + urllib.parse.quote(json.dumps(payload))
        return await self.deliver(body, "application/x-www-form-urlencoded")

    def block_actions(self, channel: str, ts: str, action_id: str, user: str) -> str:
        """The signed-form body of a button click (for tests that tamper with it)."""
        payload = self._block_actions(channel, ts, action_id, user)
        return "payload=" + urllib.parse.quote(json.dumps(payload))

    def _block_actions(self, channel: str, ts: str, action_id: str, user: str) -> dict[str, Any]:
        message = self.message(channel, ts)
        origin = Origin(user, channel, ts)
        return {
            "type": "block_actions",
            "user": self._user(user),
            "api_app_id": "AKEYTURN",
            "token": "verification-token-unused",
            "container": {
                "type": "message",
                "message_ts": ts,
                "channel_id": channel,
                "is_ephemeral": False,
            },
            "trigger_id": self._trigger(origin),
            "team": TEAM,
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": channel, "name": channel},
            "message": message.as_json(),
            "response_url": self._response_url(origin),
            "actions": [_action(message.blocks, action_id)],
        }

    async def click(self, channel: str, ts: str, action_id: str, user: str) -> tuple[int, str]:
        return await self._interact(self._block_actions(channel, ts, action_id, user))

    async def click_view(self, view_id: str, action_id: str, user: str) -> tuple[int, str]:
        """A button in a modal or an App Home (``view_id``) clicked by ``user``."""
        view = self.views.get(view_id) or next(
            (v for v in self.home.values() if v.get("id") == view_id), None
        )
        if view is None:
            raise KeyError(f"no view {view_id}")
        payload = {
            "type": "block_actions",
            "user": self._user(user),
            "api_app_id": "AKEYTURN",
            "token": "verification-token-unused",
            "container": {"type": "view", "view_id": view_id},
            "trigger_id": self._trigger(Origin(user)),
            "team": TEAM,
            "enterprise": None,
            "is_enterprise_install": False,
            "view": view,
            "actions": [_action(view.get("blocks", []), action_id)],
        }
        return await self._interact(payload)

    async def submit(self, view_id: str, user: str, values: dict[str, str]) -> tuple[int, str]:
        """Submit an open modal with ``{block_id: value}`` for its inputs (a select's value is
        the option's ``value``). As in Slack, the modal closes unless the app answers with
        ``response_action`` errors, update or push."""
        view = self.views[view_id]
        state = {
            block["block_id"]: {
                block["element"]["action_id"]: _input_state(
                    block["element"], values.get(block["block_id"])
                )
            }
            for block in view.get("blocks", [])
            if block.get("type") == "input"
        }
        payload = {
            "type": "view_submission",
            "team": TEAM,
            "user": self._user(user),
            "api_app_id": "AKEYTURN",
            "token": "verification-token-unused",
            "trigger_id": self._trigger(Origin(user)),
            "view": dict(view, state={"values": state}, team_id=TEAM["id"]),
            "is_enterprise_install": False,
            "enterprise": None,
        }
        status, text = await self._interact(payload)
        answer = _json_arg(text) if text else None
        action: dict[str, Any] = answer if isinstance(answer, dict) else {}
        kind = action.get("response_action")
        if status == 200 and kind == "update" and isinstance(action.get("view"), dict):
            self.views[view_id] = dict(action["view"], id=view_id)
            self.version += 1
        elif status == 200 and kind not in ("errors", "push"):
            self.close_modal(view_id, user)
        return status, text

    async def command(self, text: str, user: str, channel: str = "CGENERAL") -> tuple[int, str]:
        """``/keyturn text`` typed by ``user`` in ``channel``; what the app acks with is shown
        to that user alone, as Slack shows it."""
        origin = Origin(user, channel)
        form = {
            "token": "verification-token-unused",
            "team_id": TEAM["id"],
            "team_domain": TEAM["domain"],
            "channel_id": channel,
            "channel_name": channel,
            "user_id": user,
            "user_name": user.lower(),
            "command": "/keyturn",
            "text": text,
            "api_app_id": "AKEYTURN",
            "response_url": self._response_url(origin),
            "trigger_id": self._trigger(origin),
        }
        if self.bot_url is None and self._sockets:
            status, body = await self._over_socket("slash_commands", form)
        else:
            status, body = await self.deliver(
                urllib.parse.urlencode(form), "application/x-www-form-urlencoded"
            )
        ack = _json_arg(body) if body else None
        if status == 200 and isinstance(ack, dict) and (ack.get("text") or ack.get("blocks")):
            self._ephemeral(channel, user, ack.get("text", ""), ack.get("blocks"))
            self.version += 1
        elif status == 200 and body and not isinstance(ack, dict):
            self._ephemeral(channel, user, body, None)
            self.version += 1
        return status, body


async def _args(request: web.Request) -> dict[str, Any]:
    """Arguments as the SDK sends them: query string, form or JSON body (merged)."""
    args: dict[str, Any] = dict(request.query)
    if request.method == "GET":
        return args
    if request.content_type == "application/json":
        with contextlib.suppress(json.JSONDecodeError):
            body = await request.json()
            if isinstance(body, dict):
                args.update(body)
        return args
    args.update(await request.post())
    return args


def _json_arg(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def _action(blocks: list[dict[str, Any]], action_id: str) -> dict[str, Any]:
    """The ``actions`` entry of a click on the button ``action_id`` among ``blocks``."""
    for block in blocks:
        elements = list(block.get("elements") or [])
        if isinstance(block.get("accessory"), dict):
            elements.append(block["accessory"])
        for element in elements:
            if isinstance(element, dict) and element.get("action_id") == action_id:
                return {
                    "action_id": action_id,
                    "block_id": block.get("block_id", ""),
                    "value": element.get("value", ""),
                    "type": element.get("type", "button"),
                    "action_ts": str(time.time()),
                }
    raise KeyError(f"no button {action_id!r} there")


def _input_state(element: dict[str, Any], value: str | None) -> dict[str, Any]:
    """An input's entry in ``view.state.values``, as Slack reports it."""
    kind = element.get("type", "plain_text_input")
    if kind == "static_select":
        options = element.get("options") or [
            o for group in element.get("option_groups", []) for o in group.get("options", [])
        ]
        chosen = next((o for o in options if o.get("value") == value), None)
        return {"type": kind, "selected_option": chosen}
    return {"type": kind, "value": value or None}
