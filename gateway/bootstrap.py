"""Composition root of a gateway process: build everything from Settings + Config, once.

Nothing connects here; :func:`lifecycle` (aiohttp ``cleanup_ctx``) starts the listener, the
journal and the poller and stops them in reverse. Tests call :func:`build` with their own
store and Vault.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.approved import Executor
from gateway.auth import Authenticator
from gateway.catalogs import Catalogs
from gateway.http import GATEWAY_KEY, create_app
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.readonly import ReadOnlyLogins
from gateway.service import Gateway
from keyturn.aio import cancel
from keyturn.clock import Clock
from keyturn.policy import Config
from keyturn.settings import Settings
from keyturn.store.db import Store
from keyturn.store.listener import Listener
from keyturn.vault import Vault, process_vault


def gateway_vault(settings: Settings, config: Config) -> Vault | None:
    return process_vault(settings, config, "gateway") if config.policy.targets else None


def build(
    config: Config,
    store: Store,
    vault: Vault | None,
    *,
    dev_secret: str | None = None,
    public_url: str | None = None,
) -> Gateway:
    metrics = Metrics()
    readers = None
    if vault is not None:
        readers = ReadOnlyLogins(
            vault,
            config.policy.postgres_targets(),
            config.vault.database_mount,
            config.gateway,
            metrics,
        )
    cfg = config.gateway
    gw = Gateway(
        config=config,
        store=store,
        listener=Listener(store.dsn),
        journal=Journal(store),
        auth=Authenticator(cfg.auth, dev_secret),
        readers=readers,
        public_url=(public_url or cfg.public_url or f"http://{cfg.listen}").rstrip("/"),
        metrics=metrics,
    )
    if vault is not None:
        gw.executor = Executor(config, store, vault, gw.listener, gw.masker, gw.metrics)
    if readers is not None:
        gw.catalogs = Catalogs(readers, cfg.catalog_refresh.total_seconds())
    return gw


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY_KEY]
    await gw.listener.start()
    gw.journal.start()
    poller = asyncio.create_task(gw.poll_forever(), name="keyturn-gateway-poller")
    executor = reaper = None
    if gw.executor is not None:
        executor = asyncio.create_task(gw.executor.run_forever(), name="keyturn-executor")
    if gw.readers is not None:
        reaper = asyncio.create_task(gw.readers.reap_forever(), name="keyturn-ro-reaper")
    yield
    await cancel(executor)
    await cancel(reaper)
    await cancel(poller)
    if gw.readers is not None:
        await gw.readers.close()
    await gw.journal.stop()
    await gw.listener.stop()
    for vault in gw.vaults():
        await vault.close()
    await gw.store.close()


async def drain(app: web.Application) -> None:
    app[GATEWAY_KEY].drain()


def application(gw: Gateway) -> web.Application:
    app = create_app(gw)
    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)  # runs after the listening socket closed, before handlers end
    return app


async def serve(settings: Settings, config: Config) -> None:
    secret = settings.gateway_dev_secret
    dsn = settings.dsn()
    vault = gateway_vault(settings, config)
    store = Store(dsn, clock=Clock())  # connects lazily: configuration errors come first
    gw = build(config, store, vault, dev_secret=secret.get_secret_value() if secret else None)
    await store.ping()  # then fail fast, with one clear line, when Postgres is not there
    runner = web.AppRunner(application(gw), access_log=None)
    await runner.setup()
    host, _, port = config.gateway.listen.rpartition(":")
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    print(f"keyturn gateway listening on http://{config.gateway.listen}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
