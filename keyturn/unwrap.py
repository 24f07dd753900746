"""``keyturn unwrap <token>``: the on-call engineer's side of a database session.

The bot DMs a single-use Vault wrapping token; unwrapping it (once) gives the login, which
this prints as a ready ``psql`` connection string, with when it ends. A token that was already
used is the one alarming case: someone else may hold the login, so the message says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from keyturn.config.durations import format_duration
from keyturn.errors import InvalidInput
from keyturn.vault import Vault, WrapTokenInvalid

ALREADY_USED = (
    "this token was already unwrapped, has expired, or was never issued. If you did not "
    "unwrap it yourself, report it to your security team now: someone else may hold your "
    "login. Otherwise ask again with /keyturn db."
)


@dataclass(frozen=True)
class Login:
    target: str
    psql: str  # holds the password: printed for the person, never logged
    expires_at: datetime | None

    def note(self, now: datetime | None = None) -> str:
        """The line printed beside the connection string."""
        if self.expires_at is None:
            return f"# {self.target}: your sessions are killed when the login expires"
        left = self.expires_at - (now or datetime.now(UTC))
        return (
            f"# {self.target}: the login expires at {self.expires_at:%Y-%m-%d %H:%M:%S} UTC "
            f"(in {format_duration(left) if left.total_seconds() >= 1 else 'moments'}); "
            "your open sessions are killed then"
        )


async def unwrap_login(vault_addr: str, token: str) -> Login:
    """Consume ``token`` (it works once) and read the login inside."""
    if not token or any(c.isspace() or not c.isprintable() for c in token) or len(token) > 500:
        raise InvalidInput("that is not a wrapping token: paste it exactly as the DM shows it")
    vault = Vault(vault_addr)
    try:
        data = await vault.unwrap(token)
    except WrapTokenInvalid:
        raise WrapTokenInvalid(ALREADY_USED) from None
    finally:
        await vault.close()
    payload = data.get("data") or {}
    if payload.get("kind") != "postgres" or not payload.get("psql"):
        raise InvalidInput("this token holds no keyturn database login")
    expires = payload.get("expires_at")
    return Login(
        target=str(payload.get("target", "")),
        psql=str(payload["psql"]),
        expires_at=datetime.fromisoformat(expires) if isinstance(expires, str) else None,
    )
