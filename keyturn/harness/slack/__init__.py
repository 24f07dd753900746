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

from aiohttp import web

from keyturn.harness.sandbox import add_sandbox_routes
from keyturn.harness.slack.interactions import Interactivity
from keyturn.harness.slack.webapi import WebApi
from keyturn.harness.slack.workspace import TEAM, Call, Message, Origin

__all__ = ["TEAM", "Call", "Message", "Origin", "SlackEmulator"]


class SlackEmulator(WebApi, Interactivity):
    """The whole emulator on one local port: Web API, Socket Mode, interactivity, sandbox."""

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
