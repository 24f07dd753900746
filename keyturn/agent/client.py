"""keyturn's agent API from Python: submit a command, wait for a human, get a typed outcome.

    from keyturn.client import Client, Denied

    with Client() as kt:  # KEYTURN_GATEWAY_URL, KEYTURN_AGENT_TOKEN
        try:
            result = kt.run("orders-db", "UPDATE orders SET status = 'paid' WHERE id = 42",
                            reason="customer paid by wire", timeout=900)
        except Denied as exc:
            print(exc.denied_by, exc.reason)

``Client`` and ``AsyncClient`` share one sans-IO core: each operation is a generator that yields
the HTTP calls and pauses it needs and is driven by a blocking or an async loop, so retries,
backoff and error mapping exist once. A submit always carries an ``Idempotency-Key`` (generated
when none is given) and is retried with it, so a retry after a dropped connection never makes
a second request (or a second Slack card). Long-polls reconnect across gateway restarts.

The errors here are the client's outcomes, all under :class:`ClientError`; they are not the
server-side errors of :mod:`keyturn.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from keyturn import __version__
from keyturn.agent.api import (
    TERMINAL,
    CommandOut,
    HttpResultOut,
    Result,
    RunOut,
    TargetOut,
    TargetsOut,
)
from keyturn.backoff import Backoff

__all__ = [  # what keyturn.client, the public import path, offers
    "AsyncClient",
    "AuthError",
    "Cancelled",
    "Client",
    "ClientError",
    "CommandBlocked",
    "Denied",
    "Expired",
    "Failed",
    "GatewayUnavailable",
    "HttpResult",
    "NotConfigured",
    "Rejected",
    "Request",
    "Result",
    "StillPending",
    "TooManyRequests",
    "http_call",
    "outcome",
]

log = logging.getLogger(__name__)
Request = CommandOut
# What an agent sends: SQL or a shell line (text), or an HTTP call (:func:`http_call`).
Command = str | dict[str, Any]
NO_BODY: Any = object()  # http(json=...) not given (JSON null is a body)


def http_call(
    method: str,
    path: str,
    *,
    params: dict[str, Any] | list[list[Any]] | None = None,
    json: Any = NO_BODY,
    text: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An HTTP target's call as the gateway takes it (``request`` in POST /v1/commands)."""
    call: dict[str, Any] = {"method": method, "path": path}
    for name, value in (("query", params), ("text", text), ("headers", headers)):
        if value is not None:
            call[name] = value
    if json is not NO_BODY:
        call["json"] = json
    return call


def tool_call(method: str, path: str, query: dict[str, Any] | None, body: Any) -> dict[str, Any]:
    """An API call from a model's tool arguments, where no body is ``None`` (a tool cannot
    send a JSON ``null`` body; the client can)."""
    return http_call(method, path, params=query, json=NO_BODY if body is None else body)


@dataclass(frozen=True)
class HttpResult:
    """An HTTP target's answer, as the agent may see it (masked, capped)."""

    status: int
    headers: dict[str, str]
    json: Any
    text: str | None
    truncated: bool
    bytes: int  # of the body read (before masking)
    request_id: str
    note: str | None = None


def http_result(request: Request) -> HttpResult:
    result = outcome(request)
    if not isinstance(result, HttpResultOut):
        raise TypeError(f"request {request.id} is not an HTTP call")
    return HttpResult(
        status=result.status,
        headers=result.headers,
        json=result.json_body,
        text=result.text,
        truncated=result.truncated,
        bytes=result.bytes,
        request_id=request.id,
        note=result.note,
    )


T = TypeVar("T")

POLL_SECONDS = 30.0  # one long-poll; the gateway caps it at its max_wait anyway
SUBMIT_RETRY_SECONDS = 60.0  # how long a submit keeps retrying a gateway that is down
LAST_READ_GRACE = 2.0  # seconds a wait past its timeout still retries its last read
MIN_POLL_GAP = 0.25  # seconds between polls that came back early and not final
MIN_ATTEMPT = 0.5  # seconds any one HTTP attempt gets, even at its deadline
TARGETS_TIMEOUT = 10.0
BACKOFF_FIRST, BACKOFF_CAP = 0.25, 5.0
RETRYABLE_STATUS = frozenset({502, 503, 504})
CONNECT_TIMEOUT = 5.0


