"""Real Postgres clients nobody here wrote, connected to keyturn as if it were the database:
psql (Debian's, verify-full), psycopg 3, asyncpg, SQLAlchemy 2 and pg8000. Each: an allowed
read with masked emails, a held UPDATE approved in Slack (``UPDATE 1``), a denied DELETE
(42501 and the reason), a prepared statement run twice, a cancelled long read, a wrong token
(28P01)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import asyncpg
import pg8000.native
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import orm

from keyturn.harness.idp import DevIdP
from keyturn.harness.tls import ServerTls
from tests.integration.conftest import DeskFactory, Shop
from tests.integration.wire import Raw, Wire, fields, wire_desk

AGENT = "crew-billing"
LONG_READ = "SELECT count(*) FROM generate_series(1, 2000000000) a"


async def _decide(wire: Wire, approve: bool, reason: str = "not today") -> str:
    """Approve (or deny) the next held request's card once it is posted; its id."""
    async with asyncio.timeout(30):
        while True:
            async with wire.desk.store.raw_connection() as conn:
                ident = await conn.fetchval(
                    "SELECT id::text FROM requests WHERE status = 'pending'"
                    " AND NOT id::text = ANY($1) ORDER BY created_at LIMIT 1",
                    list(wire.decided),
                )
            if ident:
                wire.decided.add(ident)
                break
            await asyncio.sleep(0.1)
    if approve:
        await wire.desk.approve(ident)
    else:
        await wire.desk.deny(ident, reason)
    return str(ident)


# ------------------------------------------------------------------ psycopg 3


async def _still_running(shop: Shop, fragment: str) -> int:
    """Statements containing ``fragment`` active on the target (keyturn wraps reads)."""
    rows = await shop.postgres.fetch(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
        f" AND pid <> pg_backend_pid() AND query LIKE '%{fragment}%'",
        shop.database,
    )
    return int(rows[0][0])


async def test_psycopg(run_desk: DeskFactory, idp: DevIdP, tls: ServerTls, shop: Shop) -> None:
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        conn = await psycopg.AsyncConnection.connect(
            wire.url(AGENT), password=token, autocommit=True
        )
        async with conn:
            cur = await conn.execute("SELECT id, name, email FROM customers ORDER BY id")
            assert await cur.fetchall() == [(1, "Ada", "***"), (2, "Lin", "***")]
            for order in (3, 4):  # prepared server-side from the first run (prepare=True)
                cur = await conn.execute(
                    "SELECT id, total FROM orders WHERE id = %s", (order,), prepare=True
                )
                assert await cur.fetchall() == [(order, order * 10)]
            update = asyncio.create_task(
                conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (7,))
            )
            await _decide(wire, approve=True)
            cur = await update
            assert cur.statusmessage == "UPDATE 1"
            delete = asyncio.create_task(conn.execute("DELETE FROM orders WHERE id = 8"))
            await _decide(wire, approve=False, reason="order 8 is audited")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="order 8 is audited"):
                await delete
            long = asyncio.create_task(conn.execute(LONG_READ))
            async with asyncio.timeout(10):  # running on the target
                while not await _still_running(shop, "generate_series(1, 2000000000)"):
                    await asyncio.sleep(0.05)
            await conn.cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await long
            async with asyncio.timeout(10):  # cancelled on the target too, not just abandoned
                while await _still_running(shop, "generate_series(1, 2000000000)"):
                    await asyncio.sleep(0.1)
            cur = await conn.execute("SELECT 1")  # the connection goes on
            assert await cur.fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await psycopg.AsyncConnection.connect(wire.url(AGENT), password=token + "x")
        metrics = await (await wire.desk.gateway.client.get("/metrics")).text()
        for line in (
            'keyturn_gateway_pg_statements_total{verdict="executed"}',
            'keyturn_gateway_pg_statements_total{verdict="denied"} 1.0',
            'keyturn_gateway_pg_connections_refused_total{reason="auth"} 1.0',
            "keyturn_gateway_pg_held_seconds_count 2.0",
            "# TYPE keyturn_gateway_pg_connections gauge",
        ):
            assert line in metrics, line


# ------------------------------------------------------------------ asyncpg


async def test_asyncpg(run_desk: DeskFactory, idp: DevIdP, tls: ServerTls) -> None:
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        conn = await wire.asyncpg(AGENT, token)
        try:
            rows = await conn.fetch("SELECT id, name, email FROM customers ORDER BY id")
            assert [tuple(r) for r in rows] == [(1, "Ada", "***"), (2, "Lin", "***")]
            statement = await conn.prepare("SELECT id, total, status FROM orders WHERE id = $1")
            assert tuple(await statement.fetchrow(5)) == (5, 50, "open")
            assert tuple(await statement.fetchrow(6)) == (6, 60, "open")
            update = asyncio.create_task(
                conn.execute("UPDATE orders SET status = 'paid' WHERE id = $1", 9)
            )
            await _decide(wire, approve=True)
            assert await update == "UPDATE 1"
            delete = asyncio.create_task(conn.execute("DELETE FROM orders WHERE id = 10"))
            await _decide(wire, approve=False, reason="keep order 10")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="keep order 10"):
                await delete
            with pytest.raises(TimeoutError):  # asyncpg sends a CancelRequest, then says so
                await conn.fetchval(LONG_READ, timeout=1.0)
            assert await conn.fetchval("SELECT 2") == 2
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await wire.asyncpg(AGENT, "nope")


# ------------------------------------------------------------------ pg8000


