"""Slack's Web API, as the bot's ``AsyncWebClient(base_url=...)`` meets it: token checks,
injected faults and outages, and the methods keyturn calls, recorded with their arguments."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from keyturn.harness.slack.workspace import TEAM, Call, Message, Workspace, json_arg

# Web API methods that change what a person would see (the sandbox page redraws on them).
_VISIBLE = {
    "chat.postMessage",
    "chat.update",
    "chat.postEphemeral",
    "views.open",
    "views.update",
    "views.publish",
}

# Slack refuses a message of more than 50 blocks and a view (modal, App Home) of more than 100
_BLOCK_LIMITS = {
    "chat.postMessage": (50, "invalid_blocks"),
    "chat.update": (50, "invalid_blocks"),
    "chat.postEphemeral": (50, "invalid_blocks"),
    "views.open": (100, "invalid_arguments"),
    "views.update": (100, "invalid_arguments"),
    "views.publish": (100, "invalid_arguments"),
}


def _too_many_blocks(method: str, args: dict[str, Any]) -> str | None:
    """Slack's error when ``args`` holds more blocks than ``method`` takes."""
    limit, error = _BLOCK_LIMITS.get(method, (0, ""))
    if not limit:
        return None
    holder = json_arg(args.get("view")) if method.startswith("views.") else args
    blocks = json_arg((holder or {}).get("blocks")) if isinstance(holder, dict) else None
    return error if isinstance(blocks, list) and len(blocks) > limit else None


class WebApi(Workspace):
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
                self.faulted.append(Call(method, {"status": fault.status}))
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
        if refused := _too_many_blocks(method, args):
            return web.json_response({"ok": False, "error": refused})
        body: dict[str, Any] = handler(args)
        if body.get("ok"):
            if method in _VISIBLE:
                self.version += 1
            async with self._called:
                self.calls.append(Call(method, args))
                self._called.notify_all()
        return web.json_response(body)

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
            json_arg(args.get("blocks")) or [],
            self.bot_user,
            args.get("thread_ts"),
            json_arg(args.get("metadata")),
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
            message.blocks = json_arg(args["blocks"]) or []
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
        view = dict(json_arg(args.get("view")) or {})
        view["id"] = f"V{next(self._ids):08d}"
        self.views[view["id"]] = view
        self.modals.setdefault(origin.user, []).append(view["id"])
        return {"ok": True, "view": view}

    def _m_views_update(self, args: dict[str, Any]) -> dict[str, Any]:
        view_id = args.get("view_id", "")
        if view_id not in self.views:
            return {"ok": False, "error": "not_found"}
        self.views[view_id] = dict(json_arg(args.get("view")) or {}, id=view_id)
        return {"ok": True, "view": self.views[view_id]}

    def _m_views_publish(self, args: dict[str, Any]) -> dict[str, Any]:
        user = str(args.get("user_id", ""))
        if user not in self.users:
            return {"ok": False, "error": "user_not_found"}
        view = dict(json_arg(args.get("view")) or {}, id=f"VHOME{user}")
        self.home[user] = view
        return {"ok": True, "view": view}

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