# ---------------------------------------------------------------------- outcomes


class NotConfigured(ValueError):
    """No gateway URL or agent token (from arguments or the environment), or a bad URL."""


class ClientError(Exception):
    """Every way a command can end other than executed. ``request_id`` when one exists."""

    code = "error"

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class CommandBlocked(ClientError):
    """A policy rule refuses the command outright; no request was made."""

    code = "blocked"

    def __init__(self, message: str, rule: str | None) -> None:
        super().__init__(message)
        self.rule = rule


class Denied(ClientError):
    code = "denied"

    def __init__(self, request_id: str, denied_by: str | None, reason: str | None) -> None:
        who = denied_by or "an approver"
        super().__init__(f"denied by {who}" + (f": {reason}" if reason else ""), request_id)
        self.denied_by = denied_by
        self.reason = reason


class Expired(ClientError):
    """Nobody decided before the request's pending time ran out."""

    code = "expired"


class Cancelled(ClientError):
    code = "cancelled"


class Failed(ClientError):
    """The command was allowed or approved but did not complete (``error`` says why)."""

    code = "failed"


class StillPending(ClientError):
    """The wait ended before a decision; the request goes on (``status`` says where)."""

    code = "pending"

    def __init__(self, request: Request) -> None:
        super().__init__(f"request {request.id} is still {request.status}", request.id)
        self.status = request.status
        self.request = request


class AuthError(ClientError):
    """The gateway refused the token (401). Never retried."""

    code = "unauthorized"


class Rejected(ClientError):
    """The gateway refused the call itself: bad input, unknown target, not allowed, a key
    reused with another body, too large. ``code`` is the gateway's error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class TooManyRequests(ClientError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GatewayUnavailable(ClientError):
    """The gateway (or what it needs) could not be reached in time."""

    code = "unavailable"


def outcome(request: Request) -> Result:
    """The result of an executed request; any other state raises its typed error."""
    if request.status == "executed" and request.result is not None:
        return request.result
    if request.status == "denied":
        raise Denied(request.id, request.denied_by, request.deny_reason)
    if request.status == "expired":
        raise Expired(f"request {request.id} expired before anyone approved it", request.id)
    if request.status == "cancelled":
        raise Cancelled(f"request {request.id} was cancelled", request.id)
    if request.status in ("failed", "executed"):
        raise Failed(request.error or "the command failed", request.id)
    raise StillPending(request)


# ---------------------------------------------------------------------- the sans-IO core


@dataclass(frozen=True)
class Call:
    """One HTTP call to make; answered with a :class:`Reply` (or ``None`` if it failed)."""

    method: str
    path: str
    read_timeout: float
    body: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    body: Any


Step = Call | Sleep
Flow = Generator[Step, Reply | None, T]


def _retry_after(reply: Reply) -> float:
    try:
        return max(0.0, float(str(reply.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


def _error(reply: Reply) -> ClientError:
    """The typed error of a non-2xx answer."""
    detail = reply.body.get("error") if isinstance(reply.body, dict) else None
    code = str(detail.get("code", "http_error")) if isinstance(detail, dict) else "http_error"
    message = str(detail.get("message", "")) if isinstance(detail, dict) else ""
    message = message or f"the gateway answered HTTP {reply.status}"
    if reply.status == 401:
        return AuthError(message)
    if reply.status == 403 and code == "blocked":
        return CommandBlocked(message, detail.get("rule") if isinstance(detail, dict) else None)
    if reply.status == 429:
        return TooManyRequests(message, _retry_after(reply))
    if reply.status >= 500:
        return GatewayUnavailable(f"{message} (HTTP {reply.status})")
    return Rejected(reply.status, code, message)


def _request(reply: Reply) -> Request:
    try:
        return CommandOut.model_validate(reply.body)
    except ValidationError:
        raise GatewayUnavailable(
            f"the gateway answered HTTP {reply.status} with no request"
        ) from None


def _exchange(call: Call, deadline: float, what: str) -> Flow[Reply]:
    """Make ``call`` until it gets a final answer: connection errors, 502-504 and 429 are
    retried (with backoff, or after Retry-After) while ``deadline`` allows. No attempt
    outlives the deadline either: each gets only the time that is left."""
    backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP)
    while True:
        left = max(MIN_ATTEMPT, deadline - time.monotonic())
        reply = yield replace(call, read_timeout=min(call.read_timeout, left))
        if reply is not None and reply.status < 400:
            return reply
        if reply is not None and reply.status == 429:
            pause = _retry_after(reply)
            if time.monotonic() + pause > deadline:
                raise _error(reply)
        elif reply is None or reply.status in RETRYABLE_STATUS:
            pause = backoff.next()
            if time.monotonic() + pause > deadline:
                cause = _error(reply).message if reply is not None else "no connection"
                raise GatewayUnavailable(f"could not {what}: {cause}")
        else:
            raise _error(reply)
        yield Sleep(pause)


def submit_flow(
    target: str,
    command: Command,
    reason: str | None,
    run_id: str | None,
    idempotency_key: str | None,
    retry_for: float,
) -> Flow[Request]:
    body = {"target": target, "command" if isinstance(command, str) else "http": command}
    body |= {k: v for k, v in (("reason", reason), ("run_id", run_id)) if v is not None}
    key = idempotency_key or f"keyturn-client-{uuid.uuid4()}"
    call = Call("POST", "/v1/commands", POLL_SECONDS, body, {"Idempotency-Key": key})
    reply = yield from _exchange(call, time.monotonic() + retry_for, f"submit to {target}")
    return _request(reply)


def wait_flow(request_id: str, timeout: float) -> Flow[Request]:
    """Long-poll until the request is final or ``timeout`` passes; reconnects meanwhile.

    A poll answered early without a final state (a gateway shutting down, a proxy that ends
    long-polls) is followed by a short pause, never by a tight loop."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        wait = max(0.0, min(POLL_SECONDS, deadline - started))
        path = f"/v1/commands/{quote(request_id, safe='')}?wait={wait:.3f}"
        # the gateway answers at the end of its wait: the read may take a moment longer, and
        # a gateway down at the deadline still gets that moment for a last read
        last = max(deadline, started) + LAST_READ_GRACE
        reply = yield from _exchange(Call("GET", path, wait + 10), last, "read a request")
        request = _request(reply)
        now = time.monotonic()
        if request.status in TERMINAL or now >= deadline:
            return request
        if now - started < MIN_POLL_GAP:
            yield Sleep(min(MIN_POLL_GAP, deadline - now))


