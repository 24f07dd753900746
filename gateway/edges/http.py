"""The HTTP agent API (aiohttp): parse, authenticate, call one use case, serialize; every
error in one envelope."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from gateway.auth import Authenticator
from gateway.edges.openapi import build_spec
from gateway.edges.schemas import (
    MAX_BODY_BYTES,
    MAX_COMMAND_BYTES,
    CommandIn,
    HttpCallIn,
    storable,
)
from gateway.ratelimit import RateLimiter
from gateway.usecases.gateway import AGENT_TERMINAL, Gateway, agent_run, read, ready, targets
from gateway.usecases.submission import Submission, large
from gateway.usecases.submit import Blocked, submit
from keyturn.agent.api import CommandOut
from keyturn.classify.http import call_of
from keyturn.domain import RequestStatus
from keyturn.errors import InvalidInput, KeyturnError, RateLimited, TooLarge, Unavailable
from keyturn.store.reads import RequestView

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Edge:
    """What the HTTP edge holds: the use cases' gateway, who is calling, how often."""

    gw: Gateway
    auth: Authenticator
    limiter: RateLimiter
    health: Callable[[], tuple[int, dict[str, Any]]]  # the process's loops (Supervisor.health)
    public_url: str  # where agents reach this gateway (wait_url)

    def answer(self, row: RequestView) -> CommandOut:
        """A request as the HTTP API shows it; one still going carries where to wait for it."""
        status = RequestStatus(row.status)
        waiting = status not in AGENT_TERMINAL
        return CommandOut(
            id=str(row.id),
            status=status.value,
            target=row.target,
            rule=row.rule,
            created_at=row.created_at,
            wait_url=f"{self.public_url}/v1/commands/{row.id}?wait=30" if waiting else None,
            expires_at=row.pending_expires_at if status is RequestStatus.PENDING else None,
            estimated_rows=row.estimated_rows,
            result=row.result,
            error=row.error,
            denied_by=row.denied_by,
            deny_reason=row.deny_reason,
        )


EDGE_KEY = web.AppKey("edge", Edge)
RUN_STEPS, MAX_RUN_STEPS = 100, 1000  # steps of a run one GET answers: by default, at most

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


@web.middleware
async def edge_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time the request, and turn every error into the envelope.

    keyturn errors and aiohttp's HTTP errors keep their status; anything else is logged with
    the request id and becomes a fixed 500 (its text could carry SQL or a credential).
    One middleware, not two: a long-poll keeps its whole chain alive while it waits.
    """
    started = time.perf_counter()
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    try:
        response = await handler(request)
    except Blocked as exc:
        response = error_response(exc.status, exc.code, exc.message, rule=exc.rule)
    except RateLimited as exc:
        response = error_response(exc.status, exc.code, exc.message)
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    except KeyturnError as exc:
        if isinstance(exc, Unavailable):
            log.warning("request %s: dependency unavailable: %s", request_id, exc.message)
        response = error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else f"body is larger than {MAX_BODY_BYTES} bytes"
        response = error_response(exc.status, code, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except (HttpProcessingError, RequestPayloadError) as exc:  # bad gzip, framing, length
        cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
        message = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
        response = error_response(400, "invalid_input", f"the body cannot be read: {message}")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request %s failed", request_id)
        response = error_response(500, "internal", f"internal error (request id {request_id})")
    response.headers["X-Request-Id"] = request_id
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[EDGE_KEY].gw.metrics.http_seconds.labels(route).observe(
        time.perf_counter() - started
    )
    return response


async def _json(out: CommandOut, status: int = 200) -> web.Response:
    """The body; a large result is encoded off the event loop, which keeps /healthz prompt."""
    rows = getattr(out.result, "rows", None) or []
    if large(len(rows), getattr(out.result, "bytes", 0)) or len(str(rows[:1])) > 4096:
        body = await asyncio.to_thread(out.model_dump_json, exclude_none=True)
    else:
        body = out.model_dump_json(exclude_none=True)
    return web.Response(text=body, status=status, content_type="application/json")


def _parse(raw: bytes, idempotency_key: str | None) -> Submission:
    try:
        data = json.loads(raw)
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4,300 digits
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("body is not valid JSON: it nests too deeply") from None
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object with target and command (or request)")
    try:
        cmd = CommandIn.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"{where}: {first['msg']}") from None
    command = _http_text(cmd.http) if cmd.http is not None else cmd.command or ""
    if len(command.encode(errors="replace")) > MAX_COMMAND_BYTES:
        raise TooLarge(f"command is larger than {MAX_COMMAND_BYTES} bytes")
    for name, value in (
        ("target", cmd.target),
        ("command", command),
        ("reason", cmd.reason),
        ("run_id", cmd.run_id),
    ):
        storable(name, value)
    return Submission(
        target=cmd.target,
        command=command,
        reason=cmd.reason,
        run_id=cmd.run_id,
        body_sha256=hashlib.sha256(raw).hexdigest(),
        idempotency_key=idempotency_key,
        as_http=cmd.http is not None,
    )


def _http_text(given: HttpCallIn) -> str:
    """An API call's text form (:mod:`keyturn.classify.http`): what is judged and sent."""
    call = call_of(
        given.method,
        given.path,
        query=given.query,
        headers=given.headers,
        json_body=("json_body" in given.model_fields_set, given.json_body),
        text=given.text,
    )
    return call.render()