async def test_pg8000(run_desk: DeskFactory, idp: DevIdP, tls: ServerTls) -> None:
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:

        def session() -> None:
            conn = pg8000.native.Connection(**wire.kwargs(AGENT, token))
            try:
                rows = conn.run("SELECT id, name, email FROM customers ORDER BY id")
                assert rows == [[1, "Ada", "***"], [2, "Lin", "***"]]
                statement = conn.prepare("SELECT id, total FROM orders WHERE id = :id")
                assert statement.run(id=11) == [[11, 110]]
                assert statement.run(id=12) == [[12, 120]]
                conn.run("UPDATE orders SET status = 'paid' WHERE id = :id", id=13)
                assert conn.row_count == 1
                with pytest.raises(pg8000.native.DatabaseError, match="not this one"):
                    conn.run("DELETE FROM orders WHERE id = 14")
            finally:
                conn.close()

        running = asyncio.create_task(asyncio.to_thread(session))
        await _decide(wire, approve=True)
        await _decide(wire, approve=False, reason="not this one")
        await running
        with pytest.raises(pg8000.native.DatabaseError, match="28P01"):
            await asyncio.to_thread(pg8000.native.Connection, **wire.kwargs(AGENT, "bad"))


# ------------------------------------------------------------------ SQLAlchemy 2


async def test_sqlalchemy(run_desk: DeskFactory, idp: DevIdP, tls: ServerTls) -> None:
    """An unchanged SQLAlchemy program (psycopg driver): reflection, an ORM query, and a
    write in ``engine.begin()`` approved in Slack."""
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        url = wire.url(AGENT).replace("postgresql://", "postgresql+psycopg://")

        def program() -> tuple[list[str], list[tuple[int, str]], int]:
            engine = sa.create_engine(url, connect_args={"password": token}, poolclass=sa.NullPool)
            meta = sa.MetaData()
            customers = sa.Table("customers", meta, autoload_with=engine)
            columns = [c.name for c in customers.columns]

            class Base(orm.DeclarativeBase):
                pass

            class Order(Base):
                __tablename__ = "orders"
                id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
                status: orm.Mapped[str]

            with orm.Session(engine) as session:
                found = session.scalars(sa.select(Order).where(Order.id <= 2).order_by(Order.id))
                orders = [(o.id, o.status) for o in found]
            with engine.begin() as conn:
                updated = conn.execute(sa.text("UPDATE orders SET status = 'paid' WHERE id = 15"))
            engine.dispose()
            return columns, orders, updated.rowcount

        running = asyncio.create_task(asyncio.to_thread(program))
        await _decide(wire, approve=True)
        columns, orders, rowcount = await running
        assert columns == ["id", "name", "email", "note"]
        assert orders == [(1, "open"), (2, "open")]
        assert rowcount == 1


# ------------------------------------------------------------------ psql


def _psql() -> str:
    found = shutil.which("psql")
    if found is None:
        pytest.fail("Debian's psql (postgresql-client) is missing: scripts/test installs it")
    return found


async def test_psql(run_desk: DeskFactory, idp: DevIdP, tls: ServerTls) -> None:
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:

        def psql(*commands: str) -> subprocess.CompletedProcess[str]:
            args = [_psql(), wire.url(AGENT), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
            for command in commands:
                args += ["-c", command]
            env = {**os.environ, "PGPASSWORD": token, "PGCONNECT_TIMEOUT": "10"}
            return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)

        read = await asyncio.to_thread(psql, "SELECT id, email FROM customers ORDER BY id")
        assert read.returncode == 0, read.stderr
        assert read.stdout.split() == ["1|***", "2|***"]
        described = await asyncio.to_thread(psql, r"\d customers")
        assert described.returncode == 0, described.stderr
        assert "email" in described.stdout and "integer" in described.stdout
        dropped = await asyncio.to_thread(psql, "DROP TABLE customers")
        assert dropped.returncode != 0 and "dropping tables is never allowed" in dropped.stderr
        update = asyncio.create_task(
            asyncio.to_thread(psql, "UPDATE orders SET status = 'paid' WHERE id = 16")
        )
        ident = await _decide(wire, approve=True)
        done = await update
        assert done.returncode == 0, done.stderr
        assert f"held for approval: request {ident}" in done.stderr
        wrong = await asyncio.to_thread(
            lambda: subprocess.run(
                [_psql(), wire.url(AGENT), "-c", "SELECT 1"],
                capture_output=True,
                text=True,
                env={**os.environ, "PGPASSWORD": "wrong"},
                timeout=60,
            )
        )
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr


# ------------------------------------------------------------------ held, then expired or left


async def test_a_held_statement_that_nobody_decides_expires_as_57014(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls, writes={"pending_ttl": "2s"}) as wire:
        conn = await psycopg.AsyncConnection.connect(
            wire.url(AGENT), password=token, autocommit=True
        )
        async with conn:
            with pytest.raises(psycopg.errors.QueryCanceled, match="expired before anyone"):
                await conn.execute("UPDATE orders SET status = 'paid' WHERE id = 50")
            cur = await conn.execute("SELECT status FROM orders WHERE id = 50")
            assert await cur.fetchone() == ("open",)


async def test_a_client_that_leaves_while_held_leaves_the_request_held(
    run_desk: DeskFactory, idp: DevIdP, tls: ServerTls
) -> None:
    token = idp.token(AGENT)
    async with wire_desk(run_desk, tls) as wire:
        raw = await Raw.login(wire, AGENT, token)
        raw.send(b"Q", b"UPDATE orders SET status = 'paid' WHERE id = 51\0")
        notice = await raw.until(b"N")
        ident = fields(notice[-1][1])["M"].split("request ")[1].split(" ")[0]
        again = await raw.until(b"N", timeout=5)  # the keep-alive, every notice_interval
        assert "waiting" in fields(again[-1][1])["M"]
        await raw.close()
        await asyncio.sleep(1.5)
        status, body = await wire.desk.gateway.get(token, ident)
        assert (status, body["status"]) == (200, "pending")
