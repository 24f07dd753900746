"""Runs: one agent run of 12 steps (allowed reads, a blocked DROP, held writes approved and
denied, an SSH command with timed output, an HTTP call) recorded through the real gateway,
bot and Slack emulator, then shown, replayed, exported (asciicast v2 that Debian's asciinema
plays), proven offline, summarised on a later card, kept from other identities, and purged.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from bot.run_view import VIEW_RUN
from keyturn import audit
from keyturn.agent.api import SqlResultOut
from keyturn.agent.client import AsyncClient, Denied
from keyturn.errors import NotFound
from keyturn.harness.idp import DevIdP
from keyturn.harness.sshd import SshServer
from keyturn.harness.tls import ServerTls
from keyturn.store import recordings, run_list, run_steps
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.integration.conftest import APPROVALS, APPROVER, Apis, Desk, DeskFactory, Shop
from tests.integration.test_audit import _cli as audit_cli
from tests.integration.wire import wire_desk

AGENT = "crew-nightly"
RUN = "nightly-7"
EMAILS = ("ada@example.com", "lin@example.com")  # the shop's customers: never recorded
TICKS = "sh -c 'echo one; sleep 0.4; echo two >&2; sleep 0.4; echo three'"


def _policy(shop: Shop, sshd: SshServer, apis: Apis) -> dict[str, Any]:
    targets = json.loads(json.dumps(shop.base_policy["targets"])) | apis.policy()["targets"]
    targets["web"].update(port=sshd.port, host_key=sshd.host_public_key)
    rules = [
        {
            "name": "scripts",
            "target": "web",
            "match": {"shell": ["sh **"]},
            "action": "hold",
            "approvers": {"users": [APPROVER]},
            "grant_ttl": "5m",
        },
        *shop.base_policy["rules"],
        *[r for r in apis.policy()["rules"] if r["name"] in ("api-reads",)],
    ]
    return {"targets": targets, "rules": rules}


def _cli(dsn: Dsn, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return audit_cli(dsn, *args, env=env)


async def _pending(store: Store, command: str) -> str:
    async with asyncio.timeout(30):
        while True:
            async with store.raw_connection() as conn:
                found = await conn.fetchval(
                    "SELECT id::text FROM requests WHERE status = 'pending' AND command = $1",
                    command,
                )
            if found:
                return str(found)
            await asyncio.sleep(0.05)


async def _held_then(
    desk: Desk, agent: AsyncClient, target: str, command: str, approve: bool
) -> Any:
    """Run a held command, approving or denying it on its card; what the agent got."""
    running = asyncio.create_task(agent.run(target, command, reason="nightly", run_id=RUN))
    ident = await _pending(desk.store, command)
    if approve:
        await desk.approve(ident)
    else:
        await desk.deny(ident, "not tonight")
    try:
        return await running
    except Denied as exc:
        return exc


async def _the_run(desk: Desk, token: str) -> dict[str, Any]:
    """The 12 steps; what the agent saw of some."""
    seen: dict[str, Any] = {}
    async with AsyncClient(desk.gateway.url, token) as agent:
        seen["customers"] = await agent.run(
            "shop", "SELECT id, email FROM customers ORDER BY id", run_id=RUN
        )
        await agent.run("shop", "SELECT count(*) FROM orders", run_id=RUN)
        with pytest.raises(Exception, match="dropping tables is never allowed"):
            await agent.run("shop", "DROP TABLE orders", run_id=RUN)
        seen["update"] = await _held_then(
            desk, agent, "shop", "UPDATE orders SET status = 'paid' WHERE id = 3", True
        )
        await agent.run("shop", "SELECT id, status FROM orders WHERE id = 3", run_id=RUN)
        seen["denied"] = await _held_then(
            desk, agent, "shop", "DELETE FROM orders WHERE id = 4", False
        )
        seen["ticks"] = await _held_then(desk, agent, "web", TICKS, True)
        seen["http"] = await agent.http("httpbin", "GET", "/anything/nightly", run_id=RUN)
        for n in range(9, 13):
            await agent.run(
                "shop", f"SELECT {n} AS step, 'x{n}@example.org' AS contact", run_id=RUN
            )
    return seen


async def _card_of(desk: Desk, command: str) -> dict[str, Any]:
    """The card of the request that ran ``command``, as last drawn."""
    async with desk.store.raw_connection() as conn:
        ident = await conn.fetchval("SELECT id::text FROM requests WHERE command = $1", command)
    ts = await desk.card(ident)
    return next(m.as_json() for m in desk.slack.messages[APPROVALS] if m.ts == ts)


async def _view_run(desk: Desk, card: dict[str, Any], user: str) -> dict[str, Any] | str:
    """Click View run on ``card`` as ``user``: the modal opened, or the ephemeral said."""
    opened, told = len(desk.slack.views), len(desk.slack.ephemerals)
    status, _ = await desk.slack.click(APPROVALS, card["ts"], VIEW_RUN, user)
    assert status == 200
    async with asyncio.timeout(10):
        while len(desk.slack.views) == opened and len(desk.slack.ephemerals) == told:
            await asyncio.sleep(0.05)
    if len(desk.slack.views) > opened:
        return list(desk.slack.views.values())[-1]
    return str(desk.slack.ephemerals[-1]["text"])


def _recorded_text(rows: list[asyncpg.Record]) -> str:
    return "\n".join(str(r["output"]) for r in rows)


async def test_a_run_is_recorded_shown_replayed_exported_and_proven(
    run_desk: DeskFactory,
    idp: DevIdP,
    shop: Shop,
    sshd: SshServer,
    apis: Apis,
    database: Dsn,
    tmp_path: Path,
) -> None:
    async with run_desk(**_policy(shop, sshd, apis)) as desk:
        seen = await _the_run(desk, idp.token(AGENT))
        ran = await _recorded(desk.store, RUN)
        # the card of a later held request (the SSH command, step 7) shows the run before it
        card = await _card_of(desk, TICKS)
        run_block = next(b for b in card["blocks"] if b.get("block_id") == "run")
        text = run_block["text"]["text"]
        assert "the last 5 steps before this one, and 1 earlier step" in text
        assert "`nightly-7`" in text and "customers" not in text  # step 1 is the earlier one
        assert "blocked by rule `no-drop`" in text and f"approved by `{APPROVER}`" in text
        assert f"denied by `{APPROVER}`" in text and "<@" not in text  # named, never pinged
        assert text.index("SELECT count(*)") < text.index("DROP TABLE orders")  # in order
        assert not any(e in json.dumps(card) for e in EMAILS)
        first_held = await _card_of(desk, "UPDATE orders SET status = 'paid' WHERE id = 3")
        assert "the last 3 steps before this one (" in json.dumps(first_held)
        # View run: the modal for an approver, "not allowed" for anyone else
        modal = await _view_run(desk, card, APPROVER)
        assert isinstance(modal, dict) and modal["title"]["text"] == "Run nightly-7"
        body = json.dumps(modal["blocks"])
        assert "*7 steps*" in body and body.index("one; sleep") < body.index("count(*)")
        desk.slack.add_user("U_OTHER", "Someone Else")
        refused = await _view_run(desk, card, "U_OTHER")
        assert isinstance(refused, str) and "not an approver" in refused
        # another identity's run is not found, as if it did not exist; its own is there
        other = idp.token("crew-other")
        async with aiohttp.ClientSession() as http:
            for token, status in ((other, 404), (idp.token(AGENT), 200)):
                async with http.get(
                    f"{desk.gateway.url}/v1/runs/{RUN}",
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    assert resp.status == status, await resp.text()
                    answer = await resp.json()
        assert [s["verdict"] for s in answer["steps"]][:4] == [
            "allowed",
            "allowed",
            "blocked",
            "held",
        ]
        assert answer["steps"][0]["output"]["value"]["rows"] == [[1, "***"], [2, "***"]]
        async with desk.store.raw_connection() as conn:
            kept = await conn.fetch("SELECT * FROM recordings ORDER BY at")
    # the steps, in order, with verdicts and deciders
    assert [s.verdict for s in ran.steps] == [
        "allowed",
        "allowed",
        "blocked",
        "held",
        "allowed",
        "held",
        "held",
        "allowed",
        "allowed",
        "allowed",
        "allowed",
        "allowed",
    ]
    assert [str(s.outcome) for s in ran.steps][2:7] == [
        "blocked",
        f"approved by {APPROVER}",
        "allowed",
        f"denied by {APPROVER}",
        f"approved by {APPROVER}",
    ]
    update, ticks = ran.steps[3], ran.steps[6]
    assert update.grant is not None and update.grant.status in ("revoked", "expired")
    assert update.recording is not None and update.recording.output() == seen["update"].model_dump()
    assert ticks.recording is not None and (ticks.recording.output() or {})["timing"]
    # nothing unmasked was kept: the customers' real emails are nowhere in the recordings
    assert len(kept) == 11  # every step but the denied one produced an output
    assert not any(e in _recorded_text(kept) for e in EMAILS)
    # keyturn runs show / --json / list
    show = await asyncio.to_thread(_cli, database, "runs", "show", RUN)
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    assert len(lines) == 14 and "DROP TABLE orders" in lines[4] and "blocked" in lines[4]
    assert f"approved by {APPROVER}" in lines[5] and f"denied by {APPROVER}" in lines[7]
    as_json = json.loads(
        (await asyncio.to_thread(_cli, database, "runs", "show", RUN, "--json")).stdout
    )
    assert [s["number"] for s in as_json["steps"]] == list(range(1, 13))
    listed = await asyncio.to_thread(_cli, database, "runs", "list", "--agent", AGENT)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(RUN))
    assert row.split()[4:8] == ["12", "3", "1", "1"], row  # steps, held, denied, blocked
    # replay: the same outputs in the same order
    replay = await asyncio.to_thread(_cli, database, "runs", "replay", RUN, "--speed", "100")
    assert replay.returncode == 0, replay.stderr
    order = [
        "count",
        "dropping tables",
        "UPDATE 1",
        "3 | paid",
        "not tonight",
        "one",
        "two",
        "three",
        "/anything/nightly",
        "x9@example.org",
        "x12@example.org",
    ]
    at = [replay.stdout.find(word) for word in order]
    assert -1 not in at and at == sorted(at), list(zip(order, at, strict=True))
    # asciicast v2 that Debian's asciinema plays
    cast = tmp_path / "run.cast"
    done = await asyncio.to_thread(_cli, database, "runs", "export", RUN, "-o", str(cast))
    assert done.returncode == 0, done.stderr
    _check_asciicast_v2(cast.read_text(encoding="utf-8"))
    asciinema = shutil.which("asciinema")
    assert asciinema, "Debian's asciinema is installed by scripts/test"
    played = await asyncio.to_thread(_in_a_terminal, f"{asciinema} cat {cast}")
    assert played.returncode == 0, played.stderr
    assert "UPDATE 1" in played.stdout and "three" in played.stdout
    jsonl = await asyncio.to_thread(_cli, database, "runs", "export", RUN, "--format", "jsonl")
    assert [json.loads(line)["number"] for line in jsonl.stdout.splitlines()] == list(range(1, 13))
    # evidence of the approved update: holds offline; one byte of its output changed does not
    await _sealed_evidence(database, str(update.id), shop, tmp_path)
    await _evidence_holds_until_one_byte_changes(database, str(update.id), tmp_path)


def _in_a_terminal(command: str) -> subprocess.CompletedProcess[str]:
    """``command`` with a terminal of its own (asciinema reads /dev/tty): util-linux's
    script gives it one, as a person's shell would."""
    script = shutil.which("script")
    assert script, "util-linux's script is part of every Debian"
    return subprocess.run(
        [script, "-q", "-e", "-c", command, "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _check_asciicast_v2(text: str) -> None:
    """Read back line by line against the v2 format: a header object, then events."""
    header, *events = [json.loads(line) for line in text.splitlines()]
    assert header["version"] == 2 and isinstance(header["timestamp"], int)
    assert (
        header["width"] > 0 and header["height"] > 0 and header["title"].startswith("keyturn run")
    )
    times = [e[0] for e in events]
    assert times == sorted(times) and all(isinstance(t, int | float) and t >= 0 for t in times)
    assert {e[1] for e in events} == {"i", "o", "m"}
    assert all(len(e) == 3 and isinstance(e[2], str) for e in events)
    markers = [e[2] for e in events if e[1] == "m"]
    assert f"approved by {APPROVER}" in markers and "blocked by rule no-drop" in markers
    assert any(
        m.startswith("credentials revoked") or m.startswith("credentials expired") for m in markers
    )


async def _sealed_evidence(dsn: Dsn, request: str, shop: Shop, tmp_path: Path) -> None:
    """Written with the bot's Vault, the file is sealed by the audit key; checked against
    Vault, the seal holds; a forged seal, or an unsealed file, does not."""
    config = tmp_path / "keyturn.yaml"
    config.write_text(json.dumps(shop.base_policy), encoding="utf-8")
    bot = {"KEYTURN_BOT_ROLE_ID": shop.bot_role_id, "KEYTURN_BOT_SECRET_ID": shop.bot_secret_id}
    file, unsealed = tmp_path / "sealed.json", tmp_path / "unsealed.json"
    args = ("audit", "evidence", request, "--config", str(config), "-o", str(file))
    wrote = await asyncio.to_thread(_cli, dsn, *args, **bot)
    assert wrote.returncode == 0 and "(sealed)" in wrote.stderr, wrote.stderr
    check = ("audit", "verify", "--config", str(config), "--evidence")
    held = await asyncio.to_thread(_cli, dsn, *check, str(file), **bot)
    assert held.returncode == 0 and "evidence holds" in held.stdout, held.stderr
    assert "sealed by this deployment's audit key (checked)" in held.stdout
    forged = json.loads(file.read_text(encoding="utf-8"))
    forged["seal"]["hmac"] = "vault:v1:" + "A" * 44
    file.write_text(json.dumps(forged), encoding="utf-8")
    refused = await asyncio.to_thread(_cli, dsn, *check, str(file), **bot)
    assert refused.returncode == 1 and "not from this deployment's audit key" in refused.stderr
    plain = ("audit", "evidence", request, "-o", str(unsealed))
    assert (await asyncio.to_thread(_cli, dsn, *plain)).returncode == 0
    unproven = await asyncio.to_thread(_cli, dsn, *check, str(unsealed), **bot)
    assert unproven.returncode == 1 and "it is not sealed" in unproven.stderr


async def _evidence_holds_until_one_byte_changes(dsn: Dsn, request: str, tmp_path: Path) -> None:
    file = tmp_path / "evidence.json"
    wrote = await asyncio.to_thread(_cli, dsn, "audit", "evidence", request, "-o", str(file))
    assert wrote.returncode == 0, wrote.stderr
    held = await asyncio.to_thread(_cli, dsn, "audit", "verify", "--evidence", str(file))
    assert held.returncode == 0 and "consistent: step" in held.stdout, held.stderr
    assert f"by {AGENT} on shop: executed (approve by {APPROVER})" in held.stdout
    conn = await asyncpg.connect(dsn.url)
    try:
        await conn.execute(
            "UPDATE recordings SET output = replace(output, 'UPDATE 1', 'UPDATE 2')"
            " WHERE step_id = $1",
            uuid.UUID(request),
        )
    finally:
        await conn.close()
    again = await asyncio.to_thread(_cli, dsn, "audit", "evidence", request, "-o", str(file))
    assert again.returncode == 0, again.stderr
    broken = await asyncio.to_thread(_cli, dsn, "audit", "verify", "--evidence", str(file))
    assert broken.returncode == 1 and "the recorded output was changed" in broken.stderr
    chain = await asyncio.to_thread(_cli, dsn, "audit", "verify", "--unanchored")
    assert chain.returncode == 1 and "its output was changed" in chain.stderr, chain.stderr


async def _verify(store: Store) -> str | None:
    """``keyturn audit verify --unanchored``'s verdict: None, or the break it names."""
    result = await audit.verify(store)
    return None if result.broken is None else str(result.broken)


async def _superuser(dsn: Dsn, *statements: str) -> None:
    conn = await asyncpg.connect(dsn.url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_retention_deletes_outputs_keeps_hashes_and_a_tampered_purge_is_caught(
    run_desk: DeskFactory, idp: DevIdP, database: Dsn
) -> None:
    async with run_desk() as desk, AsyncClient(desk.gateway.url, idp.token(AGENT)) as agent:
        for n in range(3):
            await agent.run("shop", f"SELECT {n} AS n", run_id="kept")
        with pytest.raises(Exception, match="never allowed"):
            await agent.run("shop", "DROP TABLE orders", run_id="kept")
        store = desk.store
        await _recorded(store, "kept")
        assert await _verify(store) is None
        # nothing is old enough yet: a purge deletes nothing, and says so in no event
        assert await recordings.purge(store, timedelta(days=90)) == 0
        # an output deleted by hand, with no purge reaching it, is tampering
        await _superuser(
            database,
            "UPDATE recordings SET output = NULL, purged_at = now()"
            " WHERE step_id = (SELECT step_id FROM recordings ORDER BY at LIMIT 1)",
        )
        assert "no retention purge reached it" in (await _verify(store) or "")
        # the real purge (everything past a retention of a microsecond) deletes every output,
        # keeps every hash, and the chain (with its purge event) verifies again
        await asyncio.sleep(0.01)
        assert await recordings.purge(store, timedelta(microseconds=1)) == 3
        assert await _verify(store) is None
        ran = await run_steps.run(store, "kept")
        assert [s.recording is not None and s.recording.text for s in ran.steps] == [None] * 4
        assert all(s.recording and len(s.recording.sha256) == 64 for s in ran.steps)
        # a purge that also "fixes" a hash, or removes a recording, is caught
        first = "(SELECT step_id FROM recordings ORDER BY at LIMIT 1)"
        await _superuser(
            database,
            f"UPDATE recordings SET output_bytes = output_bytes + 1 WHERE step_id = {first}",
        )
        assert "do not match what the audit chain recorded" in (await _verify(store) or "")
        await _superuser(
            database,
            f"UPDATE recordings SET output_bytes = output_bytes - 1 WHERE step_id = {first}",
        )
        assert await _verify(store) is None
        # a blocked command's step rewritten into another agent's innocent one is caught
        await _superuser(
            database,
            "UPDATE recordings SET command = 'SELECT 1', agent = 'crew-other'"
            " WHERE request_id IS NULL",
        )
        assert "not the step its audit event records" in (await _verify(store) or "")
        await _superuser(database, "DELETE FROM recordings WHERE request_id IS NULL")
        assert "the recording this event vouches for was deleted" in (await _verify(store) or "")


async def test_an_output_deleted_after_a_purge_and_back_dated_is_caught(
    run_desk: DeskFactory, idp: DevIdP, database: Dsn
) -> None:
    async with run_desk() as desk, AsyncClient(desk.gateway.url, idp.token(AGENT)) as agent:
        await agent.run("shop", "SELECT 'before' AS w", run_id="late")
        await _recorded(desk.store, "late")
        await asyncio.sleep(0.01)
        assert await recordings.purge(desk.store, timedelta(microseconds=1)) == 1
        await agent.run("shop", "SELECT 'evidence of wrongdoing' AS w", run_id="late")
        await _recorded(desk.store, "late")
        assert await _verify(desk.store) is None
        # deleted by hand, dated back before the purge's cut-off: the event's time decides
        await _superuser(
            database,
            "UPDATE recordings SET output = NULL, purged_at = now(), at = at - interval '1 day'"
            " WHERE output LIKE '%wrongdoing%'",
        )
        assert "no retention purge reached it" in (await _verify(desk.store) or "")


async def test_steps_without_a_run_id_make_one_run_per_idle_gap(
    run_desk: DeskFactory, idp: DevIdP, database: Dsn
) -> None:
    async with run_desk() as desk, AsyncClient(desk.gateway.url, idp.token(AGENT)) as agent:
        for n in range(3):
            await agent.run("shop", f"SELECT {n} AS n")
        with pytest.raises(Exception, match="never allowed"):  # blocked: a step of it too
            await agent.run("shop", "DROP TABLE orders")
        held = await agent.submit("shop", "UPDATE orders SET status = 'x' WHERE id = 9")
        assert held.status == "pending"  # held: a step of it too
        # an hour later (moved back in the store: the gap is the steps' own times)
        await _superuser(
            database,
            "UPDATE requests SET created_at = created_at - interval '1 hour',"
            " pending_expires_at = pending_expires_at - interval '1 hour'",
            "UPDATE recordings SET at = at - interval '1 hour'",
        )
        for n in range(3, 5):
            await agent.run("shop", f"SELECT {n} AS n")
        await agent.run("shop", "SELECT 5 AS n", run_id="named")
        found = await run_list.runs_since(
            desk.store, desk.store.clock.now() - timedelta(days=1), agent=AGENT
        )
        names = [r.run for r in found]
        assert len(found) == 3 and "named" in names
        auto = [r for r in found if r.run.startswith("auto-")]
        assert sorted(r.steps for r in auto) == [2, 5]
        earlier = next(r for r in auto if r.steps == 5)
        assert (earlier.held, earlier.blocked) == (1, 1)
        ran = await run_steps.run(desk.store, earlier.run)
        assert [s.command for s in ran.steps][:3] == [f"SELECT {n} AS n" for n in range(3)]
        assert [s.verdict for s in ran.steps][3:] == ["blocked", "held"]
        assert earlier.run == f"auto-{ran.steps[0].id}"  # named for its first step
        # a step in the middle of a run names no run; nor does another agent's
        with pytest.raises(NotFound):
            await run_steps.run(desk.store, f"auto-{ran.steps[1].id}")
        with pytest.raises(NotFound):
            await run_steps.run(desk.store, earlier.run, agent="crew-other")
        # a period that starts mid-run lists the run under the name of its real first step
        later = await run_list.runs_since(desk.store, ran.steps[1].at, agent=AGENT)
        assert earlier.run in [r.run for r in later]


async def test_what_record_outputs_keeps_and_the_cap(
    run_desk: DeskFactory, idp: DevIdP, shop: Shop
) -> None:
    long_read = "SELECT repeat('x', 5000) AS filler, g FROM generate_series(1, 40) g"
    for kept in ("tags", "none", "masked"):
        async with (
            run_desk(record={"outputs": kept, "output_bytes": 4096}) as desk,
            AsyncClient(desk.gateway.url, idp.token(AGENT)) as agent,
        ):
            seen = await agent.run("shop", long_read, run_id=f"keep-{kept}")
            ran = await _recorded(desk.store, f"keep-{kept}")
        recording = ran.steps[0].recording
        assert recording is not None and recording.kept == kept
        assert isinstance(seen, SqlResultOut) and seen.row_count == 40
        assert recording.bytes > 200_000  # the full output's size, whatever was kept
        if kept == "none":
            assert recording.text is None
        elif kept == "tags":
            assert recording.output() == {
                "columns": ["filler", "g"],
                "row_count": 40,
                "rows_count": 40,
                "statements": 1,
                "truncated": False,
                "types": [25, 23],
            }
        else:
            value = recording.output() or {}
            assert recording.truncated and len(recording.text or "") <= 4096
            assert value["columns"] == ["filler", "g"] and value["row_count"] == 40
            rows = value["rows"]  # valid JSON: long values lose their tails, not the JSON
            assert rows and all(0 < len(filler) < 5000 for filler, _ in rows)


async def _recorded(store: Store, name: str) -> Any:
    """The run once every output is recorded: an allowed command's outcome is committed with
    the journal's next batch, just after the agent has its answer."""
    async with asyncio.timeout(10):
        while True:
            found = await run_steps.run(store, name)
            ended = [s for s in found.steps if s.status in ("executed", "failed", "blocked")]
            running = [s for s in found.steps if s.status == "executing"]
            if not running and all(s.recording is not None for s in ended):
                return found
            await asyncio.sleep(0.05)


async def test_a_postgres_client_names_its_run_with_application_name(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        named = await wire.asyncpg(AGENT, token, server_settings={"application_name": "run:wire-1"})
        try:
            assert await named.fetchval("SELECT 41 + 1") == 42
            await named.execute("SET application_name = 'run:wire-2'")  # as a pool would
            assert await named.fetchval("SELECT 'two'") == "two"
            await named.execute("SET application_name = 'run:auto-forged'")
            with pytest.raises(asyncpg.InvalidParameterValueError, match="keyturn's own runs"):
                await named.fetchval("SELECT 3")
        finally:
            await named.close()
        one = await _recorded(wire.desk.store, "wire-1")
        two = await _recorded(wire.desk.store, "wire-2")
    assert [s.command for s in one.steps] == ["SELECT 41 + 1"]
    assert [s.command for s in two.steps] == ["SELECT 'two'"]
    assert one.steps[0].recording.output()["rows"] == [[42]]


async def test_a_run_id_two_agents_share_is_one_run_but_each_card_shows_its_own_agent(
    run_desk: DeskFactory, idp: DevIdP
) -> None:
    async with (
        run_desk() as desk,
        AsyncClient(desk.gateway.url, idp.token("crew-a")) as a,
        AsyncClient(desk.gateway.url, idp.token("crew-b")) as b,
    ):
        for n in range(2):
            await a.run("shop", f"SELECT {n} AS a", run_id="shared")
        for n in range(3):  # another agent sends into the same run id
            await b.run("shop", f"SELECT {n} AS b", run_id="shared")
        held = await a.submit(
            "shop", "UPDATE orders SET status = 'x' WHERE id = 5", run_id="shared"
        )
        context = await run_steps.so_far(desk.store, uuid.UUID(held.id), last=5)
        everyone = await run_steps.run(desk.store, "shared")
        theirs = await a.run_steps("shared")
    assert context is not None and context.earlier == 0
    assert [s.command for s in context.steps] == ["SELECT 0 AS a", "SELECT 1 AS a"]
    assert len(everyone.steps) == 6 and everyone.agents == ["crew-a", "crew-b"]
    assert [s.command for s in theirs.steps][-1].startswith("UPDATE") and len(theirs.steps) == 3
