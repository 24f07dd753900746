"""HTTP target benchmark: run ``python bench/http_target.py`` (after scripts/test has set up .venv).

1. Added latency of an allowed GET: through the gateway (HTTP, JWT, policy, the record, the
   API key read from Vault for the call, the answer scrubbed and masked) minus calling the API
   directly, as a ratio to a bare aiohttp forwarder's added latency in the same run (target
   <= 2x). The API is a small aiohttp app in its own process, checking a bearer key.
2. Click -> the agent holds the API's answer: a held POST approved in the Slack emulator
   through the real bot; from the click to the agent's long-poll returning the API's 201.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.stack import Stack, percentile, real_stack, report, serve, serve_bot
from bot import card_store
from bot.cards import APPROVE
from gateway.bootstrap import application, build
from keyturn.config.loading import parse_config
from keyturn.harness.ports import free_port
from keyturn.harness.slack import SlackEmulator
from keyturn.store.db import Store
from keyturn.vault import Vault
from keyturn.vault_setup import bootstrap

ITERATIONS = 2000
CLICKS = 60
CHANNEL = "CBENCH"
ORDERS = {"orders": [{"id": i, "total": i * 10, "status": "open"} for i in range(20)]}


def upstream_main(port: int, key: str) -> None:
    """The API under test, in its own process: GET /orders, POST /orders/{id}/refunds."""
    expected = f"Bearer {key}"

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": "no key"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def orders(_request: web.Request) -> web.Response:
        return web.json_response(ORDERS)

    async def refund(request: web.Request) -> web.Response:
        return web.json_response({"refund": await request.json()}, status=201)

    app = web.Application(middlewares=[guard])
    app.router.add_get("/orders", orders)
    app.router.add_post("/orders/{id}/refunds", refund)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


@contextlib.contextmanager
def upstream(key: str) -> Any:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--upstream", str(port), key])
    deadline = time.monotonic() + 30
    while True:  # up once it accepts a connection
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


FORWARD = web.AppKey("forward", tuple)


async def _forward(request: web.Request) -> web.Response:
    """The floor: what any HTTP forwarder must do (parse the body, send the call with the
    key, return the answer as JSON) and nothing keyturn adds."""
    session, base, key = request.app[FORWARD]
    call = json.loads(await request.read())["http"]
    async with session.request(
        call["method"], base + call["path"], headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        body = await resp.read()
    return web.json_response({"status": resp.status, "json": json.loads(body)})


async def p50(http: aiohttp.ClientSession, send: Any) -> float:
    for _ in range(200):  # warm: logins, pools, caches
        await send(http)
    samples = []
    for _ in range(ITERATIONS):
        start = time.perf_counter()
        await send(http)
        samples.append(time.perf_counter() - start)
    return percentile(samples, 0.5)


async def with_api(stack: Stack, api_url: str, key: str) -> dict[str, Any]:
    """The stack's policy with the API as target ``api`` (its key in KV), Vault bootstrapped
    again so the gateway may read that key."""
    data = dict(stack.policy_data)
    data["targets"] = dict(data["targets"]) | {
        "api": {"kind": "http", "base_url": api_url, "vault": {"kv": "secret/api"}}
    }
    data["rules"] = [
        {"name": "api-reads", "target": "api", "match": {"http": ["GET /**"]}, "action": "allow"},
        {
            "name": "api-writes",
            "target": "api",
            "match": {"http": ["* /**"]},
            "action": "hold",
            "approvers": {"users": ["U_APPROVER"]},
        },
        *data["rules"],
    ]
    root = Vault(stack.openbao.addr, token=stack.openbao.root_token)
    await root.write("secret/data/api", {"data": {"token": key}})
    await bootstrap(root, parse_config(data))
    await root.close()
    return data


async def latency(stack: Stack, data: dict[str, Any], api_url: str, key: str) -> None:
    gw = build(
        parse_config(data), Store(stack.database, pool_size=20), stack.vault("keyturn-gateway")
    )
    agent = {"Authorization": f"Bearer {stack.idp.token('crew-bench')}"}
    get = {"target": "api", "http": {"method": "GET", "path": "/orders"}}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def direct(h: aiohttp.ClientSession) -> None:
            async with h.get(f"{api_url}/orders", headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()

        direct_p50 = await p50(http, direct)
        floor = web.Application()
        floor[FORWARD] = (http, api_url, key)
        floor.router.add_post("/v1/commands", _forward)
        async with serve(floor) as url:

            async def through_floor(h: aiohttp.ClientSession) -> None:
                async with h.post(f"{url}/v1/commands", json=get) as r:
                    await r.read()

            floor_p50 = await p50(http, through_floor)
        async with serve(application(gw)) as url:

            async def through_keyturn(h: aiohttp.ClientSession) -> None:
                async with h.post(f"{url}/v1/commands", json=get, headers=agent) as r:
                    assert r.status == 200, await r.text()
                    await r.read()

            gw_p50 = await p50(http, through_keyturn)
        vault = stack.vault("keyturn-gateway")
        await vault.ensure_login()

        async def key_read(_h: aiohttp.ClientSession) -> None:
            await vault.kv_secret("secret", "api")

        read_p50 = await p50(http, key_read)  # what the design adds to every call, alone
        await vault.close()
    floor_added, gw_added = (floor_p50 - direct_p50) * 1000, (gw_p50 - direct_p50) * 1000
    print(
        f"  direct p50 {direct_p50 * 1000:.3f} ms; floor forwarder p50 {floor_p50 * 1000:.3f} ms"
        f" (adds {floor_added:.3f} ms); gateway p50 {gw_p50 * 1000:.3f} ms (adds"
        f" {gw_added:.3f} ms)"
    )
    print(f"  of which, done alone: the key's read from OpenBao p50 {read_p50 * 1000:.3f} ms")
    report(
        "allowed GET: added p50 latency / floor's",
        gw_added / floor_added,
        "x",
        "<= 2",
        gw_added <= 2 * floor_added,
    )


async def click_to_answer(stack: Stack, data: dict[str, Any]) -> None:
    slack = SlackEmulator()
    await slack.start()
    slack.add_user("U_APPROVER")
    config = parse_config(
        dict(data, slack={"approval_channel": CHANNEL}, bot={"poll_interval": "1s"})
    )
    store = Store(stack.database)
    runner = await serve_bot(stack, config, slack, store)
    gw = build(config, Store(stack.database, pool_size=10), stack.vault("keyturn-gateway"))
    agent = {"Authorization": f"Bearer {stack.idp.token('crew-bench-held')}"}
    samples = []
    try:
        async with aiohttp.ClientSession() as http, serve(application(gw)) as url:
            for i in range(CLICKS + 10):
                call = {"method": "POST", "path": f"/orders/{i}/refunds", "json": {"amount": i}}
                async with http.post(
                    f"{url}/v1/commands", json={"target": "api", "http": call}, headers=agent
                ) as resp:
                    held = await resp.json()
                    assert resp.status == 202, held
                request_id = held["id"]
                while (posted := await card_store.posted_at(store, uuid.UUID(request_id))) is None:
                    await asyncio.sleep(0.005)
                started = time.perf_counter()
                status, _ = await slack.click(CHANNEL, posted[1], APPROVE, "U_APPROVER")
                assert status == 200
                async with http.get(
                    f"{url}/v1/commands/{request_id}?wait=30", headers=agent
                ) as resp:
                    done = await resp.json()
                assert done["status"] == "executed" and done["result"]["status"] == 201, done
                if i >= 10:  # the first clicks warm Bolt, the pools and Vault logins
                    samples.append(time.perf_counter() - started)
    finally:
        await runner.cleanup()
        await slack.stop()
        await store.close()
    mid = percentile(samples, 0.5) * 1000
    print(f"  {len(samples)} clicks; p95 {percentile(samples, 0.95) * 1000:.1f} ms")
    report("click Approve -> agent holds the API's 201, p50", mid, "ms", "(reported)", True)


async def main() -> None:
    key = secrets.token_urlsafe(24)
    with upstream(key) as api_url:
        async with real_stack() as stack:
            data = await with_api(stack, api_url, key)
            print(
                "keyturn HTTP target benchmark (real OpenBao, Postgres; the API in its own process)"
            )
            await latency(stack, data, api_url, key)
            await click_to_answer(stack, data)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--upstream"]:
        upstream_main(int(sys.argv[2]), sys.argv[3])
    else:
        asyncio.run(main())
