"""``keyturn vault-bootstrap``: engines, roles, policies and AppRoles, applied idempotently.

Run it as often as you like: mounts and the SSH CA are created only when missing, roles and
policies are rewritten to match the config, and a database connection is (re)written only when
its admin login is in the environment — so the admin password is needed once, on the first run.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from keyturn import checkpoint
from keyturn.config.policy import Config
from keyturn.config.targets import PostgresTarget
from keyturn.errors import ConfigError, KeyturnError, NotFound
from keyturn.settings import target_admin_credentials, target_env_name
from keyturn.store.dsn import parse_dsn
from keyturn.vault import Vault, VaultRequestError

POLICY_DIR = Path(
    os.environ.get("KEYTURN_VAULT_POLICIES", Path(__file__).parents[1] / "vault_policies")
)
GATEWAY_POLICY = "keyturn-gateway"
READONLY_LEASE_TTL = timedelta(minutes=15)  # the gateway renews and replaces its pool leases
BOT_POLICY = "keyturn-bot"

_PLACEHOLDER = re.compile(r"<([a-z_]+)>")

# Revoking a lease alone leaves the role's open sessions alive: end them, then drop the role.
# Whatever the login created (a table, a large object, default privileges) makes DROP ROLE
# fail, and Vault runs these in one transaction: a failure would roll NOLOGIN back and leave
# the login working. So its objects pass to the login Vault uses (nothing made during an
# incident is lost) and its privileges are dropped, where that login may (a superuser or,
# before Postgres 16, CREATEROLE); and a role that still cannot be dropped stays, NOLOGIN,
# with a warning in the target's log. The DO blocks are kept whole by Vault ($$).
REVOCATION = [
    'ALTER ROLE "{{name}}" NOLOGIN;',
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE usename = '{{name}}' AND pid <> pg_backend_pid();",
    "DO $$ BEGIN"
    " EXECUTE format('REASSIGN OWNED BY %I TO CURRENT_USER', '{{name}}');"
    " EXECUTE format('DROP OWNED BY %I', '{{name}}');"
    " EXCEPTION WHEN insufficient_privilege THEN"
    " RAISE WARNING 'keyturn: cannot take over what % owns', '{{name}}';"
    " END $$;",
    "DO $$ BEGIN"
    " EXECUTE format('DROP ROLE IF EXISTS %I', '{{name}}');"
    " EXCEPTION WHEN dependent_objects_still_exist THEN"
    " RAISE WARNING 'keyturn: % keeps objects; it stays, unable to log in', '{{name}}';"
    " END $$;",
]


def render_policy(text: str, values: dict[str, list[str]]) -> str:
    """Fill ``<name>`` placeholders; a block naming a list placeholder repeats once per value.

    Blocks are separated by blank lines. A block whose list is empty is dropped, so a policy
    never grants a path for a role that does not exist.
    """
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        names = set(_PLACEHOLDER.findall(block))
        unknown = names - values.keys()
        if unknown:
            raise ConfigError(f"policy template names unknown placeholders: {sorted(unknown)}")
        multi = sorted(n for n in names if len(values[n]) != 1)
        if len(multi) > 1:
            raise ConfigError(f"a policy block may repeat over one list only, not {multi}")
        variants = values[multi[0]] if multi else [""]
        for variant in variants:
            rendered = block
            for name in names:
                value = variant if multi and name == multi[0] else values[name][0]
                rendered = rendered.replace(f"<{name}>", value)
            out.append(rendered)
    return "\n\n".join(out) + "\n"


def policy_values(config: Config) -> dict[str, list[str]]:
    pg = config.policy.postgres_targets().values()
    ssh = config.policy.ssh_targets().values()
    http = config.policy.http_targets().values()
    return {
        "database_mount": [config.vault.database_mount],
        "ssh_mount": [config.vault.ssh_mount],
        "transit_mount": [config.vault.transit_mount],
        "kv_mount": [config.vault.kv_mount],
        "readonly_role": sorted({t.vault.readonly_role for t in pg}),
        "write_role": sorted({t.vault.write_role for t in pg}),
        "ssh_role": sorted({t.vault.ssh_role for t in ssh}),
        "http_secret": sorted({t.vault.kv_data_path for t in http if t.vault.kv}),
        "identity_role": sorted({t.vault.identity_token for t in http if t.vault.identity_token}),
    }


def rendered_policies(config: Config, policy_dir: Path = POLICY_DIR) -> dict[str, str]:
    values = policy_values(config)
    try:
        return {
            GATEWAY_POLICY: render_policy((policy_dir / "gateway.hcl").read_text(), values),
            BOT_POLICY: render_policy((policy_dir / "bot.hcl").read_text(), values),
        }
    except FileNotFoundError as exc:
        raise ConfigError(
            f"Vault policy file missing: {exc.filename} (set KEYTURN_VAULT_POLICIES to the folder)"
        ) from None


def role_statements(target: PostgresTarget, write: bool) -> tuple[list[str], list[str]]:
    """Creation and revocation SQL for a target's read-only or write role."""
    _, _, database = target.host_port_db
    schemas = target.vault.schemas
    create = [
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
        "VALID UNTIL '{{expiration}}' NOINHERIT;",
        f'GRANT CONNECT ON DATABASE "{database}" TO "{{{{name}}}}";',
    ]
    for schema in schemas:
        tables = "SELECT, INSERT, UPDATE, DELETE" if write else "SELECT"
        create += [
            f'GRANT USAGE ON SCHEMA "{schema}" TO "{{{{name}}}}";',
            f'GRANT {tables} ON ALL TABLES IN SCHEMA "{schema}" TO "{{{{name}}}}";',
        ]
        if write:
            create.append(
                f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{{{{name}}}}";'
            )
    if not write:
        create.append('ALTER ROLE "{{name}}" SET default_transaction_read_only = on;')
    return create, list(REVOCATION)


