"""Attackers' stories against the Postgres protocol's edge, each with a valid token; each
fails with its guard removed (the guard named in the test's docstring)."""

from __future__ import annotations

import asyncio
import socket
import struct

import asyncpg
import psycopg
import pytest

from keyturn.harness.idp import DevIdP
from keyturn.harness.tls import ServerTls
from tests.integration.conftest import DeskFactory
from tests.integration.wire import Raw, Wire, fields, wire_desk

AGENT = "crew-billing"


async def _commands(wire: Wire) -> list[str]:
    async with wire.desk.store.raw_connection() as conn:
        return [r[0] for r in await conn.fetch("SELECT command FROM requests ORDER BY created_at")]


async def test_a_write_in_a_bind_parameter_is_a_value(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: values.literal doubles the quote (and parenthesises). A parameter carrying SQL
    comes back as the string it is, in text and in binary, and nothing else is recorded."""
    token = idp.token(AGENT)
    payloads = [
        "x'); DELETE FROM orders WHERE id = 20; --",
        "x' AS a; DELETE FROM orders WHERE id = 20; --",
        "\\'; DELETE FROM orders WHERE id = 20; --",
        "$$; DELETE FROM orders WHERE id = 20; $$",
    ]
    async with wire_desk(run_desk, tls) as wire:
        conn = await psycopg.AsyncConnection.connect(
            wire.url(AGENT), password=token, autocommit=True
        )
        async with conn:
            for payload in payloads:
                cur = await conn.execute("SELECT %s::text AS v", (payload,))
                assert await cur.fetchone() == (payload,)
                cur = await conn.execute("SELECT %b::bytea AS v", (payload.encode(),))
                assert await cur.fetchone() == (payload.encode(),)
        binary = await wire.asyncpg(AGENT, token)
        try:
            for payload in payloads:  # asyncpg sends text parameters in binary
                assert await binary.fetchval("SELECT $1::text", payload) == payload
        finally:
            await binary.close()
        recorded = await _commands(wire)
        assert not [c for c in recorded if c.lstrip("(").upper().startswith("DELETE")]
        assert all(c.startswith("SELECT") for c in recorded), recorded
        async with asyncio.timeout(10), wire.desk.store.raw_connection() as conn:
            while True:  # outcomes of allowed reads are committed after the answer
                statuses = [r[0] for r in await conn.fetch("SELECT status FROM requests")]
                if "executing" not in statuses:
                    break
                await asyncio.sleep(0.1)
        assert set(statuses) == {"executed"}


async def test_statements_pipelined_behind_a_held_one_wait_and_die_with_it(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: one message at a time, and an error skips to Sync. Behind a held UPDATE, a
    pipelined write is not even recorded until the UPDATE is decided; once it is denied, the
    write never is."""
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        raw = await Raw.login(wire, AGENT, token)
        for sql in (
            "UPDATE orders SET status = 'paid' WHERE id = 30",
            "UPDATE orders SET status = 'paid' WHERE id = 31",
        ):
            raw.send(b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))
            raw.send(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
            raw.send(b"E", b"\0" + struct.pack("!i", 0))
        raw.send(b"S")
        await raw.writer.drain()
        notice = await raw.until(b"N")
        assert "held for approval" in fields(notice[-1][1])["M"]
        await asyncio.sleep(1.0)  # what a pipelining gateway would have recorded by now
        assert [c for c in await _commands(wire) if "id = 31" in c] == []
        ident = fields(notice[-1][1])["M"].split("request ")[1].split(" ")[0]
        await wire.desk.deny(ident, "no")
        answer = await raw.until(b"Z", timeout=30)
        errors = [fields(body) for kind, body in answer if kind == b"E"]
        assert [e["C"] for e in errors] == ["42501"]
        assert not [kind for kind, _ in answer if kind == b"C"]  # nothing completed
        assert [c for c in await _commands(wire) if "id = 31" in c] == []
        await raw.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SET ROLE postgres",
        "set role = 'postgres'",
        "SET SESSION AUTHORIZATION postgres",
        "SET LOCAL statement_timeout = 0",
        "RESET ALL",
        "RESET role",
        "DISCARD ALL",
        "LISTEN keyturn",
        "NOTIFY keyturn",
        "COPY orders FROM PROGRAM 'id'",
        "COPY orders TO STDOUT",
        "PREPARE p AS SELECT 1",
        "EXECUTE p",
        "DECLARE c CURSOR FOR SELECT 1",
        "LOAD 'plpgsql'",
        "SET search_path TO pg_temp, public",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
    ],
)
async def test_session_state_is_refused(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls, sql: str
) -> None:
    """Guard: keyturn.classify.session. Statements that would change a session keyturn does
    not keep are refused at once (0A000), before anything is recorded or held."""
    async with wire_desk(run_desk, tls) as wire:
        raw = await Raw.login(wire, AGENT, idp.token(AGENT))
        raw.send(b"Q", sql.encode() + b"\0")
        answer = await raw.until(b"Z", timeout=10)
        errors = [fields(body) for kind, body in answer if kind == b"E"]
        assert [e["C"] for e in errors] == ["0A000"], answer
        assert await _commands(wire) == []
        await raw.close()


async def test_the_startup_user_must_be_the_tokens_subject(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: server._authenticate compares ``user`` with the token's sub."""
    async with wire_desk(run_desk, tls) as wire:
        with pytest.raises(psycopg.OperationalError, match="user must be the token's subject"):
            await psycopg.AsyncConnection.connect(wire.url("crew-vip"), password=idp.token(AGENT))
        for bad in (idp.token(AGENT, exp=0), idp.token(AGENT, aud="other"), "x" * 5000):
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await psycopg.AsyncConnection.connect(wire.url(AGENT), password=bad)
        with pytest.raises(psycopg.OperationalError, match="web"):  # an SSH target
            await psycopg.AsyncConnection.connect(wire.url(AGENT, "web"), password=idp.token(AGENT))
        with pytest.raises(psycopg.OperationalError, match="private"):  # not this agent's
            await psycopg.AsyncConnection.connect(
                wire.url(AGENT, "private"), password=idp.token(AGENT)
            )


async def test_bad_messages_close_only_their_connection(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: protocol.Connection's length and shape checks. Each bad message gets a FATAL
    error and its connection closed at once (a 1 GB length costs nothing); a second
    connection of the same agent goes on working."""
    token = idp.token(AGENT)
    bad = {
        "1 GB": (b"Q", b"SELECT 1\0", 1 << 30),
        "negative": (b"Q", b"", -5),
        "too short": (b"Q", b"", 2),
        "unknown type": (b"z", b"", None),
        "function call": (b"F", b"", None),
        "copy data": (b"d", b"x", None),
        "bind count": (b"B", b"\0\0" + struct.pack("!h", 30000), None),
        "describe what": (b"D", b"X\0", None),
        "no terminator": (b"Q", b"SELECT 1", None),
        "trailing bytes": (b"S", b"junk", None),
        "invalid utf-8": (b"Q", b"SELECT '\xff'\0", None),
    }
    async with wire_desk(run_desk, tls) as wire:
        good = await psycopg.AsyncConnection.connect(
            wire.url(AGENT), password=token, autocommit=True
        )
        async with good:
            for name, (kind, body, length) in bad.items():
                raw = await Raw.login(wire, AGENT, token)
                raw.send(kind, body, length)
                sent, answer = await raw.message()
                assert sent == b"E", name
                assert fields(answer)["S"] == "FATAL", (name, fields(answer))
                assert await raw.closed(), name
                cur = await good.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
            startup = await Raw.open(wire)
            startup.writer.write(struct.pack("!ii", 99_999_999, 196608))
            assert (await startup.message())[0] == b"E"
            assert await startup.closed()


async def test_tls_is_required_and_nothing_rides_in_before_it(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guards: a StartupMessage in the clear is refused; bytes sent after an SSLRequest,
    before the handshake (CVE-2021-23214's class), close the connection unanswered."""
    async with wire_desk(run_desk, tls) as wire:
        plain = await Raw.open(wire, tls=False)
        plain.startup({"user": AGENT, "database": "shop"})
        kind, body = await plain.message()
        assert kind == b"E" and fields(body)["C"] == "28000"
        assert await plain.closed()
        early = await Raw.open(wire, tls=False)
        early.writer.write(struct.pack("!ii", 8, 80877103))
        early.startup({"user": AGENT, "database": "shop"})  # in the same write
        try:
            answered = await early.reader.read(1)
        except ConnectionResetError:  # closed with the client's bytes unread
            answered = b""
        assert answered == b""  # closed, no "S"
        await early.close()
        gss = await Raw.open(wire, tls=False)
        gss.writer.write(struct.pack("!ii", 8, 80877104))
        assert await gss.reader.readexactly(1) == b"N"
        await gss.close()


async def test_an_agents_idle_connections_stay_within_its_limit(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: postgres_connections_per_agent. 500 connections from one identity: 20 are
    let in, the rest get 53300; another agent still connects."""
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:

        async def attempt() -> Raw | str:
            raw = await Raw.open(wire)
            raw.startup({"user": AGENT, "database": "shop"})
            await raw.message()
            raw.send(b"p", token.encode() + b"\0")
            kind, body = await raw.message(timeout=60)
            if kind == b"E":
                await raw.close()
                return fields(body)["C"]
            return raw

        gate = asyncio.Semaphore(16)  # within what one address may have starting at once

        async def gated() -> Raw | str:
            async with gate:
                return await attempt()

        results = await asyncio.gather(*(gated() for _ in range(500)))
        admitted = [r for r in results if isinstance(r, Raw)]
        assert len(admitted) == 20
        assert {r for r in results if isinstance(r, str)} == {"53300"}
        other = await psycopg.AsyncConnection.connect(
            wire.url("crew-other"), password=idp.token("crew-other")
        )
        await other.close()
        for raw in admitted:
            await raw.close()


async def test_a_block_with_a_write_committed_on_approval_cannot_roll_back_quietly(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: Session._local refuses ROLLBACK of a block in which a write was committed at
    approval. The client is warned when it commits, and its ROLLBACK is an error."""
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        conn = await psycopg.AsyncConnection.connect(wire.url(AGENT), password=token)
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        async with conn:
            update = asyncio.create_task(
                conn.execute("UPDATE orders SET status = 'paid' WHERE id = 40")
            )
            async with asyncio.timeout(30):
                while not any("held for approval" in n for n in notices):
                    await asyncio.sleep(0.05)
            ident = notices[0].split("request ")[1].split(" ")[0]
            await wire.desk.approve(ident)
            await update
            assert any("cannot undo it" in n for n in notices)
            with pytest.raises(psycopg.errors.InvalidTransactionState, match="nothing was undone"):
                await conn.rollback()
            cur = await conn.execute("SELECT status FROM orders WHERE id = 40")
            assert await cur.fetchone() == ("paid",)


async def test_a_session_ends_when_its_token_does(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: the token is checked again before each statement (Session._submit)."""
    auth = {"jwks_url": idp.url, "issuer": idp.issuer, "leeway_seconds": 0}
    async with wire_desk(run_desk, tls, auth=auth) as wire:
        conn = await psycopg.AsyncConnection.connect(
            wire.url(AGENT), password=idp.token(AGENT, ttl=3), autocommit=True
        )
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        await asyncio.sleep(4)
        with pytest.raises(psycopg.OperationalError, match="expired"):
            await conn.execute("SELECT 2")
        assert conn.closed or conn.broken
        await conn.close()


async def test_a_statement_past_the_command_cap_is_refused_and_the_session_goes_on(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: session._capped. The HTTP API's 64 KiB cap on a command holds on the wire too,
    in a Query, a Parse, and after a Bind's values are put in; nothing is recorded."""
    async with wire_desk(run_desk, tls) as wire:
        raw = await Raw.login(wire, AGENT, idp.token(AGENT))
        big = b"x" * 70_000
        raw.send(b"Q", b"SELECT '" + big + b"'\0")
        raw.send(b"P", b"\0SELECT '" + big + b"'\0" + struct.pack("!h", 0))
        raw.send(b"S")
        raw.send(b"P", b"\0SELECT $1::text\0" + struct.pack("!h", 0))
        raw.send(b"B", b"\0\0" + struct.pack("!hhi", 0, 1, len(big)) + big + struct.pack("!h", 0))
        raw.send(b"E", b"\0" + struct.pack("!i", 0))
        raw.send(b"S")
        raw.send(b"Q", b"SELECT 1\0")
        await raw.writer.drain()
        codes = []
        for _ in range(3):
            answer = await raw.until(b"Z")
            codes += [fields(body)["C"] for kind, body in answer if kind == b"E"]
        assert codes == ["54000", "54000", "54000"]
        last = await raw.until(b"Z")
        assert [kind for kind, _ in last] == [b"T", b"D", b"C", b"Z"]
        assert [c for c in await _commands(wire) if "xxx" in c] == []
        await raw.close()


async def test_idle_sockets_from_one_address_cannot_lock_others_out(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: server.STARTING_PER_PEER. 300 sockets that never speak, from 127.0.0.2, hold
    at most that many startup slots; an agent from 127.0.0.1 still connects at once (with
    room for 100 connections in all, which the sockets alone would fill)."""
    async with wire_desk(run_desk, tls, postgres_max_connections=100) as wire:
        idle = []
        for _ in range(300):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", wire.port))
            idle.append(sock)
        try:
            async with asyncio.timeout(10):
                conn = await psycopg.AsyncConnection.connect(
                    wire.url(AGENT), password=idp.token(AGENT), autocommit=True
                )
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
                await conn.close()
        finally:
            for sock in idle:
                sock.close()


async def test_a_left_deep_expression_is_refused_and_the_gateway_lives(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: keyturn.classify.sql.MAX_OPERATORS. pglast recursed in C without a check and
    took the whole process down on ``1+1+…`` (32,000 terms fit in 64 KiB); over the wire and
    over HTTP it is refused, and the gateway answers the next statement."""
    deep = "SELECT " + "+".join(["1"] * 32_000)
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        conn = await psycopg.AsyncConnection.connect(
            wire.url(AGENT), password=token, autocommit=True
        )
        async with conn:
            with pytest.raises(psycopg.errors.StatementTooComplex):
                await conn.execute(deep)
            with pytest.raises(psycopg.errors.StatementTooComplex):
                await conn.execute(deep + " + %s", (1,))
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        status, body = await wire.desk.gateway.post(token, {"target": "shop", "command": deep})
        assert (status, body["error"]["code"]) == (400, "too_complex")
        nested = "DELETE FROM orders WHERE id = " + "abs(" * 300 + "1" + ")" * 300
        status, body = await wire.desk.gateway.post(token, {"target": "shop", "command": nested})
        assert (status, body["status"]) == (202, "pending")  # printed back for no estimate


async def test_what_a_connection_keeps_is_bounded(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: session.MAX_STATEMENTS (and its bytes): named statements past the cap are
    refused, not kept, and the connection goes on."""
    async with wire_desk(run_desk, tls) as wire:
        raw = await Raw.login(wire, AGENT, idp.token(AGENT))
        for i in range(501):
            raw.send(b"P", f"s{i}\0SELECT {i}\0".encode() + struct.pack("!h", 0))
            raw.send(b"S")
        await raw.writer.drain()
        codes = []
        for _ in range(501):
            answer = await raw.until(b"Z")
            codes += [fields(body)["C"] for kind, body in answer if kind == b"E"]
        assert codes == ["54000"]
        raw.send(b"Q", b"SELECT 1\0")
        assert [kind for kind, _ in await raw.until(b"Z")] == [b"T", b"D", b"C", b"Z"]
        await raw.close()


async def test_a_query_with_a_refused_statement_runs_none_of_it(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: Session._query refuses the whole query first. ``UPDATE …; LISTEN x`` used to
    hold (and on approval commit) the UPDATE, then refuse LISTEN: Postgres would have run
    none of it."""
    async with wire_desk(run_desk, tls) as wire:
        raw = await Raw.login(wire, AGENT, idp.token(AGENT))
        for tail in (b"LISTEN x", b"SAVEPOINT s", b"ROLLBACK", b"RELEASE s"):
            # a write and a statement that would undo it (in Postgres): neither runs
            raw.send(b"Q", b"UPDATE orders SET status = 'x' WHERE id = 60; " + tail + b"\0")
            answer = await raw.until(b"Z", timeout=10)
            assert [fields(b)["C"] for k, b in answer if k == b"E"] == ["0A000"], tail
            assert not [k for k, _ in answer if k in (b"N", b"C")]
        assert await _commands(wire) == []
        raw.send(b"Q", b"SET application_name = 'crew'\0")  # answered, without NoData
        assert [kind for kind, _ in await raw.until(b"Z")] == [b"S", b"C", b"Z"]
        await raw.close()


async def test_statements_sent_together_keep_their_line_comments_to_themselves(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: joined statements go on lines of their own. A trailing ``-- comment`` once
    swallowed the separator, merging two statements into one request no one sent."""
    async with wire_desk(run_desk, tls) as wire:
        conn = await psycopg.AsyncConnection.connect(
            wire.url(AGENT), password=idp.token(AGENT), autocommit=True
        )
        async with conn:
            both = asyncio.create_task(
                conn.execute(
                    "UPDATE orders SET status = 'a' WHERE id = 61 -- first\n;"
                    " UPDATE orders SET status = 'b' WHERE id = 62"
                )
            )
            async with asyncio.timeout(20):
                while not (recorded := await _commands(wire)):
                    await asyncio.sleep(0.05)
            await wire.desk.approve(await _pending_id(wire))
            await both
            cur = await conn.execute("SELECT status FROM orders WHERE id IN (61, 62) ORDER BY id")
            assert await cur.fetchall() == [("a",), ("b",)]
        assert len(recorded) == 1 and "-- first\n;" in recorded[0]


async def _pending_id(wire: Wire) -> str:
    async with wire.desk.store.raw_connection() as conn:
        return str(await conn.fetchval("SELECT id::text FROM requests WHERE status = 'pending'"))


async def test_a_portal_runs_once_and_ends_at_sync(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guards: a portal that failed says so again rather than running again; portals end
    with the implicit transaction at Sync, as in Postgres."""
    async with wire_desk(run_desk, tls) as wire:
        raw = await Raw.login(wire, AGENT, idp.token(AGENT))
        raw.send(b"P", b"\0DROP TABLE orders\0" + struct.pack("!h", 0))
        raw.send(b"B", b"p\0\0" + struct.pack("!hhh", 0, 0, 0))
        raw.send(b"E", b"p\0" + struct.pack("!i", 0))
        raw.send(b"S")
        raw.send(b"E", b"p\0" + struct.pack("!i", 0))
        raw.send(b"S")
        await raw.writer.drain()
        first = await raw.until(b"Z")
        assert [fields(b)["C"] for k, b in first if k == b"E"] == ["42501"]
        second = await raw.until(b"Z")
        assert [fields(b)["C"] for k, b in second if k == b"E"] == ["34000"]
        blocked = wire.desk.gateway.gw.metrics.pg_statements.labels("blocked")
        assert blocked._value.get() == 1  # judged (and recorded) once
        # in a block, portals outlive Sync; ROLLBACK TO clears the failure, not the portal
        raw.send(b"Q", b"BEGIN; SAVEPOINT a\0")
        raw.send(b"B", b"p\0\0" + struct.pack("!hhh", 0, 0, 0))
        raw.send(b"E", b"p\0" + struct.pack("!i", 0))
        raw.send(b"S")
        raw.send(b"Q", b"ROLLBACK TO a\0")
        raw.send(b"E", b"p\0" + struct.pack("!i", 0))
        raw.send(b"S")
        await raw.writer.drain()
        codes = []
        for _ in range(4):
            answer = await raw.until(b"Z")
            codes += [fields(b)["C"] for k, b in answer if k == b"E"]
        assert codes == ["42501", "42501"]
        assert blocked._value.get() == 2  # the second is the first's answer, not a new run


async def test_a_write_that_committed_is_never_reported_as_failed(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: Session._sendable. An approved write whose RETURNING rows cannot be sent (a
    value past the per-value cap) answers its real tag and a warning, not an error that
    would invite the agent to send the write again."""
    async with wire_desk(run_desk, tls) as wire:
        conn = await psycopg.AsyncConnection.connect(
            wire.url(AGENT), password=idp.token(AGENT), autocommit=True
        )
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        async with conn:
            update = asyncio.create_task(
                conn.execute(
                    "UPDATE orders SET status = 'big' WHERE id = 63 RETURNING repeat('x', 100000)"
                )
            )
            async with asyncio.timeout(20):
                while not await _commands(wire):
                    await asyncio.sleep(0.05)
            await wire.desk.approve(await _pending_id(wire))
            cur = await update
            assert cur.statusmessage == "UPDATE 1"
            assert any("its rows are not sent" in n for n in notices)


async def test_a_parameter_typed_by_the_client_is_described_as_that_type(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """``SELECT $1`` with $1 typed float8 by the client: described (and run) as float8, so
    a client that relies on Describe gets its rows, not a type mismatch."""
    async with wire_desk(run_desk, tls) as wire:
        raw = await Raw.login(wire, AGENT, idp.token(AGENT))
        raw.send(b"P", b"s\0SELECT $1\0" + struct.pack("!hI", 1, 701))
        raw.send(b"D", b"Ss\0")
        raw.send(
            b"B",
            b"\0s\0"
            + struct.pack("!hhhi", 1, 1, 1, 8)
            + struct.pack("!d", 1.5)
            + struct.pack("!hh", 1, 1),
        )
        raw.send(b"E", b"\0" + struct.pack("!i", 0))
        raw.send(b"S")
        await raw.writer.drain()
        answer = dict((k, b) for k, b in await raw.until(b"Z") if k in b"tTDE")
        assert b"E" not in answer, fields(answer[b"E"])
        assert answer[b"t"] == struct.pack("!hI", 1, 701)
        assert struct.unpack("!I", answer[b"T"][-12:-8])[0] == 701  # the column's type oid
        assert answer[b"D"] == struct.pack("!hi", 1, 8) + struct.pack("!d", 1.5)
        await raw.close()


async def test_a_pipeline_partly_committed_says_so_when_it_fails(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    """Guard: Session.pipelined. asyncpg's executemany sends its writes in one pipeline; each
    is its own request. When the first is approved and the second denied, the error the
    client raises names the committed one: a retry of the whole batch is not quietly safe."""
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        conn = await wire.asyncpg(AGENT, token)
        try:
            batch = asyncio.create_task(
                conn.executemany(
                    "UPDATE orders SET status = $1 WHERE id = $2", [("one", 70), ("two", 71)]
                )
            )
            for decide in (wire.desk.approve, None):
                async with asyncio.timeout(20):
                    while not (pending := await _pending_id(wire)) or pending == "None":
                        await asyncio.sleep(0.05)
                if decide is not None:
                    first = pending
                    await decide(pending)
                    async with asyncio.timeout(20):
                        while await _pending_id(wire) == first:
                            await asyncio.sleep(0.05)
                else:
                    await wire.desk.deny(pending, "not two")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"requests {first}"):
                await batch
        finally:
            await conn.close()