async def post_command(request: web.Request) -> web.Response:
    edge = request.app[EDGE_KEY]
    who = await edge.auth.authenticate(request.headers.get("Authorization"))
    edge.limiter.check(who.subject)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 200 and key.isprintable()):
        raise InvalidInput("Idempotency-Key must be 1 to 200 printable characters")
    sub = _parse(await request.read(), key)
    ended, row = await submit(edge.gw, who, sub)
    return await _json(edge.answer(row), 200 if ended else 202)


async def get_command(request: web.Request) -> web.Response:
    edge = request.app[EDGE_KEY]
    who = await edge.auth.authenticate(request.headers.get("Authorization"))
    raw_wait = request.query.get("wait", "0")
    try:
        wait = float(raw_wait)
    except ValueError:
        raise InvalidInput(f"wait must be a number of seconds, got {raw_wait!r}") from None
    if not math.isfinite(wait) or wait < 0:
        raise InvalidInput("wait must be a non-negative number of seconds")
    wait = min(wait, edge.gw.config.gateway.max_wait.total_seconds())
    return await _json(edge.answer(await read(edge.gw, who, request.match_info["id"], wait)))


async def get_targets(request: web.Request) -> web.Response:
    edge = request.app[EDGE_KEY]
    who = await edge.auth.authenticate(request.headers.get("Authorization"))
    return web.json_response(targets(edge.gw, who).model_dump())


async def get_run(request: web.Request) -> web.Response:
    """The agent's own steps of one run, outputs as it saw them."""
    edge = request.app[EDGE_KEY]
    who = await edge.auth.authenticate(request.headers.get("Authorization"))
    edge.limiter.check(who.subject)
    raw = request.query.get("limit", str(RUN_STEPS))
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_RUN_STEPS):
        raise InvalidInput(f"limit must be a whole number from 1 to {MAX_RUN_STEPS}")
    waiting = request.query.get("waiting", "false")
    if waiting not in ("true", "false"):
        raise InvalidInput("waiting must be true or false")
    found = await agent_run(
        edge.gw, who, request.match_info["id"], int(raw), waiting=waiting == "true"
    )
    body = await asyncio.to_thread(found.model_dump_json)
    return web.Response(text=body, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """Alive unless a background loop is down (crashed, not recovered within its period):
    held requests would never run while the process still answered."""
    status, body = request.app[EDGE_KEY].health()
    return web.json_response(body, status=status)


async def readyz(request: web.Request) -> web.Response:
    return web.json_response(await ready(request.app[EDGE_KEY].gw))


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[EDGE_KEY].gw.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(build_spec())


def create_app(edge: Edge) -> web.Application:
    app = web.Application(middlewares=[edge_errors], client_max_size=MAX_BODY_BYTES)
    app[EDGE_KEY] = edge
    app.router.add_post("/v1/commands", post_command)
    app.router.add_get("/v1/commands/{id}", get_command)
    app.router.add_get("/v1/targets", get_targets)
    app.router.add_get("/v1/runs/{id}", get_run)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
