"""People's registered SSH public keys: add, list, remove, each audited.

Keys are checked before they get here (:func:`keyturn.ssh_keys.parse_public_key`); the store
keeps at most :data:`MAX_KEYS` per person, and one owner per key: a certificate names the person
whose key it signs, so two people holding one key could not be told apart in a login.
"""

from __future__ import annotations

from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

from keyturn.errors import Conflict, InvalidInput, NotFound
from keyturn.ssh_keys import PublicKey
from keyturn.store.audit_log import Event
from keyturn.store.db import Store
from keyturn.store.models import SshKeyRow

MAX_KEYS = 10


async def add_key(store: Store, owner: str, key: PublicKey) -> SshKeyRow:
    """Register ``key`` for ``owner``; the same key again is a :class:`Conflict`."""
    try:
        async with store.transaction() as tx:
            # one add per person at a time, or concurrent adds could all count under the limit
            await tx.session.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner}
            )
            count = await tx.session.scalar(
                select(func.count()).select_from(SshKeyRow).where(SshKeyRow.owner == owner)
            )
            if (count or 0) >= MAX_KEYS:
                raise InvalidInput(
                    f"you already have {MAX_KEYS} keys: remove one first "
                    "(`/keyturn ssh-key list`, then `/keyturn ssh-key remove <fingerprint>`)"
                )
            row = SshKeyRow(
                owner=owner,
                fingerprint=key.fingerprint,
                algorithm=key.algorithm,
                bits=key.bits,
                public_key=key.openssh,
                added_at=tx.now,
            )
            tx.session.add(row)
            await tx.session.flush()
            tx.record(Event("ssh_key.added", owner, data=_described(key.fingerprint, row)))
    except IntegrityError as exc:
        if "uq_ssh_keys_owner" in str(exc.orig):
            raise Conflict(f"that key ({key.fingerprint}) is already registered") from None
        raise Conflict(
            f"that key ({key.fingerprint}) is registered to someone else: make a key of your "
            "own (`ssh-keygen -t ed25519`)"
        ) from None
    return row


async def keys_of(store: Store, owner: str) -> list[SshKeyRow]:
    async with store.transaction() as tx:
        rows = await tx.session.scalars(
            select(SshKeyRow).where(SshKeyRow.owner == owner).order_by(SshKeyRow.added_at)
        )
        return list(rows.all())


async def remove_key(store: Store, owner: str, fingerprint: str) -> None:
    """Remove one of ``owner``'s keys; someone else's key is as unknown as a missing one."""
    async with store.transaction() as tx:
        removed = (
            await tx.session.scalars(
                delete(SshKeyRow)
                .where(SshKeyRow.owner == owner, SshKeyRow.fingerprint == fingerprint)
                .returning(SshKeyRow)
            )
        ).one_or_none()
        if removed is None:
            raise NotFound(f"you have no key {fingerprint[:100]!r} (see `/keyturn ssh-key list`)")
        tx.record(Event("ssh_key.removed", owner, data=_described(fingerprint, removed)))


def _described(fingerprint: str, row: SshKeyRow) -> dict[str, object]:
    return {"fingerprint": fingerprint, "algorithm": row.algorithm, "bits": row.bits}
