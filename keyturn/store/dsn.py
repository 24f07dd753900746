"""Postgres connection strings: one validated form for SQLAlchemy and one for plain asyncpg."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from keyturn.errors import ConfigError

_SCHEMES = {"postgres", "postgresql", "postgresql+asyncpg"}
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


@dataclass(frozen=True)
class Dsn:
    """A parsed ``postgresql://`` URL. ``str()`` never shows the password."""

    url: str  # plain postgresql:// form, for asyncpg.connect
    connect_args: dict[str, Any]

    @property
    def sqlalchemy_url(self) -> str:
        return "postgresql+asyncpg://" + self.url.split("://", 1)[1]

    @property
    def redacted(self) -> str:
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def database(self) -> str:
        return urlsplit(self.url).path.lstrip("/")

    def with_database(self, name: str) -> Dsn:
        parts = urlsplit(self.url)
        return Dsn(urlunsplit(parts._replace(path="/" + name)), self.connect_args)

    def __str__(self) -> str:
        return self.redacted

    __repr__ = __str__


def parse_dsn(raw: str, what: str = "database URL") -> Dsn:
    """Validate ``raw`` and move libpq's ``sslmode`` into asyncpg's ``ssl`` argument."""
    raw = raw.strip()
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{what} is not a valid URL: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"{what} must start with postgresql:// (got {parts.scheme or 'no scheme'!r})"
        )
    if not parts.hostname:
        raise ConfigError(f"{what} has no host; expected postgresql://USER:PASSWORD@HOST:PORT/DB")
    if not parts.path.strip("/"):
        raise ConfigError(f"{what} names no database; add /DBNAME after the host")
    if port == 0:
        raise ConfigError(f"{what} has port 0")
    query = dict(parse_qsl(parts.query))
    connect_args: dict[str, Any] = {}
    sslmode = query.pop("sslmode", None)
    if sslmode is not None:
        if sslmode not in _SSLMODES:
            raise ConfigError(f"{what}: sslmode must be one of {', '.join(sorted(_SSLMODES))}")
        if sslmode in ("verify-ca", "verify-full"):
            context = ssl.create_default_context()
            context.check_hostname = sslmode == "verify-full"
            connect_args["ssl"] = context
        else:
            connect_args["ssl"] = sslmode
    url = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))
    return Dsn(url, connect_args)