def settle_flow(
    target: str,
    command: Command,
    reason: str | None,
    run_id: str | None,
    idempotency_key: str | None,
    *,
    wait: float | Callable[[Request], float],
    on_pending: Callable[[Request], None] | None,
    retry_for: float,
) -> Flow[Request]:
    """Submit, then wait ``wait`` seconds (or as long as ``wait(request)`` says) for a held
    command: the request as it ends up. ``on_pending`` hears of a held command first; its
    own failure is logged and changes nothing."""
    request = yield from submit_flow(target, command, reason, run_id, idempotency_key, retry_for)
    if request.status in TERMINAL:
        return request
    if request.status == "pending" and on_pending is not None:
        try:
            on_pending(request)
        except Exception:
            log.exception("on_pending failed for request %s; waiting anyway", request.id)
    seconds = wait(request) if callable(wait) else wait
    return (yield from wait_flow(request.id, max(0.0, seconds)))


def deadline_flow(
    target: str,
    command: Command,
    reason: str | None,
    run_id: str | None,
    idempotency_key: str | None,
    timeout: float,
    on_pending: Callable[[Request], None] | None,
) -> Flow[Request]:
    """Submit, then wait for a held command until ``timeout`` seconds in all have passed."""
    deadline = time.monotonic() + timeout
    return (
        yield from settle_flow(
            target,
            command,
            reason,
            run_id,
            idempotency_key,
            wait=lambda _: deadline - time.monotonic(),
            on_pending=on_pending,
            retry_for=min(timeout, SUBMIT_RETRY_SECONDS),
        )
    )


def run_flow(
    target: str,
    command: Command,
    reason: str | None,
    run_id: str | None,
    idempotency_key: str | None,
    timeout: float,
    on_pending: Callable[[Request], None] | None,
) -> Flow[Result]:
    args = (target, command, reason, run_id, idempotency_key, timeout, on_pending)
    return outcome((yield from deadline_flow(*args)))


def http_flow(
    target: str,
    call: dict[str, Any],
    reason: str | None,
    run_id: str | None,
    idempotency_key: str | None,
    timeout: float,
    on_pending: Callable[[Request], None] | None,
) -> Flow[HttpResult]:
    args = (target, call, reason, run_id, idempotency_key, timeout, on_pending)
    return http_result((yield from deadline_flow(*args)))


