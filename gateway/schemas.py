"""The agent API's bodies. Responses are built from these models and /openapi.json is
generated from them, so the spec cannot drift from what the gateway really sends."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from keyturn.errors import InvalidInput

MAX_BODY_BYTES = 1024 * 1024
MAX_COMMAND_BYTES = 64 * 1024


def storable(name: str, value: str | None) -> None:
    """Refuse text Postgres cannot store (NUL) or UTF-8 cannot encode (lone surrogates).

    Checked at the edge, before anything is recorded or run: such input must never reach the
    record, where it would fail after the fact.
    """
    if value is None:
        return
    if "\x00" in value:
        raise InvalidInput(f"{name}: must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidInput(f"{name}: must be valid Unicode text (no lone surrogates)") from None


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, max_length=200)
    command: str = Field(min_length=1)
    reason: str | None = Field(default=None, max_length=2000)
    run_id: str | None = Field(default=None, max_length=200)


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


class ShellResultOut(BaseModel):
    exit_status: int | None = Field(description="None when the output was cut off")
    stdout: str
    stderr: str
    truncated: bool


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
    result: SqlResultOut | ShellResultOut | None = None
    error: str | None = None
    denied_by: str | None = None
    deny_reason: str | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    rule: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail
