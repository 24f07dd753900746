"""The allowed path as an attacker with a valid agent token sees it (real Postgres, OpenBao).

Most stories run under a policy that allows *everything* the classifier sees: the point is
that the execution itself is harmless where the classifier (or its parser) is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from gateway.journal import Journal
from keyturn.classify.readonly import statement_texts
from keyturn.domain import request_tag
from keyturn.harness.idp import DevIdP
from keyturn.harness.ports import free_port
from keyturn.store import outcomes, requests
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.integration.conftest import GatewayFactory, Running, Shop

ALLOW_ANY = [{"name": "anything", "match": {"sql": ["any"]}, "action": "allow"}]
CUSTOMERS = "SELECT id, name FROM customers ORDER BY id"
REAL_CUSTOMERS = [[1, "Ada"], [2, "Lin"]]


async def assert_held(gw: Running, token: str, command: str, because: str = "") -> None:
    """``command`` waits for a human, its answer carries no email in any shape (nor reversed),
    and one of its reasons names ``because``."""
    status, body = await gw.post(token, sql(command))
    assert (status, body["status"]) == (202, "pending"), (command, body)
    answer = json.dumps(body)
    assert "example" not in answer and "elpmaxe" not in answer, (command, body)
    request = await requests.get_request(gw.store, uuid.UUID(body["id"]))
    assert any(because in r for r in request.classification["reasons"]), (command, because)


def sql(command: str) -> dict[str, str]:
    return {"target": "shop", "command": command}


async def until(check: Any, timeout: float = 10.0) -> None:
    """Wait for an async condition (no timing assertions: only an upper bound to give up)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def superuser(shop: Shop, query: str) -> list[asyncpg.Record]:
    return await shop.postgres.fetch(query, shop.database)


# ------------------------------------------------------------------ one agent and another


async def test_a_read_cannot_plant_what_another_agent_reads(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """Mallory turns standard_conforming_strings off so that Postgres ends a string where
    pglast does not, then commits, opens a read-write transaction and creates a temporary
    view named like a real table, hoping later reads on the pooled connection see it."""
    planted = (
        "SELECT set_config('standard_conforming_strings', 'off', false); "
        "SELECT 'a\\''; COMMIT; BEGIN READ WRITE; "
        "CREATE TEMP VIEW customers AS SELECT 999 AS id, $$planted$$ AS name; --'"
    )
    assert len(statement_texts(planted)) == 2  # the parser sees two harmless SELECTs
    mallory, alice = idp.token("mallory"), idp.token("alice")
    async with run_gateway(rules=ALLOW_ANY) as gw:
        status, body = await gw.post(mallory, sql(planted))
        assert status == 200 and body["status"] == "failed", body
        assert "changed standard_conforming_strings" in body["error"]
        for token in (mallory, alice, mallory):
            status, body = await gw.post(token, sql(CUSTOMERS))
            assert body["result"]["rows"] == REAL_CUSTOMERS, body
        # each step on its own never runs on the read-only path: a human would have to approve
        for step in ("COMMIT", "BEGIN READ WRITE", "CREATE TEMP VIEW v AS SELECT 1", "DISCARD ALL"):
            status, body = await gw.post(mallory, sql(step))
            assert status == 202 and body["status"] == "pending", (step, body)


async def test_session_leftovers_never_reach_the_next_command(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    """A read takes a session-level advisory lock and moves search_path; both outlive a plain
    transaction end on a pooled connection."""
    token = idp.token("mallory")
    held = "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
    async with run_gateway(rules=ALLOW_ANY, gateway={"readonly_pool_size": 1}) as gw:
        status, body = await gw.post(
            token,
            sql("SELECT pg_advisory_lock(4242), set_config('search_path', 'pg_catalog', false)"),
        )
        assert body["status"] == "executed", body

        async def released() -> bool:
            return (await superuser(shop, held))[0]["n"] == 0

        await until(released)
        status, body = await gw.post(token, sql("SHOW search_path"))
        assert status == 200
        assert body["result"]["rows"] == [['"$user", public']], body


async def test_agents_cannot_see_or_end_each_others_queries(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    alice, bob = idp.token("alice"), idp.token("bob")
    async with run_gateway(rules=ALLOW_ANY) as gw:
        running = asyncio.create_task(
            gw.post(alice, sql("SELECT pg_sleep(1.5), 'alice-' || 'secret' AS marker"))
        )
        seen: list[asyncpg.Record] = []

        async def alice_runs() -> bool:
            seen[:] = await superuser(
                shop,
                "SELECT usename, application_name FROM pg_stat_activity"
                " WHERE query LIKE '%pg_sleep(1.5)%' AND usename <> 'postgres'",
            )
            return bool(seen)

        await until(alice_runs)
        # pg_stat_activity copies other sessions' SQL: neither a look nor a kill through it
        # runs without a human (the read-only logins could not see or end alice's anyway)
        for command in (
            "SELECT usename, query FROM pg_stat_activity WHERE usename <> current_user",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE usename = '{seen[0]['usename']}'",
        ):
            status, held = await gw.post(bob, sql(command))
            assert (status, held["status"]) == (202, "pending"), held
            request = await requests.get_request(gw.store, uuid.UUID(held["id"]))
            assert any("pg_stat_activity" in r for r in request.classification["reasons"])
        status, body = await running
        assert status == 200
        assert body["status"] == "executed" and body["result"]["rows"][0][1] == "alice-secret"
        # the target sees a tag, not the request id another agent could take away; keyturn
        # ties it back to the request for an operator
        tag = seen[0]["application_name"]
        assert tag == f"keyturn:{request_tag(body['id'])}" and body["id"] not in tag
        found = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "keyturn.cli", "tag", tag],
            capture_output=True, text=True, check=False,
            env={**os.environ, "KEYTURN_DATABASE_URL": gw.store.dsn.url},
        )  # fmt: skip
        assert found.returncode == 0, found.stderr
        assert found.stdout.startswith(f"{body['id']} executed on shop by alice at ")


# ------------------------------------------------------------------ time and concurrency


async def no_query_left(shop: Shop, marker: str) -> bool:
    rows = await superuser(
        shop,
        "SELECT count(*) AS n FROM pg_stat_activity"
        f" WHERE state = 'active' AND query LIKE '%{marker}%' AND usename <> 'postgres'",
    )
    return bool(rows[0]["n"] == 0)


async def test_the_deadline_is_the_gateways_not_the_commands(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    token = idp.token("mallory")
    command = "SELECT set_config('statement_timeout', '0', false); SELECT pg_sleep(30) AS slept"
    async with run_gateway(rules=ALLOW_ANY, gateway={"statement_timeout": "1s"}) as gw:
        status, body = await gw.post(token, sql(command))
        assert body["status"] == "failed" and body["error"].startswith("deadline exceeded"), body

        async def cancelled() -> bool:  # on the server, not just abandoned by the gateway
            return await no_query_left(shop, "pg_sleep(30) AS slept")

        await until(cancelled, timeout=3)
        status, body = await gw.post(token, sql("SELECT 1 AS still_works"))
        assert (status, body["status"]) == (200, "executed")


async def test_one_agent_cannot_hold_the_pools(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    mallory, alice = idp.token("mallory"), idp.token("alice")
    slow = sql("SELECT pg_sleep(2) AS hogging")
    async with run_gateway(
        rules=ALLOW_ANY, gateway={"agent_concurrency": 2, "statement_timeout": "5s"}
    ) as gw:
        hogs = [asyncio.create_task(gw.post(mallory, slow)) for _ in range(6)]

        async def two_hogging() -> bool:
            rows = await superuser(
                shop,
                "SELECT count(*) AS n FROM pg_stat_activity"
                " WHERE query LIKE '%AS hogging%' AND state = 'active' AND usename <> 'postgres'",
            )
            return bool(rows[0]["n"] == 2)

        await until(two_hogging)
        status, body = await gw.post(alice, sql("SELECT 1 AS unrelated"))
        assert (status, body["status"]) == (200, "executed")
        assert not all(h.done() for h in hogs)  # answered while mallory's reads still run
        results = await asyncio.gather(*hogs)
        assert sorted(s for s, _ in results) == [200, 200, 429, 429, 429, 429]
        refused = next(b for s, b in results if s == 429)
        assert (
            refused["error"]["code"] == "rate_limited"
            and "limit is 2" in refused["error"]["message"]
        )
        resp = await gw.client.post(
            "/v1/commands", json=slow, headers={"Authorization": f"Bearer {mallory}"}
        )
        assert resp.status == 200  # the slots came back


async def test_statements_per_command_are_capped(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    async with run_gateway(rules=ALLOW_ANY) as gw:
        status, body = await gw.post(idp.token("mallory"), sql("SELECT 1;" * 3000))
        assert status == 202 and body["status"] == "pending", body  # never run at once
        request = await requests.get_request(gw.store, uuid.UUID(body["id"]))
        assert any("at most 20" in r for r in request.classification["reasons"])


# ------------------------------------------------------------------ bounded results


async def test_huge_values_never_cross_the_wire_whole(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    caps = {"value_bytes": 4096, "response_bytes": 65536}
    async with run_gateway(gateway=caps) as gw:
        tracemalloc.start()
        try:
            status, body = await gw.post(
                token, sql("SELECT repeat('x', 30000000) AS big, g FROM generate_series(1, 2) g")
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert status == 200 and body["status"] == "executed", body
        result = body["result"]
        assert result["truncated"] == "value_bytes" and result["row_count"] == 2
        assert all(len(row[0]) <= 4096 and row[1] in (1, 2) for row in result["rows"])
        assert peak < 16 * 1024 * 1024, f"the gateway held {peak / 2**20:.0f} MiB"

        status, body = await gw.post(
            token, sql("SELECT repeat('y', 3000) AS v FROM generate_series(1, 1000)")
        )
        result = body["result"]
        assert result["truncated"] == "response_bytes" and 5 < result["row_count"] < 30
        assert len(json.dumps(body)) < 70_000

        # PII straddling the cut is dropped whole, never left as a fragment
        status, body = await gw.post(
            token,
            sql("SELECT repeat('x', 4080) || ' ada.lovelace@example.com 4111 1111 1111 1111'"),
        )
        value = body["result"]["rows"][0][0]
        assert set(value) == {"x"} and len(value) <= 4096 - 200, value[-40:]


async def test_health_answers_while_a_maximal_result_is_produced(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    big = sql("SELECT g, repeat(md5(g::text), 200) AS v FROM generate_series(1, 1000) g")
    caps = {"value_bytes": 1024 * 1024, "response_bytes": 8 * 1024 * 1024}
    async with run_gateway(
        gateway=caps, masking={"columns": [], "detectors": ["email", "phone"]}
    ) as gw:
        read = asyncio.create_task(gw.post(idp.token("crew-billing"), big))
        answered = 0
        while not read.done():
            resp = await gw.client.get("/healthz")
            assert resp.status == 200
            answered += 1
            await asyncio.sleep(0.005)
        status, body = await read
        assert status == 200 and body["result"]["row_count"] == 1000 and answered > 1


# 2,000 chained CTEs: judging it spends the whole work budget, then refuses it too_complex
COSTLY = sql(  # costly to judge, within keyturn.classify.sql.MAX_OPERATORS (4 per CTE)
    "WITH c0 AS (SELECT * FROM customers), "
    + ", ".join(f"c{i} AS (SELECT * FROM c{i - 1})" for i in range(1, 1200))
    + " SELECT * FROM c1199"
)


async def test_health_answers_while_eight_agents_send_the_costliest_commands_to_judge(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """The red team stalled /healthz for 23 s with one query; judging now happens in a small
    pool off the event loop and within a work budget: each gets a 400, the loop stays free."""
    async with run_gateway() as gw:
        token = idp.token("crew-billing")
        judging = [asyncio.create_task(gw.post(token, COSTLY)) for _ in range(8)]
        answered = 0
        while not all(task.done() for task in judging):
            assert (await gw.client.get("/healthz")).status == 200
            answered += 1
            await asyncio.sleep(0.005)
        for status, body in [task.result() for task in judging]:
            assert (status, body["error"]["code"]) == (400, "too_complex"), body
        assert answered > 1


async def test_one_agents_costly_commands_wait_for_each_other_not_in_front_of_others(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """The red team's four connections of costly shell lines made another agent's SELECT 1
    wait 17-20 s. Each identity is judged one command at a time: the attacker queues behind
    itself, and the other agent's command takes the pool's other thread."""
    async with run_gateway() as gw:
        attacker = idp.token("crew-billing")
        flood = [asyncio.create_task(gw.post(attacker, COSTLY)) for _ in range(8)]
        await asyncio.sleep(0.05)  # the flood is queued
        status, body = await gw.post(idp.token("crew-other"), sql("SELECT 1"))
        assert (status, body["status"]) == (200, "executed"), body
        assert sum(not task.done() for task in flood) >= 4  # most of the flood still waits
        await asyncio.gather(*flood)


# ------------------------------------------------------------------ records


@contextlib.asynccontextmanager
async def lock_held_by_dba(shop: Shop) -> AsyncIterator[None]:
    """An advisory lock a DBA holds: a command that reaches the target waits on it, visibly."""
    conn = await asyncpg.connect(shop.postgres.dsn(shop.database).url)
    await conn.execute("SELECT pg_advisory_lock(4711)")
    try:
        yield
    finally:
        await conn.close()


async def reached_target(shop: Shop, gw: Running, token: str, body: Any) -> tuple[int, bool]:
    """Post ``body`` (JSON or raw bytes); whether it ever waited on the DBA's lock."""
    if isinstance(body, bytes):
        coro = gw.client.post(
            "/v1/commands",
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        task: asyncio.Task[Any] = asyncio.create_task(coro)
    else:
        task = asyncio.create_task(gw.post(token, body))
    reached = False
    while not task.done():
        rows = await superuser(
            shop,
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = 4711"
            " AND NOT granted",
        )
        reached = reached or rows[0]["n"] > 0
        await asyncio.sleep(0.01)
    result = await task
    return (result.status if not isinstance(result, tuple) else result[0]), reached


LOCKING = "SELECT pg_advisory_xact_lock_shared(4711)"


async def test_nothing_runs_unrecorded(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    token = idp.token("mallory")
    async with run_gateway(rules=ALLOW_ANY, gateway={"statement_timeout": "2s"}) as gw:
        async with lock_held_by_dba(shop):
            # input that cannot be stored is refused before anything runs
            for body in (
                {**sql(LOCKING), "reason": "nul \x00 here"},
                {**sql(LOCKING), "run_id": "r" * 201},
                b'{"target": "shop", "command": "' + LOCKING.encode() + b' -- \\ud800"}',
            ):
                status, reached = await reached_target(shop, gw, token, body)
                assert status == 400 and not reached, body
            # keyturn's database cannot take the record: the command does not run either
            await gw.gw.journal.stop()
            dead = Dsn(f"postgresql://u:p@127.0.0.1:{free_port()}/gone", {})
            gw.gw.journal = Journal(Store(dead))
            gw.gw.journal.start()
            status, reached = await reached_target(shop, gw, token, sql(LOCKING))
            assert status == 503 and not reached
        await gw.gw.journal.stop()


async def test_the_record_is_committed_before_the_command_runs(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    async with run_gateway(rules=ALLOW_ANY, gateway={"statement_timeout": "5s"}) as gw:
        async with lock_held_by_dba(shop):
            task = asyncio.create_task(gw.post(idp.token("mallory"), sql(LOCKING)))

            async def waiting() -> bool:
                rows = await superuser(
                    shop, "SELECT count(*) AS n FROM pg_locks WHERE objid = 4711 AND NOT granted"
                )
                return bool(rows[0]["n"])

            await until(waiting)  # the command is on the target, blocked; its record exists
            async with gw.store.raw_connection() as conn:
                row = await conn.fetchrow(
                    "SELECT r.status, e.kind FROM requests r JOIN audit_events e"
                    " ON e.request_id = r.id WHERE r.command = $1",
                    LOCKING,
                )
            assert row is not None and tuple(row) == ("executing", "request.allowed")
        status, body = await task
        assert (status, body["status"]) == (200, "executed")


async def test_stopping_the_journal_commits_what_it_holds(database: Dsn) -> None:
    store = Store(database)
    journal = Journal(store)
    journal.start()
    intents = [
        outcomes.Outcome(uuid.uuid4(), "shop", "SELECT 1", "crew", "executing", "reads", {})
        for _ in range(20)
    ]
    recorded = [journal.enqueue(intent) for intent in intents]
    await asyncio.sleep(0.001)  # the batch has left the queue: its commit is under way
    await journal.stop()
    assert all(future.done() and future.exception() is None for future in recorded)
    async with store.raw_connection() as conn:
        statuses = await conn.fetch("SELECT status FROM requests")
    await store.close()
    assert [r["status"] for r in statuses] == ["executing"] * 20


def test_the_journal_retries_all_but_refused_data() -> None:
    from gateway.journal import _refused

    refused = [asyncpg.UniqueViolationError(), asyncpg.UntranslatableCharacterError()]
    transient = [
        asyncpg.TooManyConnectionsError(),
        asyncpg.CannotConnectNowError(),
        asyncpg.AdminShutdownError(),
        asyncpg.QueryCanceledError(),
        asyncpg.SerializationError(),
        asyncpg.DeadlockDetectedError(),
        OSError(),
    ]
    assert all(_refused(e) for e in refused)
    assert not any(_refused(e) for e in transient)


async def test_one_refused_record_does_not_fail_its_batch(database: Dsn) -> None:
    store = Store(database)
    journal = Journal(store)
    journal.start()

    def outcome(command: str) -> outcomes.Outcome:
        return outcomes.Outcome(
            uuid.uuid4(), "shop", command, "mallory", "executing", "reads", {}, reason="r"
        )

    good, bad = outcome("SELECT 1"), outcome("SELECT '\x00'")  # NUL: refused by Postgres
    try:
        results = await asyncio.gather(
            journal.record(good), journal.record(bad), return_exceptions=True
        )
        assert results[0] is None and isinstance(results[1], asyncpg.PostgresError)
        assert (await requests.get_request(store, good.id)).status == "executing"
    finally:
        await journal.stop()
        await store.close()


# ------------------------------------------------------------------ identities and logins


async def test_a_sub_is_never_a_group(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    command = {"target": "private", "command": "SELECT 1"}
    async with run_gateway() as gw:
        status, body = await gw.post(idp.token("group:sre"), command)  # no groups claim
        assert status == 403 and body["error"]["code"] == "not_allowed", body
        status, body = await gw.post(idp.token("crew-x", groups=["sre"]), command)
        assert status == 200, body
        status, body = await gw.post(idp.token("crew-vip"), command)
        assert status == 200, body


async def test_logins_stay_within_their_bound(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    async with run_gateway(gateway={"readonly_logins": 5, "statement_timeout": "1s"}) as gw:
        readers = gw.logins
        assert readers is not None
        most = 0
        sampling = True

        async def sample() -> None:
            nonlocal most
            while sampling:
                most = max(most, readers.open_count())
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        gate = asyncio.Semaphore(10)

        async def agent(i: int) -> int:
            async with gate:
                status, _ = await gw.post(idp.token(f"agent-{i}"), sql("SELECT 1"))
                return status

        statuses = await asyncio.gather(*(agent(i) for i in range(200)))
        sampling = False
        await sampler
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 20  # 429: all stayed busy
        assert most <= 5, most
        root = shop.root_vault()
        try:
            assert len(await root.lease_ids("database/creds/shop-ro")) <= 5
        finally:
            await root.close()
        roles = await superuser(
            shop, "SELECT count(*) AS n FROM pg_roles WHERE rolname LIKE 'v-%shop-ro%'"
        )
        assert roles[0]["n"] <= 5
        metrics = await (await gw.client.get("/metrics")).text()
        assert "keyturn_gateway_readonly_logins_limit 5.0" in metrics


async def test_an_idle_login_is_closed_and_its_lease_revoked(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    async with run_gateway(gateway={"readonly_idle": "1s"}) as gw:
        status, body = await gw.post(idp.token("crew-billing"), sql("SELECT 1"))
        assert (status, body["status"]) == (200, "executed")
        assert gw.logins is not None
        login = gw.logins.login_of("shop", "crew-billing")
        assert login is not None and login.lease is not None
        username, lease_id = login.lease.data["username"], login.lease.lease_id

        async def closed() -> bool:
            return gw.logins.login_of("shop", "crew-billing") is None  # type: ignore[union-attr]

        async def dropped() -> bool:  # the lease's revocation runs after the login is let go
            check = f"SELECT 1 FROM pg_roles WHERE rolname = '{username}'"
            return await superuser(shop, check) == []

        await until(closed)
        await until(dropped)
        root = shop.root_vault()
        try:
            assert lease_id not in await root.lease_ids("database/creds/shop-ro")
        finally:
            await root.close()
        metrics = await (await gw.client.get("/metrics")).text()
        assert 'keyturn_gateway_readonly_logins_closed_total{reason="idle"}' in metrics


# ------------------------------------------------------------------ reads of every shape


async def test_reads_of_every_shape(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    token = idp.token("crew-billing")
    shapes = {
        "SELECT name FROM customers WHERE id = 1;": [["Ada"]],
        "SELECT name FROM customers WHERE id = 1 -- a trailing comment": [["Ada"]],
        "SELECT '{\"a\": 1}'::json, '{\"b\": 2}'::jsonb": [['{"a": 1}', '{"b": 2}']],
        "SELECT '\\x0102'::bytea, ARRAY[1, 2], ARRAY['a', 'b'], int4range(1, 3), 1.50::numeric": [
            ["AQI=", [1, 2], ["a", "b"], "[1,3)", "1.50"]
        ],
        "SELECT 'infinity'::date, '24:00:00'::time, '0044-03-15 BC'::date, "
        "'infinity'::interval, 'NaN'::float8": [
            ["infinity", "24:00:00", "0044-03-15 BC", "infinity", "NaN"]
        ],
        "SELECT g FROM generate_series(1, 0) g": [],
    }
    async with run_gateway() as gw:
        for command, rows in shapes.items():
            status, body = await gw.post(token, sql(command))
            assert (status, body["status"]) == (200, "executed"), (command, body)
            assert body["result"]["rows"] == rows, (command, body["result"])
        wide = "SELECT " + ", ".join(f"'v{i}' AS c{i}" for i in range(900))
        status, body = await gw.post(token, sql(wide))
        assert body["status"] == "executed" and len(body["result"]["rows"][0]) == 900, body
        status, body = await gw.post(token, sql("SELECT $1::text"))
        assert status == 400 and "parameter $1" in body["error"]["message"], body


async def test_explain_runs_unless_its_constants_could_grow(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    reads = [{"name": "reads", "match": {"sql": ["select", "explain"]}, "action": "allow"}]
    async with run_gateway(rules=reads) as gw:
        status, body = await gw.post(token, sql("EXPLAIN SELECT * FROM orders WHERE id = 1"))
        assert body["status"] == "executed", body
        status, body = await gw.post(
            token, sql("EXPLAIN SELECT * FROM customers WHERE name = repeat('x', 40000000)")
        )
        assert status == 202 and body["status"] == "pending", body


async def test_a_schema_change_between_reads(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    token = idp.token("crew-billing")
    command = sql("SELECT id, status FROM orders WHERE id = 1")
    await shop.postgres.execute("CREATE TABLE IF NOT EXISTS drift (id int, v text)", shop.database)
    await shop.postgres.execute("GRANT SELECT ON drift TO PUBLIC", shop.database)
    try:
        async with run_gateway(gateway={"readonly_pool_size": 1}) as gw:
            command = sql("SELECT * FROM drift")
            status, body = await gw.post(token, command)
            assert body["status"] == "executed", body
            await shop.postgres.execute(
                "ALTER TABLE drift ALTER COLUMN v TYPE int USING 0", shop.database
            )
            status, body = await gw.post(token, command)  # the cached statement is stale
            assert (status, body["status"]) == (200, "executed"), body
    finally:
        await shop.postgres.execute("DROP TABLE drift", shop.database)


async def test_a_read_that_ignores_the_cancel_keeps_its_slot(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    """translate() never looks for a cancel: the server runs on after the deadline. The
    connection stays taken until it ends, so the agent cannot pile up runaway backends."""
    mallory, alice = idp.token("mallory"), idp.token("alice")
    runaway = sql("SELECT length(translate(repeat('a', 30000), repeat('b', 30000) || 'a', 'x'))")
    key = {"Idempotency-Key": "after-the-runaway"}
    async with run_gateway(gateway={"readonly_pool_size": 1, "statement_timeout": "1s"}) as gw:
        status, body = await gw.post(mallory, runaway)
        assert body["status"] == "failed" and "deadline" in body["error"], body
        status, body = await gw.post(mallory, sql("SELECT 1"), **key)
        assert status == 429, body  # its one connection is still behind the runaway
        status, body = await gw.post(alice, sql("SELECT 1"))
        assert body["status"] == "executed"

        async def runaway_ended() -> bool:
            return await no_query_left(shop, "translate(")

        await until(runaway_ended, timeout=60)
        # the command that never started gave its key back: the retry runs it
        status, body = await gw.post(mallory, sql("SELECT 1"), **key)
        assert (status, body["status"]) == (200, "executed"), body


async def test_a_cancelled_command_is_recorded_as_failed(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    from gateway.auth import _identity
    from gateway.usecases.submission import Submission
    from gateway.usecases.submit import submit

    async with run_gateway(rules=ALLOW_ANY) as gw:
        who = _identity({"sub": "crew-billing"}, "groups")
        asked = Submission("shop", "SELECT pg_sleep(5)", None, None, body_sha256="0" * 64)
        task = asyncio.create_task(submit(gw.gw, who, asked))

        async def executing() -> bool:  # judged (in the pool), recorded, and running
            async with gw.store.raw_connection() as conn:
                return await conn.fetchval("SELECT status FROM requests") == "executing"

        await until(executing)
        await asyncio.sleep(0.2)  # the statement is on its way to the target
        task.cancel()

        async def failed() -> bool:
            async with gw.store.raw_connection() as conn:
                rows = await conn.fetch("SELECT status, error FROM requests")
            return [tuple(r) for r in rows] == [("failed", "cancelled by the gateway")]

        await until(failed)


async def test_a_replaced_lease_is_revoked_once_its_connections_close(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    token = idp.token("mallory")
    async with run_gateway(rules=ALLOW_ANY) as gw:
        assert gw.logins is not None
        slow = asyncio.create_task(gw.post(token, sql("SELECT pg_sleep(1.5) AS slow")))

        async def running() -> bool:
            return not await no_query_left(shop, "AS slow")

        await until(running)
        login = gw.logins.login_of("shop", "mallory")
        assert login is not None and login.username is not None
        old = login.username
        await login.leases._fresh()  # what the keeper does when the lease nears its max TTL

        async def role_exists() -> bool:
            rows = await superuser(shop, f"SELECT 1 FROM pg_roles WHERE rolname = '{old}'")
            return bool(rows)

        assert login.username != old and await role_exists()  # its connection is busy
        status, body = await slow
        assert (status, body["status"]) == (200, "executed"), body

        async def revoked() -> bool:
            return not await role_exists()

        await until(revoked)


async def test_calls_are_judged_by_the_targets_own_catalog(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    await shop.postgres.execute(
        "CREATE OR REPLACE FUNCTION shop_total(int) RETURNS int STABLE LANGUAGE sql"
        " AS 'SELECT sum(total)::int FROM orders WHERE customer_id = $1';"
        " CREATE OR REPLACE FUNCTION shop_touch(int) RETURNS int VOLATILE LANGUAGE sql"
        " AS 'SELECT $1'",
        shop.database,
    )
    token = idp.token("crew-billing")
    held = [
        "SELECT * FROM pg_sleep(0)",
        "SELECT count(*) FROM pg_stat_activity, LATERAL pg_terminate_backend(pid) x",
        "VALUES (pg_notify('c', 'x'))",
        "SELECT shop_touch(1)",
        "SELECT no_such_function(1)",
        "SELECT txid_current()",
    ]
    try:
        async with run_gateway() as gw:
            for command in held:
                status, body = await gw.post(token, sql(command))
                assert (status, body["status"]) == (202, "pending"), (command, body)
            status, body = await gw.post(
                token, sql("SELECT lower(name), shop_total(id), now() IS NOT NULL FROM customers")
            )
            assert body["status"] == "executed", body
    finally:
        await shop.postgres.execute(
            "DROP FUNCTION shop_total(int); DROP FUNCTION shop_touch(int)", shop.database
        )


async def test_statistics_views_never_show_a_masked_column(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    """The red team's read: after ANALYZE, pg_stats holds an email column's most common values
    and histogram, readable by any role that may read the table, past every mask."""
    await shop.postgres.execute("ANALYZE customers", shop.database)
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        for command in (
            "SELECT attname, replace(histogram_bounds::text, '@', ' AT ') FROM pg_stats"
            " WHERE tablename = 'customers'",
            "WITH s AS (SELECT * FROM pg_catalog.pg_stats) SELECT most_common_vals::text FROM s",
            "SELECT (SELECT array_to_string(most_common_vals, ',') FROM pg_stats LIMIT 1)",
            "TABLE pg_stats_ext",
        ):
            await assert_held(gw, token, command, because="system relation")
        _, body = await gw.post(token, sql("SELECT tablename FROM pg_tables LIMIT 1"))
        assert body["status"] == "executed", body  # structure is still a read


async def test_masked_columns_are_followed_through_the_query(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        _, body = await gw.post(
            token, sql("SELECT id, email AS contact FROM customers ORDER BY id")
        )
        assert body["result"]["rows"] == [[1, "***"], [2, "***"]], body
        _, body = await gw.post(
            token, sql("SELECT c FROM (SELECT id, email AS c FROM customers) s ORDER BY id")
        )
        assert body["result"]["rows"] == [["***"], ["***"]], body
        for command in (
            "SELECT c FROM (SELECT email AS c FROM customers) s ORDER BY 1",  # order tells
            "SELECT reverse(email) FROM customers",
            "SELECT id FROM customers WHERE email = 'ada@example.com'",
            "SELECT string_agg(x, ',') FROM customers, unnest(regexp_split_to_array(email, '@')) x",
        ):
            await assert_held(gw, token, command, because="customers.email")


async def test_a_whole_row_call_in_column_notation_is_held_on_a_real_target(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """The red team's reads: ``c.concat`` is ``concat(c)`` on PostgreSQL, the whole row with
    its email. The gateway knows the target's columns, so ``c.name`` stays a plain read."""
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        _, body = await gw.post(token, sql("SELECT c.id, c.name FROM customers c ORDER BY 1"))
        assert body["status"] == "executed", body
        for command in (
            "SELECT reverse(c.concat) FROM customers c",
            "SELECT encode(convert_to(c.concat, 'UTF8'), 'hex') FROM customers c",
            "SELECT replace(c.quote_literal, '@', ' AT ') FROM customers c",
            "SELECT replace(c.json_agg_strict::text, '@', ' at ') FROM customers c",
            "WITH x AS (SELECT * FROM customers) SELECT translate(x.quote_literal, '@', '#') FROM x",
            "SELECT id FROM customers c WHERE c.concat LIKE '%ada%'",
            "SELECT c.to_json FROM customers c",
            "SELECT c.array_agg FROM customers c",
        ):
            await assert_held(gw, token, command, because="whole row")


async def test_names_an_agent_shadows_duplicates_or_quotes_are_held_on_a_real_target(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """The second outside round read emails through a duplicate column name, a quoted CTE
    name, an inner alias shadowing an outer one, and a FROM subquery correlated with the
    enclosing query; and lost a renamed email's mask beside (f()).*."""
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        for command in (
            "SELECT translate(row_to_json(s)::text, '@.', '#,')"
            " FROM (SELECT email AS a, 1 AS a FROM customers) s",
            'WITH "S" AS (SELECT email FROM customers), s AS (SELECT 1 AS x)'
            ' SELECT reverse(email) FROM "S"',
            "SELECT (SELECT string_agg(translate(c::text, '@.', '#,'), ';') FROM customers c)"
            " FROM (SELECT 1 AS x) c",
            "SELECT (SELECT t FROM (SELECT translate(c::text, '@.', '#,') AS t) s)"
            " FROM customers c",
            "SELECT email AS e2, (information_schema._pg_expandarray(ARRAY[1])).* FROM customers",
        ):
            await assert_held(gw, token, command)
        _, body = await gw.post(
            token, sql("SELECT s.* FROM (SELECT email AS a, 1 AS a FROM customers) s ORDER BY 2")
        )
        assert body["result"]["rows"] == [["***", 1], ["***", 1]], body


async def test_renames_recursion_and_grouping_sets_are_held_on_a_real_target(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """The third outside round: new names over a *, a recursive step reading earlier steps,
    a WITH RECURSIVE reading a later CTE, SEARCH/CYCLE copies, ROLLUP on an output name;
    and what the later rounds found (each held, so more than the 20 pending an agent may
    have by default)."""
    token = idp.token("crew-billing")
    async with run_gateway(gateway={"max_pending_per_agent": 100}) as gw:
        for command in (
            "SELECT reverse(c) FROM (SELECT * FROM customers) x(a, b, c)",
            "WITH s(a, b, c) AS (SELECT * FROM customers) SELECT a, replace(c, '@', ' AT ') FROM s",
            "SELECT a, reverse(f) FROM (customers CROSS JOIN (SELECT 1) o) AS j(a, b, c, f)",
            "WITH RECURSIVE r(n, e, leak) AS (SELECT 0, NULL::text, NULL::text UNION ALL"
            " SELECT r.n + 1, c.email, reverse(r.e) FROM r JOIN customers c ON c.id = r.n + 1)"
            " SELECT n, leak FROM r",
            "WITH RECURSIVE a AS (SELECT x FROM s), s AS (SELECT email AS x FROM customers)"
            " SELECT reverse(x) FROM a",
            "WITH RECURSIVE r AS (SELECT id, email FROM customers UNION ALL SELECT id, email"
            " FROM r WHERE false) SEARCH DEPTH FIRST BY email SET o SELECT id, reverse(o::text)"
            " FROM r",
            "SELECT email AS x, count(*) FROM customers GROUP BY ROLLUP (x) ORDER BY 2",
            # the fourth round: a scalar subquery named after its column; * positions
            "SELECT reverse(s.email) FROM (SELECT (SELECT email FROM customers c2"
            " WHERE c2.id = c.id) FROM customers c) s",
            "SELECT * FROM customers ORDER BY 3 DESC",
            "SELECT DISTINCT ON (3) * FROM customers",
            # the fifth round: a subquery's * compared by value; FROM items lineage missed
            "SELECT (1, 'Ada', 'a') < (SELECT * FROM customers WHERE id = 1) AS lt",
            "SELECT id FROM customers WHERE (1, 'Ada', 'ada@example.com') IN"
            " (SELECT * FROM customers)",
            "SELECT reverse(b) AS r FROM (SELECT * FROM JSON_TABLE('[1]', '$[*]'"
            " COLUMNS (z int PATH '$')) x, (SELECT email AS e FROM customers) c) q(a, b)",
            "SELECT reverse(q.a) AS r FROM (SELECT c.* FROM ((SELECT 1 AS z) c CROSS JOIN"
            " (SELECT 1 AS w) o) AS j, (SELECT email AS e FROM customers) c) q(a)",
            # the sixth round: a non-recursive CTE named like a table, an alias named like a
            # column, a position after a * of unknown width
            "WITH customers AS (SELECT 'x' AS e UNION ALL SELECT email FROM customers)"
            " SELECT reverse(e) FROM customers",
            "SELECT reverse(email) FROM customers, (SELECT 1 AS y) email",
            "SELECT name FROM (SELECT g.*, email, name FROM customers,"
            " generate_series(1, 1) g ORDER BY 2 DESC) s",
            # the seventh round: a bare name over an aliased join
            "SELECT reverse(x) AS r FROM ((SELECT email AS x FROM customers) s"
            " CROSS JOIN (SELECT 1) o) j",
            # the eleventh round: columns named as PostgreSQL names them; a set operation's
            # ORDER BY expression
            "SELECT reverse(text) FROM (SELECT 'x'::text UNION ALL SELECT email FROM customers) s",
            "SELECT id, email FROM customers UNION ALL SELECT -1, 'b' ORDER BY email::text",
            # the twelfth round: VALUES rows; a scalar subquery's * in the select list
            "SELECT v.column1 FROM customers c, LATERAL (VALUES (reverse(c.email))) v",
            # the thirteenth round: CASE named after its ELSE; VALUES' own ORDER BY
            "SELECT reverse(lower) FROM (SELECT CASE WHEN true THEN 'a' ELSE lower('b') END"
            " UNION ALL SELECT email FROM customers) s",
            "SELECT c.id, v.y FROM customers c, LATERAL (VALUES (c.email, 1), ('m', 2)"
            " ORDER BY column1::text LIMIT 1) v(x, y)",
            "SELECT reverse(e) FROM (SELECT (SELECT t.* FROM (SELECT email AS e FROM customers"
            " c2 WHERE c2.id = c.id) t) FROM customers c) s",
        ):
            await assert_held(gw, token, command)


async def test_where_a_result_is_cut_tells_nothing_of_a_masked_value(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """The eighth outside round read each email's exact length from where the response cap
    cut a result (raw sizes decided it, masking came after): 8 requests a row. A masked
    column now weighs what its mask does, so the cut falls at the same row whatever it holds."""
    token = idp.token("crew-billing")

    async def rows(value: str, pad: int) -> int:
        command = (
            "SELECT NULL::text AS email, repeat('x', 1090) AS p FROM generate_series(1, 900)"
            f" UNION ALL SELECT '{value}', repeat('x', {pad})"
        )
        status, body = await gw.post(token, sql(command))
        assert status == 200, body
        assert all(row[0] == "***" for row in body["result"]["rows"])  # nulls too
        return int(body["result"]["row_count"])

    async with run_gateway() as gw:
        low, high = 1, 200_000  # the largest pad that still fits, for a one-letter value
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if await rows("a", middle) == 901 else (low, middle - 1)
        for pad in range(low - 45, low + 6, 5):
            assert await rows("a", pad) == await rows("a" * 40, pad), pad


NAMED = [
    "email",
    "c.email",
    "'x'::text",
    "email::text",
    "email::varchar(3)",
    'email COLLATE "C"',
    "coalesce(email, 'x')",
    "CASE WHEN true THEN email END",
    "nullif(email, 'x')",
    "greatest(email, 'x')",
    "least(email, 'x')",
    "ARRAY[email]",
    "ROW(email)",
    "1 + 1",
    "lower(email)",
    "pg_catalog.lower(email)",
    "(SELECT email FROM customers LIMIT 1)",
    "(SELECT 'x'::text UNION ALL SELECT email FROM customers LIMIT 1)",
    "EXISTS (SELECT 1)",
    "ARRAY(SELECT email FROM customers)",
    "current_user",
    "current_date",
    "localtimestamp",
    "(ROW(email, 1)).f1",
    "'x'",
    "CAST(NULL AS int)",
    "- id",
    "email IS NULL",
    "GROUPING(email)",
    "CASE WHEN true THEN 'a' ELSE lower('b') END",
    "CASE WHEN true THEN 'a' END",
    "CASE WHEN true THEN 'a' END::text",
    "CASE WHEN true THEN email ELSE (SELECT 'x' AS q) END",
]


async def test_columns_are_named_as_postgresql_names_them(shop: Shop) -> None:
    """The eleventh outside round read emails through columns lineage called ?column? and
    PostgreSQL called `text` or `coalesce`: the server says what each expression is named."""
    from pglast import parse_sql

    from keyturn.classify.naming import column_name

    conn = await asyncpg.connect(shop.postgres.dsn(shop.database).url)
    try:
        for expression in NAMED:
            grouped = " GROUP BY email" if "GROUPING" in expression else ""
            query = f"SELECT {expression} FROM customers c{grouped}"
            statement = await conn.prepare(query)
            (attribute,) = statement.get_attributes()
            target = parse_sql(query)[0].stmt.targetList[0]  # type: ignore[union-attr]
            assert column_name(target) == attribute.name, expression
    finally:
        await conn.close()
