"""What agents send, checked at the edge. The answers are :mod:`keyturn.agent.api`, shared with the
client; /openapi.json is generated from both, so the spec cannot drift from the handlers."""

from __future__ import annotations

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
