"""How the Postgres edge answers what went wrong: keyturn's errors and requests that did not
run, as ErrorResponses with their SQLSTATEs, in one place (as the HTTP edge's envelope is)."""

from __future__ import annotations

import logging
import re

from gateway.edges.pgwire.values import ValueError_
from gateway.edges.schemas import MAX_COMMAND_BYTES
from gateway.usecases.driver import StatementRefused
from gateway.usecases.submit import Blocked
from keyturn.classify.session import Refused
from keyturn.errors import (
    Forbidden,
    InvalidInput,
    KeyturnError,
    NotFound,
    RateLimited,
    TooComplex,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from keyturn.store.reads import RequestView

log = logging.getLogger(__name__)

_SQLSTATE = re.compile(r"^([0-9A-Z]{5}): (.*)$", re.DOTALL)


class StatementError(Exception):
    """A statement's ErrorResponse: the session answers it and goes on."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate, self.message, self.hint = sqlstate, message, hint


class Fatal(StatementError):
    """An error after which the connection closes (the token expired, say)."""


def error_of(exc: BaseException) -> StatementError:
    """A keyturn error as the client's ErrorResponse."""
    if isinstance(exc, StatementError):
        return exc
    if isinstance(exc, Blocked):
        rule = f" (rule {exc.rule})" if exc.rule else ""
        return StatementError("42501", f"keyturn blocked this statement{rule}: {exc.message}")
    if isinstance(exc, StatementRefused | ValueError_):
        return StatementError(exc.sqlstate, exc.message)
    if isinstance(exc, Refused):
        return StatementError(exc.sqlstate, exc.message)
    if isinstance(exc, RateLimited):
        return StatementError("53400", exc.message, hint=f"retry in {exc.retry_after:.1f} s")
    if isinstance(exc, Unavailable):
        return StatementError("57P03", exc.message, hint="retry later")
    if isinstance(exc, Unauthorized):
        return Fatal("28P01", f"keyturn: {exc.message}")
    if isinstance(exc, Forbidden | NotFound):
        return StatementError("42501", exc.message)
    if isinstance(exc, TooLarge):
        return StatementError("54000", exc.message)
    if isinstance(exc, TooComplex):
        return StatementError("54001", exc.message)
    if isinstance(exc, InvalidInput):
        return StatementError("42601", exc.message)
    if isinstance(exc, KeyturnError):
        return StatementError("XX000", exc.message)
    log.exception("a Postgres-protocol statement failed unexpectedly", exc_info=exc)
    return StatementError("XX000", "internal error in the keyturn gateway (see its log)")


def failed(view: RequestView) -> StatementError:
    """How a request that did not run is told to the client."""
    if view.status == "denied":
        reason = view.deny_reason or "no reason given"
        return StatementError(
            "42501", f"denied by {view.denied_by or 'an approver'}: {reason} (request {view.id})"
        )
    if view.status == "expired":
        return StatementError(
            "57014", f"request {view.id} expired before anyone approved it; nothing ran"
        )
    message = view.error or f"request {view.id} {view.status}"
    match = _SQLSTATE.match(message)
    if match:
        return StatementError(match.group(1), match.group(2))
    if view.status == "cancelled" or message.startswith("deadline exceeded"):
        return StatementError("57014", message)
    return StatementError("XX000", message)


ABORTED = StatementError(
    "25P02", "current transaction is aborted, commands ignored until end of transaction block"
)


def unparsed(exc: Exception) -> StatementError:
    if isinstance(exc, RecursionError):
        return StatementError("54001", "the statement nests too deeply for keyturn to judge")
    return StatementError("42601", f"syntax error: {exc}")


def capped(sql: str) -> None:
    """The HTTP API's cap on a command holds here too (parameters in place): a statement is
    judged, described and shown whole."""
    if len(sql.encode()) > MAX_COMMAND_BYTES:
        raise StatementError(
            "54000", f"the statement is longer than keyturn's {MAX_COMMAND_BYTES} bytes"
        )
