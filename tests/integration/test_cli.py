"""The ``keyturn`` command: bad input of every kind is one clear line and exit code 2."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import jwt
import pytest

from keyturn.harness.openbao import OpenBaoDevServer
from keyturn.harness.ports import free_port
from keyturn.harness.pytest_plugin import PostgresServer

EXAMPLE = Path(__file__).parents[2] / "examples" / "policy.yml"


SSH_ONLY = (
    "targets:\n  box: {kind: ssh, host: 127.0.0.1, principal: deploy, vault: {ssh_role: r}}\n"
)
# Processes log in to Vault lazily, on first use: an address and an AppRole are enough to start.
VAULT_ENV = {
    "KEYTURN_VAULT_ADDR": f"http://127.0.0.1:{free_port()}",
    "KEYTURN_GATEWAY_ROLE_ID": "role",
    "KEYTURN_GATEWAY_SECRET_ID": "secret",
    "KEYTURN_BOT_ROLE_ID": "role",
    "KEYTURN_BOT_SECRET_ID": "secret",
}
HS256_GATEWAY = SSH_ONLY + "gateway: {auth: {algorithms: [HS256]}}\n"


def keyturn(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KEYTURN_", "VAULT_"))}
    return subprocess.run(
        [sys.executable, "-m", "keyturn.cli", *args],
        capture_output=True,
        text=True,
        env=clean | env,
        check=False,
        timeout=120,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_check_config_accepts_a_valid_file() -> None:
    proc = keyturn("check-config", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    assert "ok (2 targets, 5 rules, 1 access rules, 5 tests)" in proc.stdout


def test_policy_tests_fail_naming_each_case(tmp_path: Path) -> None:
    config = tmp_path / "policy.yml"
    config.write_text(
        EXAMPLE.read_text()
        + "  - {target: orders-db, command: 'SELECT 1; DROP TABLE t', expect: allow}\n"
    )
    for args in (("policy", "test", str(config)), ("check-config", str(config))):
        proc = keyturn(*args)
        assert proc.returncode == 1, proc
        assert "tests[5] (allow 'SELECT 1; DROP TABLE t' on orders-db): got block by rule" in (
            proc.stderr
        )
    proc = keyturn("policy", "test", str(EXAMPLE))
    assert proc.returncode == 0 and "all 5 tests pass" in proc.stdout, proc


def test_check_config_lists_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "targets:\n  db: {kind: postgres, dsn: 'postgresql://u:pw@h/d', vault: {readonly_role: r}}\n"
        "rules:\n  - {name: a, match: {sql: [select]}, action: allow}\n"
        "  - {name: b, match: {sql: [select]}, action: allow}\n"
        "  - {name: c, match: {sql: [select]}, action: nope}\n"
    )
    proc = keyturn("check-config", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "rules[2].action: expected allow, hold or block" in lines
    assert "targets.db.vault.write_role: required" in lines
    assert any(line.startswith("targets.db.dsn: must not carry") for line in lines)
    assert lines[-1] == f"{bad}: 3 error(s)"
    assert "pw" not in proc.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["check-config", "/nonexistent.yml"], "no such file"),
        (["frobnicate"], "invalid choice"),
        (["audit"], "required"),
        (["vault-bootstrap"], "--config"),
        (["tag", "keyturn:not-a-tag"], "a tag is 16 hex characters"),
        (["tag", "0123456789abcdef0"], "a tag is 16 hex characters"),
    ],
)
def test_bad_arguments(args: list[str], fragment: str) -> None:
    one_line_error(keyturn(*args), fragment)


def test_migrate_without_a_database_url() -> None:
    one_line_error(keyturn("migrate"), "KEYTURN_DATABASE_URL is not set")


def test_migrate_with_a_bad_dsn() -> None:
    one_line_error(
        keyturn("migrate", KEYTURN_DATABASE_URL="mysql://u:pw@h/db"),
        "KEYTURN_DATABASE_URL must start with postgresql://",
    )


def test_postgres_not_reachable() -> None:
    url = f"postgresql://u:secret-pw@127.0.0.1:{free_port()}/keyturn"
    proc = keyturn("audit", "verify", "--unanchored", KEYTURN_DATABASE_URL=url)
    one_line_error(proc, "cannot connect to Postgres", "is Postgres running")
    assert "secret-pw" not in proc.stderr


def test_postgres_refuses_the_password(postgres_server: PostgresServer) -> None:
    url = f"postgresql://postgres:wrong-pw@127.0.0.1:{postgres_server.port}/postgres"
    proc = keyturn("migrate", KEYTURN_DATABASE_URL=url)
    one_line_error(proc, "refused the credentials")
    assert "wrong-pw" not in proc.stderr


def test_migrate_up_and_down(postgres_server: PostgresServer) -> None:
    name = f"cli_{uuid.uuid4().hex[:8]}"
    asyncio.run(postgres_server.execute(f'CREATE DATABASE "{name}"'))
    url = postgres_server.dsn(name).url
    try:
        up = keyturn("migrate", KEYTURN_DATABASE_URL=url)
        assert up.returncode == 0, up.stderr
        assert "***" in up.stdout and postgres_server.password not in up.stdout
        assert keyturn("audit", "verify", "--unanchored", KEYTURN_DATABASE_URL=url).returncode == 0
        nothing = keyturn("tag", "keyturn:0123456789abcdef", KEYTURN_DATABASE_URL=url)
        assert nothing.returncode == 1 and nothing.stdout == ""
        assert nothing.stderr == "keyturn: no request has the tag 0123456789abcdef\n"
        down = keyturn("migrate", "--down", "base", KEYTURN_DATABASE_URL=url)
        assert down.returncode == 0, down.stderr
    finally:
        asyncio.run(postgres_server.execute(f'DROP DATABASE "{name}" WITH (FORCE)'))


def test_vault_not_reachable() -> None:
    proc = keyturn(
        "vault-bootstrap",
        "--config",
        str(EXAMPLE),
        KEYTURN_VAULT_ADDR=f"http://127.0.0.1:{free_port()}",
        KEYTURN_VAULT_TOKEN="t",
    )
    one_line_error(proc, "not reachable")


def test_vault_without_a_token() -> None:
    proc = keyturn("vault-bootstrap", "--config", str(EXAMPLE), KEYTURN_VAULT_ADDR="http://x")
    one_line_error(proc, "KEYTURN_VAULT_TOKEN")


def test_vault_bootstrap_writes_secret_ids_privately(
    openbao: OpenBaoDevServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    config = tmp_path / "policy.yml"
    config.write_text(
        "targets:\n  ssh-only:\n    kind: ssh\n    host: 127.0.0.1\n    principal: deploy\n"
        "    vault: {ssh_role: cli-ops}\n"
    )
    out = tmp_path / "approle.env"
    proc = keyturn(
        "vault-bootstrap",
        "--config",
        str(config),
        "--secret-ids-out",
        str(out),
        KEYTURN_VAULT_ADDR=openbao.addr,
        KEYTURN_VAULT_TOKEN=openbao.root_token,
    )
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert set(env) == {
        "KEYTURN_GATEWAY_ROLE_ID",
        "KEYTURN_GATEWAY_SECRET_ID",
        "KEYTURN_BOT_ROLE_ID",
        "KEYTURN_BOT_SECRET_ID",
    }
    assert env["KEYTURN_BOT_SECRET_ID"] not in proc.stdout + proc.stderr
    assert openbao.root_token not in proc.stdout + proc.stderr


def test_dev_stack_runs_the_gateway(tmp_path: Path) -> None:
    proc = keyturn("dev", "--once", "--state-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "keyturn dev stack is up" in proc.stdout
    assert "smoke test: allowed SELECT -> executed" in proc.stdout
    assert "smoke test: held UPDATE -> pending" in proc.stdout
    assert "approved by U_APPROVER -> executed (['UPDATE 1'])" in proc.stdout
    assert "allowed uptime on web-demo -> executed (exit 0)" in proc.stdout  # sshd demo target
    assert "'***'" in proc.stdout  # the demo's email column is masked
    assert "password" not in proc.stdout.lower()
    assert not (tmp_path / "stack.json").exists()  # the stack is gone: so is its state


def test_token_from_a_stack_file(tmp_path: Path) -> None:
    state = tmp_path / "stack.json"
    state.write_text(json.dumps({"dev_secret": "s" * 32}))
    token = keyturn("token", "crew-x", "--state", str(state), "--group", "ops")
    assert token.returncode == 0, token.stderr
    claims = jwt.decode(token.stdout.strip(), "s" * 32, algorithms=["HS256"], audience="keyturn")
    assert claims["sub"] == "crew-x" and claims["groups"] == ["ops"]


def test_token_without_a_secret(tmp_path: Path) -> None:
    one_line_error(
        keyturn("token", "x", "--state", str(tmp_path / "none.json")), "KEYTURN_GATEWAY_DEV_SECRET"
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        (
            {"KEYTURN_GATEWAY_ROLE_ID": "r", "KEYTURN_GATEWAY_SECRET_ID": "s"},
            "gateway.auth needs jwks_url or public_key_file",
        ),
        ({}, "KEYTURN_GATEWAY_ROLE_ID"),
    ],
    ids=["no-key-source", "no-approle"],
)
def test_gateway_configuration_errors(env: dict[str, str], fragment: str) -> None:
    proc = keyturn(
        "gateway",
        "--config",
        str(EXAMPLE),
        KEYTURN_DATABASE_URL="postgresql://u:p@127.0.0.1:1/x",
        KEYTURN_VAULT_ADDR="http://v",
        **env,
    )
    one_line_error(proc, fragment)


def test_gateway_with_postgres_down(tmp_path: Path) -> None:
    config = tmp_path / "policy.yml"
    config.write_text(HS256_GATEWAY)
    proc = keyturn(
        "gateway",
        "--config",
        str(config),
        KEYTURN_GATEWAY_DEV_SECRET="x" * 32,
        KEYTURN_DATABASE_URL=f"postgresql://u:p@127.0.0.1:{free_port()}/x",
        **VAULT_ENV,
    )
    one_line_error(proc, "cannot connect to Postgres")


def test_gateway_needs_its_dev_secret_for_hs256(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    config = tmp_path / "policy.yml"
    config.write_text(HS256_GATEWAY)
    proc = keyturn(
        "gateway",
        "--config",
        str(config),
        KEYTURN_DATABASE_URL=postgres_server.dsn("postgres").url,
        **VAULT_ENV,
    )
    one_line_error(proc, "KEYTURN_GATEWAY_DEV_SECRET")


def test_bot_needs_its_approle(tmp_path: Path, postgres_server: PostgresServer) -> None:
    config = tmp_path / "policy.yml"
    config.write_text(SSH_ONLY + "vault: {addr: 'http://127.0.0.1:8200'}\n")
    proc = keyturn(
        "bot",
        "--config",
        str(config),
        KEYTURN_DATABASE_URL=postgres_server.dsn("postgres").url,
        KEYTURN_SLACK_BOT_TOKEN="xoxb-test",
        KEYTURN_SLACK_SIGNING_SECRET="s" * 32,
    )
    one_line_error(proc, "KEYTURN_BOT_ROLE_ID and KEYTURN_BOT_SECRET_ID")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("SELECT * FROM orders", {"action": "allow", "rule": "reads"}),
        ("SELECT 1; DROP TABLE orders", {"action": "block", "rule": "no-drop"}),
        ("UPDATE orders SET paid = true WHERE id = 1", {"action": "hold", "rule": "writes"}),
    ],
)
def test_classify_prints_one_json_line(command: str, expected: dict[str, str]) -> None:
    proc = keyturn("classify", "--config", str(EXAMPLE), "--target", "orders-db", command)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert {k: out[k] for k in expected} == expected
    assert out["reasons"]


def test_classify_unknown_target() -> None:
    one_line_error(
        keyturn("classify", "--config", str(EXAMPLE), "--target", "nope", "SELECT 1"),
        "unknown target 'nope'",
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "KEYTURN_SLACK_BOT_TOKEN"),
        ({"KEYTURN_SLACK_BOT_TOKEN": "xoxb-1"}, "KEYTURN_SLACK_SIGNING_SECRET"),
    ],
)
def test_bot_configuration_errors(env: dict[str, str], fragment: str) -> None:
    one_line_error(keyturn("bot", "--config", str(EXAMPLE), **env), fragment)


@pytest.mark.parametrize(
    ("command", "section", "env", "banner"),
    [
        (
            "gateway",
            "gateway: {{listen: '127.0.0.1:{port}', auth: {{algorithms: [HS256]}}}}",
            {"KEYTURN_GATEWAY_DEV_SECRET": "s" * 32},
            "listening on",
        ),
        (
            "bot",
            "bot: {{listen: '127.0.0.1:{port}'}}",
            {"KEYTURN_SLACK_BOT_TOKEN": "xoxb-test", "KEYTURN_SLACK_SIGNING_SECRET": "s" * 32},
            "/slack/events",
        ),
    ],
)
def test_processes_start_and_serve_health(
    postgres_server: PostgresServer,
    tmp_path: Path,
    command: str,
    section: str,
    env: dict[str, str],
    banner: str,
) -> None:
    port = free_port()
    config = tmp_path / "policy.yml"
    config.write_text(SSH_ONLY + section.format(port=port) + "\n")
    name = f"{command}_{uuid.uuid4().hex[:8]}"
    asyncio.run(postgres_server.execute(f'CREATE DATABASE "{name}"'))
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
        | env
        | VAULT_ENV
        | {
            "KEYTURN_DATABASE_URL": postgres_server.dsn(name).url,
            "KEYTURN_SLACK_API_URL": f"http://127.0.0.1:{free_port()}/api/",
        }
    )
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "keyturn.cli", command, "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:  # its pipe is closed on the way out
            try:
                assert proc.stdout is not None
                assert banner in proc.stdout.readline()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                    assert json.load(resp) == {"status": "ok"}
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    finally:
        asyncio.run(postgres_server.execute(f'DROP DATABASE "{name}" WITH (FORCE)'))
