"""The Slack sandbox: the emulator's workspace as a person sees it, in a browser.

``GET /`` serves a static page (``page/``) that draws what one member of the workspace would
see in Slack: channels, their direct messages with the app, ephemerals meant for them, their
open modal and their App Home. It acts as one user at a time (a switcher picks who) and sends
clicks, modal submissions and ``/keyturn`` commands through the emulator, which signs them for
the bot as Slack does. The page polls ``/sandbox/state`` and redraws when ``version`` moves.

The JSON routes also drive the sandbox from scripts: ``GET /sandbox/messages`` (everything,
for every user), ``POST /sandbox/click {"ts"|"view_id", "action_id", "user"}``,
``POST /sandbox/submit {"view_id"?, "user", "values": {block_id: value}}``,
``POST /sandbox/close {"view_id", "user"}``, ``POST /sandbox/command {"text", "user"}`` and
``POST /sandbox/home {"user"}`` (they opened the App Home tab).
Dev only: it trusts whoever the page says it is, and listens on loopback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from aiohttp import web

if TYPE_CHECKING:
    from keyturn.harness.slack import SlackEmulator

PAGE = Path(__file__).parent / "page"
_EMULATOR: web.AppKey[SlackEmulator] = web.AppKey("emulator")


def add_sandbox_routes(app: web.Application, emulator: SlackEmulator) -> None:
    app[_EMULATOR] = emulator
    app.router.add_get("/", _page)
    app.router.add_static("/sandbox/page/", PAGE)
    app.router.add_get("/sandbox/messages", _messages)
    app.router.add_get("/sandbox/state", _state)
    app.router.add_post("/sandbox/click", _click)
    app.router.add_post("/sandbox/submit", _submit)
    app.router.add_post("/sandbox/close", _close)
    app.router.add_post("/sandbox/command", _command)
    app.router.add_post("/sandbox/home", _home)


def view_for(emulator: SlackEmulator, user: str) -> dict[str, Any]:
    """What ``user`` sees: public channels, their own DMs with the app, the ephemerals sent to
    them, their top modal and their App Home. Nothing meant for someone else."""
    ephemerals = [e for e in emulator.ephemerals if e.get("user") == user]
    # named channels show before anything is posted; so does one holding only ephemerals
    ids = set(emulator.messages) | set(emulator.channel_names) | {e["channel"] for e in ephemerals}
    conversations = [
        {
            "id": channel,
            "name": emulator.channel_names.get(channel, channel),
            "kind": "dm" if channel.startswith("D") else "channel",
            "messages": [m.as_json() for m in emulator.messages.get(channel, [])],
        }
        for channel in sorted(ids)
        if not channel.startswith("D") or channel == f"D{user}"
    ]
    modal = emulator.open_modal(user)
    return {
        "version": emulator.version,
        "me": user,
        "default_user": emulator.sandbox_user,
        "bot_user": emulator.bot_user,
        "users": [
            {
                "id": u["id"],
                "name": u["real_name"],
                "title": u.get("profile", {}).get("title", ""),
            }
            for u in emulator.users.values()
        ],
        "conversations": conversations,
        "ephemerals": ephemerals,
        "modal": emulator.views[modal] if modal else None,
        "home": emulator.home.get(user),
    }


async def _page(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE / "index.html")


async def _messages(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    return web.json_response(
        {
            "channels": {c: [m.as_json() for m in ms] for c, ms in emulator.messages.items()},
            "ephemerals": emulator.ephemerals,
            "views": emulator.views,
        }
    )


async def _state(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    user = request.query.get("user") or emulator.sandbox_user
    if request.query.get("since") == str(emulator.version):
        return web.json_response({"version": emulator.version, "unchanged": True})
    return web.json_response(view_for(emulator, user))


async def _body(request: web.Request, *keys: str) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad("expected a JSON object") from None
    if not isinstance(body, dict):
        raise _bad("expected a JSON object")
    missing = [k for k in keys if not isinstance(body.get(k), str) or not body[k]]
    if missing:
        raise _bad(f"missing {', '.join(missing)}")
    return body


def _bad(message: str, status: type[web.HTTPException] = web.HTTPBadRequest) -> web.HTTPException:
    return status(
        text=json.dumps({"error": {"code": "bad_request", "message": message}}),
        content_type="application/json",
    )


def _answer(status: int, text: str) -> web.Response:
    return web.json_response({"status": status, "response": text})


async def _click(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    body = await _body(request, "action_id", "user")
    try:
        if isinstance(body.get("view_id"), str):
            return _answer(
                *await emulator.click_view(body["view_id"], body["action_id"], body["user"])
            )
        if not isinstance(body.get("ts"), str):
            raise _bad("missing ts (a message's) or view_id")
        message = emulator.find(body["ts"])
        return _answer(
            *await emulator.click(message.channel, message.ts, body["action_id"], body["user"])
        )
    except KeyError as exc:
        raise _bad(str(exc.args[0]), web.HTTPNotFound) from None


async def _submit(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    body = await _body(request, "user")
    view_id = body.get("view_id") or emulator.open_modal(body["user"])
    if not isinstance(view_id, str) or view_id not in emulator.views:
        raise _bad("no open modal", web.HTTPNotFound)
    values = body.get("values") or {}
    if not isinstance(values, dict):
        raise _bad("values must be an object of block_id: value")
    return _answer(*await emulator.submit(view_id, body["user"], values))


async def _close(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    body = await _body(request, "view_id", "user")
    emulator.close_modal(body["view_id"], body["user"])
    return web.json_response({"ok": True})


async def _command(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    body = await _body(request, "user")
    if not isinstance(body.get("text"), str):  # empty is fine: a bare /keyturn
        raise _bad("missing text")
    channel = body.get("channel")
    where = channel if isinstance(channel, str) and channel else "CGENERAL"
    return _answer(*await emulator.command(body["text"], body["user"], where))


def find_card(sandbox_url: str, text: str, timeout: float = 30, poll: float = 0.05) -> str:
    """For scripts: the ts of the first card (a message with blocks) that shows ``text`` (a
    request id, or a piece of its command), once the bot has posted it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = httpx.get(f"{sandbox_url}/sandbox/messages", timeout=5).json()
        for messages in page["channels"].values():
            for message in messages:
                if text in json.dumps(message) and message.get("blocks"):
                    return str(message["ts"])
        time.sleep(poll)
    raise TimeoutError(f"no card shows {text!r} after {timeout:g} s")


async def _home(request: web.Request) -> web.Response:
    body = await _body(request, "user")
    return _answer(*await request.app[_EMULATOR].open_home(body["user"]))
