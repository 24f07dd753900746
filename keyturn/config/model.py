"""What every model of the policy file shares: strict fields, names, subjects."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")
]


def _typed_subject(value: object) -> object:
    """``agent:<JWT sub>`` or ``group:<groups claim entry>``: a subject says what it names.

    An untyped name is refused rather than guessed at: read as both, a token whose ``sub`` is
    ``group:ops`` would pass for the group ``ops``.
    """
    if isinstance(value, str):
        kind, sep, name = value.partition(":")
        if not sep or kind not in ("agent", "group"):
            raise ValueError(
                f"{value!r} must say what it names: agent:{value} (a token's sub) or "
                f"group:{value} (an entry of its groups claim)"
            )
        if not name or name != name.strip():
            raise ValueError(f"{value!r} names nobody after {kind}:")
    return value


Subject = Annotated[str, BeforeValidator(_typed_subject), Field(max_length=201)]
