"""Bad input of every kind gets a 4xx with the error envelope, never a 5xx (real gateway)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.bootstrap import application, build
from keyturn.harness.idp import DevIdP
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.integration.conftest import GatewayFactory, Shop

SECRET = "fuzz-dev-secret-with-enough-bytes-for-hs256"


def b64(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def with_crit(idp: DevIdP) -> str:
    """A token whose header names a critical extension nobody understands (no valid sig)."""
    claims = {"sub": "x", "aud": "keyturn", "exp": int(time.time()) + 60, "iss": idp.issuer}
    header = {"alg": "RS256", "kid": "rsa-1", "crit": ["urn:nobody"], "urn:nobody": 1}
    return f"{b64(header)}.{b64(claims)}.c2ln"


def deep_json(depth: int) -> bytes:
    return (
        b'{"target": "shop", "command": "SELECT 1", "reason": ' + b"[" * depth + b"]" * depth + b"}"
    )


CASES: list[tuple[str, Any, int, str]] = [
    # name, body (bytes: sent raw), status, error code
    ("deep JSON", deep_json(100_000), 400, "invalid_input"),
    (
        "an integer of 5,000 digits",
        b'{"target": "shop", "command": "SELECT 1", "run_id": 1' + b"0" * 5000 + b"}",
        400,
        "invalid_input",
    ),
    (
        "lone surrogate",
        b'{"target": "shop", "command": "SELECT \'\\ud800\'"}',
        400,
        "invalid_input",
    ),
    (
        "NUL in a held command",
        {"target": "shop", "command": "UPDATE orders SET status = 'x\x00' WHERE id = 1"},
        400,
        "invalid_input",
    ),
    (
        "20,000-term expression",
        {"target": "shop", "command": "SELECT " + "+".join(["1"] * 20_000)},
        400,
        "too_complex",
    ),
    (
        "900 nested subqueries",
        {"target": "shop", "command": "SELECT " + "(SELECT " * 900 + "1" + ")" * 900},
        400,
        "too_complex",
    ),
    (
        "2,000 nested $()",
        {"target": "web", "command": "echo " + "$(" * 2000 + "x" + ")" * 2000},
        400,
        "too_complex",
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_bad_bodies_get_a_4xx(
    run_gateway: GatewayFactory, idp: DevIdP, name: str, body: Any, status: int, code: str
) -> None:
    async with run_gateway() as gw:
        headers = {"Authorization": f"Bearer {idp.token('crew-billing')}"}
        if isinstance(body, bytes):
            resp = await gw.client.post("/v1/commands", data=body, headers=headers)
        else:
            resp = await gw.client.post("/v1/commands", json=body, headers=headers)
        answer = await resp.json()
        assert (resp.status, answer["error"]["code"]) == (status, code), answer


async def test_bad_tokens_get_a_401(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    tokens = {
        "unknown crit": with_crit(idp),
        "long sub": idp.token("a" * 5000),
        "long on_behalf_of": idp.token("crew-billing", on_behalf_of="U" * 5000),
        "NUL in sub": idp.token("crew\x00billing"),
        "groups not strings": idp.token("crew-billing", groups=[{"a": 1}]),  # type: ignore[list-item]
        "exp as digits": idp.token("crew-billing", exp="9999999999"),
    }
    async with run_gateway() as gw:
        for name, token in tokens.items():
            status, body = await gw.post(token, {"target": "shop", "command": "SELECT 1"})
            assert status == 401 and body["error"]["code"] == "unauthorized", (name, body)
        # an IdP may sign an absurd expiry: accepted, but cached for an hour at most
        status, body = await gw.post(
            idp.token("crew-billing", exp=10**400), {"target": "shop", "command": "SELECT 1"}
        )
        assert status == 200, body


# ------------------------------------------------------------------ property-based


@pytest.fixture
def threaded_gateway(shop: Shop, database: Dsn) -> Iterator[str]:
    """A real gateway on its own event loop in a thread, so hypothesis can drive it."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    where: list[str] = []

    async def main() -> None:
        config = shop.policy(
            gateway={
                "auth": {"algorithms": ["HS256"]},
                "rate_per_second": 1_000_000,
                "rate_burst": 1_000_000,
                "max_wait": "100ms",
            }
        )
        gw = build(config, Store(database), shop.vault(), dev_secret=SECRET)
        runner = web.AppRunner(application(gw), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        where.append(f"http://127.0.0.1:{port}")
        started.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "the gateway did not start"
    yield where[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    loop.close()


SAFE_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
HEADER_TEXT = SAFE_TEXT.filter(lambda t: t == t.strip())  # what an HTTP client can send
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
COMMANDS = st.sampled_from(
    [
        "SELECT 1",
        "SELECT id, email FROM customers",
        "UPDATE orders SET status = 'x' WHERE id = 1",
        "DROP TABLE orders",
        "uptime",
        "SELECT 1; SELECT 2",
        "SELECT repeat('x', 100000)",
        "COMMIT",
    ]
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "target": st.sampled_from(["shop", "web", "private", "nope"]) | st.text(max_size=20),
            "command": COMMANDS | st.text(max_size=120),
        },
        optional={"reason": JSON, "run_id": JSON, "other": JSON},
    ).map(lambda d: json.dumps(d).encode()),
)
CLAIMS = st.dictionaries(
    st.sampled_from(["sub", "aud", "exp", "nbf", "iat", "groups", "act", "on_behalf_of", "iss"]),
    JSON | st.text(max_size=300),
    max_size=5,
)


def _signed(claims: dict[str, Any]) -> str:
    """Validly signed (HS256, the gateway's dev secret) whatever the claims hold: signed by
    hand, as pyjwt itself refuses to encode some of them."""
    base = {"sub": "fuzz-agent", "aud": "keyturn", "exp": int(time.time()) + 300}
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(base | claims)}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def _odd_header(header: dict[str, Any]) -> str:
    return f"{b64(header)}.{b64({'sub': 'x', 'aud': 'keyturn'})}.c2ln"


TOKENS = st.one_of(
    HEADER_TEXT,
    CLAIMS.map(_signed),
    st.dictionaries(st.sampled_from(["alg", "kid", "crit", "typ", "x"]), JSON, max_size=4).map(
        _odd_header
    ),
)


@given(
    body=BODIES,
    token=st.none() | TOKENS,
    key=st.none() | HEADER_TEXT,
    request_id=SAFE_TEXT,
    wait=SAFE_TEXT,
)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_generated_requests_never_get_a_5xx(
    threaded_gateway: str,
    body: bytes,
    token: str | None,
    key: str | None,
    request_id: str,
    wait: str,
) -> None:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if key is not None:
        headers["Idempotency-Key"] = key
    answers = [
        requests.post(f"{threaded_gateway}/v1/commands", data=body, headers=headers, timeout=30),
        requests.get(
            f"{threaded_gateway}/v1/commands/{requests.utils.quote(request_id, safe='')}",
            params={"wait": wait},
            headers=headers,
            timeout=30,
        ),
    ]
    for resp in answers:
        assert resp.status_code < 500 or resp.status_code == 503, (resp.status_code, resp.text)
        if resp.status_code >= 400:
            assert set(resp.json()["error"]) >= {"code", "message"}, resp.text
