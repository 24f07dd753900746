"""The audit chain's arithmetic, pure: what each event's hash covers. The database computes it
on insert (``keyturn_audit_hash``, :mod:`keyturn.store.audit_log`); ``keyturn audit verify``
and an evidence file's offline check (:mod:`keyturn.recording.proof`) recompute it."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from uuid import UUID

GENESIS = "0" * 64


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def event_hash(
    *,
    prev_hash: str,
    seq: int,
    at: datetime,
    kind: str,
    actor: str,
    request_id: UUID | None,
    grant_id: UUID | None,
    data_text: str,
) -> str:
    """The digest the database computes on insert (``keyturn_audit_hash``), recomputed.

    Fields are length-prefixed so no value can shift characters into its neighbour; ``data``
    is hashed as Postgres prints the jsonb, its canonical form.
    """
    micros = (at - _EPOCH) // timedelta(microseconds=1)
    fields = [
        prev_hash,
        str(seq),
        str(micros),
        kind,
        actor,
        str(request_id) if request_id else "",
        str(grant_id) if grant_id else "",
        data_text,
    ]
    body = "|".join(f"{len(f)}:{f}" for f in fields)
    return hashlib.sha256(body.encode()).hexdigest()
