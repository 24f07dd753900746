"""CrewAI tools: an agent's SQL and shell commands go through keyturn (``pip install
keyturn[crewai]``).

    from keyturn.crewai import KeyturnRequestStatusTool, KeyturnShellTool, KeyturnSQLTool

    agent = Agent(..., tools=[KeyturnSQLTool(), KeyturnRequestStatusTool()])

The gateway and token come from arguments or ``KEYTURN_GATEWAY_URL`` / ``KEYTURN_AGENT_TOKEN``.
A tool returns text the model can use (:mod:`keyturn.agent.reports`) and never raises into the
crew. A held command waits up to the tool's ``wait`` (default: until the request would expire)
and then tells the model the request id to check with ``keyturn_request_status``. Results are
never cached by CrewAI: the same call can rightly answer differently (a request decided since,
rows changed by an approved write).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from crewai.tools import BaseTool
from pydantic import BaseModel, Field, SecretStr

from keyturn.agent.api import CommandOut
from keyturn.agent.client import (
    SUBMIT_RETRY_SECONDS,
    AsyncClient,
    Client,
    ClientError,
    Command,
    NotConfigured,
    tool_call,
)
from keyturn.agent.reports import ToolOutcome, default_wait, told, unexpected

log = logging.getLogger(__name__)

__all__ = [
    "KeyturnHTTPTool",
    "KeyturnRequestStatusTool",
    "KeyturnSQLTool",
    "KeyturnShellTool",
]  # keyturn.crewai's

NEXT_CALL = "keyturn_request_status with request_id {request_id}"
MAX_STATUS_WAIT = 300.0
TARGETS_TIMEOUT = 5.0


def _never_cache(_arguments: Any = None, _result: Any = None) -> bool:
    return False


def _failure(tool: str, exc: Exception) -> str:
    """Whatever else went wrong, as a sentence: a tool never raises into the crew."""
    if isinstance(exc, NotConfigured):
        return f"keyturn is not configured: {exc}. A person must set it up; nothing ran."
    log.error("keyturn tool %s failed", tool, exc_info=exc)
    return unexpected().text


class _Connection(BaseTool):
    """Where the gateway is, and how long a held command is waited for."""

    gateway_url: str | None = Field(default=None, description="default: KEYTURN_GATEWAY_URL")
    token: SecretStr | None = Field(default=None, description="default: KEYTURN_AGENT_TOKEN")
    wait: float | None = Field(
        default=None, ge=0, description="seconds to wait for a held command; default: its TTL"
    )
    retry_for: float = Field(
        default=SUBMIT_RETRY_SECONDS, ge=0, description="seconds to retry a gateway that is down"
    )
    run_id: str | None = Field(
        default=None, description="puts the commands in one run that keyturn records"
    )
    cache_function: Callable[..., bool] = _never_cache

    def _client(self) -> Client:
        return Client(self.gateway_url, self.token.get_secret_value() if self.token else None)

    def _async_client(self) -> AsyncClient:
        token = self.token.get_secret_value() if self.token else None
        return AsyncClient(self.gateway_url, token)

    def _wait_for(self, request: CommandOut) -> float:
        return self.wait if self.wait is not None else default_wait(request)


class _CommandTool(_Connection):
    """Submit a command to one of the gateway's targets of ``kind`` and report its outcome.

    Made with no ``targets``, the tool asks the gateway for them once (a short blocking call:
    in async code, pass ``targets`` or make the tool in a worker thread) and names them in its
    description, which is what the model reads."""

    kind: Literal["postgres", "ssh", "http"]
    command_argument: Literal["sql", "command"] | None  # None: the tool builds its command
    targets: list[str] | None = Field(
        default=None, description="target names offered to the model; default: asked of keyturn"
    )
    on_pending: Callable[[CommandOut], None] | None = Field(
        default=None, description="called when a command is held, before the wait", exclude=True
    )

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if "Targets:" not in self.description:  # a copy of a tool keeps its line
            self.description = f"{self.description} {self._targets_line()}"

    def _targets_line(self) -> str:
        """The targets of this tool's kind, from the gateway unless given."""
        if self.targets is None:
            try:
                with self._client() as kt:
                    listed = [t for t in kt.targets(TARGETS_TIMEOUT) if t.kind == self.kind]
            except (ClientError, NotConfigured) as exc:
                log.warning("keyturn: cannot list targets for %s: %s", self.name, exc)
                return "Targets: keyturn could not list them now; an unknown one is refused."
            self.targets = [t.name for t in listed]
            return "Targets: " + "; ".join(f"{t.name} ({t.description})" for t in listed) + "."
        return f"Targets: {', '.join(self.targets)}."

    def _command(self, args: dict[str, Any]) -> Command:
        """What is submitted, from the model's arguments past target and reason."""
        command: str = args[self.command_argument or "command"]
        return command

    def _submit(self, target: str, command: Command, reason: str) -> ToolOutcome:
        with self._client() as kt:
            try:
                found: CommandOut | ClientError = kt.submit_and_wait(
                    target, command, reason or None, self.run_id, wait=self._wait_for,
                    on_pending=self.on_pending, retry_for=self.retry_for,
                )  # fmt: skip
            except ClientError as exc:
                found = exc
        return told(found, NEXT_CALL, self.targets)

    async def _asubmit(self, target: str, command: Command, reason: str) -> ToolOutcome:
        async with self._async_client() as kt:
            try:
                found: CommandOut | ClientError = await kt.submit_and_wait(
                    target, command, reason or None, self.run_id, wait=self._wait_for,
                    on_pending=self.on_pending, retry_for=self.retry_for,
                )  # fmt: skip
            except ClientError as exc:
                found = exc
        return told(found, NEXT_CALL, self.targets)

    def _run(self, target: str, reason: str = "", **args: Any) -> str:
        try:
            return self._submit(target, self._command(args), reason).text
        except Exception as exc:
            return _failure(self.name, exc)

    async def _arun(self, target: str, reason: str = "", **args: Any) -> str:
        try:
            return (await self._asubmit(target, self._command(args), reason)).text
        except Exception as exc:
            return _failure(self.name, exc)


