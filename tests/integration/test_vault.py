"""Vault bootstrap, least-privilege policies and credentials against a real OpenBao + Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest
import pytest_asyncio

from keyturn.config.loading import parse_config
from keyturn.config.policy import Config
from keyturn.harness.openbao import OpenBaoDevServer
from keyturn.harness.ports import free_port
from keyturn.harness.pytest_plugin import PostgresServer
from keyturn.vault import (
    AppRoleLogin,
    Vault,
    VaultForbidden,
    VaultSealed,
    VaultUnauthenticated,
    VaultUnavailable,
    WrapTokenInvalid,
)
from keyturn.vault_setup import REVOKE_RISKY_FUNCTIONS, REVOKE_STATISTICS_VIEWS, bootstrap


@dataclass
class Bootstrapped:
    config: Config
    database: str
    gateway: Vault
    bot: Vault
    first_actions: list[str]
    second_actions: list[str]


def _policy(port: int, database: str) -> Config:
    return parse_config(
        {
            "targets": {
                "orders-db": {
                    "kind": "postgres",
                    "dsn": f"postgresql://127.0.0.1:{port}/{database}",
                    "vault": {"readonly_role": "orders-ro", "write_role": "orders-rw"},
                },
                "web-1": {
                    "kind": "ssh",
                    "host": "127.0.0.1",
                    "principal": "deploy",
                    "vault": {"ssh_role": "web-ops"},
                },
            }
        }
    )


@pytest.fixture(scope="module")
def fresh_openbao() -> Iterator[OpenBaoDevServer]:
    """A server of this module's own, so "first bootstrap" really is the first."""
    with OpenBaoDevServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def boot(
    fresh_openbao: OpenBaoDevServer, postgres_server: PostgresServer
) -> AsyncIterator[Bootstrapped]:
    openbao = fresh_openbao
    database = f"orders_{uuid.uuid4().hex[:8]}"
    await postgres_server.execute(f'CREATE DATABASE "{database}"')
    await postgres_server.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text); INSERT INTO orders VALUES (1, 'open')",
        database,
    )
    config = _policy(postgres_server.port, database)
    root = Vault(openbao.addr, token=openbao.root_token)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEYTURN_TARGET_ORDERS_DB_USERNAME", "postgres")
        mp.setenv("KEYTURN_TARGET_ORDERS_DB_PASSWORD", postgres_server.password)
        first = await bootstrap(root, config, issue_secret_ids=True)
    # second run: no admin login in the environment any more; it must keep what exists
    second = await bootstrap(root, config, issue_secret_ids=False)
    await root.close()
    clients = {}
    for role in ("keyturn-gateway", "keyturn-bot"):
        clients[role] = Vault(
            openbao.addr, approle=AppRoleLogin(first.role_ids[role], first.secret_ids[role])
        )
        await clients[role].login()
    yield Bootstrapped(
        config,
        database,
        clients["keyturn-gateway"],
        clients["keyturn-bot"],
        first.actions,
        second.actions,
    )
    for client in clients.values():
        await client.close()
    await postgres_server.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