def run_steps_flow(run_id: str, limit: int, waiting: bool, timeout: float) -> Flow[RunOut]:
    query = f"limit={limit}&waiting={'true' if waiting else 'false'}"
    call = Call("GET", f"/v1/runs/{quote(run_id, safe='')}?{query}", timeout)
    reply = yield from _exchange(call, time.monotonic() + timeout, f"read run {run_id}")
    try:
        return RunOut.model_validate(reply.body)
    except ValidationError:
        raise GatewayUnavailable("the gateway answered /v1/runs without a run") from None


def targets_flow(timeout: float) -> Flow[list[TargetOut]]:
    call = Call("GET", "/v1/targets", timeout)
    reply = yield from _exchange(call, time.monotonic() + timeout, "list targets")
    try:
        return TargetsOut.model_validate(reply.body).targets
    except ValidationError:
        raise GatewayUnavailable("the gateway answered /v1/targets without a target list") from None


# ---------------------------------------------------------------------- the two runners


def _settings(url: str | None, token: str | None) -> tuple[str, str]:
    url = url or os.environ.get("KEYTURN_GATEWAY_URL")
    token = token or os.environ.get("KEYTURN_AGENT_TOKEN")
    if not url:
        raise NotConfigured("no gateway URL: pass url= or set KEYTURN_GATEWAY_URL")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise NotConfigured(f"the gateway URL {url!r} is not valid: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise NotConfigured(f"the gateway URL must be http(s)://HOST[:PORT], got {url!r}")
    if not token:
        raise NotConfigured("no agent token: pass token= or set KEYTURN_AGENT_TOKEN")
    return url.rstrip("/"), token


def _timeout(call: Call) -> httpx.Timeout:
    return httpx.Timeout(call.read_timeout, connect=min(CONNECT_TIMEOUT, call.read_timeout))


def _reply(response: httpx.Response) -> Reply:
    try:
        body = response.json()
    except ValueError:
        body = None
    return Reply(response.status_code, response.headers, body)


class _Base:
    def __init__(self, url: str | None, token: str | None) -> None:
        self.url, token = _settings(url, token)
        self._headers = {
            "Authorization": f"Bearer {token}",
            "User-Agent": f"keyturn-client/{__version__}",
        }

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__name__}({self.url!r})"


