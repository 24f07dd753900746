"""Migrations go up and down on a real Postgres, and the models match them."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from keyturn.harness.pytest_plugin import PostgresServer
from keyturn.store import migrate
from keyturn.store.dsn import Dsn
from keyturn.store.models import Base


async def _tables(dsn: Dsn) -> set[str]:
    conn = await asyncpg.connect(dsn.url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


async def _diff(dsn: Dsn) -> list[object]:
    engine = create_async_engine(dsn.sqlalchemy_url, poolclass=NullPool)

    def compare(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    try:
        async with engine.connect() as conn:
            return await conn.run_sync(compare)
    finally:
        await engine.dispose()


async def test_upgrade_downgrade_upgrade(postgres_server: PostgresServer) -> None:
    await postgres_server.execute('CREATE DATABASE "migrations_roundtrip"')
    dsn = postgres_server.dsn("migrations_roundtrip")
    try:
        assert len(migrate.heads(dsn)) == 1, "migrations must have a single head"
        await asyncio.to_thread(migrate.upgrade, dsn)
        assert {"requests", "approvals", "grants", "audit_events", "audit_head"} <= await _tables(
            dsn
        )
        assert await _diff(dsn) == [], "models and migrations disagree"
        await asyncio.to_thread(migrate.downgrade, dsn, "base")
        assert await _tables(dsn) <= {"alembic_version"}
        await asyncio.to_thread(migrate.upgrade, dsn)
        assert "requests" in await _tables(dsn)
    finally:
        await postgres_server.execute('DROP DATABASE "migrations_roundtrip" WITH (FORCE)')


async def test_cards_move_to_their_table_and_back(postgres_server: PostgresServer) -> None:
    """0004 copies each request's card bookkeeping into ``cards``; its downgrade copies it
    back: a card posted before the upgrade is still known (not posted twice) after it."""
    await postgres_server.execute('CREATE DATABASE "migrations_cards"')
    dsn = postgres_server.dsn("migrations_cards")
    posted, claimed = uuid.uuid4(), uuid.uuid4()
    insert = (
        "INSERT INTO requests (id, target, command, command_sha256, requester, status,"
        " classification, quorum, pending_expires_at, slack_channel, slack_ts,"
        " card_claimed_by, card_claimed_at, card_status) VALUES ($1, 't', 'x',"
        " encode(sha256('x'), 'hex'), 'crew', 'pending', '{}', 1, now(), $2, $3, $4, now(), $5)"
    )
    try:
        await asyncio.to_thread(migrate.upgrade, dsn, "0003")
        conn = await asyncpg.connect(dsn.url)
        try:
            await conn.execute(insert, posted, "CAPPROVALS", "1.000001", "bot-a", "pending:0:")
            await conn.execute(insert, claimed, None, None, "bot-b", None)
            await asyncio.to_thread(migrate.upgrade, dsn)
            cards = {
                r["request_id"]: tuple(r)[1:]
                for r in await conn.fetch(
                    "SELECT request_id, channel, ts, claimed_by, shown FROM cards"
                )
            }
            assert cards == {
                posted: ("CAPPROVALS", "1.000001", "bot-a", "pending:0:"),
                claimed: (None, None, "bot-b", None),
            }
            await asyncio.to_thread(migrate.downgrade, dsn, "0003")
            back = await conn.fetchrow(
                "SELECT slack_channel, slack_ts, card_claimed_by, card_status FROM requests"
                " WHERE id = $1",
                posted,
            )
            assert tuple(back) == ("CAPPROVALS", "1.000001", "bot-a", "pending:0:")
        finally:
            await conn.close()
    finally:
        await postgres_server.execute('DROP DATABASE "migrations_cards" WITH (FORCE)')
