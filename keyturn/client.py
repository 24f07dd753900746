"""The agent client's public import path: ``from keyturn.client import Client``.

The code lives in :mod:`keyturn.agent.client`, inside the agent SDK's package (which an import
contract keeps free of every server module). This name is what agent code and the docs use, so
it stays stable however the package is arranged.
"""

from keyturn.agent.client import (
    AsyncClient,
    AuthError,
    Blocked,
    Cancelled,
    Client,
    Denied,
    Expired,
    Failed,
    KeyturnError,
    NotConfigured,
    RateLimited,
    Rejected,
    Request,
    Result,
    StillPending,
    Unavailable,
    outcome,
)

__all__ = [
    "AsyncClient",
    "AuthError",
    "Blocked",
    "Cancelled",
    "Client",
    "Denied",
    "Expired",
    "Failed",
    "KeyturnError",
    "NotConfigured",
    "RateLimited",
    "Rejected",
    "Request",
    "Result",
    "StillPending",
    "Unavailable",
    "outcome",
]
