"""What agents send, checked at the edge. The answers are :mod:`keyturn.agent.api`, shared with the
client; /openapi.json is generated from both, so the spec cannot drift from the handlers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keyturn.errors import InvalidInput
from keyturn.recording.runs import check_run_id

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


class HttpCallIn(BaseModel):
    """An API call for an HTTP target: keyturn sends exactly this (and its credential)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="GET, HEAD, OPTIONS, POST, PUT, PATCH or DELETE")
    path: str = Field(description="relative to the target's base_url, e.g. /orders/7")
    query: dict[str, Any] | list[list[Any]] | None = None
    headers: dict[str, str] | None = Field(
        default=None,
        description="only Accept, Accept-Language, Content-Type, If-Match, If-None-Match, "
        "If-Modified-Since, If-Unmodified-Since, Idempotency-Key, X-Request-Id",
    )
    json_body: Any = Field(default=None, alias="json", description="a JSON body")
    text: str | None = Field(default=None, description="a text body (with its Content-Type)")


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, max_length=200)
    command: str | None = Field(default=None, min_length=1, description="SQL or a shell line")
    http: HttpCallIn | None = Field(default=None, description="an HTTP target's call")
    reason: str | None = Field(default=None, max_length=2000)
    run_id: str | None = Field(
        default=None, max_length=200, description="groups commands into a run (keyturn runs)"
    )

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        return None if value is None else check_run_id(value)

    @model_validator(mode="after")
    def _one(self) -> CommandIn:
        if (self.command is None) == (self.http is None):
            raise ValueError("send command (SQL, shell) or http (an API call), one of them")
        return self
