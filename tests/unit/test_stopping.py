"""How ``keyturn gateway`` and ``keyturn bot`` stop: a signal cancels the server so its
cleanup runs, and a second signal cannot cut that cleanup short."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from keyturn.cli import until_stopped


async def _server(cleaned: list[str]) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.sleep(0.2)  # draining: long-polls answered, logins revoked
        cleaned.append("done")


async def _signal(*signums: signal.Signals) -> None:
    for signum in signums:
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signum)


async def test_sigterm_stops_the_server_after_its_cleanup() -> None:
    cleaned: list[str] = []
    sender = asyncio.create_task(_signal(signal.SIGTERM))
    await until_stopped(_server(cleaned))  # returns: being stopped is how a server ends
    await sender
    assert cleaned == ["done"]


async def test_a_second_signal_does_not_cut_the_cleanup_short() -> None:
    """Ctrl-C reaches a whole process group, then a supervisor sends SIGTERM."""
    cleaned: list[str] = []
    sender = asyncio.create_task(_signal(signal.SIGINT, signal.SIGTERM))
    await until_stopped(_server(cleaned))
    await sender
    assert cleaned == ["done"]


async def test_a_server_that_fails_still_fails() -> None:
    async def broken() -> None:
        raise RuntimeError("no port")

    with pytest.raises(RuntimeError, match="no port"):
        await until_stopped(broken())
