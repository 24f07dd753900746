"""The HCL sources render into least-privilege policies for exactly the configured roles."""

from __future__ import annotations

import pytest

from keyturn.config.loading import parse_config
from keyturn.errors import ConfigError
from keyturn.vault_setup import render_policy, rendered_policies, role_statements


def policy(**targets: object) -> object:
    return parse_config({"targets": targets})


PG = {
    "kind": "postgres",
    "dsn": "postgresql://db:5432/orders",
    "vault": {"readonly_role": "orders-ro", "write_role": "orders-rw"},
}


def test_blocks_repeat_per_role_and_vanish_without_roles() -> None:
    text = 'path "db/creds/<ro>" {\n  x\n}\n\npath "fixed/<mount>" {}\n\npath "<none>" {}\n'
    out = render_policy(text, {"ro": ["a", "b"], "mount": ["m"], "none": []})
    assert out.count('path "db/creds/') == 2 and '"db/creds/a"' in out and '"db/creds/b"' in out
    assert 'path "fixed/m"' in out
    assert "<none>" not in out and "<" not in out


def test_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown placeholders"):
        render_policy('path "<typo>" {}', {})


def test_gateway_and_bot_policies() -> None:
    rendered = rendered_policies(policy(**{"orders-db": PG}))  # type: ignore[arg-type]
    gateway, bot = rendered["keyturn-gateway"], rendered["keyturn-bot"]
    assert 'path "database/creds/orders-ro"' in gateway
    assert "orders-rw" not in gateway and "ssh/" not in gateway
    # it may end its own read-only logins, nothing else
    revokes = [
        line for line in gateway.splitlines() if line.startswith("path") and "revoke" in line
    ]
    assert revokes == ['path "sys/leases/revoke/database/creds/orders-ro/*" {'], revokes
    assert 'path "database/creds/orders-rw"' in bot
    assert "database/creds/orders-ro" not in bot
    assert 'path "sys/leases/revoke/database/creds/orders-rw/*"' in bot
    assert "ssh/sign" not in bot  # no SSH targets, no signing grant
    assert "<" not in gateway + bot


def test_revocation_ends_open_sessions_before_dropping_the_role() -> None:
    target = policy(**{"orders-db": PG}).policy.targets["orders-db"]  # type: ignore[attr-defined]
    create, revoke = role_statements(target, write=False)
    assert any("default_transaction_read_only" in s for s in create)
    joined = "\n".join(revoke)
    order = ["NOLOGIN", "pg_terminate_backend", "REASSIGN OWNED", "DROP OWNED", "DROP ROLE"]
    assert [joined.index(s) for s in order] == sorted(joined.index(s) for s in order)
    assert '"{{name}}"' in joined and "{{{{" not in joined
    write_create, _ = role_statements(target, write=True)
    assert any("INSERT, UPDATE, DELETE" in s for s in write_create)
