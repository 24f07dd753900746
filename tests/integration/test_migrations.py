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
            await asyncio.to_thread(migrate.upgrade, dsn, "0007")  # the text versions of then
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


# What 0007's bot stored as a card's version (the text form 0008 replaces).
OLD_VERSION = """
r.status || ':' || (SELECT count(*) FROM approvals a WHERE a.request_id = r.id) || ':' ||
coalesce(
    (SELECT g.status || '@' || floor(extract(epoch FROM g.expires_at))::bigint FROM grants g
     WHERE g.request_id = r.id ORDER BY g.created_at DESC LIMIT 1),
    CASE WHEN r.issue_attempts > 0 THEN 'retry' ELSE '' END)
"""


async def test_cards_keep_what_they_show_across_the_card_version_change(
    postgres_server: PostgresServer,
) -> None:
    """0008 rewrites every posted card's version in the typed form: each equals what the new
    bot computes for its request (no card is stale, so none is redrawn and nobody is told
    anything twice); the downgrade gives back the old text."""
    from bot import card_store
    from keyturn.store.db import Store

    await postgres_server.execute('CREATE DATABASE "migrations_versions"')
    dsn = postgres_server.dsn("migrations_versions")
    request = (
        "INSERT INTO requests (id, target, command, command_sha256, requester, status,"
        " classification, quorum, pending_expires_at, issue_attempts, session)"
        " VALUES ($1, 't', 'x', encode(sha256('x'), 'hex'), 'crew', $2, '{}', 1, now(), $3, $4)"
    )
    pending, retrying, running, person = (uuid.uuid4() for _ in range(4))
    try:
        await asyncio.to_thread(migrate.upgrade, dsn, "0007")
        conn = await asyncpg.connect(dsn.url)
        try:
            await conn.execute(request, pending, "pending", 0, False)
            await conn.execute(request, retrying, "approved", 2, False)
            await conn.execute(request, running, "executing", 1, False)
            await conn.execute(request, person, "executing", 0, True)
            for ident in (retrying, running, person):
                await conn.execute(
                    "INSERT INTO approvals (request_id, approver, decision, at)"
                    " VALUES ($1, 'U1', 'approve', now())",
                    ident,
                )
            for ident in (running, person):
                await conn.execute(
                    "INSERT INTO grants (id, request_id, subject, target, status, created_at,"
                    " expires_at) VALUES ($1, $2, 'crew', 't', 'active', now(),"
                    " now() + interval '10 minutes')",
                    uuid.uuid4(),
                    ident,
                )
            await conn.execute(
                "INSERT INTO cards (request_id, channel, ts, shown)"
                f" SELECT r.id, 'C1', r.id::text, {OLD_VERSION} FROM requests r"
            )
            before = dict(await conn.fetch("SELECT request_id, shown FROM cards"))
            assert before[running].startswith("executing:1:active@")
            assert before[retrying] == "approved:1:retry"
            await asyncio.to_thread(migrate.upgrade, dsn)
            async with Store(dsn) as store:
                assert await card_store.stale_cards(store) == []
                shown = {i: await card_store.card_of(store, i) for i in before}
            assert {
                i: (c.shown.status, c.shown.grant) for i, c in shown.items() if c and c.shown
            } == {
                pending: ("pending", None),
                retrying: ("approved", None),
                running: ("executing", "active"),
                person: ("executing", "active"),
            }
            assert await conn.fetchval("SELECT count(*) FROM requests WHERE access") == 1
            await asyncio.to_thread(migrate.downgrade, dsn, "0007")
            assert dict(await conn.fetch("SELECT request_id, shown FROM cards")) == before
            assert await conn.fetchval("SELECT count(*) FROM requests WHERE session") == 1
        finally:
            await conn.close()
    finally:
        await postgres_server.execute('DROP DATABASE "migrations_versions" WITH (FORCE)')
