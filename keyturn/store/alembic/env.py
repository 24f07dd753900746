"""Alembic environment: runs migrations through the async engine (``connection.run_sync``)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from keyturn.store.dsn import Dsn
from keyturn.store.models import Base

config = context.config
target_metadata = Base.metadata


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run(dsn: Dsn) -> None:
    engine = create_async_engine(
        dsn.sqlalchemy_url, connect_args=dsn.connect_args, poolclass=NullPool
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate)
            await connection.commit()
    finally:
        await engine.dispose()


asyncio.run(_run(config.attributes["dsn"]))
