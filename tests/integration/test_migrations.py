"""Migrations go up and down on a real Postgres, and the models match them."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from keyturn.store import migrate
from keyturn.store.dsn import Dsn
from keyturn.store.models import Base
from keyturn.testing.pytest_plugin import PostgresServer


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
