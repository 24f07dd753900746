from __future__ import annotations

import pytest

from keyturn.errors import ConfigError
from keyturn.store.dsn import parse_dsn


def test_password_never_shows() -> None:
    dsn = parse_dsn("postgresql://app:s3cr3t-pw@db:5432/keyturn")
    assert "s3cr3t-pw" not in str(dsn) and "s3cr3t-pw" not in repr(dsn)
    assert dsn.redacted == "postgresql://app:***@db:5432/keyturn"
    assert dsn.sqlalchemy_url.startswith("postgresql+asyncpg://app:s3cr3t-pw@")
    assert dsn.with_database("other").database == "other"


def test_sslmode_moves_into_connect_args() -> None:
    dsn = parse_dsn("postgres://app:pw@db/keyturn?sslmode=require&application_name=x")
    assert dsn.connect_args == {"ssl": "require"}
    assert "sslmode" not in dsn.url and "application_name=x" in dsn.url
    assert parse_dsn("postgresql://db/k?sslmode=verify-full").connect_args["ssl"].check_hostname


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("mysql://db/x", "must start with postgresql://"),
        ("postgresql:///x", "has no host"),
        ("postgresql://db", "names no database"),
        ("postgresql://db:notaport/x", "not a valid URL"),
        ("postgresql://db/x?sslmode=sometimes", "sslmode must be one of"),
        ("", "must start with postgresql://"),
    ],
)
def test_bad_dsns(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_dsn(raw)
