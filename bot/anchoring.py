"""The bot anchors the audit chain in Vault every ``bot.audit_checkpoint`` (keyturn.checkpoint).

A loop that must never die silently: Vault or Postgres being away is logged and retried with
backoff; anything unexpected is logged with its traceback and retried too. A forged checkpoint
found in Vault is logged as an error on every pass (it is tampering; ``keyturn audit verify``
reports it), and no new checkpoint is written over it.
"""

from __future__ import annotations

import asyncio
import logging

from keyturn.backoff import Backoff
from keyturn.checkpoint import Anchor, CheckpointRefused
from keyturn.errors import KeyturnError
from keyturn.store.db import Store

log = logging.getLogger(__name__)


async def anchor_forever(store: Store, anchor: Anchor, interval: float) -> None:
    backoff = Backoff(1.0, interval)
    while True:
        try:
            checkpoint = await anchor.record(store)
            if checkpoint is not None:
                log.debug("audit checkpoint at event %d", checkpoint.seq)
            backoff.reset()
            wait = interval
        except CheckpointRefused as exc:
            log.error("audit checkpoint: %s", exc.message)
            wait = interval
        except KeyturnError as exc:
            wait = backoff.next()
            log.warning("cannot anchor the audit chain (%s); retrying in %.1f s", exc, wait)
        except Exception:  # never a silently dead loop
            wait = backoff.next()
            log.exception("anchoring the audit chain failed; retrying in %.1f s", wait)
        await asyncio.sleep(wait)
