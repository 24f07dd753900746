"""The audit chain's writer: events appended inside the transaction that made them happen.

Each event's hash covers its own fields and the previous event's hash, so changing, deleting or
reordering any row breaks the chain from that row on. ``audit_head`` holds the newest seq and
hash: locking it serializes appends (seq has no gaps) and anchors the tail, so truncation shows
too. A trigger refuses UPDATE and DELETE for everyone but a superuser who disables it;
:mod:`keyturn.audit` verifies and exports the chain. Use cases do not call this: they
``tx.record(Event(...))`` and the unit of work (:class:`keyturn.store.db.Tx`) appends on commit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class Event:
    """Something that happened to a request or a grant: one audit row, and a wake-up."""

    kind: str
    actor: str
    request_id: UUID | None = None
    grant_id: UUID | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def wakes(self) -> tuple[str, UUID] | None:
        """The notification it sends on commit: the grant's for grant events, else the
        request's; none for an event about neither (an orphan lease)."""
        if self.kind.startswith("grant.") and self.grant_id is not None:
            return ("grant", self.grant_id)
        if self.request_id is not None:
            return ("request", self.request_id)
        return None


NOTIFY_CHANNEL = "keyturn"

# The events of one statement, from a JSON array (their order is their order in the chain).
EVENTS_FROM_JSON = """
    SELECT * FROM ROWS FROM (jsonb_to_recordset({param}::jsonb) AS (kind text, actor text,
        request_id uuid, grant_id uuid, data jsonb)) WITH ORDINALITY
        AS e(kind, actor, request_id, grant_id, data, n)
"""


def recording(events: str, wakes: str) -> str:
    """The end of one statement that records what happened: the rows of the CTE ``events``
    (kind, actor, request_id, grant_id, data, n) appended to the audit chain in order of
    ``n``, and a notification for each text (``<kind>:<id>``) the query ``wakes`` yields,
    which Postgres sends only if the statement's transaction commits.

    The unit of work (:class:`keyturn.store.db.Tx`) and the gateway's journal
    (:mod:`keyturn.store.outcomes`) both end their statements with it: what happened is
    audited and announced in one place, in the same transaction as the change.
    """
    return f""", audited AS (
    INSERT INTO audit_events (kind, actor, request_id, grant_id, data)
    SELECT kind, actor, request_id, grant_id, data FROM {events} ORDER BY n
)
SELECT count(pg_notify('{NOTIFY_CHANNEL}', w)) FROM ({wakes}) AS woken(w)"""


def as_json(events: Sequence[Event]) -> str:
    """``events`` as :data:`EVENTS_FROM_JSON` reads them."""
    return json.dumps(
        [
            {
                "kind": e.kind,
                "actor": e.actor,
                "request_id": str(e.request_id) if e.request_id else None,
                "grant_id": str(e.grant_id) if e.grant_id else None,
                "data": e.data,
            }
            for e in events
        ]
    )
