"""A small HTTP API over the demo ``orders`` database, for keyturn to guard as an HTTP target.

Dev and tests only: one static API key, the harness's admin login, no paging beyond ``limit``.
Each order nests its customer's name and email, so the gateway's masking of nested JSON has
something to mask. ``orders-api.yaml`` beside this module describes the same endpoints in
OpenAPI; change both together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

# The demo schema (harness/dev.py) has no refunds: made here, on the admin login, at every start.
REFUNDS_TABLE = """
CREATE TABLE IF NOT EXISTS refunds (id serial PRIMARY KEY, order_id int REFERENCES orders,
                                    amount int NOT NULL, created_at timestamptz DEFAULT now())
"""
_ORDERS = """
SELECT o.id, o.customer_id, o.total_cents, o.status, c.name, c.email
FROM orders o LEFT JOIN customers c ON c.id = o.customer_id
"""
INT4_MAX = 2**31 - 1  # a Postgres int: a larger id can name no row, and asyncpg would refuse it
_ID = "{id:[0-9]+}"  # ASCII digits only; anything else is aiohttp's 404


class Refused(Exception):
    """A request this API turns down, answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _guard(api_key: str) -> Middleware:
    """Checks the key before routing is answered (so without it even a 404 tells nothing) and
    turns :class:`Refused` into its JSON answer. The key is compared in constant time and
    never echoed; there is no access log to write it to."""
    expected = api_key.encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            return _error(401, "missing or wrong API key", **{"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except Refused as exc:
            return _error(exc.status, str(exc))

    return guard


def _int(text: str, name: str, low: int, high: int) -> int:
    """``text`` as an integer in ``low..high``, strictly: no signs, spaces or underscores."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and low <= int(text) <= high):
        raise Refused(400, f"{name} must be an integer from {low} to {high}")
    return int(text)


def _order_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if len(text) > 10 or int(text) > INT4_MAX:
        raise Refused(404, f"no order {text}")
    return int(text)


def _order(row: Mapping[str, Any]) -> dict[str, Any]:
    customer = None if row["name"] is None else {"name": row["name"], "email": row["email"]}
    keys = ("id", "customer_id", "total_cents", "status")
    return {key: row[key] for key in keys} | {"customer": customer}


@dataclass
class _Handlers:
    pool: asyncpg.Pool

    async def list_customers(self, _request: web.Request) -> web.Response:
        rows = await self.pool.fetch("SELECT id, name, email FROM customers ORDER BY id")
        return web.json_response({"customers": [dict(row) for row in rows]})

    async def list_orders(self, request: web.Request) -> web.Response:
        limit = _int(request.query.get("limit", "50"), "limit", 1, 100)
        customer = request.query.get("customer_id")
        customer_id = None if customer is None else _int(customer, "customer_id", 1, INT4_MAX)
        rows = await self.pool.fetch(
            _ORDERS + "WHERE $1::int IS NULL OR o.customer_id = $1 ORDER BY o.id LIMIT $2",
            customer_id,
            limit,
        )
        return web.json_response({"orders": [_order(row) for row in rows]})

    async def get_order(self, request: web.Request) -> web.Response:
        order_id = _order_id(request)
        row = await self.pool.fetchrow(_ORDERS + "WHERE o.id = $1", order_id)
        if row is None:
            raise Refused(404, f"no order {order_id}")
        return web.json_response(_order(row))

    async def create_refund(self, request: web.Request) -> web.Response:
        order_id = _order_id(request)
        try:
            body = await request.json()
        except ValueError:  # not UTF-8, not JSON, or empty
            raise Refused(400, "the body must be JSON") from None
        amount = body.get("amount") if isinstance(body, dict) and body.keys() == {"amount"} else 0
        if type(amount) is not int or amount < 1:  # JSON true is a bool, 2.0 a float: refused
            raise Refused(400, 'the body must be {"amount": <integer cents, at least 1>}')
        async with self.pool.acquire() as conn, conn.transaction():
            # the lock keeps a concurrent DELETE from removing the order under the insert
            total = await conn.fetchval(
                "SELECT total_cents FROM orders WHERE id = $1 FOR UPDATE", order_id
            )
            if total is None:
                raise Refused(404, f"no order {order_id}")
            if amount > total:
                raise Refused(422, f"amount {amount} is over the order total of {total}")
            row = await conn.fetchrow(
                "INSERT INTO refunds (order_id, amount) VALUES ($1, $2)"
                " RETURNING id, order_id, amount, created_at",
                order_id,
                amount,
            )
        refund = dict(row) | {"created_at": row["created_at"].isoformat()}
        return web.json_response({"refund": refund}, status=201)

    async def delete_order(self, request: web.Request) -> web.Response:
        order_id = _order_id(request)
        async with self.pool.acquire() as conn, conn.transaction():
            # locked first, so no refund can be added between the two deletes
            locked = await conn.fetchval("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order_id)
            if locked is None:
                raise Refused(404, f"no order {order_id}")
            await conn.execute("DELETE FROM refunds WHERE order_id = $1", order_id)
            await conn.execute("DELETE FROM orders WHERE id = $1", order_id)
        return web.Response(status=204)


@dataclass
class OrdersApi:
    url: str  # http://HOST:PORT, no trailing slash
    _runner: web.AppRunner = field(repr=False)
    _pool: asyncpg.Pool = field(repr=False)

    async def close(self) -> None:
        await self._runner.cleanup()  # finishes the requests in flight, then the pool can go
        await self._pool.close()


async def start_orders_api(
    dsn: str, api_key: str, *, host: str = "127.0.0.1", port: int = 0
) -> OrdersApi:
    """Serve the API on ``host:port`` (0: a free port) over the database at ``dsn``, a
    ``postgresql://user:password@…`` URL whose login may create the refunds table."""
    if not api_key:
        raise ValueError("an API key is required: an empty one would let 'Bearer ' in")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        await pool.execute(REFUNDS_TABLE)
        handlers = _Handlers(pool)
        app = web.Application(middlewares=[_guard(api_key)])
        app.add_routes(
            [
                web.get("/customers", handlers.list_customers),
                web.get("/orders", handlers.list_orders),
                web.get(f"/orders/{_ID}", handlers.get_order),
                web.delete(f"/orders/{_ID}", handlers.delete_order),
                web.post(f"/orders/{_ID}/refunds", handlers.create_refund),
            ]
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
    except BaseException:
        await pool.close()
        raise
    bound = runner.addresses[0][1]
    return OrdersApi(f"http://{f'[{host}]' if ':' in host else host}:{bound}", runner, pool)


def main() -> None:
    """``python -m keyturn.harness.orders_api PORT``: the dev stack's process. Its database
    and key come from the environment (``DEMO_API_DSN``, ``DEMO_API_KEY``), never argv,
    where any user on the machine could read them."""

    async def serve() -> None:
        dsn, key = os.environ.pop("DEMO_API_DSN"), os.environ.pop("DEMO_API_KEY")
        api = await start_orders_api(dsn, key, port=int(sys.argv[1]))
        try:
            await asyncio.Event().wait()
        finally:
            await api.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
