"""Targets: the databases, hosts and HTTP APIs keyturn guards, and the Vault roles behind each."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from keyturn.config.durations import Duration
from keyturn.config.model import Model, Name, Subject
from keyturn.errors import ConfigError
from keyturn.openapi import Spec
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


# A KV v2 path: <mount>/<path>, each part a plain name (no "..", no empty segment).
_KV_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$")
_FIELD = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")
# Headers an agent may never set and keyturn never injects into: framing, routing, cookies.
_NOT_INJECTABLE = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "cookie", "te", "upgrade"}
)


class HttpVault(Model):
    """Where an HTTP target's credential lives: a KV v2 secret's fields, injected by
    ``inject``, or a JWT minted per call by Vault's identity OIDC provider."""

    kv: str | None = None  # <mount>/<path> of a KV v2 secret
    identity_token: Name | None = None  # identity/oidc/token/<role>
    max_ttl: Duration = timedelta(hours=1)  # how long an approval may wait to be sent

    @field_validator("kv")
    @classmethod
    def _kv_path(cls, value: str | None) -> str | None:
        if value is not None and (not _KV_PATH.match(value) or ".." in value.split("/")):
            raise ValueError(f"{value!r} is not <mount>/<path> of a KV v2 secret")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> HttpVault:
        if self.kv and self.identity_token:
            raise ValueError("name kv or identity_token, not both")
        return self

    @property
    def kv_mount_path(self) -> tuple[str, str]:
        mount, _, path = (self.kv or "").partition("/")
        return mount, path

    @property
    def kv_data_path(self) -> str:
        """The path Vault's API reads the secret at (what a policy grants)."""
        mount, path = self.kv_mount_path
        return f"{mount}/data/{path}"


class Inject(Model):
    """The header a credential is sent in: ``value`` names the secret's fields as
    ``{{field}}`` (``{{token}}`` for an identity token)."""

    header: str = Field(default="Authorization", pattern=r"^[A-Za-z0-9-]{1,64}$")
    value: str = Field(default="Bearer {{token}}", min_length=1, max_length=500)

    @field_validator("header")
    @classmethod
    def _injectable(cls, value: str) -> str:
        if value.lower() in _NOT_INJECTABLE:
            raise ValueError(f"{value} cannot carry a credential")
        return value

    @field_validator("value")
    @classmethod
    def _names_a_field(cls, value: str) -> str:
        if not _FIELD.search(value):
            raise ValueError("must name the secret's field, e.g. 'Bearer {{token}}'")
        if any(ch in value for ch in "\r\n\x00"):
            raise ValueError("must be one line")
        return value

    def fields(self) -> list[str]:
        return _FIELD.findall(self.value)

    def render(self, secret: Mapping[str, object]) -> str:
        """The header's value; a field the secret lacks, or one that is not one line of
        text, is an error naming the field (never its value)."""

        def field(match: re.Match[str]) -> str:
            value = secret.get(match.group(1))
            if (
                not isinstance(value, str)
                or not value
                or not (value.isascii() and value.isprintable())
            ):
                raise ValueError(f"the secret has no one-line text field {match.group(1)!r}")
            return value

        return _FIELD.sub(field, self.value)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpTarget(TargetBase):
    kind: Literal["http"]
    base_url: str
    allow_plain_http: bool = False  # http:// to a host other than loopback
    ca_file: Path | None = None  # trust this CA (PEM) instead of the system's
    timeout: Duration = timedelta(seconds=30)  # connect to last byte of the response
    max_response_bytes: int = Field(default=1024 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_body_bytes: int = Field(default=64 * 1024, ge=1, le=1024 * 1024)  # what an agent sends
    openapi: Path | None = None  # 3.0/3.1, JSON or YAML: names operations, refuses the rest
    vault: HttpVault = HttpVault()
    inject: Inject = Inject()
    _spec: Spec | None = PrivateAttr(default=None)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"{value!r} must be an https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not carry a user or password: Vault holds the credential")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _plain_http(self) -> HttpTarget:
        host = urlsplit(self.base_url).hostname or ""
        if self.base_url.startswith("http:") and not (self.allow_plain_http or _loopback(host)):
            raise ValueError(
                f"base_url {self.base_url} is plain http to a host that is not loopback: "
                "use https, or set allow_plain_http: true"
            )
        if self.inject.fields() != ["token"] and self.vault.identity_token:
            raise ValueError("an identity token is sent as {{token}} in inject.value")
        return self

    @model_validator(mode="after")
    def _load_openapi(self, info: ValidationInfo) -> HttpTarget:
        """The OpenAPI file, read once with the policy (relative to the policy file)."""
        if self.openapi is not None:
            base = (info.context or {}).get("base_dir")
            path = (
                self.openapi if self.openapi.is_absolute() or base is None else base / self.openapi
            )
            try:
                self._spec = Spec.load(path)
            except ConfigError as exc:
                raise ValueError(f"the OpenAPI file {exc.message}") from None
        return self

    @property
    def spec(self) -> Spec | None:
        return self._spec

    @property
    def where_sent(self) -> str:
        """A digest of what decides where a call goes and with which credential: an
        approval names it, and a gateway whose policy now says otherwise does not send."""
        decides = {
            "base_url": self.base_url,
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "vault": [self.vault.kv, self.vault.identity_token],
            "inject": [self.inject.header, self.inject.value],
        }
        return hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()

    @property
    def credential_header(self) -> str | None:
        """The header keyturn adds the credential in, if the target has one."""
        has_one = self.vault.kv or self.vault.identity_token
        return self.inject.header if has_one else None


Target = Annotated[PostgresTarget | SshTarget | HttpTarget, Field(discriminator="kind")]
