"""LISTEN/NOTIFY: notifications wake waiters; a killed connection comes back; polling covers gaps."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest_asyncio

from keyturn.domain import Deciders, Decision
from keyturn.harness.ports import free_port
from keyturn.store import decisions, requests
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn, parse_dsn
from keyturn.store.listener import Listener, wait_until


@pytest_asyncio.fixture
async def listener(database: Dsn) -> AsyncIterator[Listener]:
    listener = Listener(database, probe_after=0.5, backoff_initial=0.05, backoff_max=0.5)
    listener.start()
    await asyncio.wait_for(listener.connected.wait(), 10)
    yield listener
    await listener.stop()


async def _notify(dsn: Dsn, payload: str) -> None:
    conn = await asyncpg.connect(dsn.url)
    try:
        await conn.execute("SELECT pg_notify('keyturn', $1)", payload)
    finally:
        await conn.close()


async def _kill_listener_backend(dsn: Dsn) -> int:
    conn = await asyncpg.connect(dsn.url)
    try:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'keyturn-listener' AND datname = current_database()"
        )
    finally:
        await conn.close()
    return killed


async def test_state_change_wakes_the_waiter(listener: Listener, store: Store) -> None:
    row, _ = await requests.create_request(
        store,
        requests.NewRequest(
            "orders-db", "DELETE FROM t WHERE id = 1", "crew", timedelta(minutes=5)
        ),
    )
    with listener.watch("request", row.id) as changed:
        task = asyncio.create_task(changed.wait(10))
        await decisions.decide(store, row.id, "U1", Decision.APPROVE, deciders=Deciders.only("U1"))
        assert await task is True
    assert listener.waiting == 0


async def test_unrelated_notifications_do_not_wake(listener: Listener, database: Dsn) -> None:
    with listener.watch("request", uuid.uuid4()) as changed:
        await _notify(database, f"request:{uuid.uuid4()}")
        assert await changed.wait(0.3) is False


async def test_subscribers_see_every_notification(listener: Listener, database: Dsn) -> None:
    seen: list[tuple[str, str]] = []
    listener.subscribe(lambda kind, ident: seen.append((kind, ident)))
    await _notify(database, "grant:abc")
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.02)
    assert seen == [("grant", "abc")]


async def test_keeps_delivering_after_its_backend_is_terminated(
    listener: Listener, database: Dsn
) -> None:
    reconnect_wakeups: list[str] = []
    listener.subscribe(lambda kind, _ident: reconnect_wakeups.append(kind))
    key = uuid.uuid4()
    with listener.watch("request", key) as changed:
        assert await _kill_listener_backend(database) == 1
        # Waiters are woken after the reconnect, so a change missed meanwhile is re-read.
        assert await changed.wait(10) is True
        assert listener.connects >= 2
        assert "*" in reconnect_wakeups
        await asyncio.wait_for(listener.connected.wait(), 10)
        await _notify(database, f"request:{key}")
        assert await changed.wait(10) is True


async def test_reconnects_with_backoff_while_postgres_refuses(database: Dsn) -> None:
    """Pointed at a dead port it keeps trying (no crash), waiting longer after each failure
    up to its cap; it never stops the process."""
    dead = parse_dsn(f"postgresql://nobody:x@127.0.0.1:{free_port()}/nothing")
    listener = Listener(dead, backoff_initial=0.01, backoff_max=0.05)
    listener.start()
    async with asyncio.timeout(10):
        while listener.failures < 4:  # three waits behind it: the ceiling is the cap now
            await asyncio.sleep(0.01)
    # jitter takes a wait down to half its ceiling: above the first wait means it doubled
    assert 0.01 < listener.last_wait <= 0.05
    assert listener.connects == 0
    await listener.stop()


async def _wait_for_decision(
    listener: Listener, store: Store, request_id: uuid.UUID, poll: float
) -> str:
    row = await wait_until(
        listener,
        "request",
        request_id,
        lambda: requests.get_request(store, request_id),
        lambda r: r.status != "pending",
        timeout=10,
        poll_interval=poll,
    )
    return row.status


async def test_wait_until_wakes_on_notification(listener: Listener, store: Store) -> None:
    row, _ = await requests.create_request(
        store,
        requests.NewRequest(
            "orders-db", "DELETE FROM t WHERE id = 1", "crew", timedelta(minutes=5)
        ),
    )
    # a poll interval far beyond the test's patience: only the notification can wake it in time
    waiter = asyncio.create_task(_wait_for_decision(listener, store, row.id, poll=60))
    await asyncio.sleep(0.1)
    await decisions.decide(store, row.id, "U1", Decision.DENY, "no", deciders=Deciders.only("U1"))
    assert await asyncio.wait_for(waiter, 5) == "denied"


async def test_wait_until_falls_back_to_polling(database: Dsn, store: Store) -> None:
    silent = Listener(database)  # never started: no notification will ever arrive
    row, _ = await requests.create_request(
        store,
        requests.NewRequest(
            "orders-db", "DELETE FROM t WHERE id = 1", "crew", timedelta(minutes=5)
        ),
    )
    waiter = asyncio.create_task(_wait_for_decision(silent, store, row.id, poll=0.05))
    await asyncio.sleep(0.1)
    await decisions.decide(store, row.id, "U1", Decision.APPROVE, deciders=Deciders.only("U1"))
    assert await asyncio.wait_for(waiter, 5) == "approved"
