"""The engine, the unit of work, and how Postgres failures become keyturn errors."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from keyturn.clock import Clock
from keyturn.errors import DatabaseUnavailable, NotFound, Unavailable
from keyturn.store.audit_log import EVENTS_FROM_JSON, Event, as_json, recording
from keyturn.store.dsn import Dsn
from keyturn.store.models import GrantRow, RequestRow

Row = TypeVar("Row", RequestRow, GrantRow)


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
    elif isinstance(exc, asyncpg.InsufficientResourcesError):
        return DatabaseUnavailable(
            f"Postgres at {dsn.redacted} is out of resources ({exc.sqlstate}: {exc}); retry later"
        )
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
    # the server is there but cannot take the work now: too many connections, disk full, out
    # of memory; shutting down or restarting
    asyncpg.InsufficientResourcesError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
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
    r"""One open transaction: the session, and what it will record when it commits.

    The unit of work: a use case changes rows and ``record``\ s what happened; on commit the
    events are appended to the audit chain and their notifications queued (``pg_notify``,
    which Postgres delivers only if the transaction commits), in the same transaction. No use
    case writes audit rows or notifications itself, so none can forget one or send one for a
    change that rolled back.
    """

    def __init__(self, session: AsyncSession, now: datetime) -> None:
        self.session = session
        self.now = now  # the store's clock when the transaction began: one instant per change
        self._events: list[Event] = []
        self._wakes: dict[tuple[str, str], None] = {}  # ordered, without repeats

    def record(self, *events: Event) -> None:
        """``events`` happened in this transaction: audited and announced on commit."""
        self._events += events
        for event in events:
            if event.wakes is not None:
                self.wake(*event.wakes)

    def wake(self, kind: str, ident: object) -> None:
        """Notify ``<kind>:<id>`` on commit without an audit event (a retry's new schedule,
        a hand-off to take)."""
        self._wakes[(kind, str(ident))] = None

    async def locked(self, model: type[Row], ident: uuid.UUID) -> Row:
        """The row, locked until the transaction ends (``SELECT … FOR UPDATE``); a missing
        one is :class:`~keyturn.errors.NotFound`."""
        row = (
            await self.session.scalars(
                select(model).where(model.id == ident).with_for_update(of=model)
            )
        ).one_or_none()
        if row is None:
            raise NotFound(f"{model.__tablename__[:-1]} {ident} not found")
        return row

    async def raw_connection(self) -> asyncpg.Connection:
        """The asyncpg connection under this transaction, for bulk statements on hot paths."""
        connection = await self.session.connection()
        raw = await connection.get_raw_connection()
        driver: asyncpg.Connection = raw.driver_connection
        if not driver.is_in_transaction():
            # SQLAlchemy's asyncpg adapter emits BEGIN lazily, on the first statement
            await connection.execute(text("SELECT 1"))
        return driver

    async def flush(self) -> None:
        """Write the recorded events and queue their notifications (called before commit)."""
        if not self._events and not self._wakes:
            return
        await self.session.flush()  # rows first: events refer to them
        await self.session.execute(
            text(_RECORD),
            {"events": as_json(self._events), "wakes": [f"{k}:{i}" for k, i in self._wakes]},
        )
        self._events, self._wakes = [], {}


# One statement: the transaction's events into the chain, then their notifications.
_RECORD = (
    "WITH events AS ("
    + EVENTS_FROM_JSON.format(param="CAST(:events AS jsonb)")
    + ")"
    + recording("events", "SELECT unnest(CAST(:wakes AS text[]))")
)


class Store:
    """Owns the engine. Every state change goes through :meth:`transaction`.

    ``async with Store(dsn) as store:`` closes it on the way out. A closed store refuses use
    rather than quietly opening new pools that nothing would close again.
    """

    def __init__(
        self, dsn: Dsn, *, clock: Clock | None = None, pool_size: int = 10, **engine_kwargs: Any
    ) -> None:
        self.dsn = dsn
        self.clock = clock or Clock()
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
        self._closed = False

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("this Store is closed; open a new one")

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
        self._open()
        async with self._translated(), self._sessions() as session, session.begin():
            tx = Tx(session, self.clock.now())
            yield tx
            await tx.flush()

    @contextlib.asynccontextmanager
    async def raw_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection from a plain asyncpg pool, for single-statement reads on hot paths.

        No ORM session and no greenlet per call: thousands of long-polls re-read rows through
        this without the memory and CPU a session costs.
        """
        self._open()
        async with self._translated():
            if self._raw_pool is None:
                async with self._raw_pool_lock:
                    self._open()  # closed while this waited: no pool that nothing would close
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
        self._closed = True
        async with self._raw_pool_lock:  # a pool being made now is closed too
            if self._raw_pool is not None:
                await self._raw_pool.close()
                self._raw_pool = None
        await self.engine.dispose()
