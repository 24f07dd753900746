"""The one error hierarchy. Entry points map these to HTTP bodies, CLI lines or Slack messages.

Every error carries a stable machine-readable ``code`` and the HTTP ``status`` it means at the
edge; the message is written for a human and never contains a credential.
"""

from __future__ import annotations


class KeyturnError(Exception):
    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(KeyturnError):
    code = "invalid_input"
    status = 400


class TooComplex(InvalidInput):
    """A command nests deeper or grows larger than keyturn will analyse: refused, not guessed."""

    code = "too_complex"


class ConfigError(InvalidInput):
    """A configuration file, setting or DSN is wrong. ``problems`` lists every finding."""

    code = "invalid_config"

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class Unauthorized(KeyturnError):
    code = "unauthorized"
    status = 401


class TooLarge(KeyturnError):
    code = "too_large"
    status = 413


class RateLimited(KeyturnError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Forbidden(KeyturnError):
    code = "forbidden"
    status = 403


class NotFound(KeyturnError):
    code = "not_found"
    status = 404


class Conflict(KeyturnError):
    code = "conflict"
    status = 409


class Unavailable(KeyturnError):
    """A dependency (Postgres, Vault, Slack) cannot be reached or refuses to work right now."""

    code = "unavailable"
    status = 503


class DatabaseUnavailable(Unavailable):
    """keyturn's own Postgres: nothing can be decided or recorded until it is back."""
