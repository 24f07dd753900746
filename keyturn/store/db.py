"""The engine, the unit of work, and how Postgres failures become keyturn errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from keyturn.errors import DatabaseUnavailable, Unavailable
from keyturn.store.dsn import Dsn

NOTIFY_CHANNEL = "keyturn"


def utcnow() -> datetime:
    return datetime.now(UTC)


def describe_connect_error(dsn: Dsn, exc: BaseException) -> Unavailable:
    """One line an operator can act on, without the password."""
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        why = "the server refused the credentials (check the user and password)"
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        why = f"database {dsn.database!r} does not exist (create it, then run `keyturn migrate`)"
    elif isinstance(exc, OSError | TimeoutError | asyncpg.CannotConnectNowError):
        why = "nothing answers there (is Postgres running, and are host and port right?)"
    else:
        why = f"{type(exc).__name__}: {exc}"
    return DatabaseUnavailable(f"cannot connect to Postgres at {dsn.redacted}: {why}")


_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


def connection_failure(exc: BaseException) -> BaseException | None:
    """The underlying connection error behind ``exc`` (SQLAlchemy wraps asyncpg's), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _CONNECTION_ERRORS):
            return current
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return current
        nxt = current.orig if isinstance(current, sa_exc.DBAPIError) else None
        current = nxt if isinstance(nxt, BaseException) else current.__cause__
    return None


class Tx:
    """One open transaction: the session plus the notifications it will send on commit."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def driver(self) -> asyncpg.Connection:
        """The asyncpg connection under this transaction, for bulk statements on hot paths."""
        connection = await self.session.connection()
        raw = await connection.get_raw_connection()
        driver: asyncpg.Connection = raw.driver_connection
        if not driver.is_in_transaction():
            # SQLAlchemy's asyncpg adapter emits BEGIN lazily, on the first statement
            await connection.execute(text("SELECT 1"))
        return driver

    async def notify_many(self, kind: str, idents: Sequence[object]) -> None:
        """:meth:`notify` for many rows in one statement."""
        if idents:
            await self.session.execute(
                text(
                    "SELECT pg_notify(:channel, :kind || ':' || x)"
                    " FROM unnest(CAST(:ids AS text[])) AS x"
                ),
                {"channel": NOTIFY_CHANNEL, "kind": kind, "ids": [str(i) for i in idents]},
            )

    async def notify(self, kind: str, ident: object) -> None:
        """Queue ``<kind>:<id>`` on the keyturn channel; Postgres delivers it only on commit."""
        await self.session.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": NOTIFY_CHANNEL, "payload": f"{kind}:{ident}"},
        )


class Store:
    """Owns the engine. Every state change goes through :meth:`transaction`."""

    def __init__(self, dsn: Dsn, *, pool_size: int = 10, **engine_kwargs: Any) -> None:
        self.dsn = dsn
        self._pool_size = pool_size
        self._raw_pool: asyncpg.Pool | None = None
        self._raw_pool_lock = asyncio.Lock()
        self.engine: AsyncEngine = create_async_engine(
            dsn.sqlalchemy_url,
            connect_args=dsn.connect_args,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            **engine_kwargs,
        )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.asynccontextmanager
    async def _translated(self) -> AsyncIterator[None]:
        """A lost or refused connection becomes Unavailable; other errors pass unchanged."""
        try:
            yield
        except (sa_exc.DBAPIError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            cause = connection_failure(exc)
            if cause is None:
                raise
            raise describe_connect_error(self.dsn, cause) from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """Commit on success, roll back on any error."""
        async with self._translated(), self._sessions() as session, session.begin():
            yield Tx(session)

    @contextlib.asynccontextmanager
    async def driver(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection from a plain asyncpg pool, for single-statement reads on hot paths.

        No ORM session and no greenlet per call: thousands of long-polls re-read rows through
        this without the memory and CPU a session costs.
        """
        async with self._translated():
            if self._raw_pool is None:
                async with self._raw_pool_lock:
                    if self._raw_pool is None:
                        self._raw_pool = await asyncpg.create_pool(
                            self.dsn.url,
                            min_size=1,
                            max_size=self._pool_size,
                            **self.dsn.connect_args,
                        )
            async with self._raw_pool.acquire() as conn:
                yield conn

    async def ping(self) -> None:
        async with self.transaction() as tx:
            await tx.session.execute(text("SELECT 1"))

    async def close(self) -> None:
        if self._raw_pool is not None:
            await self._raw_pool.close()
            self._raw_pool = None
        await self.engine.dispose()
