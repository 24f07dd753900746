"""What a person hears of their own access: each change, and a warning before it ends.

Best effort, like every courtesy message: a failure is logged and not retried, so a retried
card update cannot say the same thing twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from slack_sdk.web.async_client import AsyncWebClient

from bot import card_store
from bot.access import views
from bot.access.home import Home
from bot.access.views import REMIND_BEFORE
from bot.card_store import CardVersion
from bot.people import SLACK_ERRORS, dm
from keyturn.store import access
from keyturn.store.access import Held
from keyturn.store.db import Store

log = logging.getLogger(__name__)


@dataclass
class News:
    store: Store
    client: AsyncWebClient
    home: Home

    async def changed(self, card: card_store.Card, shown: CardVersion | None) -> None:
        """A card moved from ``shown`` to its current version: a person asking for access hears
        what changed, and the App Homes it touches are redrawn. Best effort: logged when
        Slack fails, never retried, so that a retried card update cannot say it twice."""
        row = card.request
        if row.access:
            try:
                await self._tell(card, shown)
            except SLACK_ERRORS as exc:
                log.warning("could not tell the requester of %s: %s", row.id, exc)
        await self.home.redraw_for(row)

    async def _tell(self, card: card_store.Card, shown: CardVersion | None) -> None:
        row, grant = card.request, card.grant
        denial = next((a for a in row.approvals if a.decision == "deny"), None)
        text = views.news(
            request_id=str(row.id),
            target=row.target,
            was=(shown.status, shown.grant) if shown else ("pending", None),
            now_is=(card.current.status, card.current.grant),
            approvers=[a.approver for a in row.approvals if a.decision == "approve"],
            denial=(denial.approver, denial.reason or "") if denial else None,
            error=row.error,
            ended_by=grant.ended_by if grant else None,
            pending_ttl=row.pending_expires_at - row.created_at,
        )
        if text is not None:
            await dm(self.client, row.requester, text)

    async def remind_expiring(self) -> int:
        """Warn people whose access ends within :data:`REMIND_BEFORE`, with Extend
        buttons; a warning Slack refused is tried again on the next pass."""
        reminded = 0
        for due in await access.claim_expiry_reminders(self.store, REMIND_BEFORE):
            line = self.home.line(Held(due.request, due.grant))
            text, blocks = views.reminder(line, due.grant.expires_at, self.store.clock.now())
            try:
                await dm(self.client, due.request.requester, text, blocks)
            except SLACK_ERRORS as exc:
                log.warning("could not warn %s: %s", due.request.requester, exc)
                await access.unclaim_reminder(self.store, due.grant.id)
                continue
            reminded += 1
        return reminded