@dataclass
class BootstrapReport:
    actions: list[str] = field(default_factory=list)
    role_ids: dict[str, str] = field(default_factory=dict)
    secret_ids: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def did(self, what: str) -> None:
        self.actions.append(what)


# Built-in roles that would let a read-only login see or touch other sessions or the server.
RISKY_MEMBERSHIPS = (
    "pg_read_all_stats",
    "pg_signal_backend",
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_write_all_data",
    "pg_monitor",
)
# Extensions through which a read reaches other servers or files.
RISKY_EXTENSIONS = ("dblink", "postgres_fdw", "file_fdw", "adminpack")
# Built-in functions PUBLIC may call that act beyond a read-only transaction: a WAL message
# that survives the rollback, transaction ids used up.
RISKY_FUNCTIONS = ("pg_logical_emit_message", "txid_current", "pg_current_xact_id")
# What a DBA runs on a target to take them away from PUBLIC (every overload of this version).
REVOKE_RISKY_FUNCTIONS = """
DO $$ DECLARE f regprocedure; BEGIN
  FOR f IN SELECT oid::regprocedure FROM pg_proc
           WHERE proname IN ('pg_logical_emit_message', 'txid_current', 'pg_current_xact_id')
  LOOP EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f); END LOOP;
END $$;
"""
# Views that copy the values of every table a role may read (most common values, histograms),
# past any masking: keyturn holds reads of them (keyturn.classify.readonly), and a DBA can take
# them from PUBLIC for good (the planner reads pg_statistic itself, not these views).
STATISTICS_VIEWS = ("pg_stats", "pg_stats_ext", "pg_stats_ext_exprs")
REVOKE_STATISTICS_VIEWS = f"""
DO $$ DECLARE v regclass; BEGIN
  FOR v IN SELECT oid::regclass FROM pg_class WHERE relnamespace = 'pg_catalog'::regnamespace
           AND relname IN ({", ".join(f"'{name}'" for name in STATISTICS_VIEWS)})
  LOOP EXECUTE format('REVOKE SELECT ON %s FROM PUBLIC', v); END LOOP;
END $$;
"""


async def readonly_findings(
    conn: asyncpg.Connection, database: str, schemas: list[str]
) -> list[str]:
    """What a DBA should tighten for a read-only login: it is already held to read-only
    transactions, but each of these is a door that should not exist at all."""
    found = []
    if await conn.fetchval("SELECT has_database_privilege(current_database(), 'TEMPORARY')"):
        found.append(
            f'it may create temporary tables: REVOKE TEMPORARY ON DATABASE "{database}" FROM '
            "PUBLIC (grant it back to the roles that need it)"
        )
    for schema in schemas:
        if await conn.fetchval("SELECT has_schema_privilege($1, 'CREATE')", schema):
            found.append(f'it may create objects: REVOKE CREATE ON SCHEMA "{schema}" FROM PUBLIC')
    for role in RISKY_MEMBERSHIPS:
        if await conn.fetchval("SELECT pg_has_role($1, 'USAGE')", role):
            found.append(f"it is a member of {role}: revoke that membership")
    extensions = await conn.fetch(
        "SELECT extname FROM pg_extension WHERE extname = ANY($1::text[])", list(RISKY_EXTENSIONS)
    )
    for row in extensions:
        found.append(f"extension {row[0]} is installed: a read may reach beyond this database")
    callable_ = await conn.fetch(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.proname = ANY($1::text[])"
        " AND has_function_privilege(p.oid, 'EXECUTE') ORDER BY 1",
        list(RISKY_FUNCTIONS),
    )
    for row in callable_:
        found.append(f"it may call {row[0]}: REVOKE EXECUTE ON FUNCTION {row[0]} FROM PUBLIC")
    readable = await conn.fetch(
        "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relname = ANY($1::text[])"
        " AND c.relnamespace = 'pg_catalog'::regnamespace"
        " AND has_table_privilege(c.oid, 'SELECT') ORDER BY 1",
        list(STATISTICS_VIEWS),
    )
    if readable:
        views = ", ".join(f"pg_catalog.{row[0]}" for row in readable)
        found.append(
            f"it may read {views}, which show column values of every table it may read "
            f"(keyturn holds such reads): REVOKE SELECT ON {views} FROM PUBLIC"
        )
    return found


