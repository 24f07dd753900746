"""Composition root of a bot process: Bolt app, Slack client, store, listener, one Bot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.anchoring import anchor_forever
from bot.app import register
from bot.credentials import Issuer
from bot.service import Bot
from keyturn.aio import cancel, drain
from keyturn.checkpoint import Anchor
from keyturn.clock import Clock
from keyturn.errors import ConfigError
from keyturn.policy import Config
from keyturn.settings import Settings
from keyturn.store.db import Store
from keyturn.store.listener import Listener
from keyturn.vault import Vault, process_vault

BOT_KEY = web.AppKey("bot", Bot)
DRAIN_SECONDS = 10.0  # what a click or a decision still in flight gets to finish at shutdown
BOLT_KEY = web.AppKey("bolt", AsyncApp)


# slack_sdk logs every request body at DEBUG, and a DM may carry a person's wrapping token
# or certificate: the client logs through this logger, which never goes below INFO.
SLACK_API_LOG = logging.getLogger("keyturn.slack_api")
SLACK_API_LOG.setLevel(logging.INFO)


def slack_client(token: str, base_url: str | None = None) -> AsyncWebClient:
    """Retries connection errors, 429s (honouring Retry-After) and 5xx, with backoff."""
    return AsyncWebClient(
        token=token,
        base_url=base_url or AsyncWebClient.BASE_URL,
        timeout=10,
        logger=SLACK_API_LOG,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=3),
            AsyncRateLimitErrorRetryHandler(max_retry_count=5),
            AsyncServerErrorRetryHandler(max_retry_count=3),
        ],
    )


def build(
    config: Config,
    store: Store,
    client: AsyncWebClient,
    signing_secret: str | None,
    vault: Vault,
) -> tuple[Bot, AsyncApp]:
    """HTTP mode with a signing secret; without one, Socket Mode (Slack signs nothing there)."""
    if signing_secret is None:
        app = AsyncApp(client=client, request_verification_enabled=False)
    else:
        app = AsyncApp(client=client, signing_secret=signing_secret)
    bot = Bot(
        config=config,
        store=store,
        listener=Listener(store.dsn),
        client=client,
        issuer=Issuer(config, vault),
    )
    register(app, bot)
    return bot, app


async def _lifecycle(web_app: web.Application) -> AsyncIterator[None]:
    bot = web_app[BOT_KEY]
    await bot.listener.start()
    runner = asyncio.create_task(bot.run_forever(), name="keyturn-bot")
    anchor = Anchor.of(bot.issuer.vault, bot.config.vault)
    every = bot.config.bot.audit_checkpoint.total_seconds()
    anchoring = asyncio.create_task(anchor_forever(bot.store, anchor, every), name="keyturn-anchor")
    yield
    await drain(bot.tasks, DRAIN_SECONDS)
    await cancel(anchoring)
    await cancel(runner)
    await bot.listener.stop()
    await bot.issuer.vault.close()
    await bot.store.close()


def web_application(bot: Bot, bolt: AsyncApp, *, http_mode: bool = True) -> web.Application:
    """Bolt's one POST route (HTTP mode) mounted in our own app, next to /healthz."""

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await bolt.async_dispatch(await to_bolt_request(request)))

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app[BOT_KEY], app[BOLT_KEY] = bot, bolt
    if http_mode:
        app.router.add_post("/slack/events", events)
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def serve(settings: Settings, config: Config) -> None:
    """HTTP mode (KEYTURN_SLACK_SIGNING_SECRET) or Socket Mode (KEYTURN_SLACK_APP_TOKEN)."""
    if settings.slack_bot_token is None:
        raise ConfigError("the bot needs KEYTURN_SLACK_BOT_TOKEN (xoxb-…)")
    app_token = settings.slack_app_token.get_secret_value() if settings.slack_app_token else None
    secret = settings.slack_signing_secret
    if app_token is None and secret is None:
        raise ConfigError(
            "set KEYTURN_SLACK_SIGNING_SECRET (HTTP mode) or KEYTURN_SLACK_APP_TOKEN (Socket Mode)"
        )
    vault = process_vault(settings, config, "bot")
    client = slack_client(settings.slack_bot_token.get_secret_value(), settings.slack_api_url)
    store = Store(settings.dsn(), clock=Clock())
    signing = None if app_token else secret.get_secret_value()  # type: ignore[union-attr]
    bot, bolt = build(config, store, client, signing, vault)
    await store.ping()
    runner = web.AppRunner(web_application(bot, bolt, http_mode=app_token is None), access_log=None)
    await runner.setup()
    host, _, port = config.bot.listen.rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()
    socket = None
    if app_token is not None:
        socket = AsyncSocketModeHandler(bolt, app_token, web_client=client)
        await socket.connect_async()  # type: ignore[no-untyped-call]
        print("keyturn bot connected to Slack in Socket Mode", flush=True)
    else:
        print(f"keyturn bot listening on http://{config.bot.listen}/slack/events", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        if socket is not None:
            await socket.close_async()  # type: ignore[no-untyped-call]
        await runner.cleanup()
