"""Each Postgres target's catalog, read through a read-only login and kept fresh.

The classifier judges function calls by what the target itself says about them, and reads
``t.f`` as a column or a call on the whole row by the target's columns
(:mod:`keyturn.classify.catalog`). A catalog is read on first use of a target, served from
memory afterwards and re-read in the background once older than ``gateway.catalog_refresh``.
When it cannot be read and no earlier copy exists, an empty catalog stands in: every function
call then holds, which is safe while the target is unreachable anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from gateway.drivers.postgres.logins import ReadOnlyLogins
from keyturn.aio import Deadline, spawn
from keyturn.classify.catalog import CATALOG_SQL, COLUMNS_SQL, SEARCH_PATH_SQL, Catalog
from keyturn.errors import KeyturnError

log = logging.getLogger(__name__)

CATALOG_IDENTITY = ""  # the login the gateway reads catalogs with: no agent's sub is empty
LOAD_TIMEOUT = 10.0
EMPTY = Catalog({}, ("pg_catalog",))


class Catalogs:
    def __init__(self, readers: ReadOnlyLogins, refresh: float) -> None:
        self._readers = readers
        self._refresh = refresh
        self._loaded: dict[str, tuple[float, Catalog]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._refreshing: set[asyncio.Task[None]] = set()

    async def get(self, target: str) -> Catalog:
        entry = self._loaded.get(target)
        if entry is None:
            async with self._locks.setdefault(target, asyncio.Lock()):
                entry = self._loaded.get(target)
                if entry is None:
                    await self._load(target)
                    entry = self._loaded.get(target)
            return entry[1] if entry is not None else EMPTY
        if time.monotonic() - entry[0] > self._refresh and not self._locks[target].locked():
            spawn(self._refreshing, self._reload(target))
        return entry[1]

    async def _reload(self, target: str) -> None:
        async with self._locks[target]:
            await self._load(target)

    async def _load(self, target: str) -> None:
        deadline = Deadline(LOAD_TIMEOUT)
        try:
            async with self._readers.transaction(
                target, CATALOG_IDENTITY, "catalog", deadline
            ) as conn:
                rows = await conn.fetch(CATALOG_SQL, timeout=deadline.left())
                path = await conn.fetchval(SEARCH_PATH_SQL, timeout=deadline.left())
                relations = await conn.fetch(COLUMNS_SQL, timeout=deadline.left())
        except (KeyturnError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("cannot read the function catalog of %s (calls hold): %s", target, exc)
            return
        self._loaded[target] = (time.monotonic(), Catalog.of(rows, path, relations))
        log.info("catalog of %s: %d functions, %d relations", target, len(rows), len(relations))