class SQLArgs(BaseModel):
    target: str = Field(description="the database target's name")
    sql: str = Field(description="the SQL to run")
    reason: str = Field(default="", description="why: shown to the person who approves it")


class KeyturnSQLTool(_CommandTool):
    name: str = "keyturn_sql"
    description: str = (
        "Run SQL on a database through keyturn. Plain reads run at once (sensitive columns "
        "come back masked as ***). Anything that changes data waits for a person to approve "
        "it in Slack, so give a clear reason; some commands are refused outright."
    )
    args_schema: type[BaseModel] = SQLArgs
    kind: Literal["postgres", "ssh", "http"] = "postgres"
    command_argument: Literal["sql", "command"] | None = "sql"


class ShellArgs(BaseModel):
    target: str = Field(description="the host target's name")
    command: str = Field(description="one shell command line")
    reason: str = Field(default="", description="why: shown to the person who approves it")


class KeyturnShellTool(_CommandTool):
    name: str = "keyturn_shell"
    description: str = (
        "Run a shell command on a host through keyturn. Commands the policy allows run at "
        "once; others wait for a person to approve them in Slack, so give a clear reason; "
        "some are refused outright."
    )
    args_schema: type[BaseModel] = ShellArgs
    kind: Literal["postgres", "ssh", "http"] = "ssh"
    command_argument: Literal["sql", "command"] | None = "command"


class HTTPArgs(BaseModel):
    target: str = Field(description="the API target's name")
    method: str = Field(description="GET, HEAD, OPTIONS, POST, PUT, PATCH or DELETE")
    path: str = Field(description="the path under the API, e.g. /orders/7")
    query: dict[str, Any] | None = Field(default=None, description="query parameters")
    body: Any = Field(default=None, description="a JSON body (POST, PUT, PATCH)")
    reason: str = Field(default="", description="why: shown to the person who approves it")


class KeyturnHTTPTool(_CommandTool):
    name: str = "keyturn_http"
    description: str = (
        "Call an HTTP API through keyturn. Calls the policy allows run at once (sensitive "
        "fields come back masked as ***); others wait for a person to approve them in Slack, "
        "so give a clear reason; some are refused outright. keyturn adds the API's "
        "credential itself: never send one."
    )
    args_schema: type[BaseModel] = HTTPArgs
    kind: Literal["postgres", "ssh", "http"] = "http"
    command_argument: Literal["sql", "command"] | None = None

    def _command(self, args: dict[str, Any]) -> Command:
        return tool_call(args["method"], args["path"], args.get("query"), args.get("body"))


class StatusArgs(BaseModel):
    request_id: str = Field(description="the request id keyturn gave")
    wait_seconds: float = Field(
        default=60, ge=0, le=MAX_STATUS_WAIT, description="how long to wait for it to finish"
    )


class KeyturnRequestStatusTool(_Connection):
    name: str = "keyturn_request_status"
    description: str = (
        "Check a keyturn request that was still waiting for approval, by its request id: "
        "waits up to wait_seconds for it to finish and returns its result or outcome."
    )
    args_schema: type[BaseModel] = StatusArgs

    def _run(self, request_id: str, wait_seconds: float = 60) -> str:
        try:
            with self._client() as kt:
                try:
                    found: CommandOut | ClientError = kt.wait(
                        request_id, min(wait_seconds, MAX_STATUS_WAIT)
                    )
                except ClientError as exc:
                    found = exc
            return told(found, NEXT_CALL).text
        except Exception as exc:
            return _failure(self.name, exc)

    async def _arun(self, request_id: str, wait_seconds: float = 60) -> str:
        try:
            async with self._async_client() as kt:
                try:
                    found: CommandOut | ClientError = await kt.wait(
                        request_id, min(wait_seconds, MAX_STATUS_WAIT)
                    )
                except ClientError as exc:
                    found = exc
            return told(found, NEXT_CALL).text
        except Exception as exc:
            return _failure(self.name, exc)
