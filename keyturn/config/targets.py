"""Targets: the databases and hosts keyturn guards, and the Vault roles behind each."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    Field,
    field_validator,
)

from keyturn.config.durations import Duration
from keyturn.config.model import Model, Name, Subject
from keyturn.errors import ConfigError
from keyturn.store.dsn import parse_dsn


class PostgresVault(Model):
    readonly_role: Name
    write_role: Name
    max_ttl: Duration = timedelta(hours=1)
    schemas: list[Name] = ["public"]


class SshVault(Model):
    ssh_role: Name
    max_ttl: Duration = timedelta(hours=1)


class TargetBase(Model):
    subjects: list[Subject] | None = None
    approval_channel: str | None = None
    # shown to agents (GET /v1/targets, the CrewAI and MCP tools): what is there, in one line
    description: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[^\n]*$")


class PostgresTarget(TargetBase):
    kind: Literal["postgres"]
    dsn: str
    vault: PostgresVault

    @field_validator("dsn")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        try:
            dsn = parse_dsn(value, "dsn")
        except ConfigError as exc:
            raise ValueError(exc.message.removeprefix("dsn ")) from None
        parts = urlsplit(dsn.url)
        if parts.username or parts.password:
            raise ValueError(
                "must not carry a user or password: Vault issues credentials (vault-bootstrap "
                "reads the admin login from KEYTURN_TARGET_<NAME>_USERNAME/_PASSWORD)"
            )
        return value

    @property
    def host_port_db(self) -> tuple[str, int, str]:
        parts = urlsplit(parse_dsn(self.dsn).url)
        return parts.hostname or "", parts.port or 5432, parts.path.lstrip("/")

    def login(self, username: str, password: str) -> tuple[str, dict[str, object]]:
        """asyncpg ``connect`` arguments for this target with a Vault-issued login."""
        dsn = parse_dsn(self.dsn, "dsn")
        parts = urlsplit(dsn.url)
        netloc = f"{parts.hostname}:{parts.port or 5432}"
        return urlunsplit(parts._replace(netloc=netloc)), {
            **dsn.connect_args,
            "user": username,
            "password": password,
        }


class SshTarget(TargetBase):
    kind: Literal["ssh"]
    host: str = Field(min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    principal: Name
    vault: SshVault
    host_key: str | None = None  # the target's public host key (known_hosts line or key)
    host_ca: str | None = None  # or the CA that signs host keys
    source_address: str | None = None  # CIDR list baked into certificates

    @field_validator("principal")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value == "root":
            raise ValueError("root is not an allowed principal; use an unprivileged account")
        return value


Target = Annotated[PostgresTarget | SshTarget, Field(discriminator="kind")]