async def _check_readonly(vault: Vault, config: Config, report: BootstrapReport) -> None:
    """Log in once as each target's read-only role and report what the DBA should tighten."""
    mount = config.vault.database_mount
    for name, target in config.policy.postgres_targets().items():
        try:
            lease = await vault.creds(f"{mount}/creds/{target.vault.readonly_role}")
        except KeyturnError as exc:
            report.warnings.append(f"target {name}: could not check its read-only role: {exc}")
            continue
        try:
            url, kwargs = target.login(lease.data["username"], lease.data["password"])
            conn = await asyncpg.connect(url, timeout=10, **kwargs)
            try:
                _, _, database = target.host_port_db
                findings = await readonly_findings(conn, database, target.vault.schemas)
            finally:
                await conn.close()
            report.warnings += [f"target {name}: the read-only role: {f}" for f in findings]
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            report.warnings.append(f"target {name}: could not check its read-only role: {exc}")
        finally:
            with contextlib.suppress(KeyturnError):  # it expires with its TTL anyway
                await vault.revoke_lease(lease.lease_id)


async def _ensure_mount(
    vault: Vault,
    report: BootstrapReport,
    kind: str,
    path: str,
    auth: bool,
    options: dict[str, str] | None = None,
) -> None:
    listing = await vault.read("sys/auth" if auth else "sys/mounts") or {}
    mounts = listing.get("data", listing)
    existing = mounts.get(f"{path}/")
    if existing is None:
        body: dict[str, object] = {"type": kind} | ({"options": options} if options else {})
        await vault.write(f"sys/{'auth' if auth else 'mounts'}/{path}", body)
        report.did(f"enabled {kind} at {path}/")
    elif existing.get("type") != kind:
        raise ConfigError(f"Vault path {path}/ is a {existing.get('type')} mount, not {kind}")
    elif options and any((existing.get("options") or {}).get(k) != v for k, v in options.items()):
        raise ConfigError(f"Vault path {path}/ is a {kind} mount without options {options}")


async def _audit_anchor(vault: Vault, config: Config, report: BootstrapReport) -> None:
    """The transit key that HMACs audit checkpoints, and the KV v2 mount that keeps them."""
    transit = config.vault.transit_mount
    await _ensure_mount(vault, report, "transit", transit, auth=False)
    if await vault.read(f"{transit}/keys/{checkpoint.KEY}") is None:
        await vault.write(f"{transit}/keys/{checkpoint.KEY}", {"exportable": False})
        report.did(f"created the transit key {transit}/keys/{checkpoint.KEY}")
    await _ensure_mount(vault, report, "kv", config.vault.kv_mount, False, {"version": "2"})


def _connection_url(target: PostgresTarget) -> str:
    parts = urlsplit(parse_dsn(target.dsn).url)
    netloc = "{{username}}:{{password}}@" + parts.netloc
    return urlunsplit(parts._replace(netloc=netloc))


async def _database(vault: Vault, config: Config, report: BootstrapReport) -> None:
    mount = config.vault.database_mount
    await _ensure_mount(vault, report, "database", mount, auth=False)
    for name, target in config.policy.postgres_targets().items():
        config_path = f"{mount}/config/{name}"
        admin = target_admin_credentials(name)
        if admin is not None:
            user, password = admin
            await vault.write(
                config_path,
                {
                    "plugin_name": "postgresql-database-plugin",
                    "connection_url": _connection_url(target),
                    "username": user,
                    "password": password,
                    "allowed_roles": [target.vault.readonly_role, target.vault.write_role],
                    "verify_connection": True,
                    "password_authentication": "scram-sha-256",
                },
            )
            report.did(f"configured connection {config_path}")
        elif await vault.read(config_path) is None:
            raise ConfigError(
                f"target {name}: Vault has no connection yet; set "
                f"{target_env_name(name, 'username')} and {target_env_name(name, 'password')} "
                "(an admin login that may create roles) for the first bootstrap"
            )
        else:
            report.did(f"kept connection {config_path}")
        for role, write in ((target.vault.readonly_role, False), (target.vault.write_role, True)):
            create, revoke = role_statements(target, write)
            ttl = config.policy.default_grant_ttl if write else READONLY_LEASE_TTL
            ttl = min(ttl, target.vault.max_ttl)
            await vault.write(
                f"{mount}/roles/{role}",
                {
                    "db_name": name,
                    "creation_statements": create,
                    "revocation_statements": revoke,
                    "default_ttl": int(ttl.total_seconds()),
                    "max_ttl": int(target.vault.max_ttl.total_seconds()),
                },
            )
            report.did(f"wrote role {mount}/roles/{role}")


