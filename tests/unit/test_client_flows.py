"""The client's sans-IO core, driven by hand: retries, backoff, keys and typed errors."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from keyturn.agent.api import CommandOut
from keyturn.agent.client import (
    AuthError,
    Call,
    Client,
    Failed,
    GatewayUnavailable,
    NotConfigured,
    Rejected,
    Reply,
    Sleep,
    outcome,
    settle_flow,
    submit_flow,
    wait_flow,
)

PENDING = {"id": "r-1", "status": "pending", "target": "db", "created_at": "2026-11-26T12:00:00Z"}


def reply(status: int, body: Any = None, **headers: str) -> Reply:
    return Reply(status, httpx.Headers(headers), body)


def test_a_retried_submit_keeps_its_idempotency_key() -> None:
    flow = submit_flow("db", "UPDATE t SET x = 1", None, None, None, retry_for=60)
    first = next(flow)
    assert isinstance(first, Call) and first.headers is not None
    key = first.headers["Idempotency-Key"]
    assert isinstance(flow.send(None), Sleep)  # no connection: back off
    again = flow.send(None)
    assert isinstance(again, Call) and again.headers == {"Idempotency-Key": key}
    assert isinstance(flow.send(reply(503, {"error": {"code": "unavailable"}})), Sleep)
    assert flow.send(None) == again  # the same call, the same key, after the pause
    with pytest.raises(StopIteration) as done:
        flow.send(reply(202, PENDING))
    assert done.value.value.id == "r-1"


def test_401_and_4xx_are_not_retried() -> None:
    flow = submit_flow("db", "SELECT 1", None, None, "k", retry_for=60)
    next(flow)
    with pytest.raises(AuthError):
        flow.send(reply(401, {"error": {"code": "unauthorized", "message": "bad token"}}))
    flow = submit_flow("db", "SELECT 1", None, None, "k", retry_for=60)
    next(flow)
    with pytest.raises(Rejected) as rejected:
        flow.send(reply(409, {"error": {"code": "idempotency_conflict", "message": "other body"}}))
    assert rejected.value.code == "idempotency_conflict" and rejected.value.status == 409


def test_429_waits_retry_after_and_a_dead_gateway_gives_up_at_the_deadline() -> None:
    flow = submit_flow("db", "SELECT 1", None, None, "k", retry_for=60)
    next(flow)
    pause = flow.send(reply(429, {"error": {"code": "rate_limited"}}, **{"Retry-After": "3"}))
    assert pause == Sleep(3.0)
    flow = submit_flow("db", "SELECT 1", None, None, "k", retry_for=0)
    next(flow)
    with pytest.raises(GatewayUnavailable, match="could not submit to db: no connection"):
        flow.send(None)


def test_a_wait_polls_with_the_time_left_and_quotes_the_id() -> None:
    flow = wait_flow("a/b?c", timeout=0)
    call = next(flow)
    assert isinstance(call, Call) and call.path == "/v1/commands/a%2Fb%3Fc?wait=0.000"
    with pytest.raises(StopIteration) as done:
        flow.send(reply(200, PENDING))
    assert done.value.value.status == "pending"


def test_outcomes_are_typed() -> None:
    failed = CommandOut.model_validate(PENDING | {"status": "failed", "error": "boom"})
    with pytest.raises(Failed, match="boom") as caught:
        outcome(failed)
    assert caught.value.request_id == "r-1"


def test_configuration_errors_and_the_token_stays_out_of_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KEYTURN_GATEWAY_URL", raising=False)
    monkeypatch.delenv("KEYTURN_AGENT_TOKEN", raising=False)
    with pytest.raises(NotConfigured, match="KEYTURN_GATEWAY_URL"):
        Client()
    with pytest.raises(NotConfigured, match="KEYTURN_AGENT_TOKEN"):
        Client("http://127.0.0.1:1")
    for bad in ("localhost:8080", "ftp://x", "http://127.0.0.1:None"):
        with pytest.raises(NotConfigured):
            Client(bad, "t")
    monkeypatch.setenv("KEYTURN_GATEWAY_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("KEYTURN_AGENT_TOKEN", "secret-token")
    with Client() as kt:
        assert repr(kt) == "Client('http://127.0.0.1:9')" and "secret" not in repr(kt)


def test_no_attempt_outlives_its_deadline() -> None:
    flow = submit_flow("db", "SELECT 1", None, None, "k", retry_for=3)
    first = next(flow)
    assert isinstance(first, Call) and first.read_timeout <= 3  # not the 30 s of a POST


def test_an_early_non_final_answer_is_not_a_tight_loop() -> None:
    flow = wait_flow("r-1", timeout=60)
    next(flow)
    pause = flow.send(reply(200, PENDING))  # answered at once, still pending
    assert isinstance(pause, Sleep) and 0 < pause.seconds <= 0.25
    assert isinstance(flow.send(None), Call)


def test_on_pending_hears_of_held_commands_only_and_cannot_break_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(_request: CommandOut) -> None:
        raise RuntimeError("pager down")

    flow = settle_flow(
        "db", "UPDATE t SET x = 1", None, None, "k", wait=0, on_pending=boom, retry_for=5
    )
    next(flow)
    poll = flow.send(reply(202, PENDING))
    assert isinstance(poll, Call) and poll.method == "GET"  # waited anyway
    assert "on_pending failed for request r-1" in caplog.text
    told: list[CommandOut] = []
    flow = settle_flow(
        "web", "uptime", None, None, "k", wait=0, on_pending=told.append, retry_for=5
    )
    next(flow)
    flow.send(reply(202, PENDING | {"status": "approved"}))  # approved by policy: nobody to ask
    assert told == []
