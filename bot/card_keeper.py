"""Approval cards in Slack: each posted once, kept in step with its request, and the
approvers of a request pending for half its pending TTL reminded in its thread.

Which replica posts or updates a card is settled in Postgres (:mod:`bot.card_store`); Slack
is told only after, so Slack being slow or down loses nothing: the card catches up on the
bot's next pass.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace

from slack_sdk.web.async_client import AsyncWebClient

from bot import card_store
from bot.access.home import Home
from bot.access.news import News
from bot.cards import CardState, outcome_message
from bot.drawing import Drawn, drawn, state_of
from bot.people import SLACK_ERRORS, approvers_for, dm
from bot.run_view import CARD_STEPS
from bot.slack_text import approver_reminder
from keyturn.config.policy import Config
from keyturn.store import run_steps
from keyturn.store.db import Store
from keyturn.store.models import GrantRow, RequestRow

log = logging.getLogger(__name__)


@dataclass
class CardKeeper:
    config: Config
    store: Store
    client: AsyncWebClient
    home: Home
    news: News
    replica: str

    async def _state(self, row: RequestRow, grant: GrantRow | None = None) -> CardState:
        state = state_of(self.config, row, grant, self.store.clock.now())
        if row.access:  # a person's access: no agent run behind it
            return state
        return replace(state, run=await run_steps.so_far(self.store, row.id, last=CARD_STEPS))

    async def post_pending_cards(self) -> int:
        """Post a card for every pending request without one; each exactly once."""
        posted = 0
        claim_timeout = self.config.bot.card_claim_timeout
        while (
            claimed := await card_store.claim_card(self.store, self.replica, claim_timeout)
        ) is not None:
            row = claimed.request
            channel = self.config.approval_channel(row.target)
            if channel is None:
                log.error(
                    "no approval channel for target %s (set slack.approval_channel)", row.target
                )
                await card_store.release_card(self.store, row.id, self.replica)
                return posted
            try:
                ts = await self._find_card(channel, row.id)
                adopted = ts is not None
                if ts is not None:  # its thread may lack the full command: posted again
                    await self._post_full_command(channel, ts, await drawn(await self._state(row)))
                else:
                    ts = await self._post_card(channel, row)
            except SLACK_ERRORS as exc:
                log.warning("could not post the card for %s: %s; will retry", row.id, exc)
                await card_store.release_card(self.store, row.id, self.replica)
                raise
            if await card_store.card_posted(
                self.store, claimed, self.replica, channel, ts, adopted=adopted
            ):
                posted += 1
                await self.home.redraw_for(row)  # its approvers' "waiting on you"
        return posted

    async def _post_card(self, channel: str, row: RequestRow) -> str:
        card = await drawn(await self._state(row))
        resp = await self.client.chat_postMessage(
            channel=channel,
            text=card.text,
            blocks=card.blocks,
            metadata={"event_type": "keyturn_request", "event_payload": {"id": str(row.id)}},
        )
        ts = str(resp["ts"])
        await self._post_full_command(channel, ts, card)
        return ts

    async def _post_full_command(self, channel: str, ts: str, card: Drawn) -> None:
        """A command longer than a card holds goes, complete, into the card's thread."""
        for text in card.thread:
            await self.client.chat_postMessage(channel=channel, thread_ts=ts, text=text)

    async def _find_card(self, channel: str, request_id: uuid.UUID) -> str | None:
        """A card an earlier claim posted before it could record it (the replica died)."""
        resp = await self.client.conversations_history(
            channel=channel, limit=200, include_all_metadata=True
        )
        for message in resp.get("messages") or []:
            payload = (message.get("metadata") or {}).get("event_payload") or {}
            if payload.get("id") == str(request_id):
                return str(message["ts"])
        return None

    async def refresh_card(self, request_id: uuid.UUID) -> None:
        """Bring a card up to date; the replica that wins the compare-and-set posts the news."""
        card = await card_store.card_of(self.store, request_id)
        if card is None or not card.stale:
            return
        row, shown = card.request, card.shown
        if not await card_store.take_card_update(self.store, row.id, shown, card.current):
            return
        state = await self._state(row, card.grant)
        picture = await drawn(state)
        try:
            await self.client.chat_update(
                channel=card.channel, ts=card.ts, text=picture.text, blocks=picture.blocks
            )
            if row.status != "pending" and (shown is None or shown.status == "pending"):
                await self._announce(card, state)
        except SLACK_ERRORS:
            await card_store.take_card_update(self.store, row.id, card.current, shown)
            raise
        await self.news.changed(card, shown)

    async def _announce(self, card: card_store.Card, state: CardState) -> None:
        row = card.request
        text = outcome_message(state)
        await self.client.chat_postMessage(channel=card.channel, thread_ts=card.ts, text=text)
        if row.on_behalf_of and row.on_behalf_of[:1] in ("U", "W"):
            # A courtesy: when it fails it is logged, not retried, so that a retry of the
            # whole announcement cannot post the thread message twice.
            try:
                await dm(
                    self.client,
                    row.on_behalf_of,
                    f"Your agent `{row.requester}` asked to run on `{row.target}`: {text}",
                )
            except SLACK_ERRORS as exc:
                log.warning("could not DM %s about %s: %s", row.on_behalf_of, row.id, exc)

    async def remind_approvers(self) -> int:
        """A request pending for half its pending TTL: a nudge in its card's thread (best
        effort, like every courtesy message)."""
        reminded = 0
        for overdue in await card_store.claim_approver_reminders(self.store):
            row = overdue.request
            people = approvers_for(self.config, row)
            text = approver_reminder(
                people.users if people else [],
                people.slack_usergroup if people else None,
                self.store.clock.now() - row.created_at,
                row.pending_expires_at,
            )
            try:
                await self.client.chat_postMessage(
                    channel=overdue.channel, thread_ts=overdue.ts, text=text
                )
            except SLACK_ERRORS as exc:
                log.warning("could not remind the approvers of %s: %s", row.id, exc)
                continue
            reminded += 1
        return reminded
