"""What a person reads when a click changed nothing: one place words every error."""

from __future__ import annotations

from bot.app import tell
from bot.service import NotRecorded
from keyturn.domain import AlreadyVoted, IllegalTransition
from keyturn.errors import DatabaseUnavailable, NotFound
from keyturn.vault import VaultRequestError, VaultUnavailable


def test_each_error_is_told_plainly() -> None:
    assert tell(DatabaseUnavailable("cannot connect to Postgres at …")) == (
        "keyturn cannot reach its database right now; nothing was decided — try again in a minute"
    )
    assert "Vault may already have acted" in tell(NotRecorded("…; Vault may already have acted"))
    assert "nothing was decided" not in tell(NotRecorded("Vault may already have acted"))
    assert tell(VaultUnavailable("Vault at … failed")).startswith("keyturn cannot reach Vault")
    assert tell(AlreadyVoted("x")) == "you already approved this request; it needs another approver"
    assert tell(IllegalTransition("request", "denied", "approved")) == (
        "this request is already denied; nothing was changed"
    )
    assert tell(NotFound("this card refers to no request")).endswith("; nothing was changed")
    refused = tell(VaultRequestError("Vault rejected sys/leases/revoke/database/creds/x/L1: …"))
    assert "database/creds" not in refused and "bot's log" in refused
