"""Slack's side of interactivity: clicks, modal submissions and slash commands, signed as
Slack signs them (``v0=`` HMAC-SHA256 of ``v0:{timestamp}:{body}``) so Bolt's real request
verification runs, delivered over HTTP or Socket Mode; ``response_url`` and ``trigger_id``
remember who acted."""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any

import aiohttp
from slack_sdk.signature import SignatureVerifier

from keyturn.harness.slack.socket_mode import SocketMode
from keyturn.harness.slack.workspace import TEAM, Origin, json_arg


class Interactivity(SocketMode):
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
        answer = json_arg(text) if text else None
        action: dict[str, Any] = answer if isinstance(answer, dict) else {}
        kind = action.get("response_action")
        if status == 200 and kind == "update" and isinstance(action.get("view"), dict):
            self.views[view_id] = dict(action["view"], id=view_id)
            self.version += 1
        elif status == 200 and kind not in ("errors", "push"):
            self.close_modal(view_id, user)
        return status, text

    async def open_home(self, user: str) -> tuple[int, str]:
        """``user`` opened the app's Home tab: the ``app_home_opened`` event Slack sends."""
        payload = {
            "token": "verification-token-unused",
            "team_id": TEAM["id"],
            "api_app_id": "AKEYTURN",
            "type": "event_callback",
            "event_id": f"Ev{next(self._ids):010d}",
            "event_time": int(time.time()),
            "event": {
                "type": "app_home_opened",
                "user": user,
                "channel": f"D{user}",
                "tab": "home",
                "event_ts": f"{time.time():.6f}",
            },
        }
        if self.bot_url is None and self._sockets:
            return await self._over_socket("events_api", payload)
        if self.bot_url is None:
            return 503, "no app is connected to this workspace"
        return await self.deliver(json.dumps(payload), "application/json")

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
        ack = json_arg(body) if body else None
        if status == 200 and isinstance(ack, dict) and (ack.get("text") or ack.get("blocks")):
            self._ephemeral(channel, user, ack.get("text", ""), ack.get("blocks"))
            self.version += 1
        elif status == 200 and body and not isinstance(ack, dict):
            self._ephemeral(channel, user, body, None)
            self.version += 1
        return status, body


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
