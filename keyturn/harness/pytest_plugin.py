"""pytest fixtures on real services: ``pytest_plugins = ["keyturn.harness.pytest_plugin"]``.

One Postgres cluster and one OpenBao dev server per session; the schema is migrated once into
a template database and every test gets its own copy (``CREATE DATABASE … TEMPLATE``, ~20 ms).
``KEYTURN_TEST_DATABASE_URL`` (a superuser DSN) points the suite at an existing server instead.
Nothing here skips: a service that cannot start fails the tests that need it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from keyturn.harness.openbao import OpenBaoDevServer
from keyturn.harness.postgres import PostgresCluster
from keyturn.store import migrate
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn, parse_dsn


@dataclass(frozen=True)
class PostgresServer:
    """A superuser connection to whichever server the session uses."""

    admin: Dsn  # superuser, database "postgres"
    password: str
    port: int

    def dsn(self, database: str, user: str | None = None, password: str | None = None) -> Dsn:
        dsn = self.admin.with_database(database)
        if user is None:
            return dsn
        return parse_dsn(f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}")

    async def execute(self, sql: str, database: str = "postgres") -> None:
        await self._run("execute", sql, database)

    async def fetch(self, sql: str, database: str = "postgres") -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._run("fetch", sql, database)
        return rows

    async def _run(self, method: str, sql: str, database: str) -> Any:
        conn = await asyncpg.connect(self.dsn(database).url, **self.admin.connect_args)
        try:
            return await getattr(conn, method)(sql)
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    external = os.environ.get("KEYTURN_TEST_DATABASE_URL")
    if external:
        dsn = parse_dsn(external, "KEYTURN_TEST_DATABASE_URL")
        from urllib.parse import urlsplit

        parts = urlsplit(dsn.url)
        yield PostgresServer(
            dsn.with_database("postgres"), parts.password or "", parts.port or 5432
        )
        return
    with PostgresCluster() as cluster:
        yield PostgresServer(cluster.dsn(), cluster.password, cluster.port)


@pytest.fixture(scope="session")
def template_database(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"keyturn_template_{uuid.uuid4().hex[:8]}"
    asyncio.run(postgres_server.execute(f'CREATE DATABASE "{name}"'))
    migrate.upgrade(postgres_server.dsn(name))
    asyncio.run(postgres_server.execute(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE true'))
    yield name
    asyncio.run(postgres_server.execute(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE false'))
    asyncio.run(postgres_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest_asyncio.fixture
async def database(postgres_server: PostgresServer, template_database: str) -> AsyncIterator[Dsn]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await postgres_server.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield postgres_server.dsn(name)
    left_open = await _connections_left(postgres_server, name)
    await postgres_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if left_open:
        pytest.fail(
            f"the test left {left_open} connection(s) open to its database: close every Store "
            "(async with Store(dsn) as store) and every connection it opens",
            pytrace=False,
        )


async def _connections_left(server: PostgresServer, name: str, grace: float = 5.0) -> int:
    """Connections still open to ``name`` once a closed client's backends have had time to go.

    A pool nobody closed outlives its test and, once the database is dropped, retries and warns
    in whichever later test the garbage collector happens to run: found here, it names the test.
    """
    query = f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'"
    deadline = asyncio.get_running_loop().time() + grace
    while True:
        left = int((await server.fetch(query))[0][0])
        if not left or asyncio.get_running_loop().time() > deadline:
            return left
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def store(database: Dsn) -> AsyncIterator[Store]:
    async with Store(database) as store:
        yield store


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoDevServer]:
    with OpenBaoDevServer() as server:
        yield server