async def _ssh(vault: Vault, config: Config, report: BootstrapReport) -> None:
    targets = config.policy.ssh_targets()
    if not targets:
        return
    mount = config.vault.ssh_mount
    await _ensure_mount(vault, report, "ssh", mount, auth=False)
    try:
        has_ca = bool(
            (await vault.read(f"{mount}/config/ca") or {}).get("data", {}).get("public_key")
        )
    except (VaultRequestError, NotFound):
        has_ca = False
    if not has_ca:
        await vault.write(
            f"{mount}/config/ca", {"generate_signing_key": True, "key_type": "ed25519"}
        )
        report.did(f"generated the SSH CA at {mount}/config/ca")
    roles: dict[str, list[str]] = {}
    max_ttls: dict[str, int] = {}
    for target in targets.values():
        roles.setdefault(target.vault.ssh_role, []).append(target.principal)
        max_ttls[target.vault.ssh_role] = max(
            max_ttls.get(target.vault.ssh_role, 0), int(target.vault.max_ttl.total_seconds())
        )
    for role, principals in roles.items():
        await vault.write(
            f"{mount}/roles/{role}",
            {
                "key_type": "ca",
                "allow_user_certificates": True,
                "allowed_users": ",".join(sorted(set(principals))),
                "default_user": sorted(principals)[0],
                "allowed_critical_options": "force-command,source-address",
                "allowed_extensions": "permit-pty",
                "default_extensions": {},
                "ttl": int(config.policy.default_grant_ttl.total_seconds()),
                "max_ttl": max_ttls[role],
            },
        )
        report.did(f"wrote SSH role {mount}/roles/{role}")


OIDC_KEY = "keyturn"  # the signing key of every HTTP target's identity-token role


async def _identity_tokens(vault: Vault, config: Config, report: BootstrapReport) -> None:
    """The OIDC roles HTTP targets mint identity tokens with; an API checks them against
    Vault's ``/v1/identity/oidc/.well-known/keys``."""
    roles = sorted(
        {
            t.vault.identity_token
            for t in config.policy.http_targets().values()
            if t.vault.identity_token
        }
    )
    if not roles:
        return
    await vault.write(
        f"identity/oidc/key/{OIDC_KEY}",
        {"allowed_client_ids": "*", "rotation_period": "24h", "verification_ttl": "24h"},
    )
    for role in roles:
        await vault.write(f"identity/oidc/role/{role}", {"key": OIDC_KEY, "ttl": "5m"})
        report.did(f"wrote identity token role identity/oidc/role/{role}")


async def _approles(
    vault: Vault, config: Config, report: BootstrapReport, issue_secret_ids: bool
) -> None:
    mount = config.vault.approle_mount
    await _ensure_mount(vault, report, "approle", mount, auth=True)
    for role, acl in (
        (config.vault.gateway_approle, GATEWAY_POLICY),
        (config.vault.bot_approle, BOT_POLICY),
    ):
        await vault.write(
            f"auth/{mount}/role/{role}",
            {
                "token_policies": [acl],
                "token_ttl": "1h",
                "token_max_ttl": "24h",
                "secret_id_ttl": "0",
                "token_type": "service",
            },
        )
        role_id = ((await vault.read(f"auth/{mount}/role/{role}/role-id")) or {})["data"]["role_id"]
        report.role_ids[role] = role_id
        report.did(f"wrote AppRole {role}")
        if issue_secret_ids:
            secret = await vault.write(f"auth/{mount}/role/{role}/secret-id")
            report.secret_ids[role] = (secret or {})["data"]["secret_id"]


async def bootstrap(
    vault: Vault, config: Config, *, issue_secret_ids: bool = False, policy_dir: Path = POLICY_DIR
) -> BootstrapReport:
    report = BootstrapReport()
    await vault.health()
    policies = rendered_policies(config, policy_dir)
    if config.policy.postgres_targets():
        await _database(vault, config, report)
        await _check_readonly(vault, config, report)
    await _ssh(vault, config, report)
    await _identity_tokens(vault, config, report)
    await _audit_anchor(vault, config, report)
    for name, text in policies.items():
        await vault.write(f"sys/policies/acl/{name}", {"policy": text})
        report.did(f"wrote policy {name}")
    await _approles(vault, config, report, issue_secret_ids)
    return report
