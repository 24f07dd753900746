"""Composition root of a gateway process: build everything from Settings + Config, once.

Edges, use cases and drivers meet only here: the bootstrap builds a driver per kind of
target, hands them to the use cases, and puts the HTTP edge in front. Nothing connects while
building; :func:`lifecycle` (aiohttp ``cleanup_ctx``) starts the listener, the journal and the
supervised loops (:mod:`keyturn.supervise`) and stops them in reverse. Tests call
:func:`build` with their own store and Vault.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from gateway.auth import Authenticator
from gateway.drivers.http.driver import HttpDriver
from gateway.drivers.postgres.catalogs import Catalogs
from gateway.drivers.postgres.driver import PostgresDriver
from gateway.drivers.postgres.logins import ReadOnlyLogins
from gateway.drivers.ssh import SshDriver
from gateway.edges.http import EDGE_KEY, Edge, create_app
from gateway.edges.pgwire.server import WireConfig, WireServer
from gateway.edges.pgwire.session import Settings as WireSettings
from gateway.journal import Journal
from gateway.judging import Turns
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.usecases.approved import Executor
from gateway.usecases.driver import Drivers
from gateway.usecases.gateway import Gateway, poll
from gateway.usecases.inflight import InFlight
from keyturn.clock import Clock
from keyturn.config.policy import Config
from keyturn.config.process import GatewayConfig
from keyturn.errors import ConfigError
from keyturn.masking import Masker
from keyturn.settings import Settings
from keyturn.store.db import Store
from keyturn.store.listener import Listener
from keyturn.supervise import Loop, Supervisor
from keyturn.vault import Vault, process_vault


def gateway_vault(settings: Settings, config: Config) -> Vault | None:
    return process_vault(settings, config, "gateway") if config.policy.targets else None


@dataclass
class GatewayProcess:
    """One gateway process, wired: the use cases, their drivers, the edge, the loops."""

    gw: Gateway
    edge: Edge
    executor: Executor | None  # runs approved commands (needs Vault)
    supervisor: Supervisor
    wire: WireServer | None = None  # the Postgres protocol's edge (gateway.postgres_listen)
    wire_port: int | None = field(init=False, default=None)  # where it listens, once started

    async def start(self) -> None:
        self.supervisor.start()
        listen = self.gw.config.gateway.postgres_listen
        if self.wire is not None and listen is not None:
            host, _, port = listen.rpartition(":")
            self.wire_port = await self.wire.start(host, int(port))

    async def stop(self) -> None:
        if self.wire is not None and self.wire_port is not None:
            await self.wire.stop()
        await self.supervisor.stop()
        if self.executor is not None:
            await self.executor.close()
        for driver in self.gw.drivers:
            await driver.close()
        await self.gw.journal.stop()
        await self.gw.listener.stop()
        for vault in self.gw.vaults:
            await vault.close()
        await self.gw.store.close()


def build(
    config: Config,
    store: Store,
    vault: Vault | None,
    *,
    dev_secret: str | None = None,
    public_url: str | None = None,
) -> GatewayProcess:
    cfg = config.gateway
    metrics = Metrics()
    masker = Masker.from_policy(config.policy.masking)
    listener = Listener(store.dsn)
    logins = catalogs = None
    if vault is not None:
        logins = ReadOnlyLogins(
            vault, config.policy.postgres_targets(), config.vault.database_mount, cfg, metrics
        )
        catalogs = Catalogs(logins, cfg.catalog_refresh.total_seconds())
    turns = Turns()
    postgres = PostgresDriver(config, masker, metrics, turns, logins, catalogs)
    ssh = SshDriver(config.policy.ssh_targets(), cfg.ssh_timeout, masker)
    http = HttpDriver(config.policy.http_targets(), vault, masker)
    kinds = {name: target.kind for name, target in config.policy.targets.items()}
    gw = Gateway(
        config=config,
        store=store,
        listener=listener,
        journal=Journal(store, run_gap=config.record.run_gap),
        drivers=Drivers(kinds, [postgres, ssh, http]),
        metrics=metrics,
        turns=turns,
        in_flight=InFlight(cfg.agent_concurrency, metrics),
        vaults=[vault] if vault is not None else [],
    )
    supervisor = Supervisor(metrics.registry)
    supervisor.watch("listener", listener.start)
    supervisor.watch("journal", gw.journal.start)
    period = cfg.poll_interval.total_seconds()
    supervisor.add(Loop("poller", lambda: poll(gw), period))
    executor = None
    if vault is not None:
        executor = Executor(config, store, vault, listener, gw.drivers, masker, metrics)
        supervisor.add(Loop("executor", executor.drain, period, wake=executor.wake))
    for driver in gw.drivers:
        for loop in driver.background():
            supervisor.add(loop)
    edge = Edge(
        gw,
        Authenticator(cfg.auth, dev_secret),
        RateLimiter(cfg.rate_per_second, cfg.rate_burst),
        supervisor.health,
        (public_url or cfg.public_url or f"http://{cfg.listen}").rstrip("/"),
    )
    wire = None
    if cfg.postgres_listen is not None:
        wire = WireServer(gw, edge.auth, edge.limiter, server_tls(cfg), wire_config(cfg, edge))
    return GatewayProcess(gw, edge, executor, supervisor, wire)


def server_tls(cfg: GatewayConfig) -> ssl.SSLContext:
    """The Postgres edge's TLS: the configured certificate, TLS 1.2 at least, ALPN
    ``postgresql`` (what libpq 17 sends, and what direct TLS requires)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["postgresql"])
    assert cfg.postgres_tls_cert is not None and cfg.postgres_tls_key is not None
    try:
        context.load_cert_chain(cfg.postgres_tls_cert, cfg.postgres_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"gateway.postgres_tls_cert/postgres_tls_key: {exc}") from None
    return context


def wire_config(cfg: GatewayConfig, edge: Edge) -> WireConfig:
    return WireConfig(
        max_connections=cfg.postgres_max_connections,
        per_agent=cfg.postgres_connections_per_agent,
        max_message=cfg.postgres_max_message_bytes,
        settings=WireSettings(cfg.postgres_notice_interval.total_seconds(), edge.public_url),
    )


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    process = app[PROCESS_KEY]
    await process.start()
    yield
    await process.stop()


async def drain(app: web.Application) -> None:
    app[EDGE_KEY].gw.drain()


PROCESS_KEY = web.AppKey("process", GatewayProcess)


def application(process: GatewayProcess) -> web.Application:
    app = create_app(process.edge)
    app[PROCESS_KEY] = process
    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)  # runs after the listening socket closed, before handlers end
    return app


async def serve(settings: Settings, config: Config) -> None:
    secret = settings.gateway_dev_secret
    dsn = settings.dsn()
    vault = gateway_vault(settings, config)
    store = Store(dsn, clock=Clock())  # connects lazily: configuration errors come first
    process = build(config, store, vault, dev_secret=secret.get_secret_value() if secret else None)
    await store.ping()  # then fail fast, with one clear line, when Postgres is not there
    runner = web.AppRunner(application(process), access_log=None)
    await runner.setup()
    try:  # from here on, a stop (SIGTERM) cleans up: the drivers' logins end
        host, _, port = config.gateway.listen.rpartition(":")
        await web.TCPSite(runner, host, int(port)).start()
        print(f"keyturn gateway listening on http://{config.gateway.listen}", flush=True)
        if process.wire_port is not None:
            host = config.gateway.postgres_listen.rpartition(":")[0]  # type: ignore[union-attr]
            print(f"  and for Postgres clients on {host}:{process.wire_port} (TLS)", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
