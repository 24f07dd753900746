"""The floor a Python gateway is measured against: a bare aiohttp + asyncpg proxy.

It does the least any HTTP-to-Postgres proxy must do — parse a JSON body, run the statement on
a pooled connection, encode the rows as JSON — and nothing keyturn adds: no authentication,
config, records, masking or read-only transaction. Benchmarks run it beside the gateway, on the
same machine, login and query, and report keyturn's figures as ratios to it.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from aiohttp import web

from gateway.drivers.postgres.values import jsonable

POOL_KEY = web.AppKey("pool", asyncpg.Pool)


async def _run(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    records = await request.app[POOL_KEY].fetch(body["command"])
    columns = list(records[0].keys()) if records else []
    rows: list[Any] = [[jsonable(v) for v in r.values()] for r in records]
    return web.json_response({"columns": columns, "rows": rows})


def floor_app(pool: asyncpg.Pool) -> web.Application:
    app = web.Application()
    app[POOL_KEY] = pool
    app.router.add_post("/v1/commands", _run)
    return app