async def _roles(server: PostgresServer) -> set[str]:
    conn = await asyncpg.connect(server.admin.url)
    try:
        return {r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles")}
    finally:
        await conn.close()


async def test_bootstrap_is_idempotent(boot: Bootstrapped) -> None:
    assert "enabled database at database/" in boot.first_actions
    assert "generated the SSH CA at ssh/config/ca" in boot.first_actions
    assert not [a for a in boot.second_actions if a.startswith(("enabled", "generated"))]
    assert "kept connection database/config/orders-db" in boot.second_actions


async def test_bootstrap_tells_the_dba_what_read_only_logins_could_still_do(
    boot: Bootstrapped, fresh_openbao: OpenBaoDevServer, postgres_server: PostgresServer
) -> None:
    root = Vault(fresh_openbao.addr, token=fresh_openbao.root_token)
    try:
        report = await bootstrap(root, boot.config)
        assert any(
            "may create temporary tables" in w and f'ON DATABASE "{boot.database}"' in w
            for w in report.warnings
        ), report.warnings
        assert any(
            "may read pg_catalog.pg_stats," in w and "REVOKE SELECT ON pg_catalog.pg_stats" in w
            for w in report.warnings
        ), report.warnings
        await postgres_server.execute(
            f'REVOKE TEMPORARY ON DATABASE "{boot.database}" FROM PUBLIC;'
            " REVOKE CREATE ON SCHEMA public FROM PUBLIC; "
            + REVOKE_RISKY_FUNCTIONS
            + REVOKE_STATISTICS_VIEWS,
            boot.database,
        )
        assert (await bootstrap(root, boot.config)).warnings == []
        await postgres_server.execute("CREATE EXTENSION IF NOT EXISTS dblink", boot.database)
        found = (await bootstrap(root, boot.config)).warnings
        assert found == [
            "target orders-db: the read-only role: extension dblink is installed: "
            "a read may reach beyond this database"
        ], found
    finally:
        await postgres_server.execute("DROP EXTENSION IF EXISTS dblink", boot.database)
        await postgres_server.execute(f'GRANT TEMPORARY ON DATABASE "{boot.database}" TO PUBLIC')
        await postgres_server.execute(
            "GRANT SELECT ON pg_catalog.pg_stats, pg_catalog.pg_stats_ext,"
            " pg_catalog.pg_stats_ext_exprs TO PUBLIC",
            boot.database,
        )
        await root.close()


async def test_gateway_readonly_credentials_log_in_and_die_with_the_lease(
    boot: Bootstrapped, postgres_server: PostgresServer
) -> None:
    lease = await boot.gateway.creds("database/creds/orders-ro")
    user, password = lease.data["username"], lease.data["password"]
    conn = await asyncpg.connect(postgres_server.dsn(boot.database, user, password).url)
    assert await conn.fetchval("SELECT status FROM orders WHERE id = 1") == "open"
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await conn.execute("UPDATE orders SET status = 'x'")
    assert user in await _roles(postgres_server)

    await boot.gateway.revoke_lease(lease.lease_id)  # the gateway ends its own read-only logins

    # the open session is terminated, not just the role dropped (the backend exits on the
    # signal pg_terminate_backend sent, a moment after the revocation returns)
    for _ in range(50):
        with contextlib.suppress(
            asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError,
            asyncpg.InternalClientError,  # the signal landed mid-query (seen in a CI run)
            ConnectionError,
        ):
            await conn.fetchval("SELECT 1")
        if conn.is_closed():
            break
        await asyncio.sleep(0.1)
    assert conn.is_closed()
    assert user not in await _roles(postgres_server)


async def test_bot_write_credentials_are_wrapped_and_unwrap_once(
    boot: Bootstrapped, postgres_server: PostgresServer
) -> None:
    wrapped = await boot.bot.wrapped_read("database/creds/orders-rw", timedelta(seconds=60))
    info = await boot.gateway.lookup_wrapping(wrapped.token)
    assert info["creation_path"] == "database/creds/orders-rw"
    secret = await boot.gateway.unwrap(wrapped.token)
    with pytest.raises(WrapTokenInvalid):
        await boot.gateway.unwrap(wrapped.token)  # single use
    conn = await asyncpg.connect(
        postgres_server.dsn(
            boot.database, secret["data"]["username"], secret["data"]["password"]
        ).url
    )
    try:
        assert await conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1") == "UPDATE 1"
    finally:
        await conn.close()
    assert secret["lease_id"] in await boot.bot.lease_ids("database/creds/orders-rw")
    await boot.bot.revoke_lease(secret["lease_id"])  # the bot may revoke its own role's leases
    assert secret["lease_id"] not in await boot.bot.lease_ids("database/creds/orders-rw")


async def test_bot_signs_ssh_keys_and_wraps(boot: Bootstrapped) -> None:
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    signed = await boot.bot.write(
        "ssh/sign/web-ops",
        {
            "public_key": key.export_public_key().decode(),
            "valid_principals": "deploy",
            "ttl": "60s",
            "cert_type": "user",
            "critical_options": {"force-command": "uptime"},
        },
    )
    assert signed is not None and signed["data"]["signed_key"].startswith("ssh-ed25519-cert")
    wrapped = await boot.bot.wrap(
        {"certificate": signed["data"]["signed_key"]}, timedelta(seconds=30)
    )
    assert wrapped.creation_path == "sys/wrapping/wrap"


GATEWAY_REFUSED = [
    ("read", "database/creds/orders-rw"),
    ("write", "ssh/sign/web-ops"),
    ("revoke", "database/creds/orders-rw/anything"),
    ("write", "sys/policies/acl/keyturn-gateway"),
    ("list", "sys/leases/lookup/database/creds/orders-ro"),
    ("read", "database/config/orders-db"),
]
BOT_REFUSED = [
    ("read", "database/creds/orders-ro"),
    ("revoke", "database/creds/orders-ro/anything"),
    ("list", "sys/leases/lookup/database/creds/orders-ro"),
    ("write", "sys/policies/acl/keyturn-bot"),
    ("write", "auth/approle/role/keyturn-bot/secret-id"),
    ("read", "database/config/orders-db"),
    ("write", "database/roles/orders-rw"),
]


async def _attempt(vault: Vault, op: str, path: str) -> None:
    if op == "read":
        await vault.read(path)
    elif op == "write":
        await vault.write(path, {"public_key": "x", "policy": "x"})
    elif op == "list":
        await vault.list_keys(path)
    else:
        await vault.revoke_lease(path)


@pytest.mark.parametrize(("op", "path"), GATEWAY_REFUSED)
async def test_gateway_policy_refuses(boot: Bootstrapped, op: str, path: str) -> None:
    with pytest.raises(VaultForbidden):
        await _attempt(boot.gateway, op, path)


@pytest.mark.parametrize(("op", "path"), BOT_REFUSED)
async def test_bot_policy_refuses(boot: Bootstrapped, op: str, path: str) -> None:
    with pytest.raises(VaultForbidden):
        await _attempt(boot.bot, op, path)


async def test_down_vault_is_a_clear_error() -> None:
    vault = Vault(f"http://127.0.0.1:{free_port()}", token="x", timeout=2)
    with pytest.raises(VaultUnavailable, match="not reachable"):
        await vault.health()
    await vault.close()


async def test_sealed_vault_is_a_clear_error() -> None:
    with OpenBaoDevServer() as server:
        server.seal()
        vault = Vault(server.addr, token=server.root_token)
        with pytest.raises(VaultSealed, match="sealed"):
            await vault.health()
        with pytest.raises(VaultSealed, match="sealed"):
            await vault.read("database/creds/anything")
        await vault.close()


async def test_bad_token_is_refused(openbao: OpenBaoDevServer) -> None:
    vault = Vault(openbao.addr, token="not-a-token")
    with pytest.raises(VaultForbidden):
        await vault.read("sys/mounts")
    await vault.close()
    bad_login = Vault(openbao.addr, approle=AppRoleLogin("nope", "nope"))
    with pytest.raises(VaultUnauthenticated) as info:
        await bad_login.login()
    assert "nope" not in str(info.value)
    await bad_login.close()


async def test_approle_token_is_kept_alive(
    boot: Bootstrapped, fresh_openbao: OpenBaoDevServer
) -> None:
    """A token with a 2 s TTL and 4 s max stays usable for 6 s: renewed, then re-logged in."""
    vault_root = Vault(fresh_openbao.addr, token=fresh_openbao.root_token)
    await vault_root.write(
        "auth/approle/role/short-lived",
        {"token_policies": ["keyturn-gateway"], "token_ttl": "2s", "token_max_ttl": "4s"},
    )
    role_id = (await vault_root.read("auth/approle/role/short-lived/role-id"))["data"]["role_id"]  # type: ignore[index]
    secret = (await vault_root.write("auth/approle/role/short-lived/secret-id"))["data"][
        "secret_id"
    ]  # type: ignore[index]
    vault = Vault(vault_root.addr, approle=AppRoleLogin(role_id, secret))
    await vault.login()
    first_token = vault.token
    await asyncio.sleep(6)
    assert await vault.read("auth/token/lookup-self") is not None
    assert vault.token != first_token  # past the max TTL it logged in again
    await vault.close()
    await vault_root.close()
