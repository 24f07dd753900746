"""Composition root of a bot process: Bolt app, Slack client, store, listener, one Bot."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.access.ask import Asking
from bot.access.deliver import Delivery
from bot.access.home import Home
from bot.access.news import News
from bot.anchoring import anchor_once
from bot.app import register
from bot.card_keeper import CardKeeper
from bot.credentials import Issuer
from bot.people import SLACK_ERRORS, Directory
from bot.revocation import Revoker
from bot.service import Bot
from bot.slack_identity import SlackIdentity
from keyturn.aio import drain
from keyturn.checkpoint import Anchor
from keyturn.clock import Clock
from keyturn.config.policy import Config
from keyturn.errors import ConfigError, Unavailable
from keyturn.settings import Settings
from keyturn.store import recordings
from keyturn.store.db import Store
from keyturn.store.listener import Listener
from keyturn.supervise import Loop, Supervisor
from keyturn.vault import Vault, process_vault

DRAIN_SECONDS = 10.0  # what a click or a decision still in flight gets to finish at shutdown
CARDS_RETRY = 5.0  # seconds between the cards' passes while Slack fails, at the most
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


@dataclass
class BotProcess:
    """One bot process, wired: the use cases, the Bolt app, the supervised loops."""

    bot: Bot
    bolt: AsyncApp
    supervisor: Supervisor
    registry: CollectorRegistry

    async def start(self) -> None:
        self.bot.revoker.start()
        self.supervisor.start()

    async def stop(self) -> None:
        await drain(self.bot.tasks, DRAIN_SECONDS)
        await self.supervisor.stop()
        self.bot.revoker.stop()
        await self.bot.listener.stop()
        await self.bot.issuer.vault.close()
        await self.bot.store.close()


PROCESS_KEY = web.AppKey("bot", BotProcess)


def build(
    config: Config,
    store: Store,
    client: AsyncWebClient,
    signing_secret: str | None,
    vault: Vault,
) -> BotProcess:
    """HTTP mode with a signing secret; without one, Socket Mode (Slack signs nothing there)."""
    authorize = SlackIdentity(client).authorizer()  # a click never waits on Slack's Web API
    if signing_secret is None:
        app = AsyncApp(client=client, request_verification_enabled=False, authorize=authorize)
    else:
        app = AsyncApp(client=client, signing_secret=signing_secret, authorize=authorize)
    issuer = Issuer(config, vault)
    directory = Directory(client, config.bot.usergroup_cache.total_seconds())
    revoker = Revoker(store, issuer, config.bot, AsyncIOScheduler(timezone=UTC))
    home = Home(config, store, client, directory)
    news = News(store, client, home)
    replica = f"bot-{uuid.uuid4().hex[:8]}"
    bot = Bot(
        config=config,
        store=store,
        listener=Listener(store.dsn),
        client=client,
        issuer=issuer,
        directory=directory,
        revoker=revoker,
        asking=Asking(config, store, directory),
        delivery=Delivery(config, store, client, issuer),
        home=home,
        news=news,
        cards=CardKeeper(config, store, client, home, news, replica),
    )
    register(app, bot)
    registry = CollectorRegistry()
    supervisor = Supervisor(registry, expected=(Unavailable, *SLACK_ERRORS))
    supervisor.watch("listener", bot.listener.start)
    cfg = config.bot
    poll = cfg.poll_interval.total_seconds()
    supervisor.add(Loop("bot", bot.sync, poll, wake=bot.wake))
    # Slack away: the cards' loop tries again every few seconds, not at a backoff of up to
    # 30 s, so cards catch up soon after Slack is back (and the loop above never waits)
    supervisor.add(
        Loop("cards", bot.sync_cards, poll, wake=bot.cards_wake, retry_cap=max(poll, CARDS_RETRY))
    )
    anchor = Anchor.of(vault, config.vault)
    supervisor.add(
        Loop(
            "audit-anchor", lambda: anchor_once(store, anchor), cfg.audit_checkpoint.total_seconds()
        )
    )
    record = config.record
    supervisor.add(
        Loop(
            "recording-retention",
            lambda: recordings.purge(store, record.retention),
            record.purge_every.total_seconds(),
        )
    )
    return BotProcess(bot, app, supervisor, registry)


async def _lifecycle(web_app: web.Application) -> AsyncIterator[None]:
    process = web_app[PROCESS_KEY]
    await process.start()
    yield
    await process.stop()


def web_application(process: BotProcess, *, http_mode: bool = True) -> web.Application:
    """Bolt's one POST route (HTTP mode) mounted in our own app, next to /healthz and
    /metrics."""

    async def events(request: web.Request) -> web.Response:
        dispatched = await process.bolt.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(dispatched)

    async def healthz(_request: web.Request) -> web.Response:
        """Alive unless a background loop is down (crashed, not recovered within its
        period): cards would not be posted, credentials not issued, grants not ended."""
        status, body = process.supervisor.health()
        return web.json_response(body, status=status)

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(process.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app[PROCESS_KEY] = process
    if http_mode:
        app.router.add_post("/slack/events", events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
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
    process = build(config, store, client, signing, vault)
    await store.ping()
    web_app = web_application(process, http_mode=app_token is None)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    socket = None
    try:  # from here on, a stop (SIGTERM) cleans up
        host, _, port = config.bot.listen.rpartition(":")
        await web.TCPSite(runner, host, int(port)).start()
        if app_token is not None:
            socket = AsyncSocketModeHandler(process.bolt, app_token, web_client=client)
            await socket.connect_async()  # type: ignore[no-untyped-call]
            print("keyturn bot connected to Slack in Socket Mode", flush=True)
        else:
            print(f"keyturn bot listening on http://{config.bot.listen}/slack/events", flush=True)
        await asyncio.Event().wait()
    finally:
        if socket is not None:
            await socket.close_async()  # type: ignore[no-untyped-call]
        await runner.cleanup()
