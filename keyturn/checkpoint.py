"""Audit checkpoints: the chain's head, HMACed by Vault and kept in Vault, out of the database's
reach.

The hash chain shows any edit to one row, but a database superuser can disable the append-only
trigger, rewrite rows and re-chain them with ``keyturn_audit_hash()``, cut the tail and move
``audit_head``, or wipe everything: the chain alone still verifies. A checkpoint is
``(seq, hash, at)`` of the head, HMACed by Vault's transit engine under a key the database
never holds (:data:`KEY`), and stored in Vault's KV with check-and-set (:data:`PREFIX`), where a
database superuser cannot write. The bot records one every ``bot.audit_checkpoint``, and every
export carries a fresh one. ``keyturn audit verify`` then checks that the event at the
checkpoint's seq still has the checkpoint's hash (so nothing up to it was cut, wiped or
re-chained) and says how many events after it are not yet anchored.

A checkpoint never moves back: one for a seq lower than the stored one is not written (two
replicas race; a database that lost its tail must not make the anchor forget it).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from keyturn.config.process import VaultConfig
from keyturn.errors import KeyturnError
from keyturn.store.db import Store
from keyturn.store.models import AuditEventRow, AuditHeadRow
from keyturn.vault import Vault, VaultRequestError

KEY = "keyturn-audit"  # the transit key: HMACs checkpoints; nobody exports it
PREFIX = "keyturn/audit"  # under the KV v2 mount: one checkpoint per deployment (its name)
_TRIES = 3  # check-and-set races with another replica: re-read and try again


class CheckpointRefused(KeyturnError):
    """Tampering found at the anchor: a stored checkpoint whose HMAC Vault does not confirm
    (written by someone without the key), or a chain that no longer reaches the stored
    checkpoint. Never treated as "no checkpoint", and never anchored over."""

    code = "checkpoint_forged"


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: str  # ISO 8601, UTC: when it was taken
    hmac: str  # Vault's "vault:v1:…" over :meth:`message`

    def message(self) -> bytes:
        return message(self.seq, self.hash, self.at)

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "at": self.at, "hmac": self.hmac}

    @classmethod
    def of(cls, data: dict[str, Any]) -> Checkpoint:
        try:
            return cls(int(data["seq"]), str(data["hash"]), str(data["at"]), str(data["hmac"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointRefused("the stored audit checkpoint is malformed") from None


def message(seq: int, hash_: str, at: str) -> bytes:
    """What is HMACed: every field, length-prefixed, under a purpose label."""
    fields = ["keyturn-audit-checkpoint/1", str(seq), hash_, at]
    return "|".join(f"{len(f)}:{f}" for f in fields).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Anchor:
    """Where checkpoints live in Vault: the transit and KV v2 mounts."""

    vault: Vault
    transit_mount: str = "transit"
    kv_mount: str = "secret"
    name: str = "default"  # deployments sharing a Vault keep apart (vault.audit_anchor)

    @classmethod
    def of(cls, vault: Vault, config: VaultConfig) -> Anchor:
        return cls(vault, config.transit_mount, config.kv_mount, config.audit_anchor)

    @property
    def path(self) -> str:
        return f"{self.kv_mount}/data/{PREFIX}/{self.name}"

    async def hmac(self, data: bytes) -> str:
        """Vault's ``vault:v1:…`` HMAC of ``data`` under the audit key; ``data`` must carry
        a purpose label of its own (a checkpoint's, an evidence seal's), so neither passes
        for the other."""
        await self.vault.ensure_login()
        found = await self.vault.write(f"{self.transit_mount}/hmac/{KEY}", {"input": _b64(data)})
        return str(((found or {}).get("data") or {})["hmac"])

    async def verify(self, data: bytes, hmac: str) -> bool:
        await self.vault.ensure_login()
        found = await self.vault.write(
            f"{self.transit_mount}/verify/{KEY}", {"input": _b64(data), "hmac": hmac}
        )
        return bool(((found or {}).get("data") or {}).get("valid"))

    async def sign(self, seq: int, hash_: str, at: datetime) -> Checkpoint:
        when = at.isoformat()
        return Checkpoint(seq, hash_, when, await self.hmac(message(seq, hash_, when)))

    async def genuine(self, checkpoint: Checkpoint) -> bool:
        return await self.verify(checkpoint.message(), checkpoint.hmac)

    async def latest(self) -> tuple[Checkpoint | None, int]:
        """The stored checkpoint, HMAC checked, and its KV version (0: none yet)."""
        await self.vault.ensure_login()
        found = await self.vault.read(self.path)
        body = (found or {}).get("data") or {}
        if not body.get("data"):
            return None, int((body.get("metadata") or {}).get("version") or 0)
        checkpoint = Checkpoint.of(body["data"])
        if not await self.genuine(checkpoint):
            raise CheckpointRefused(
                f"the stored audit checkpoint (event {checkpoint.seq}) does not carry Vault's "
                f"HMAC under {KEY}: someone without the key wrote it"
            )
        return checkpoint, int(body["metadata"]["version"])

    async def record(self, store: Store) -> Checkpoint | None:
        """Anchor the chain's current head; returns the checkpoint now stored (None: no
        events yet). Never moves the stored checkpoint back, and never anchors a chain that
        no longer reaches the stored one: a rewrite below it would be signed as genuine."""
        for _ in range(_TRIES):
            stored, version = await self.latest()
            async with store.transaction() as tx:
                head = await tx.session.get(AuditHeadRow, 1)
                now = tx.now
            if stored is not None:
                found = await check(store, stored, head.seq if head is not None else 0)
                if found.problem is not None:
                    raise CheckpointRefused(f"not anchoring a rewritten chain: {found.problem}")
            if head is None or head.seq == 0:
                return stored
            if stored is not None and stored.seq >= head.seq:
                return stored  # nothing new
            fresh = await self.sign(head.seq, head.hash, now)
            try:
                await self.vault.write(
                    self.path,
                    {"data": fresh.as_json(), "options": {"cas": version}},
                )
            except VaultRequestError as exc:
                if "check-and-set" not in exc.message:
                    raise
                continue  # another replica wrote first: read theirs and decide again
            return fresh
        return (await self.latest())[0]


@dataclass(frozen=True)
class Anchoring:
    """What verify found against the checkpoint."""

    checkpoint: Checkpoint | None
    problem: str | None  # the chain does not reach or match the checkpoint
    unanchored: int  # events after the checkpoint


async def check(store: Store, checkpoint: Checkpoint | None, last_seq: int) -> Anchoring:
    """Whether the database still holds the checkpoint's event with its hash.

    ``last_seq``: the newest event the chain walk accepted. Run after the walk: a chain
    re-computed from some event on passes the walk, and fails here.
    """
    if checkpoint is None:
        return Anchoring(None, None, last_seq)
    async with store.transaction() as tx:
        found = await tx.session.scalar(
            select(AuditEventRow.hash).where(AuditEventRow.seq == checkpoint.seq)
        )
    taken = f"the checkpoint taken {checkpoint.at} anchors event {checkpoint.seq}"
    if found is None:
        missing = f"{last_seq + 1}..{checkpoint.seq}" if last_seq < checkpoint.seq else "it"
        return Anchoring(checkpoint, f"{taken}, but events {missing} are missing", 0)
    if found != checkpoint.hash:
        return Anchoring(
            checkpoint, f"{taken}, and the database's event {checkpoint.seq} differs from it", 0
        )
    return Anchoring(checkpoint, None, max(0, last_seq - checkpoint.seq))
