"""``keyturn dev`` and ``keyturn demo`` as a new user meets them: the printed URLs, stack.json as
a contract, the demo finished by one click in the sandbox, and Ctrl-C leaving no process and no
file behind."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from bot.cards import APPROVE
from keyturn.harness.dev_slack import LoopThread
from keyturn.harness.slack import SlackEmulator
from tests.integration.devstack import Spawned, click, running_dev

CONTRACT = {  # docs/dev.md: what scripts may rely on
    "gateway_url": str,
    "sandbox_url": str,
    "agent_token": str,
    "agent": str,
    "approver_user": str,
    "oncall_user": str,
    "approval_channel": str,
    "targets": dict,
    "dev_secret": str,
    "policy_file": str,
    "database_url": str,
    "vault_addr": str,
    "vault_root_token": str,
    "approles": dict,
    "wire_url": str,
    "ca_file": str,
}


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children...), read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def data_directories(pids: set[int]) -> set[Path]:
    """The ``-D`` directories of the Postgres servers among ``pids``."""
    found = set()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-D" in argv[:-1]:
            found.add(Path(argv[argv.index(b"-D") + 1].decode()))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def held_id(line: str) -> str:
    return line.split("held as request ", 1)[1].split(".", 1)[0]


def demo(stack: dict[str, Any], decision: str, reason: str | None = None) -> list[str]:
    """Run ``keyturn demo`` and click ``decision`` on each of its held requests (the UPDATE,
    then the refund) in the sandbox."""
    run = Spawned("-m", "keyturn.cli", "demo", "--stack", stack["file"], "--timeout", "60")
    try:
        for _ in range(2):
            request = held_id(run.until("held as request"))
            run.until("Waiting for the click")
            click(stack, request, decision, reason)
        return run.finish()
    finally:
        run.stop()


def _psql(stack: dict[str, Any], sql: str) -> subprocess.CompletedProcess[str]:
    psql = shutil.which("psql")
    assert psql, "Debian's psql (postgresql-client) is missing: scripts/test installs it"
    return subprocess.run(
        [psql, stack["wire_url"], "-X", "-A", "-t", "-c", sql],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": stack["agent_token"]},
        timeout=120,
    )


def psql_demo(stack: dict[str, Any]) -> None:
    """The README's psql line: the demo's three steps through the Postgres protocol."""
    read = _psql(stack, "SELECT id, email FROM customers ORDER BY id")
    assert read.returncode == 0 and read.stdout.split() == ["1|***", "2|***"], read
    dropped = _psql(stack, "DROP TABLE orders")
    assert dropped.returncode != 0 and "blocked" in dropped.stderr, dropped
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        update = pool.submit(_psql, stack, "UPDATE orders SET status = 'refunded' WHERE id = 3")
        click(stack, "'refunded'", "keyturn_approve")
        done = update.result(timeout=120)
    assert done.returncode == 0 and "held for approval" in done.stderr, done
    assert "UPDATE 1" in done.stdout


def sqlalchemy_demo(stack: dict[str, Any]) -> None:
    """An unchanged SQLAlchemy program (psycopg) does the same three steps."""
    url = stack["wire_url"].replace("postgresql://", "postgresql+psycopg://")
    engine = sa.create_engine(url, connect_args={"password": stack["agent_token"]})
    try:
        with engine.connect() as conn:
            emails = conn.execute(sa.text("SELECT email FROM customers")).scalars().all()
        assert emails and set(emails) == {"***"}
        with pytest.raises(sa.exc.ProgrammingError, match="blocked"), engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE orders"))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:

            def update() -> int:
                with engine.begin() as conn:
                    sql = "UPDATE orders SET status = 'packed' WHERE id = 1"
                    return conn.execute(sa.text(sql)).rowcount

            running = pool.submit(update)
            click(stack, "'packed'", "keyturn_approve")
            assert running.result(timeout=120) == 1
    finally:
        engine.dispose()


def _runs(stack: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KEYTURN_DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "keyturn.cli", "runs", *args, "--stack", stack["file"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def runs_of_the_demo(stack: dict[str, Any], printed: str, scratch: Path) -> None:
    """The Done-when of runs: the demo's run is listed, replays, exports as an asciicast
    that ``asciinema play`` plays, and the refund's card shows the run's earlier steps."""
    run = printed.split("Every step was recorded as run ", 1)[1].split(",", 1)[0].rstrip(":")
    listed = _runs(stack, "list")
    assert listed.returncode == 0 and run in listed.stdout, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(run))
    assert line.split()[4:8] == ["5", "2", "0", "1"], line  # steps, held, denied, blocked
    replay = _runs(stack, "replay", run, "--speed", "100")
    assert replay.returncode == 0 and "UPDATE 1" in replay.stdout and "HTTP 201" in replay.stdout
    cast = scratch / "demo.cast"
    assert _runs(stack, "export", run, "-o", str(cast)).returncode == 0
    asciinema, script = shutil.which("asciinema"), shutil.which("script")
    assert asciinema and script, "scripts/test installs Debian's asciinema (script: util-linux)"
    played = subprocess.run(
        [script, "-q", "-e", "-c", f"{asciinema} play -s 100 -i 0.1 {cast}", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert played.returncode == 0 and "UPDATE 1" in played.stdout, played.stdout + played.stderr
    cast.unlink()
    page = httpx.get(f"{stack['sandbox_url']}/sandbox/messages", timeout=5).json()
    cards = [m for ms in page["channels"].values() for m in ms if "refunds" in json.dumps(m)]
    run_text = json.dumps([b for b in cards[0]["blocks"] if b.get("block_id") == "run"])
    assert "the last 4 steps before this one" in run_text and "DROP TABLE orders" in run_text


def test_dev_prints_its_urls_keeps_its_contract_and_leaves_nothing(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"  # every temporary file of the stack goes here: TMPDIR
    scratch.mkdir()
    with running_dev(scratch / "state", env={"TMPDIR": str(scratch)}) as (dev, stack):
        for key, kind in CONTRACT.items():
            assert isinstance(stack.get(key), kind), key
        assert "slack_sandbox" not in stack
        assert stack["targets"] == {
            "orders-db": "postgres",
            "web-demo": "ssh",
            "orders-api": "http",
        }
        assert stat.S_IMODE(Path(stack["file"]).stat().st_mode) == 0o600
        printed = "\n".join(dev.lines)
        assert f"sandbox    {stack['sandbox_url']}/" in printed
        assert f"gateway    {stack['gateway_url']}" in printed
        for secret in ("agent_token", "dev_secret", "vault_root_token"):
            assert stack[secret] not in printed
        assert httpx.get(stack["sandbox_url"] + "/", timeout=5).status_code == 200

        token = subprocess.run(
            [sys.executable, "-m", "keyturn.cli", "token", "crew-x", "--state", stack["file"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        claims = jwt.decode(token, stack["dev_secret"], algorithms=["HS256"], audience="keyturn")
        assert claims["sub"] == "crew-x"

        approved = "\n".join(demo(stack, "keyturn_approve"))
        assert "| ***" in approved and "@example.com" not in approved  # masked emails
        assert "blocked by rule no-drop" in approved
        assert "approved: the gateway ran it" in approved and "UPDATE 1" in approved
        assert '"email": "***"' in approved  # the API's JSON, masked
        assert "approved: the gateway sent exactly that call -> HTTP 201" in approved
        runs_of_the_demo(stack, approved, scratch)
        denied = demo(stack, "keyturn_deny", "not during the freeze")
        assert "   denied by U_APPROVER: not during the freeze" in denied
        assert f"psql       psql '{stack['wire_url']}'  (sign in with" in printed
        psql_demo(stack)
        sqlalchemy_demo(stack)

        below = descendants(dev.proc.pid)
        assert len(below) >= 4  # gateway, bot, postgres, openbao (and sshd)
        data = data_directories(below)  # in /dev/shm when it has room, else under TMPDIR
        assert data
        dev.interrupt()
        assert "keyturn dev stopped" in dev.finish(timeout=60)[-1]
    assert not [pid for pid in below if alive(pid)]
    assert not list(scratch.iterdir())  # no state file, no data directory, no socket
    assert not [d for d in data if d.exists()]  # its own cluster: another stack may be running
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack["gateway_url"] + "/healthz", timeout=2)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--stack", "/nonexistent/stack.json"], "start one with scripts/dev"),
        (["--timeout", "nan"], "--timeout must be"),
        (["--timeout", "-1"], "--timeout must be"),
    ],
)
def test_demo_without_a_stack(args: list[str], fragment: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
    proc = subprocess.run(
        [sys.executable, "-m", "keyturn.cli", "demo", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and fragment in proc.stderr, proc.stderr


def card_of(slack: SlackEmulator, channel: str, request_id: str, timeout: float = 30) -> str:
    """The ts of the card in ``channel`` that names ``request_id``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in slack.channel(channel):
            if request_id in json.dumps(message.blocks):
                return message.ts
        time.sleep(0.1)
    raise AssertionError(f"no card for {request_id} in {channel}")


