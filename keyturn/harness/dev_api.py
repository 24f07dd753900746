"""The dev stack's HTTP target: the orders API (:mod:`keyturn.harness.orders_api`) over the
demo database, whose key lives only in OpenBao's KV; its policy; its smoke test.

The policy shows what HTTP rules do: GETs run at once (emails masked), refunds up to 100
run without a human, larger ones wait for Approve, and DELETE is refused by a rule. The
OpenAPI file refuses anything the API does not describe before anyone sees it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from keyturn.errors import Unavailable
from keyturn.harness.postgres import PostgresCluster
from keyturn.vault import Vault

TARGET = "orders-api"
KEY_PATH = "secret/orders-api"  # KV v2 <mount>/<path>: the only copy of the API key
SPEC = Path(__file__).with_name("orders-api.yaml")


def add_to_policy(data: dict[str, Any], port: int, approvers: list[str]) -> None:
    data["targets"][TARGET] = {
        "kind": "http",
        "base_url": f"http://127.0.0.1:{port}",
        "openapi": str(SPEC),
        "vault": {"kv": KEY_PATH},
        "inject": {"header": "Authorization", "value": "Bearer {{token}}"},
        "description": "the demo shop's orders API: customers, orders, refunds (in cents)",
    }
    data["rules"] = [
        {
            "name": "no-api-deletes",
            "target": TARGET,
            "match": {"http": ["DELETE /**"]},
            "action": "block",
            "message": "deleting through the orders API is never allowed",
        },
        {"name": "api-reads", "target": TARGET, "match": {"http": ["GET /**"]}, "action": "allow"},
        {
            "name": "small-refunds",
            "target": TARGET,
            "match": {
                "operation": ["createRefund"],
                "body": {"amount": {"at_least": 1, "at_most": 100}},
            },
            "action": "allow",
        },
        {
            "name": "refunds",
            "target": TARGET,
            "match": {"operation": ["createRefund"]},
            "action": "hold",
            "approvers": {"users": approvers},
            "grant_ttl": "10m",
        },
        *data["rules"],
    ]
    # what the rules must decide: `keyturn policy test --config .keyturn/dev/policy.yml`
    data.setdefault("tests", []).extend(
        [
            {"target": TARGET, "command": "GET /orders?limit=10", "expect": "allow"},
            {
                "target": TARGET,
                "command": _refund_text(50),
                "expect": "allow",
                "rule": "small-refunds",
            },
            {"target": TARGET, "command": _refund_text(500), "expect": "hold", "rule": "refunds"},
            {"target": TARGET, "command": "DELETE /orders/3", "expect": "block"},
        ]
    )


def _refund_text(amount: int) -> str:
    """A refund in the text form of a call (keyturn.classify.http), as policy tests write it."""
    return f'POST /orders/1/refunds\nContent-Type: application/json\n\n{{"amount":{amount}}}'


async def store_key(vault: Vault) -> None:
    """A fresh key in KV: the API checks it, the gateway reads it, nobody else has it."""
    mount, _, path = KEY_PATH.partition("/")
    await vault.write(f"{mount}/data/{path}", {"data": {"token": secrets.token_urlsafe(32)}})


async def read_key(vault: Vault) -> str:
    mount, _, path = KEY_PATH.partition("/")
    return str((await vault.kv_secret(mount, path))["token"])


@contextlib.contextmanager
def serving(pg: PostgresCluster, key: str, port: int) -> Iterator[str]:
    """The API as its own process until the block ends; its URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYTURN_", "DEMO_API_"))}
    env |= {"DEMO_API_DSN": pg.dsn("orders").url, "DEMO_API_KEY": key}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyturn.harness.orders_api", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise Unavailable("the demo orders API exited at start")
            try:
                httpx.get(f"{url}/customers", timeout=1)  # 401 without the key: it is up
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise Unavailable("the demo orders API did not answer in 30 s") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


Call = Callable[[str, str, "dict[str, Any] | None"], Any]


def smoke(call: Call, approve: Callable[[str], object]) -> list[str]:
    """An agent on the orders API: a read, a small refund, a refund held and approved, and
    a DELETE refused."""
    lines = []
    get = {"target": TARGET, "http": {"method": "GET", "path": "/orders"}}
    read = call("POST", "/v1/commands", get)
    email = read["result"]["json"]["orders"][0]["customer"]["email"]
    lines.append(f"allowed GET /orders -> HTTP {read['result']['status']}, email {email}")
    small = call("POST", "/v1/commands", refund(1, 50))
    lines.append(f"allowed refund of 50 -> HTTP {small['result']['status']}")
    held = call("POST", "/v1/commands", refund(2, 500))
    approve(held["id"])
    done = call("GET", f"/v1/commands/{held['id']}?wait=30", None)
    status = (done.get("result") or {}).get("status") or done.get("error")
    lines.append(
        f"held refund of 500 -> {held['status']}, approved -> {done['status']} (HTTP {status})"
    )
    delete = {"target": TARGET, "http": {"method": "DELETE", "path": "/orders/3"}}
    try:
        call("POST", "/v1/commands", delete)
        lines.append("DELETE /orders/3 -> ran (the no-api-deletes rule is missing)")
    except urllib.error.HTTPError as exc:
        lines.append(f"DELETE /orders/3 -> {exc.code}: {json.load(exc)['error']['message']}")
    return lines


def refund(order: int, amount: int) -> dict[str, Any]:
    return {
        "target": TARGET,
        "http": {
            "method": "POST",
            "path": f"/orders/{order}/refunds",
            "json": {"amount": amount},
        },
        "reason": "dev smoke test: a refund",
    }
