"""The bot anchors the audit chain in Vault every ``bot.audit_checkpoint`` (keyturn.checkpoint).

One pass of a supervised loop (:mod:`keyturn.supervise`): Vault or Postgres being away is
retried with backoff, anything unexpected is logged with its traceback, counted and retried.
A forged checkpoint found in Vault is logged as an error on every pass (it is tampering;
``keyturn audit verify`` reports it), and no new checkpoint is written over it.
"""

from __future__ import annotations

import logging

from keyturn.checkpoint import Anchor, CheckpointRefused
from keyturn.store.db import Store

log = logging.getLogger(__name__)


async def anchor_once(store: Store, anchor: Anchor) -> None:
    try:
        checkpoint = await anchor.record(store)
    except CheckpointRefused as exc:
        log.error("audit checkpoint: %s", exc.message)
        return
    if checkpoint is not None:
        log.debug("audit checkpoint at event %d", checkpoint.seq)