def test_dev_with_a_real_workspace_in_socket_mode(tmp_path: Path) -> None:
    """Slack tokens set: no sandbox, the bot connects out over Socket Mode (here to the
    emulator playing slack.com), and the cards go to the channel and approvers named."""
    loop = LoopThread()
    slack = SlackEmulator()
    loop.run(slack.start())
    env = {
        "KEYTURN_SLACK_BOT_TOKEN": slack.bot_token,
        "KEYTURN_SLACK_APP_TOKEN": slack.app_token,
        "KEYTURN_SLACK_API_URL": slack.api_url,
        "KEYTURN_DEV_SLACK_CHANNEL": "C0REAL",
        "KEYTURN_DEV_APPROVERS": "U0ADA, U0LIN",
    }
    try:
        with running_dev(tmp_path / "state", env=env) as (dev, stack):
            assert stack["sandbox_url"] is None and stack["approval_channel"] == "C0REAL"
            assert stack["approver_user"] == "U0ADA"
            assert "your workspace: cards in C0REAL" in "\n".join(dev.lines)
            run = Spawned("-m", "keyturn.cli", "demo", "--stack", stack["file"])
            try:
                run.until("its card is in your Slack channel")
                card = loop.run(slack.wait_for("chat.postMessage"))[0]
                ts = slack.channel("C0REAL")[0].ts
                assert card.args["channel"] == "C0REAL" and slack.socket_connected
                status, _ = loop.run(slack.click("C0REAL", ts, APPROVE, "U0LIN"))
                assert status == 200
                refund = held_id(run.until("held as request"))  # then the API's held refund
                ts = card_of(slack, "C0REAL", refund)
                assert loop.run(slack.click("C0REAL", ts, APPROVE, "U0LIN"))[0] == 200
                said = "\n".join(run.finish())
                assert "approved: the gateway ran it" in said and "HTTP 201" in said
            finally:
                run.stop()
    finally:
        loop.run(slack.stop())
        loop.close()


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"KEYTURN_SLACK_BOT_TOKEN": "xoxb-1"}, "KEYTURN_SLACK_APP_TOKEN (Socket Mode) or"),
        (
            {"KEYTURN_SLACK_BOT_TOKEN": "xoxb-1", "KEYTURN_SLACK_APP_TOKEN": "xapp-1"},
            "set KEYTURN_DEV_SLACK_CHANNEL",
        ),
    ],
    ids=["no-app-token-or-secret", "no-channel"],
)
def test_dev_with_half_a_workspace(env: dict[str, str], fragment: str, tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
    proc = subprocess.run(
        [sys.executable, "-m", "keyturn.cli", "dev", "--state-dir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=clean | env,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and fragment in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()  # nothing was started


def test_the_orders_api_key_lives_in_openbao_only(tmp_path: Path) -> None:
    """The dev stack's HTTP target end to end: a GET runs at once with masked emails, a
    large refund waits for Approve and returns the API's 201, a DELETE is refused by a rule,
    and the API key (read from OpenBao, the only place it is kept) appears in no answer,
    log line, database row, Slack message or file of the stack."""
    with running_dev(tmp_path / "state") as (dev, stack):
        kv = httpx.get(
            f"{stack['vault_addr']}/v1/secret/data/orders-api",
            headers={"X-Vault-Token": stack["vault_root_token"]},
            timeout=5,
        )
        key = kv.json()["data"]["data"]["token"]
        gateway = httpx.Client(
            base_url=stack["gateway_url"],
            headers={"Authorization": f"Bearer {stack['agent_token']}"},
            timeout=40,
        )
        answers = []

        def send(method: str, path: str, **body: Any) -> Any:
            request = {"method": method, "path": path, **body}
            answer = gateway.post("/v1/commands", json={"target": "orders-api", "http": request})
            answers.append(answer.text)
            return answer

        read = send("GET", "/orders").json()
        assert read["status"] == "executed", read
        assert {o["customer"]["email"] for o in read["result"]["json"]["orders"]} == {"***"}
        held = send("POST", "/orders/2/refunds", json={"amount": 5000}).json()
        assert held["status"] == "pending", held
        click(stack, held["id"], APPROVE)
        done = gateway.get(f"/v1/commands/{held['id']}?wait=30")
        answers.append(done.text)
        assert done.json()["status"] == "executed" and done.json()["result"]["status"] == 201
        blocked = send("DELETE", "/orders/3")
        assert blocked.status_code == 403 and "never allowed" in blocked.text
        wrong = send("GET", "/orders", headers={"Authorization": f"Bearer {key}"})
        assert wrong.status_code == 400  # an agent may not send a credential of its own

        rows = subprocess.run(
            [sys.executable, "-c", DUMP, stack["database_url"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert held["id"] in rows  # the dump is real
        messages = httpx.get(f"{stack['sandbox_url']}/sandbox/messages", timeout=5).text
        assert "orders/2/refunds" in messages
        files = "".join(p.read_text() for p in (tmp_path / "state").rglob("*") if p.is_file())
        gateway.close()
        printed = "\n".join(dev.lines)
    for place, text in {
        "answers": "\n".join(answers),
        "rows": rows,
        "slack": messages,
        "files": files,
        "logs": printed,
    }.items():
        assert key not in text, f"the orders API key leaked into {place}"


DUMP = """
import asyncio, json, sys
import asyncpg

async def dump(url):
    conn = await asyncpg.connect(url)
    tables = [r[0] for r in await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    for table in tables:
        for row in await conn.fetch(f'SELECT * FROM "{table}"'):
            print(json.dumps(dict(row), default=str))
    await conn.close()

asyncio.run(dump(sys.argv[1]))
"""
