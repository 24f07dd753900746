"""How each process runs: the gateway, the bot, their Vault and Slack settings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    field_validator,
    model_validator,
)

from keyturn.config.durations import Duration
from keyturn.config.model import Model, Name
from keyturn.config.rules import People


class VaultConfig(Model):
    addr: str | None = None  # KEYTURN_VAULT_ADDR overrides
    database_mount: Name = "database"
    ssh_mount: Name = "ssh"
    approle_mount: Name = "approle"
    gateway_approle: Name = "keyturn-gateway"
    bot_approle: Name = "keyturn-bot"
    wrap_ttl: Duration = timedelta(seconds=60)  # a gateway takes its hand-off at once
    # a person reads a DM, then unwraps (``session_wrap_ttl``, its earlier name, still works)
    access_wrap_ttl: Duration = Field(
        default=timedelta(minutes=10),
        validation_alias=AliasChoices("access_wrap_ttl", "session_wrap_ttl"),
    )
    public_addr: str | None = None  # how people reach Vault to unwrap; default: addr
    transit_mount: Name = "transit"  # its key HMACs audit checkpoints (keyturn.checkpoint)
    kv_mount: Name = "secret"  # KV v2: where audit checkpoints are kept
    audit_anchor: Name = "default"  # this deployment's checkpoint: keyturn/audit/<name>


Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256"
]


class GatewayAuth(Model):
    """How agents' JWTs are verified. HS256 only with KEYTURN_GATEWAY_DEV_SECRET (development)."""

    jwks_url: str | None = None
    public_key_file: Path | None = None
    algorithms: list[Algorithm] = ["RS256", "ES256", "EdDSA"]
    audience: str = "keyturn"
    issuer: str | None = None
    groups_claim: str = "groups"
    leeway_seconds: int = Field(default=30, ge=0, le=300)

    @model_validator(mode="after")
    def _one_key_source(self) -> GatewayAuth:
        if self.jwks_url and self.public_key_file:
            raise ValueError("set jwks_url or public_key_file, not both")
        return self


class GatewayConfig(Model):
    listen: str = "127.0.0.1:8080"
    public_url: str | None = None  # how agents reach us (for wait_url); default from listen
    auth: GatewayAuth = GatewayAuth()
    # the deadline of one SQL command, all its statements together (enforced by the gateway)
    statement_timeout: Duration = timedelta(seconds=5)
    ssh_timeout: Duration = timedelta(seconds=60)  # an approved shell command, end to end
    row_limit: int = Field(default=1000, ge=1, le=100_000)
    value_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024 * 1024)
    response_bytes: int = Field(default=1024 * 1024, ge=4096, le=256 * 1024 * 1024)
    max_statements: int = Field(default=20, ge=1, le=1000)  # per allowed command
    rate_per_second: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=40, ge=1)
    # held requests of one agent waiting for a human at once: each posts a card (and a long
    # command a thread of them), so an agent cannot bury everyone's approvals in its own
    max_pending_per_agent: int = Field(default=20, ge=1, le=10_000)
    max_wait: Duration = timedelta(seconds=60)
    poll_interval: Duration = timedelta(seconds=5)
    # the allowed path: one read-only login (Vault lease + pool) per agent identity and target
    readonly_pool_size: int = Field(default=2, ge=1, le=50)  # connections per login
    readonly_logins: int = Field(default=50, ge=1, le=10_000)  # open logins, LRU closed first
    readonly_idle: Duration = timedelta(minutes=5)  # a login unused this long is closed
    agent_concurrency: int = Field(default=8, ge=1, le=1000)  # allowed commands in flight
    catalog_refresh: Duration = timedelta(minutes=10)  # re-read a target's function catalog
    # the Postgres protocol's front door (docs/gateway.md): off unless postgres_listen is set
    postgres_listen: str | None = None  # HOST:PORT, e.g. 0.0.0.0:6432
    postgres_tls_cert: Path | None = None  # PEM chain clients verify (TLS is required)
    postgres_tls_key: Path | None = None
    postgres_connections_per_agent: int = Field(default=20, ge=1, le=10_000)
    postgres_max_connections: int = Field(default=1000, ge=1, le=100_000)  # all clients
    postgres_notice_interval: Duration = timedelta(seconds=10)  # "still held" keep-alives
    postgres_max_message_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)

    @field_validator("listen", "postgres_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:8080")
        return value

    @model_validator(mode="after")
    def _postgres_tls(self) -> GatewayConfig:
        if self.postgres_listen and not (self.postgres_tls_cert and self.postgres_tls_key):
            raise ValueError(
                "postgres_listen needs postgres_tls_cert and postgres_tls_key: "
                "Postgres clients connect over TLS only"
            )
        return self


class SlackConfig(Model):
    approval_channel: str | None = None  # channel id (C…) for targets without their own
    approvers: People | None = None  # for requests no rule with approvers matched


class RecordConfig(Model):
    """What keyturn keeps of each agent run (docs/runs.md)."""

    # an agent that gives no run_id starts a new run after this long without a command
    run_gap: Duration = timedelta(minutes=15)
    # masked: the output as the agent saw it (capped); tags: its shape (columns, counts, exit
    # status) without values; none: only its size and sha256
    outputs: Literal["none", "tags", "masked"] = "masked"
    output_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)  # kept a step
    retention: Duration = timedelta(days=90)  # outputs older are deleted; their hashes stay
    purge_every: Duration = timedelta(hours=1)  # how often the bot deletes them

    @field_validator("run_gap", "retention")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than zero")
        return value


class BotConfig(Model):
    listen: str = "127.0.0.1:3000"
    poll_interval: Duration = timedelta(seconds=3)
    card_claim_timeout: Duration = timedelta(seconds=60)
    usergroup_cache: Duration = timedelta(seconds=60)
    sweep_interval: Duration = timedelta(seconds=15)  # revocation's guarantee behind the jobs
    orphan_grace: Duration = timedelta(seconds=60)  # unknown this long -> an orphan lease
    # a run whose gateway died mid-way fails this long after its credentials ended (a gateway
    # still alive has recorded its outcome by then)
    stranded_after: Duration = timedelta(minutes=5)
    issue_timeout: Duration = timedelta(minutes=15)  # keep retrying Vault this long, then fail
    audit_checkpoint: Duration = timedelta(minutes=1)  # anchor the audit chain in Vault this often
