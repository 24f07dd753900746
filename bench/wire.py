"""The Postgres protocol's edge: run ``python bench/wire.py`` (after scripts/test set up .venv).

1. Added latency: the same allowed SELECT from asyncpg through keyturn's Postgres edge (TLS,
   token, judging, the record, the agent's read-only login, masking) versus directly over
   asyncpg with a read-only login of the same kind; as a ratio to what a bare asyncio
   byte-forwarding proxy in front of the target adds, measured in the same run.
2. Throughput: statements per second from 50 connections (10 agents, 5 each), through the
   edge and through the floor proxy.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.stack import Stack, percentile, real_stack, report
from gateway.bootstrap import build
from keyturn.harness.tls import make_server_tls
from keyturn.store.db import Store

QUERY = "SELECT id, total, status FROM orders WHERE id = $1"
ITERATIONS = 2000
AGENTS = 10
PER_AGENT = 5
SECONDS = 8


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def floor_proxy(port: int) -> asyncio.Server:
    """A bare byte-forwarding proxy to 127.0.0.1:``port`` (the floor)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(_forward(reader, up_writer), _forward(up_reader, writer))

    return await asyncio.start_server(pipe, "127.0.0.1", 0)


Connect = Callable[[int], Awaitable[asyncpg.Connection]]


async def p50(connect: Connect, values: int = 1) -> float:
    """The median of ``QUERY`` with ``values`` different parameters in turn (each value is
    another statement text to keyturn, judged once and then cached)."""
    conn = await connect(0)
    for i in range(200):  # warm: logins, catalogs, statement caches
        await conn.fetch(QUERY, 1 + i % values)
    samples = []
    for i in range(ITERATIONS):
        start = time.perf_counter()
        await conn.fetch(QUERY, 1 + (200 + i) % values)
        samples.append(time.perf_counter() - start)
    await conn.close()
    return percentile(samples, 0.5)


async def rate(connect: Connect) -> float:
    conns = [await connect(i // PER_AGENT) for i in range(AGENTS * PER_AGENT)]
    done = 0
    stop = time.monotonic() + SECONDS

    async def client(conn: asyncpg.Connection) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < stop:
            await conn.fetch(QUERY, 1 + i % 1000)
            i += 1
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in conns))
    elapsed = time.monotonic() - started
    for conn in conns:
        await conn.close()
    return done / elapsed


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_server_tls(Path(tmp))
        async with real_stack(
            postgres_listen="127.0.0.1:0",
            postgres_tls_cert=str(tls.cert_file),
            postgres_tls_key=str(tls.key_file),
            postgres_connections_per_agent=PER_AGENT,
        ) as stack:
            await measure(stack, ssl.create_default_context(cafile=str(tls.ca_file)))


async def measure(stack: Stack, context: ssl.SSLContext) -> None:
    vault = stack.vault("keyturn-gateway")
    await vault.login()
    lease = await vault.creds("database/creds/shop-ro")
    await vault.close()
    user, password = lease.data["username"], lease.data["password"]
    direct = await p50(lambda _i: asyncpg.connect(stack.target_dsn(user, password)))
    proxy = await floor_proxy(stack.postgres.port)
    proxy_port = proxy.sockets[0].getsockname()[1]

    def via_floor(_i: int) -> Awaitable[asyncpg.Connection]:
        return asyncpg.connect(
            host="127.0.0.1", port=proxy_port, user=user, password=password, database="shop"
        )

    floor = await p50(via_floor)
    floor_rate = await rate(via_floor)
    proxy.close()
    process = build(
        stack.policy, Store(stack.database, pool_size=20), stack.vault("keyturn-gateway")
    )
    await process.start()
    try:
        tokens = [stack.idp.token(f"crew-bench-{i}") for i in range(AGENTS)]

        def via_keyturn(i: int) -> Awaitable[asyncpg.Connection]:
            return asyncpg.connect(
                host="127.0.0.1",
                port=process.wire_port,
                user=f"crew-bench-{i}",
                password=tokens[i],
                database="shop",
                ssl=context,
            )

        wire = await p50(via_keyturn)
        fresh = await p50(via_keyturn, values=ITERATIONS + 200)
        wire_rate = await rate(via_keyturn)
    finally:
        await process.stop()
    floor_added, wire_added = (floor - direct) * 1000, (wire - direct) * 1000
    print(
        f"  direct asyncpg p50 {direct * 1000:.3f} ms; floor proxy p50 {floor * 1000:.3f} ms"
        f" (adds {floor_added:.3f} ms, {floor_rate:,.0f} statements/s); keyturn's Postgres"
        f" edge p50 {wire * 1000:.3f} ms (adds {wire_added:.3f} ms, {wire_rate:,.0f}"
        f" statements/s); with a new parameter value every time (judged anew) p50"
        f" {fresh * 1000:.3f} ms"
    )
    report(
        "allowed SELECT over the wire: added p50 / floor's",
        wire_added / floor_added,
        "x",
        "<= 3",
        wire_added <= 3 * floor_added,
    )
    report(
        f"statements/s at {AGENTS * PER_AGENT} connections / floor's",
        wire_rate / floor_rate,
        "x",
        "(no target)",
        True,
    )


if __name__ == "__main__":
    asyncio.run(main())
