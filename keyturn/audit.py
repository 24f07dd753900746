"""Verify and export the hash-chained audit events (written by :mod:`keyturn.store.audit_log`).

``verify`` recomputes every hash and the chain's links, and checks the tail against
``audit_head``: it catches what someone who disabled the append-only trigger did to some rows.
Someone who re-chains, cuts the tail and moves ``audit_head``, or wipes everything, leaves a
chain that verifies; so ``verify`` also checks it against the newest checkpoint kept in Vault
(:mod:`keyturn.checkpoint`), and ``export`` ends with a fresh one. The recordings of agents'
runs are checked against the events that vouch for them
(:func:`keyturn.store.recording_checks.check_recordings`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any
from uuid import UUID

from sqlalchemy import Text, select, true

from keyturn.chain import GENESIS, event_hash
from keyturn.checkpoint import Anchor, Anchoring, CheckpointRefused, check
from keyturn.store.db import Store
from keyturn.store.models import AuditEventRow, AuditHeadRow
from keyturn.store.recording_checks import check_recordings


@dataclass(frozen=True)
class StoredEvent:
    """An audit row as verify reads it: ``data_text`` is the jsonb exactly as Postgres prints it."""

    seq: int
    at: datetime
    kind: str
    actor: str
    request_id: UUID | None
    grant_id: UUID | None
    data_text: str
    prev_hash: str
    hash: str


def _row_hash(row: StoredEvent, prev_hash: str) -> str:
    return event_hash(
        prev_hash=prev_hash,
        seq=row.seq,
        at=row.at,
        kind=row.kind,
        actor=row.actor,
        request_id=row.request_id,
        grant_id=row.grant_id,
        data_text=row.data_text,
    )


@dataclass(frozen=True)
class Break:
    """The first event where the chain does not hold."""

    seq: int
    problem: str

    def __str__(self) -> str:
        if self.seq == 0:  # not an event: the checkpoint itself
            return f"audit chain not verified: {self.problem}"
        return f"audit chain broken at event {self.seq}: {self.problem}"


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    broken: Break | None
    anchoring: Anchoring | None = None  # None: not checked against a checkpoint

    def summary(self) -> str:
        """One line for an intact chain: how much of it a checkpoint anchors."""
        line = f"audit chain intact: {self.checked} events"
        if self.anchoring is None:
            return line + "; not checked against a checkpoint (--unanchored)"
        checkpoint = self.anchoring.checkpoint
        if checkpoint is None:
            return line + "; no checkpoint in Vault yet: none of them is anchored"
        return (
            f"{line}; the checkpoint taken {checkpoint.at} anchors events 1..{checkpoint.seq}; "
            f"{self.anchoring.unanchored} after it are not anchored yet"
        )


class ChainWalker:
    """Checks rows fed in seq order, one at a time, so a long chain never sits in memory."""

    def __init__(self) -> None:
        self.prev_hash, self.expected_seq, self.checked = GENESIS, 1, 0
        self.broken: Break | None = None

    def feed(self, row: StoredEvent) -> bool:
        """False once the chain is broken (the rest need not be read)."""
        if self.broken is not None:
            return False
        if row.seq != self.expected_seq:
            problem = (
                f"events {self.expected_seq}..{row.seq - 1} are missing (deleted)"
                if row.seq > self.expected_seq
                else f"seq {row.seq} is out of order (expected {self.expected_seq})"
            )
            self.broken = Break(self.expected_seq, problem)
        elif row.prev_hash != self.prev_hash:
            self.broken = Break(
                row.seq, "does not follow the event before it (deleted or reordered)"
            )
        elif _row_hash(row, self.prev_hash) != row.hash:
            self.broken = Break(row.seq, "its contents were changed")
        else:
            self.prev_hash, self.expected_seq = row.hash, self.expected_seq + 1
            self.checked += 1
        return self.broken is None

    def finish(self, head: AuditHeadRow | None) -> VerifyResult:
        last = self.expected_seq - 1
        if (
            self.broken is None
            and head is not None
            and (head.seq, head.hash) != (last, self.prev_hash)
        ):
            if head.seq > last:
                self.broken = Break(
                    last + 1, f"events {last + 1}..{head.seq} are missing (deleted)"
                )
            else:
                self.broken = Break(head.seq, "the chain head does not match the events")
        return VerifyResult(self.checked, self.broken)


async def stream(
    store: Store, since: int = 0, until: int | None = None
) -> AsyncGenerator[StoredEvent, None]:
    """Events after ``since`` (up to ``until``), in order, a thousand rows at a time."""
    e = AuditEventRow
    query = (
        select(
            e.seq,
            e.at,
            e.kind,
            e.actor,
            e.request_id,
            e.grant_id,
            e.data.cast(Text),
            e.prev_hash,
            e.hash,
        )
        .where(e.seq > since, e.seq <= until if until is not None else true())
        .order_by(e.seq)
        .execution_options(yield_per=1000)
    )
    async with store.transaction() as tx:
        result = await tx.session.stream(query)
        async for row in result:
            yield StoredEvent(*row)


async def verify(store: Store, anchor: Anchor | None = None) -> VerifyResult:
    """The chain walked; with ``anchor``, then checked against the newest checkpoint."""
    async with store.transaction() as tx:
        head = await tx.session.get(AuditHeadRow, 1)
    walker = ChainWalker()
    async with contextlib.aclosing(stream(store)) as rows:
        async for row in rows:
            if not walker.feed(row):
                break
    walked = walker.finish(head)
    if walked.broken is None:  # the chain holds: do the recordings it vouches for?
        unvouched = await check_recordings(store)
        if unvouched is not None:
            return VerifyResult(walked.checked, Break(unvouched.seq, unvouched.problem))
    if walked.broken is not None or anchor is None:
        return walked
    try:
        checkpoint, _ = await anchor.latest()
    except CheckpointRefused as exc:
        return VerifyResult(walked.checked, Break(0, exc.message))
    found = await check(store, checkpoint, walker.expected_seq - 1)
    if found.problem is not None and checkpoint is not None:
        return VerifyResult(walked.checked, Break(checkpoint.seq, found.problem), found)
    return VerifyResult(walked.checked, None, found)


def event_json(row: StoredEvent, *, exact: bool = False) -> dict[str, Any]:
    """An event as JSON: ``data`` parsed, or (``exact``) ``data_text`` exactly as hashed, so
    a reader can recompute the hash (evidence files)."""
    data = {"data_text": row.data_text} if exact else {"data": json.loads(row.data_text)}
    return {
        "seq": row.seq,
        "at": row.at.isoformat(),
        "kind": row.kind,
        "actor": row.actor,
        "request_id": str(row.request_id) if row.request_id else None,
        "grant_id": str(row.grant_id) if row.grant_id else None,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    } | data


async def export(store: Store, out: IO[str], since: int = 0, anchor: Anchor | None = None) -> int:
    """Write events after ``since`` as JSON lines; returns how many were written.

    With ``anchor``, a checkpoint is taken first and written last (``{"checkpoint": …}``):
    the export then carries Vault's HMAC over a head it contains, kept wherever the file is.
    """
    checkpoint = await anchor.record(store) if anchor is not None else None
    count = 0
    async for row in stream(store, since):
        if checkpoint is not None and row.seq > checkpoint.seq:
            break  # events after the checkpoint belong to the next export
        out.write(json.dumps(event_json(row), sort_keys=True) + "\n")
        count += 1
    if checkpoint is not None:
        out.write(json.dumps({"checkpoint": checkpoint.as_json()}, sort_keys=True) + "\n")
    return count
