"""What every ``keyturn`` subcommand shares: the parser that exits 2 on bad arguments, the
exit codes, running a coroutine, and keyturn's database for one command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from keyturn.store.db import Store

EXIT_BAD_INPUT = 2
EXIT_TAMPERED = 1


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def one_store(dsn: Any) -> AsyncIterator[Store]:
    """keyturn's database for one command: a single connection, closed however it ends."""
    from keyturn.store.db import Store

    store = Store(dsn, pool_size=1)
    try:
        yield store
    finally:
        await store.close()
