"""The audit chain: appends serialize, and change, delete and reorder are all detected."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from keyturn import audit
from keyturn.checkpoint import Anchor, CheckpointRefused
from keyturn.domain import Deciders, Decision
from keyturn.store import decisions, requests
from keyturn.store.audit_log import Event
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.integration.conftest import Shop


async def _fill(store: Store, events: int) -> None:
    async def one(i: int) -> None:
        async with store.transaction() as tx:
            tx.record(Event("test.event", f"actor-{i}", data={"i": i, "note": "ünïcode"}))

    await asyncio.gather(*(one(i) for i in range(events)))  # concurrent appends


async def _tamper(dsn: Dsn, *statements: str) -> None:
    """What a superuser could do: switch the append-only trigger off, edit, switch it on."""
    conn = await asyncpg.connect(dsn.url)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")
    finally:
        await conn.close()


def _cli(
    dsn: Dsn, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"KEYTURN_DATABASE_URL": dsn.url} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "keyturn.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


async def test_intact_chain_verifies(store: Store, database: Dsn) -> None:
    await _fill(store, 30)
    row, _ = await requests.create_request(
        store,
        requests.NewRequest("orders-db", "DELETE FROM t WHERE id=1", "crew", timedelta(minutes=1)),
    )
    await decisions.decide(store, row.id, "U1", Decision.DENY, "no", deciders=Deciders.only("U1"))
    result = await audit.verify(store)
    assert result.broken is None and result.checked == 32
    proc = await asyncio.to_thread(_cli, database, "audit", "verify", "--unanchored")
    assert proc.returncode == 0, proc.stderr
    assert "intact: 32 events" in proc.stdout


async def test_the_log_refuses_update_and_delete(store: Store, database: Dsn) -> None:
    await _fill(store, 2)
    conn = await asyncpg.connect(database.url)
    try:
        for sql in ("UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("statements", "first_bad", "problem"),
    [
        (["UPDATE audit_events SET data = '{\"i\": 999}' WHERE seq = 5"], 5, "changed"),
        (["UPDATE audit_events SET actor = 'someone-else' WHERE seq = 7"], 7, "changed"),
        (["DELETE FROM audit_events WHERE seq = 4"], 4, "missing"),
        (["DELETE FROM audit_events WHERE seq = 10"], 10, "missing"),  # the newest one
        (
            [
                "UPDATE audit_events SET seq = 1000 WHERE seq = 3",
                "UPDATE audit_events SET seq = 3 WHERE seq = 4",
                "UPDATE audit_events SET seq = 4 WHERE seq = 1000",
            ],
            3,
            "does not follow",
        ),
    ],
    ids=["change-data", "change-actor", "delete-middle", "delete-last", "reorder"],
)
async def test_tampering_is_detected(
    store: Store, database: Dsn, statements: list[str], first_bad: int, problem: str
) -> None:
    await _fill(store, 10)
    assert (await audit.verify(store)).broken is None
    await _tamper(database, *statements)
    result = await audit.verify(store)
    assert result.broken is not None
    assert result.broken.seq == first_bad
    assert problem in result.broken.problem
    proc = await asyncio.to_thread(_cli, database, "audit", "verify", "--unanchored")
    assert proc.returncode == 1
    assert f"broken at event {first_bad}" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_export_writes_json_lines(store: Store, database: Dsn, tmp_path: object) -> None:
    await _fill(store, 5)
    buffer = io.StringIO()
    assert await audit.export(store, buffer, since=2) == 3
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [e["seq"] for e in lines] == [3, 4, 5]
    assert lines[1]["prev_hash"] == lines[0]["hash"]
    assert {"at", "kind", "actor", "data", "hash", "request_id", "grant_id"} <= lines[0].keys()

    proc = await asyncio.to_thread(_cli, database, "audit", "export")
    assert proc.returncode == 2 and "--config" in proc.stderr  # an export carries a checkpoint


async def test_the_unit_of_work_records_only_what_commits(store: Store, database: Dsn) -> None:
    """Events recorded in a transaction that rolls back leave no audit row and wake nobody;
    a committed one leaves exactly its row and its notification, sent after the commit."""
    heard: list[str] = []
    conn = await asyncpg.connect(database.url)
    await conn.add_listener("keyturn", lambda *args: heard.append(args[3]))
    request_id, grant_id = uuid.uuid4(), uuid.uuid4()

    async def fails_after_recording() -> None:
        async with store.transaction() as tx:
            tx.record(Event("request.test", "rolled-back", request_id=request_id))
            raise RuntimeError("the use case failed after recording")

    with pytest.raises(RuntimeError):
        await fails_after_recording()
    async with store.transaction() as tx:
        tx.record(
            Event("request.test", "kept", request_id=request_id),
            Event("grant.test", "kept", request_id=request_id, grant_id=grant_id),
            Event("lease.test", "kept"),  # about no request or grant: audited, wakes nobody
        )
        tx.wake("handoff", request_id)
    async with asyncio.timeout(5):
        while len(heard) < 3:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    await conn.close()
    assert heard == [f"request:{request_id}", f"grant:{grant_id}", f"handoff:{request_id}"]
    rows = await asyncpg_fetch(database, "SELECT actor, kind FROM audit_events ORDER BY seq")
    assert rows == [("kept", "request.test"), ("kept", "grant.test"), ("kept", "lease.test")]
    assert (await audit.verify(store)).broken is None


async def asyncpg_fetch(database: Dsn, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(database.url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


# ------------------------------------------------------------------ checkpoints in Vault
# What a database superuser can do with the append-only trigger off, and the chain alone
# cannot see: cut the tail and move audit_head, wipe everything, re-chain after an edit.


@pytest_asyncio.fixture
async def anchor(shop: Shop, database: Dsn) -> AsyncIterator[Anchor]:
    vault = shop.bot_vault()  # the bot's own AppRole: what the bot and verify use
    yield Anchor(vault, name=database.url.rsplit("/", 1)[1])  # one per test
    await vault.close()


CUT_TAIL = [
    "DELETE FROM audit_events WHERE seq > 5",
    "UPDATE audit_head SET seq = 5, hash = (SELECT hash FROM audit_events WHERE seq = 5)",
]
WIPE = ["DELETE FROM audit_events", f"UPDATE audit_head SET seq = 0, hash = '{'0' * 64}'"]
RECHAIN = [
    "UPDATE audit_events SET data = '{\"i\": 999}' WHERE seq = 7",
    """DO $$ DECLARE r record; prev text; BEGIN
        SELECT hash INTO prev FROM audit_events WHERE seq = 6;
        FOR r IN SELECT * FROM audit_events WHERE seq >= 7 ORDER BY seq LOOP
            UPDATE audit_events SET prev_hash = prev, hash = keyturn_audit_hash(prev, r.seq,
                r.at, r.kind, r.actor, r.request_id, r.grant_id, r.data)
            WHERE seq = r.seq RETURNING hash INTO prev;
        END LOOP;
        UPDATE audit_head SET hash = prev WHERE id = 1;
    END $$""",
]


@pytest.mark.parametrize(
    ("statements", "problem"),
    [
        (CUT_TAIL, "events 6..10 are missing"),
        (WIPE, "events 1..10 are missing"),
        (RECHAIN, "differs"),
    ],
    ids=["tail-cut", "wipe", "re-chain"],
)
async def test_rewriting_the_chain_is_caught_by_the_checkpoint(
    store: Store, database: Dsn, anchor: Anchor, statements: list[str], problem: str
) -> None:
    await _fill(store, 10)
    assert (await anchor.record(store)) is not None
    await _tamper(database, *statements)
    assert (await audit.verify(store)).broken is None  # the chain alone: "intact"
    result = await audit.verify(store, anchor)
    assert result.broken is not None and problem in result.broken.problem, result
    assert result.broken.seq == 10
    await _fill(store, 12)  # the chain grows past the checkpoint again
    with pytest.raises(CheckpointRefused, match="rewritten"):
        await anchor.record(store)  # never signs a chain that no longer reaches it
    assert (await audit.verify(store, anchor)).broken is not None


async def test_a_checkpoint_written_without_the_key_is_refused(
    store: Store, shop: Shop, anchor: Anchor
) -> None:
    """Someone who may write the KV path but not use the transit key (or who copied an old
    checkpoint's fields) cannot make verify trust a checkpoint of their own."""
    await _fill(store, 3)
    genuine = await anchor.record(store)
    assert genuine is not None
    root = shop.root_vault()
    forged = {**genuine.as_json(), "seq": 2, "hash": "ab" * 32}
    await root.write(anchor.path, {"data": forged})
    await root.close()
    result = await audit.verify(store, anchor)
    assert result.broken is not None and "HMAC" in str(result.broken), result
    with pytest.raises(CheckpointRefused):
        await anchor.record(store)  # nothing is written over it


async def test_verify_says_how_many_events_are_not_yet_anchored(
    store: Store, anchor: Anchor
) -> None:
    await _fill(store, 4)
    first = await audit.verify(store, anchor)
    assert first.broken is None and "no checkpoint in Vault yet" in first.summary()
    await anchor.record(store)
    await _fill(store, 3)
    result = await audit.verify(store, anchor)
    assert result.broken is None, result
    assert "anchors events 1..4; 3 after it are not anchored yet" in result.summary()


async def test_the_cli_verifies_and_exports_against_vault(
    store: Store, database: Dsn, shop: Shop, anchor: Anchor, tmp_path: Path
) -> None:
    await _fill(store, 5)
    config = tmp_path / "keyturn.yaml"
    data = {**shop.base_policy, "vault": {**shop.base_policy["vault"], "audit_anchor": anchor.name}}
    config.write_text(json.dumps(data), encoding="utf-8")
    env = {"KEYTURN_BOT_ROLE_ID": shop.bot_role_id, "KEYTURN_BOT_SECRET_ID": shop.bot_secret_id}
    out = tmp_path / "audit.jsonl"
    proc = await asyncio.to_thread(
        _cli, database, "audit", "export", "--config", str(config), "-o", str(out), env=env
    )
    assert proc.returncode == 0, proc.stderr
    *events, last = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert last["checkpoint"]["seq"] == 5 and last["checkpoint"]["hash"] == events[-1]["hash"]
    assert last["checkpoint"]["hmac"].startswith("vault:v1:")
    ok = await asyncio.to_thread(
        _cli, database, "audit", "verify", "--config", str(config), env=env
    )
    assert ok.returncode == 0 and "anchors events 1..5" in ok.stdout, ok.stderr
    await _tamper(database, *WIPE)
    cut = await asyncio.to_thread(
        _cli, database, "audit", "verify", "--config", str(config), env=env
    )
    assert cut.returncode == 1 and "events 1..5 are missing" in cut.stderr, cut.stderr
    assert "Traceback" not in cut.stderr and shop.bot_secret_id not in cut.stderr + cut.stdout
    alone = await asyncio.to_thread(_cli, database, "audit", "verify")
    assert alone.returncode == 2 and "--unanchored" in alone.stderr
