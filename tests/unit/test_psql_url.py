"""The connection string a person's ``keyturn unwrap`` prints."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from bot.credentials import psql_url
from keyturn.config.targets import PostgresTarget


def target(dsn: str) -> PostgresTarget:
    return PostgresTarget.model_validate(
        {"kind": "postgres", "dsn": dsn, "vault": {"readonly_role": "r", "write_role": "w"}}
    )


def test_it_keeps_the_targets_tls_requirements() -> None:
    """psql's default is sslmode=prefer: without the target's own sslmode, a person's
    session could be downgraded to plaintext by anyone on the path."""
    url = psql_url(target("postgresql://db.internal:5432/orders?sslmode=verify-full"), "v-1", "p")
    assert parse_qs(urlsplit(url).query) == {"sslmode": ["verify-full"]}
    assert url.startswith("postgresql://v-1:p@db.internal:5432/orders")


def test_the_login_is_quoted_and_the_port_filled_in() -> None:
    url = psql_url(target("postgresql://[::1]/orders"), "v-a b", "p@ss/w:rd")
    parts = urlsplit(url)
    assert (parts.hostname, parts.port, parts.password) == ("::1", 5432, "p%40ss%2Fw%3Ard")
