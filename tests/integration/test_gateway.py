"""The gateway end to end: real JWTs, real OpenBao credentials, real Postgres."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from sqlalchemy import text

from gateway.usecases.gateway import poll
from keyturn.agent.api import CommandOut
from keyturn.clock import ManualClock
from keyturn.domain import Deciders, Decision
from keyturn.harness.idp import DevIdP
from keyturn.store import decisions, executions, requests
from keyturn.store.db import Store
from tests.integration.conftest import GatewayFactory, Shop

READ = {"target": "shop", "command": "SELECT id, name, email, note FROM customers ORDER BY id"}
UPDATE = {
    "target": "shop",
    "command": "UPDATE orders SET status = 'paid' WHERE id < 10",
    "reason": "customer paid",
    "run_id": "run-7",
}


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]), body
    return body["error"]


# ------------------------------------------------------------------ authentication


def _bad_tokens(idp: DevIdP) -> dict[str, str]:
    now = int(time.time())
    good = idp.token("crew-billing")
    header, _payload, signature = good.split(".")
    forged = jwt.utils.base64url_encode(
        json.dumps(
            {**jwt.decode(good, options={"verify_signature": False}), "sub": "admin"}
        ).encode()
    ).decode()
    return {
        "alg-none": jwt.encode(
            {"sub": "x", "aud": "keyturn", "exp": now + 60, "iss": idp.issuer},
            None,
            algorithm="none",
        ),
        "hs256-with-public-key": _hs256_forgery(idp, now),
        "expired": idp.token("crew-billing", exp=now - 3600),
        "not-yet-valid": idp.token("crew-billing", nbf=now + 3600),
        "wrong-aud": idp.token("crew-billing", aud="someone-else"),
        "wrong-iss": idp.token("crew-billing", iss="https://evil.example"),
        "unknown-kid": _signed(idp, {"sub": "x"}, kid="rotated-away"),
        "bad-signature": f"{header}.{forged}.{signature}",
        "garbage": "not.a.jwt",
        "no-sub": _signed(idp, {}),
    }


def _hs256_forgery(idp: DevIdP, now: int) -> str:
    """The classic confusion attack: HMAC-sign with the RSA public key as the secret."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(
        json.dumps({"sub": "x", "aud": "keyturn", "exp": now + 60, "iss": idp.issuer}).encode()
    )
    mac = hmac.new(idp.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def _signed(idp: DevIdP, claims: dict[str, Any], kid: str = "rsa-1") -> str:
    """Validly signed with the IdP's RSA key, claiming ``kid``, with only these claims extra."""
    base = {"aud": "keyturn", "exp": int(time.time()) + 60, "iss": idp.issuer}
    return jwt.encode(base | claims, idp.keys["rsa-1"], algorithm="RS256", headers={"kid": kid})


BAD_TOKEN_NAMES = [
    "alg-none",
    "hs256-with-public-key",
    "expired",
    "not-yet-valid",
    "wrong-aud",
    "wrong-iss",
    "unknown-kid",
    "bad-signature",
    "garbage",
    "no-sub",
]


async def approver_denies(store: Store, request_id: uuid.UUID, reason: str) -> None:
    """U_APPROVER denies the request, as the bot records it."""
    await decisions.decide(
        store, request_id, "U_APPROVER", Decision.DENY, reason, deciders=Deciders.only("U_APPROVER")
    )


async def test_bad_tokens_get_401(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    tokens = _bad_tokens(idp)
    async with run_gateway() as gw:
        for name in BAD_TOKEN_NAMES:
            status, body = await gw.post(tokens[name], READ)
            assert status == 401, (name, body)
            assert error_of(body)["code"] == "unauthorized", name
        resp = await gw.client.post("/v1/commands", json=READ)
        assert resp.status == 401
        assert "bearer" in error_of(await resp.json())["message"]
        for name in ("expired", "wrong-aud", "wrong-iss", "unknown-kid"):
            _, body = await gw.get(tokens[name], str(uuid.uuid4()))
            assert error_of(body)["code"] == "unauthorized"


async def test_each_key_type_is_accepted_and_jwks_is_cached(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    before = idp.jwks_fetches
    async with run_gateway() as gw:
        for kid in ("rsa-1", "ec-1", "ed-1"):
            status, body = await gw.post(idp.token("crew-billing", kid=kid), READ)
            assert status == 200, body
        for _ in range(5):
            await gw.post(_bad_tokens(idp)["unknown-kid"], READ)
    assert idp.jwks_fetches - before == 1  # one fetch, not one per request or per unknown kid


async def test_hs256_only_with_a_dev_secret(run_gateway: GatewayFactory) -> None:
    secret = "dev-secret-for-tests-only-0123456789"
    token = jwt.encode(
        {"sub": "crew-dev", "aud": "keyturn", "exp": int(time.time()) + 60},
        secret,
        algorithm="HS256",
    )
    async with run_gateway(dev_secret=secret, gateway={"auth": {"algorithms": ["HS256"]}}) as gw:
        status, body = await gw.post(token, READ)
        assert status == 200, body
    async with run_gateway() as gw:  # HS256 not in the allowed algorithms
        status, body = await gw.post(token, READ)
        assert status == 401 and "not allowed" in error_of(body)["message"]


# ------------------------------------------------------------------ safe path


async def test_allowed_read_runs_on_vault_readonly_credentials_and_is_masked(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = idp.token("crew-billing", on_behalf_of="U_HUMAN")
    async with run_gateway() as gw:
        status, body = await gw.post(token, READ)
        assert status == 200, body
        out = CommandOut.model_validate(body)
        assert out.status == "executed" and out.rule == "reads"
        result = body["result"]
        assert result["columns"] == ["id", "name", "email", "note"]
        assert result["rows"][0] == [1, "Ada", "***", "card ************1111, ssn ***-**-6789"]
        assert result["rows"][1][3] == "call ***-***-2671"
        assert result["truncated"] is False

        assert gw.logins is not None
        login = gw.logins.login_of("shop", "crew-billing")  # its own login
        assert login is not None
        assert login.lease is not None
        password, username = login.lease.data["password"], login.lease.data["username"]
        assert username.startswith("v-") and "shop-ro" in username
        # the request is recorded (journal) with its audit event, never with the credential
        async with gw.store.transaction() as tx:
            dump = json.dumps(
                [
                    [str(v) for v in row]
                    for table in ("requests", "approvals", "grants", "audit_events")
                    for row in (await tx.session.execute(text(f"SELECT * FROM {table}"))).all()
                ]
            )
            kinds = (
                (await tx.session.execute(text("SELECT kind FROM audit_events"))).scalars().all()
            )
        assert "request.allowed" in kinds
        status, again = await gw.get(token, body["id"], wait=10)  # its outcome follows the answer
        assert status == 200 and again["status"] == "executed"
        for blob in (dump, json.dumps(body), json.dumps(again), caplog.text):
            assert password not in blob


async def test_statement_timeout_and_row_cap(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    token = idp.token("crew-billing")
    async with run_gateway(gateway={"statement_timeout": "1s", "row_limit": 100}) as gw:
        status, body = await gw.post(
            token, {"target": "shop", "command": "SELECT g FROM generate_series(1, 5000) g"}
        )
        assert status == 200 and body["result"]["row_count"] == 100
        assert body["result"]["truncated"] == "rows"
        status, body = await gw.post(
            token,
            {
                "target": "shop",
                "command": "SELECT count(*) FROM generate_series(1, 1000000000) a, generate_series(1, 10) b",
            },
        )
        assert status == 200 and body["status"] == "failed"
        assert body["error"].startswith("deadline exceeded"), body
        status, body = await gw.post(token, {"target": "shop", "command": "SELECT * FROM nope"})
        assert body["status"] == "failed" and "nope" in body["error"]


async def test_several_statements_return_the_last(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    async with run_gateway() as gw:
        status, body = await gw.post(
            idp.token("crew-billing"), {"target": "shop", "command": "SELECT 1 AS a; SELECT 2 AS b"}
        )
        assert status == 200, body
        assert body["result"]["columns"] == ["b"] and body["result"]["rows"] == [[2]]
        assert body["result"]["statements"] == 2


async def test_readonly_login_is_renewed_and_replaced(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    from keyturn.vault import Vault

    root = Vault(shop.openbao.addr, token=shop.openbao.root_token)
    role = await root.read("database/roles/shop-ro")
    assert role is not None
    short = dict(role["data"], default_ttl=4, max_ttl=6)
    await root.write("database/roles/shop-ro", short)
    try:
        async with run_gateway() as gw:
            token = idp.token("crew-billing")
            first_user = None
            assert gw.logins is not None
            for _ in range(8):
                status, body = await gw.post(token, READ)
                assert status == 200 and body["status"] == "executed", body
                login = gw.logins.login_of("shop", "crew-billing")
                assert login is not None
                first_user = first_user or login.username
                await asyncio.sleep(1)
            assert login.rotations >= 2
            assert login.username != first_user

            async def replaced_roles_gone() -> bool:  # revoked once their connections closed
                rows = await shop.postgres.fetch(
                    "SELECT count(*) AS n FROM pg_roles WHERE rolname LIKE 'v-%shop-ro%'"
                    f" AND rolname <> '{login.username}'",
                    shop.database,
                )
                return bool(rows[0]["n"] <= 1)  # at most the catalog's own login

            for _ in range(100):
                if await replaced_roles_gone():
                    break
                await asyncio.sleep(0.1)
            assert await replaced_roles_gone()
    finally:
        await root.write("database/roles/shop-ro", dict(role["data"]))
        await root.close()


# ------------------------------------------------------------------ block and hold


async def test_blocked_command_is_refused_with_its_rule(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    async with run_gateway() as gw:
        status, body = await gw.post(
            idp.token("crew-billing"), {"target": "shop", "command": "SELECT 1; DROP TABLE orders"}
        )
        assert status == 403
        err = error_of(body)
        assert err == {
            "code": "blocked",
            "message": "dropping tables is never allowed",
            "rule": "no-drop",
        }
        async with gw.store.transaction() as tx:
            kinds = (
                (await tx.session.execute(text("SELECT kind FROM audit_events"))).scalars().all()
            )
            requests = (await tx.session.execute(text("SELECT count(*) FROM requests"))).scalar()
        assert kinds == ["request.blocked"] and requests == 0


async def test_held_update_waits_for_a_decision(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop, reopened_orders: None
) -> None:
    token = idp.token("crew-billing", on_behalf_of="U_HUMAN")
    async with run_gateway(gateway={"poll_interval": "60s"}) as gw:  # only NOTIFY can wake it
        status, body = await gw.post(token, UPDATE)
        assert status == 202, body
        held = CommandOut.model_validate(body)
        assert held.status == "pending" and held.rule == "writes"
        assert held.wait_url is not None and held.wait_url.endswith(
            f"/v1/commands/{held.id}?wait=30"
        )
        assert held.estimated_rows is not None and 1 <= held.estimated_rows <= 50
        # nothing ran, not even for the estimate: the orders are untouched
        conn = await asyncpg.connect(shop.postgres.dsn(shop.database).url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'paid'") == 0
        finally:
            await conn.close()

        status, body = await gw.get(token, held.id, wait=0)
        assert body["status"] == "pending"

        waiter = asyncio.create_task(gw.get(token, held.id, wait=60))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        request_id = uuid.UUID(held.id)
        await decisions.decide(
            gw.store,
            request_id,
            "U_APPROVER",
            Decision.APPROVE,
            deciders=Deciders.only("U_APPROVER"),
        )
        row = await executions.start_execution(
            gw.store, request_id, (await requests.get_request(gw.store, request_id)).command_sha256
        )
        result = {
            "columns": [],
            "rows": [],
            "row_count": 0,
            "truncated": False,
            "statements": 1,
            "tags": ["UPDATE 9"],
        }
        await executions.finish_execution(gw.store, row.id, result=result)
        status, final = await asyncio.wait_for(waiter, 30)
        assert status == 200 and final["status"] == "executed"
        assert final["result"] == result and "wait_url" not in final


async def test_denied_reason_reaches_the_agent(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        _, body = await gw.post(token, UPDATE)
        await approver_denies(gw.store, uuid.UUID(body["id"]), "freeze week")
        _, final = await gw.get(token, body["id"], wait=5)
        assert final["status"] == "denied"
        assert final["denied_by"] == "U_APPROVER" and final["deny_reason"] == "freeze week"


async def test_long_poll_returns_pending_when_the_wait_runs_out(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        _, body = await gw.post(token, UPDATE)
        status, again = await gw.get(token, body["id"], wait=0.5)
        assert status == 200 and again["status"] == "pending"


async def test_pending_requests_expire_and_the_agent_is_told(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    token = idp.token("crew-billing")
    rules = shop.base_policy["rules"]
    slow = [dict(r, pending_ttl="1h") if r["name"] == "writes" else r for r in rules]
    clock = ManualClock()
    gateway = {"poll_interval": "200ms"}
    async with run_gateway(rules=slow, gateway=gateway, clock=clock) as gw:
        _, body = await gw.post(token, UPDATE)
        _, still = await gw.get(token, body["id"], wait=0.5)
        assert still["status"] == "pending"
        clock.advance(timedelta(hours=1, seconds=1))  # nobody decided within the hour
        _, final = await gw.get(token, body["id"], wait=30)
        assert final["status"] == "expired"


async def test_only_the_requester_can_read(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    async with run_gateway() as gw:
        _, body = await gw.post(idp.token("crew-billing"), UPDATE)
        for ident in (body["id"], str(uuid.uuid4()), "not-a-uuid"):
            status, err = await gw.get(idp.token("crew-other"), ident)
            assert status == 404 and error_of(err)["code"] == "not_found"
        status, err = await gw.get(idp.token("crew-billing"), body["id"], wait="soon")
        assert status == 400 and error_of(err)["code"] == "invalid_input"
        status, err = await gw.get(idp.token("crew-billing"), body["id"], wait="-1")
        assert status == 400


async def test_one_listen_connection_serves_many_waiters(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        ids = [(await gw.post(token, dict(UPDATE, run_id=f"r{i}")))[1]["id"] for i in range(5)]
        waiters = [asyncio.create_task(gw.get(token, ids[i % 5], wait=30)) for i in range(90)]
        for _ in range(100):
            if gw.gw.listener.waiting >= 90:
                break
            await asyncio.sleep(0.05)
        assert gw.gw.listener.waiting == 90  # the test client holds at most 100 connections
        conn = await asyncpg.connect(gw.gw.store.dsn.url)
        try:
            rows = await conn.fetch(
                "SELECT application_name, count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() GROUP BY 1"
            )
        finally:
            await conn.close()
        counts = {r["application_name"]: r["count"] for r in rows}
        assert counts.get("keyturn-listener") == 1
        assert sum(counts.values()) <= 25  # the pool plus the listener plus this probe
        for ident in ids:
            await approver_denies(gw.store, uuid.UUID(ident), "no")
        results = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert {body["status"] for _, body in results} == {"denied"}


async def test_allowed_ssh_command_is_approved_by_policy(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    async with run_gateway() as gw:
        status, body = await gw.post(
            idp.token("crew-billing"), {"target": "web", "command": "uptime"}
        )
        assert status == 202 and body["status"] == "approved" and body["rule"] == "status"


# ------------------------------------------------------------------ bad input


async def test_idempotency_key(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        s1, first = await gw.post(token, UPDATE, **{"Idempotency-Key": "k-1"})
        s2, again = await gw.post(token, UPDATE, **{"Idempotency-Key": "k-1"})
        assert (s1, s2) == (202, 202) and first["id"] == again["id"]
        status, body = await gw.post(
            token, dict(UPDATE, reason="other"), **{"Idempotency-Key": "k-1"}
        )
        assert status == 409 and error_of(body)["code"] == "idempotency_conflict"
        r1, read1 = await gw.post(token, READ, **{"Idempotency-Key": "k-2"})
        r2, read2 = await gw.post(token, READ, **{"Idempotency-Key": "k-2"})
        assert (r1, r2) == (200, 200) and read1["id"] == read2["id"]
        assert read1["result"] == read2["result"]
        async with gw.store.transaction() as tx:
            count = (await tx.session.execute(text("SELECT count(*) FROM requests"))).scalar()
        assert count == 2
        status, body = await gw.post(token, READ, **{"Idempotency-Key": "x" * 201})
        assert status == 400


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_cannot_be_decoded_is_a_400(
    run_gateway: GatewayFactory, idp: DevIdP, encoding: str
) -> None:
    """The ninth outside round got a 500 (and two tracebacks) for Content-Encoding: gzip on a
    body that was not gzip. A body aiohttp cannot decode is the client's error."""
    async with run_gateway() as gw:
        resp = await gw.client.post(
            "/v1/commands",
            data=b"this is not compressed",
            headers={
                "Authorization": f"Bearer {idp.token('crew-billing')}",
                "Content-Type": "application/json",
                "Content-Encoding": encoding,
            },
        )
        body = await resp.json()
        assert resp.status == 400 and error_of(body)["code"] == "invalid_input", body


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_input"),
        (b"[]", 400, "invalid_input"),
        (json.dumps({"target": "shop"}).encode(), 400, "invalid_input"),
        (json.dumps({"target": "shop", "command": ""}).encode(), 400, "invalid_input"),
        (
            json.dumps({"target": "shop", "command": "SELECT 1", "extra": 1}).encode(),
            400,
            "invalid_input",
        ),
        (json.dumps({"target": 5, "command": "SELECT 1"}).encode(), 400, "invalid_input"),
        (json.dumps({"target": "nope", "command": "SELECT 1"}).encode(), 404, "not_found"),
        (json.dumps({"target": "private", "command": "SELECT 1"}).encode(), 403, "not_allowed"),
        (
            json.dumps({"target": "shop", "command": "x" * (64 * 1024 + 1)}).encode(),
            413,
            "too_large",
        ),
        (b" " * (1024 * 1024 + 1), 413, "too_large"),
    ],
    ids=[
        "bad-json",
        "not-object",
        "missing-command",
        "empty-command",
        "extra-field",
        "wrong-type",
        "unknown-target",
        "not-allowed",
        "command-too-large",
        "body-too-large",
    ],
)
async def test_bad_requests(
    run_gateway: GatewayFactory, idp: DevIdP, body: bytes, status: int, code: str
) -> None:
    async with run_gateway() as gw:
        resp = await gw.client.post(
            "/v1/commands",
            data=io.BytesIO(body),  # as a stream: aiohttp warns that large raw bytes block
            headers={
                "Authorization": f"Bearer {idp.token('crew-billing')}",
                "Content-Type": "application/json",
            },
        )
        assert resp.status == status
        assert error_of(await resp.json())["code"] == code
        async with gw.store.transaction() as tx:
            assert (await tx.session.execute(text("SELECT count(*) FROM requests"))).scalar() == 0


async def test_group_membership_opens_a_target(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    async with run_gateway() as gw:
        status, _ = await gw.post(
            idp.token("crew-x", groups=["sre"]), {"target": "private", "command": "SELECT 1"}
        )
        assert status == 200


async def test_rate_limit(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    async with run_gateway(gateway={"rate_per_second": 0.5, "rate_burst": 3}) as gw:
        token = idp.token("crew-busy")
        statuses = [(await gw.post(token, READ))[0] for _ in range(3)]
        assert statuses == [200, 200, 200]
        resp = await gw.client.post(
            "/v1/commands", json=READ, headers={"Authorization": f"Bearer {token}"}
        )
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        assert error_of(await resp.json())["code"] == "rate_limited"
        status, _ = await gw.post(idp.token("crew-calm"), READ)  # per identity
        assert status == 200


async def test_targets_lists_what_this_identity_may_use(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    targets = dict(shop.base_policy["targets"])
    targets["shop"] = {**targets["shop"], "description": "the shop: customers and orders"}
    async with run_gateway(targets=targets) as gw:

        async def listed(token: str) -> dict[str, tuple[str, str]]:
            resp = await gw.client.get("/v1/targets", headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 200
            return {
                t["name"]: (t["kind"], t["description"]) for t in (await resp.json())["targets"]
            }

        plain = await listed(idp.token("crew-billing"))
        assert plain["shop"] == ("postgres", "the shop: customers and orders")
        assert plain["web"][0] == "ssh" and plain["web"][1]  # a default line when none is set
        assert "private" not in plain  # subjects: [agent:crew-vip, group:sre]
        assert "private" in await listed(idp.token("crew-x", groups=["sre"]))
        resp = await gw.client.get("/v1/targets")
        assert resp.status == 401 and error_of(await resp.json())["code"] == "unauthorized"


async def test_a_shutdown_answers_waiting_long_polls_at_once(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """A restart must not wait out every agent's long-poll: each gets its request as it
    stands and polls again (another replica, or this one once back)."""
    token = idp.token("crew-billing")
    async with run_gateway(gateway={"max_wait": "10m"}) as gw:
        _, held = await gw.post(token, UPDATE)
        url = f"{gw.url}/v1/commands/{held['id']}?wait=600"
        async with httpx.AsyncClient() as http:
            poll = asyncio.create_task(http.get(url, headers={"Authorization": f"Bearer {token}"}))
            while not gw.gw.listener.watched("request"):
                await asyncio.sleep(0.02)
            async with asyncio.timeout(60):  # liveness: 60 s against the 600 s it asked for
                await gw.client.close()
                answer = await poll
    assert answer.status_code == 200 and answer.json()["status"] == "pending"


async def test_unknown_routes_and_methods(run_gateway: GatewayFactory) -> None:
    async with run_gateway() as gw:
        resp = await gw.client.get("/v2/nothing")
        assert resp.status == 404 and error_of(await resp.json())["code"] == "not_found"
        resp = await gw.client.delete("/v1/commands")
        assert resp.status == 405 and error_of(await resp.json())["code"] == "method_not_allowed"


# ------------------------------------------------------------------ operations


async def test_health_ready_metrics(run_gateway: GatewayFactory, idp: DevIdP) -> None:
    async with run_gateway() as gw:
        assert (await gw.client.get("/healthz")).status == 200
        ready = await gw.client.get("/readyz")
        assert ready.status == 200 and await ready.json() == {"postgres": "ok", "vault": "ok"}
        await gw.post(idp.token("crew-billing"), READ)
        await gw.post(idp.token("crew-billing"), UPDATE)
        await gw.post(idp.token("crew-billing"), {"target": "shop", "command": "DROP TABLE x"})
        await poll(gw.gw)
        text_ = await (await gw.client.get("/metrics")).text()
        for outcome in ("allowed", "held", "blocked"):
            assert f'keyturn_gateway_commands_total{{outcome="{outcome}"}} 1.0' in text_
        assert "keyturn_gateway_pending_requests 1.0" in text_
        assert "keyturn_gateway_http_seconds_bucket" in text_


async def test_readyz_names_a_dead_vault(run_gateway: GatewayFactory, shop: Shop) -> None:
    from keyturn.harness.ports import free_port
    from keyturn.vault import AppRoleLogin, Vault

    dead = Vault(f"http://127.0.0.1:{free_port()}", approle=AppRoleLogin("a", "b"))
    async with run_gateway(vault=dead) as gw:
        resp = await gw.client.get("/readyz")
        assert resp.status == 503
        assert "not reachable" in error_of(await resp.json())["message"]


async def test_openapi_matches_the_routes(run_gateway: GatewayFactory) -> None:
    async with run_gateway() as gw:
        spec = await (await gw.client.get("/openapi.json")).json()
        routes = {
            (r.method.lower(), r.resource.canonical)  # type: ignore[union-attr]
            for r in gw.client.app.router.routes()  # type: ignore[union-attr]
            if r.method != "HEAD"
        }
        documented = {
            (m, p.replace("{id}", "{id}")) for p, ops_ in spec["paths"].items() for m in ops_
        }
        assert routes == documented
        assert set(spec["components"]["schemas"]) >= {"CommandIn", "CommandOut", "ErrorOut"}
        post = spec["paths"]["/v1/commands"]["post"]["responses"]
        assert {"200", "202", "400", "401", "403", "404", "409", "413", "429", "503"} <= set(post)


async def test_a_shadow_rule_is_audited_and_counted_not_enforced(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    shadow = {
        "name": "no-updates-at-all",
        "match": {"sql": ["update"]},
        "action": "block",
        "mode": "shadow",
    }
    async with run_gateway(rules=[shadow, *shop.base_policy["rules"]]) as gw:
        status, body = await gw.post(idp.token("crew-billing"), UPDATE)
        assert (status, body["status"], body["rule"]) == (202, "pending", "writes"), body
        async with gw.store.raw_connection() as conn:
            data = await conn.fetchval("SELECT data FROM audit_events WHERE kind = 'request.held'")
        assert json.loads(data)["shadow"] == [{"rule": "no-updates-at-all", "action": "block"}]
        metrics = await (await gw.client.get("/metrics")).text()
        assert (
            'keyturn_gateway_shadow_matches_total{action="block",rule="no-updates-at-all"} 1.0'
            in metrics
        )


async def test_an_agent_cannot_bury_the_approvals_channel(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """The outside round held ~430 long commands in minutes: 50,312 messages in #approvals.
    An agent has at most gateway.max_pending_per_agent requests waiting for a human; the
    limit holds under concurrency, other agents are not affected, and a decision frees room."""
    async with run_gateway(gateway={"max_pending_per_agent": 3}) as gw:
        flood = idp.token("crew-billing")
        results = await asyncio.gather(
            *(
                gw.post(flood, {"target": "shop", "command": f"DELETE FROM orders WHERE id = {i}"})
                for i in range(8)
            )
        )
        assert sorted(status for status, _ in results) == [202] * 3 + [409] * 5
        refused = next(body for status, body in results if status == 409)
        assert refused["error"]["code"] == "too_many_pending"
        assert "at most 3" in refused["error"]["message"]
        status, _ = await gw.post(idp.token("crew-other"), UPDATE)
        assert status == 202
        first = next(body for status, body in results if status == 202)
        await approver_denies(gw.store, uuid.UUID(first["id"]), "no")
        status, body = await gw.post(flood, UPDATE)
        assert status == 202, body


async def test_a_held_commands_estimate_never_answers_for_a_masked_column(
    run_gateway: GatewayFactory, idp: DevIdP, shop: Shop
) -> None:
    """The seventh outside round read email histogram bounds through held writes' estimates
    (DELETE … WHERE email < 'm': 1 row or 2), many comparisons to a request. A held command's
    preview is judged as a read is: one that uses a masked column gets no estimate."""
    await shop.postgres.execute("ANALYZE customers", shop.database)  # what autovacuum does
    token = idp.token("crew-billing")
    async with run_gateway() as gw:
        for probe in (
            "DELETE FROM customers WHERE email < 'b'",
            "INSERT INTO orders (id) SELECT 1 FROM customers WHERE email < 'm'",
            "UPDATE orders SET status = 'x' WHERE customer_id IN"
            " (SELECT id FROM customers WHERE email LIKE 'a%')",
            # the eighth round: the planner evaluates stable calls while planning
            "INSERT INTO orders (status) SELECT 'x' FROM generate_series(1, 12345)",
            "INSERT INTO orders (status) SELECT 'x' FROM generate_series(1,"
            " ascii(substr(pg_relation_filepath('customers'), 1, 1)))",
        ):
            status, body = await gw.post(token, {"target": "shop", "command": probe})
            assert status == 202 and body.get("estimated_rows") is None, (probe, body)
        status, body = await gw.post(token, UPDATE)
        assert status == 202 and body["estimated_rows"] is not None, body


@pytest.mark.parametrize(
    "claims",
    [
        {"raw_on_behalf_of": "@slack:U_APPROVER"},
        {"on_behalf_of": "slack:slack:U_APPROVER"},
        {"raw_on_behalf_of": "U\u0332_APPROVER"},  # a combining underline
        {"raw_on_behalf_of": 123},
        {"act": {}, "raw_on_behalf_of": "U_APPROVER"},
        {"act": {"sub": 123}},
        {"act": "U_APPROVER"},
        {"act": {"sub": "U_APPROVER"}, "raw_on_behalf_of": "U_OTHER"},
    ],
    ids=[
        "double-prefix",
        "prefix-twice",
        "look-alike",
        "number",
        "empty-act",
        "act-number",
        "act-string",
        "two-people",
    ],
)
async def test_a_token_that_spells_its_human_around_the_self_approval_check_is_refused(
    run_gateway: GatewayFactory, idp: DevIdP, claims: dict[str, Any]
) -> None:
    """The ninth outside round had U_APPROVER approve requests made on its own behalf by
    spelling itself @slack:U_APPROVER, by a look-alike, or by a malformed act claim that the
    gateway dropped. A human claim that names no Slack user exactly is refused whole."""
    async with run_gateway() as gw:
        status, body = await gw.post(idp.token("crew-billing", **claims), UPDATE)
        assert status == 401 and error_of(body)["code"] == "unauthorized", body


async def test_the_human_a_token_names_is_stored_as_one_slack_id(
    run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    async with run_gateway() as gw:
        token = idp.token("crew-billing", on_behalf_of="<@u_human|ada>", raw_on_behalf_of="U_HUMAN")
        status, body = await gw.post(token, UPDATE)
        assert status == 202, body
        row = await requests.get_request(gw.store, uuid.UUID(body["id"]))
        assert row.on_behalf_of == "U_HUMAN"
