"""The agent API's answers on the wire, shared by both ends.

The gateway serializes them (and generates /openapi.json from them); :mod:`keyturn.agent.client`
parses them. One definition, so the client cannot drift from what the gateway really sends.
Unknown fields are ignored when parsing (new fields do not break an older client; new statuses
or target kinds would).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

# the states after which nothing more happens to a request (what long-polls wait for)
TERMINAL = frozenset({"executed", "failed", "denied", "expired", "cancelled"})


class SqlResultOut(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    row_count: int
    truncated: Literal[False, "rows", "value_bytes", "response_bytes"] = Field(
        description="false, or the cap that cut the result: rows (gateway.row_limit), "
        "value_bytes (a value longer than gateway.value_bytes, sent as a prefix of its text) or "
        "response_bytes (rows past gateway.response_bytes left out)"
    )
    statements: int
    tags: list[str] | None = Field(
        default=None, description="command tags of an approved run, e.g. UPDATE 3"
    )
    types: list[int] | None = Field(
        default=None,
        description="each column's Postgres type oid (25, text, for a masked column)",
    )


class ShellResultOut(BaseModel):
    exit_status: int | None = Field(description="None when the output was cut off")
    stdout: str
    stderr: str
    truncated: bool


class HttpResultOut(BaseModel):
    status: int = Field(description="the API's status code; an error status is a result too")
    headers: dict[str, str] = Field(description="Content-Type, Location, ETag and a few more")
    json_body: Any = Field(default=None, alias="json", description="a JSON body, masked")
    text: str | None = Field(default=None, description="a text body, masked")
    note: str | None = Field(default=None, description="why a body is not shown")
    bytes: int = Field(description="bytes of the body read")
    truncated: bool = Field(description="the body was longer than the target's cap")

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


# What an executed command returns, by the kind of its target.
Result = SqlResultOut | ShellResultOut | HttpResultOut

Status = Literal[
    "pending", "approved", "executing", "executed", "failed", "denied", "expired", "cancelled"
]


class CommandOut(BaseModel):
    id: str
    status: Status
    target: str
    rule: str | None = None
    created_at: datetime
    wait_url: str | None = None
    expires_at: datetime | None = Field(default=None, description="when a pending request expires")
    estimated_rows: int | None = Field(default=None, description="EXPLAIN estimate (held SQL)")
    result: Result | None = None
    error: str | None = None
    denied_by: str | None = None
    deny_reason: str | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    rule: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


class OperationOut(BaseModel):
    method: str
    path: str = Field(description="a template: /orders/{id}")
    operation_id: str | None = None
    summary: str | None = None


class TargetOut(BaseModel):
    name: str
    kind: Literal["postgres", "ssh", "http"]
    description: str = Field(description="one line for a person or a model choosing a target")
    operations: list[OperationOut] | None = Field(
        default=None, description="an HTTP target's operations, from its OpenAPI file"
    )


class TargetsOut(BaseModel):
    targets: list[TargetOut] = Field(description="the targets this identity may use")


class DecisionOut(BaseModel):
    by: str = Field(description="the approver, or policy:<rule> for a rule's own approval")
    decision: Literal["approve", "deny"]
    at: datetime
    reason: str | None = None


class StepOutputOut(BaseModel):
    kept: Literal["none", "tags", "masked"] = Field(description="what record.outputs keeps")
    bytes: int = Field(description="the size of the output as the agent saw it (JSON)")
    sha256: str = Field(description="its sha256: the result_digest in the audit log")
    truncated: bool = Field(description="only the first record.output_bytes were kept")
    deleted: bool = Field(description="deleted by retention (its hashes remain)")
    value: Any = Field(default=None, description="the output as kept (masked, capped)")


class StepOut(BaseModel):
    number: int = Field(description="its place in the run: 1 for the first step")
    id: str = Field(description="the request's id (a blocked command's step id)")
    run_id: str | None = Field(default=None, description="the run_id it was sent with")
    at: datetime
    target: str
    command: str
    verdict: Literal["allowed", "held", "blocked"]
    status: str = Field(description="the request's status, or blocked")
    rule: str | None = None
    summary: str = Field(description="a few words: allowed, approved by U1, denied by U2…")
    ended_at: datetime | None = None
    error: str | None = None
    decisions: list[DecisionOut] = Field(default_factory=list)
    output: StepOutputOut | None = None


class RunOut(BaseModel):
    name: str = Field(description="the run_id given, or auto-<first step> for an idle-gap run")
    steps: list[StepOut] = Field(description="oldest first")
    more: bool = Field(description="steps after these were left out (raise limit)")