class Client(_Base):
    """The blocking client. Thread-safe; use it as a context manager or call :meth:`close`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, token)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, transport=transport)

    def _drive(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    response = self._http.request(
                        step.method,
                        step.path,
                        json=step.body,
                        headers=step.headers,
                        timeout=_timeout(step),
                    )
                except httpx.RequestError:  # connection, timeout, protocol, decoding
                    step = flow.send(None)
                else:
                    step = flow.send(_reply(response))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def submit(
        self,
        target: str,
        command: Command,
        reason: str | None = None,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        *,
        retry_for: float = SUBMIT_RETRY_SECONDS,
    ) -> Request:
        """Submit a command: executed (allowed), pending (held) or a typed error (blocked…).

        A gateway that cannot be reached (or answers 502-504 or 429) is retried with the same
        Idempotency-Key for ``retry_for`` seconds, then :class:`Unavailable`."""
        return self._drive(submit_flow(target, command, reason, run_id, idempotency_key, retry_for))

    def wait(self, request_id: str, timeout: float) -> Request:
        """The request once final, or as it stands when ``timeout`` seconds have passed."""
        return self._drive(wait_flow(request_id, timeout))

    def run(
        self,
        target: str,
        command: Command,
        reason: str | None = None,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        *,
        timeout: float = 900.0,
        on_pending: Callable[[Request], None] | None = None,
    ) -> Result:
        """Submit, then wait until final within ``timeout`` in all: the result, or the typed
        error (``StillPending`` when the time ran out first). ``on_pending`` is called once
        when the command is held, before the wait."""
        return self._drive(
            run_flow(target, command, reason, run_id, idempotency_key, timeout, on_pending)
        )

    def submit_and_wait(
        self,
        target: str,
        command: Command,
        reason: str | None = None,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        *,
        wait: float | Callable[[Request], float],
        on_pending: Callable[[Request], None] | None = None,
        retry_for: float = SUBMIT_RETRY_SECONDS,
    ) -> Request:
        """Submit, and wait for a held command ``wait`` seconds (or ``wait(request)``): the
        request as it then stands, final or not. What tools build on; ``run`` raises instead."""
        return self._drive(
            settle_flow(
                target,
                command,
                reason,
                run_id,
                idempotency_key,
                wait=wait,
                on_pending=on_pending,
                retry_for=retry_for,
            )
        )

    def http(
        self,
        target: str,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | list[list[Any]] | None = None,
        json: Any = NO_BODY,
        text: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = 900.0,
        on_pending: Callable[[Request], None] | None = None,
    ) -> HttpResult:
        """Call an HTTP target's API through keyturn, waiting (within ``timeout``) for a held
        call as :meth:`run` does: the API's answer (any status), or the typed error."""
        call = http_call(method, path, params=params, json=json, text=text, headers=headers)
        return self._drive(
            http_flow(target, call, reason, run_id, idempotency_key, timeout, on_pending)
        )

    def targets(self, timeout: float = TARGETS_TIMEOUT) -> list[TargetOut]:
        """The targets this identity may use."""
        return self._drive(targets_flow(timeout))

    def run_steps(
        self,
        run_id: str,
        limit: int = 100,
        *,
        waiting: bool = False,
        timeout: float = TARGETS_TIMEOUT,
    ) -> RunOut:
        """This identity's steps of run ``run_id``, oldest first, outputs as it saw them
        (``waiting``: only its requests not yet ended; :class:`Rejected`, status 404, when
        it has no step)."""
        return self._drive(run_steps_flow(run_id, limit, waiting, timeout))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client: the same operations as :class:`Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, token)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers, transport=transport
        )

    async def _drive(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    response = await self._http.request(
                        step.method,
                        step.path,
                        json=step.body,
                        headers=step.headers,
                        timeout=_timeout(step),
                    )
                except httpx.RequestError:  # connection, timeout, protocol, decoding
                    step = flow.send(None)
                else:
                    step = flow.send(_reply(response))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def submit(
        self,
        target: str,
        command: Command,
        reason: str | None = None,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        *,
        retry_for: float = SUBMIT_RETRY_SECONDS,
    ) -> Request:
        return await self._drive(
            submit_flow(target, command, reason, run_id, idempotency_key, retry_for)
        )

    async def wait(self, request_id: str, timeout: float) -> Request:
        return await self._drive(wait_flow(request_id, timeout))

    async def run(
        self,
        target: str,
        command: Command,
        reason: str | None = None,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        *,
        timeout: float = 900.0,
        on_pending: Callable[[Request], None] | None = None,
    ) -> Result:
        return await self._drive(
            run_flow(target, command, reason, run_id, idempotency_key, timeout, on_pending)
        )

    async def submit_and_wait(
        self,
        target: str,
        command: Command,
        reason: str | None = None,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        *,
        wait: float | Callable[[Request], float],
        on_pending: Callable[[Request], None] | None = None,
        retry_for: float = SUBMIT_RETRY_SECONDS,
    ) -> Request:
        return await self._drive(
            settle_flow(
                target,
                command,
                reason,
                run_id,
                idempotency_key,
                wait=wait,
                on_pending=on_pending,
                retry_for=retry_for,
            )
        )

    async def http(
        self,
        target: str,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | list[list[Any]] | None = None,
        json: Any = NO_BODY,
        text: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = 900.0,
        on_pending: Callable[[Request], None] | None = None,
    ) -> HttpResult:
        """Call an HTTP target's API through keyturn, waiting (within ``timeout``) for a held
        call as :meth:`run` does: the API's answer (any status), or the typed error."""
        call = http_call(method, path, params=params, json=json, text=text, headers=headers)
        return await self._drive(
            http_flow(target, call, reason, run_id, idempotency_key, timeout, on_pending)
        )

    async def targets(self, timeout: float = TARGETS_TIMEOUT) -> list[TargetOut]:
        return await self._drive(targets_flow(timeout))

    async def run_steps(
        self,
        run_id: str,
        limit: int = 100,
        *,
        waiting: bool = False,
        timeout: float = TARGETS_TIMEOUT,
    ) -> RunOut:
        return await self._drive(run_steps_flow(run_id, limit, waiting, timeout))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
