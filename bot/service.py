"""The bot's use cases: post cards, take votes, keep cards in step with the database.

Bolt listeners (:mod:`bot.app`) ack at once and call these. Every decision is committed in
Postgres (the same operations the rest of keyturn uses) before any Slack call, so Slack being
slow or down loses nothing: the card catches up on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from bot import card_store
from bot.cards import (
    CardState,
    Credentials,
    Vote,
    approval_card,
    card_text,
    command_blocks,
    deny_modal,
    extend_choices,
    outcome_message,
)
from bot.credentials import Issuer
from bot.people import SLACK_ERRORS, Directory, dm
from bot.revocation import Revoker
from bot.sessions import Desk
from keyturn.aio import spawn
from keyturn.backoff import Backoff
from keyturn.domain import Deciders, Decision, RequestStatus
from keyturn.errors import DatabaseUnavailable, InvalidInput, KeyturnError, NotFound, Unavailable
from keyturn.policy import Config, SshTarget
from keyturn.store import grants, requests
from keyturn.store.db import Store
from keyturn.store.listener import Listener
from keyturn.store.models import GrantRow, RequestRow
from keyturn.vault import VaultUnauthenticated

log = logging.getLogger(__name__)

AGENT_EXTEND_CHOICES = (15 * 60, 60 * 60, 4 * 60 * 60)  # seconds, those within the max TTL
MAX_RETRY_DELAY = 60.0


def retry_delay(attempts: int) -> timedelta:
    """Backoff between attempts to issue credentials: about 1 s, 2 s, 4 s, … at most a
    minute (the attempt count lives in the request row: replicas share it)."""
    backoff = Backoff(1.0, MAX_RETRY_DELAY, attempt=max(attempts - 1, 0))
    return timedelta(seconds=backoff.next())


def credentials_of(row: RequestRow, grant: GrantRow | None, now: datetime) -> Credentials | None:
    if grant is None:
        if row.status == "approved" and row.issue_attempts:
            return Credentials(None, "pending", note=row.issue_error)
        return None
    return Credentials(
        grant_id=str(grant.id),
        status=grant.status,
        expires_at=grant.expires_at,
        ended_by=grant.ended_by,
        extend_choices=extend_choices(
            AGENT_EXTEND_CHOICES, grant.expires_at, grant.max_expires_at, now
        )
        if grant.lease_id
        else [],
    )


def card_state(
    row: RequestRow,
    grant: GrantRow | None,
    now: datetime,
    *,
    shell: bool = False,
    session_kind: str | None = None,
    max_ttl: timedelta | None = None,
) -> CardState:
    classification = row.classification or {}
    return CardState(
        id=str(row.id),
        target=row.target,
        command=row.command,
        requester=row.requester,
        status=row.status,
        quorum=row.quorum,
        pending_expires_at=row.pending_expires_at,
        shell=shell,
        rule=row.rule,
        reasons=list(classification.get("reasons", [])),
        run_id=row.run_id,
        on_behalf_of=row.on_behalf_of,
        reason=row.reason,
        estimated_rows=classification.get("estimated_rows"),
        grant_ttl_seconds=row.grant_ttl_seconds,
        votes=[Vote(a.approver, a.decision, a.reason) for a in row.approvals],
        error=row.error,
        credentials=credentials_of(row, grant, now),
        ran=what_ran(row.result),
        session_kind=session_kind,
        ticket=classification.get("ticket"),
        ssh_key=classification.get("key"),
        max_ttl_seconds=int(max_ttl.total_seconds()) if max_ttl else None,
    )


def what_ran(result: dict[str, Any] | None) -> str | None:
    """The card's one-line account of an approved run: command tags (``UPDATE 3``) or an
    exit status; never rows or output, which may hold what masking hid from the agent."""
    if not result:
        return None
    if result.get("tags"):
        return ", ".join(str(t) for t in result["tags"])[:200]
    if result.get("exit_status") is not None:
        return f"exit {result['exit_status']}"
    return None


@dataclass
class Bot:
    config: Config
    store: Store
    listener: Listener
    client: AsyncWebClient
    issuer: Issuer
    replica: str = field(default_factory=lambda: f"bot-{uuid.uuid4().hex[:8]}")
    directory: Directory = field(init=False)
    revoker: Revoker = field(init=False)
    desk: Desk = field(init=False)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.directory = Directory(self.client, self.config.bot.usergroup_cache.total_seconds())
        self.revoker = Revoker(self.store, self.issuer, self.config.bot)
        self.desk = Desk(self.config, self.store, self.client, self.directory, self.issuer)
        self.listener.subscribe(self._notified)

    def _notified(self, kind: str, ident: str) -> None:
        self._wake.set()
        if kind == "grant":
            spawn(self.tasks, self.revoker.on_grant(uuid.UUID(ident)))
        elif kind == "*":  # reconnected: notifications may have been lost
            spawn(self.tasks, self.revoker.reschedule_all())

    # ------------------------------------------------------------------ who decides

    async def _voting(self, request_id: str) -> tuple[RequestRow, Deciders]:
        """The request a click names, and who may decide it (checked with the vote)."""
        try:
            row = await requests.get_request(self.store, uuid.UUID(request_id))
        except ValueError:
            raise NotFound("this card refers to no request") from None
        return row, await self.directory.deciders(self.config, row)

    # ------------------------------------------------------------------ votes

    async def approve(self, request_id: str, user: str, *, on_card: bool = True) -> None:
        """Record an approval. Raises a keyturn error when nothing changed: the Slack edge
        (:mod:`bot.app`) tells the clicker why. A command is approved on its card only, the
        one place that shows every statement as it will run (``on_card``: the click came from
        a message, not an App Home that an older release drew with a shortened command)."""
        row, deciders = await self._voting(request_id)
        deciders.check(user)
        if not on_card and not row.session:
            raise InvalidInput("approve a command on its card, where every statement is shown")
        result = await requests.decide(
            self.store, row.id, user, Decision.APPROVE, deciders=deciders
        )
        await self._after_decision(row.id, issue=result.decided)

    async def open_deny(self, request_id: str, user: str, trigger_id: str) -> None:
        """Open the reason modal, only for someone who may deny."""
        row, deciders = await self._voting(request_id)
        row.domain().check_decider(user, deciders, RequestStatus.DENIED, self.store.clock.now())
        await self.client.views_open(trigger_id=trigger_id, view=deny_modal(request_id))

    async def deny(self, request_id: str, user: str, reason: str) -> None:
        """Record a denial; the modal is answered as soon as it is committed (Slack allows
        3 s), and the card and the thread follow in the background."""
        if not reason.strip():
            raise InvalidInput("a reason is required: the agent will see it")
        row, deciders = await self._voting(request_id)
        await requests.decide(self.store, row.id, user, Decision.DENY, reason, deciders=deciders)
        spawn(self.tasks, self._after_decision(row.id, issue=False))

    async def _after_decision(self, request_id: uuid.UUID, *, issue: bool) -> None:
        """What follows a committed decision. It is decided whatever happens here, so a
        failure is the bot loop's to finish (it issues and refreshes on its next pass), never
        reported to the clicker as if nothing had happened."""
        try:
            if issue:
                await self.issue_credentials(request_id)
            await self.refresh_card(request_id)
        except (*SLACK_ERRORS, KeyturnError) as exc:
            log.warning("after deciding %s: %s; the next pass catches up", request_id, exc)
            self._wake.set()

    # ------------------------------------------------------------------ credentials

    async def issue_credentials(self, request_id: uuid.UUID) -> None:
        """Mint and record credentials; while Vault is unavailable, retry with backoff."""
        try:
            grant = await grants.issue(self.store, request_id, self._mint, self.issuer.unmint)
        except (Unavailable, VaultUnauthenticated) as exc:
            row = await requests.get_request(self.store, request_id)
            now = self.store.clock.now()
            give_up = now - (row.decided_at or now) > self.config.bot.issue_timeout
            delay = None if give_up else retry_delay(row.issue_attempts + 1)
            log.warning("credentials for %s are delayed: %s", request_id, exc.message)
            await grants.issue_failed(self.store, request_id, exc.message, delay)
            return
        except KeyturnError as exc:  # refused or misconfigured: retrying will not help
            log.error("credentials for %s could not be issued: %s", request_id, exc.message)
            await grants.issue_failed(self.store, request_id, exc.message, None)
            return
        if grant is not None:
            self.revoker.schedule(grant.id, grant.expires_at)

    async def _mint(self, request: RequestRow) -> grants.Minted:
        """An agent's credentials go to a gateway; a person's session goes to them by DM."""
        if request.session:
            return await self.desk.deliver(request)
        return await self.issuer.mint(request)

    async def _grant_for(self, grant_id: str, user: str, *, own: bool) -> GrantRow:
        """The grant ``user`` may revoke or extend: as an approver of its request, or
        (``own``) as the person whose session it is."""
        try:
            grant = await grants.get_grant(self.store, uuid.UUID(grant_id))
        except ValueError:
            raise NotFound("this refers to no grant") from None
        if grant.request_id is None:
            raise NotFound("this grant belongs to no request")
        if own:
            await self.desk.check_own(user, grant)
        else:
            _, deciders = await self._voting(str(grant.request_id))
            deciders.check(user)
        return grant

    async def revoke(self, grant_id: str, user: str, *, own: bool = False) -> GrantRow:
        """Revoke now: the lease dies in Vault (its sessions end), the card says who did it."""
        grant = await self._grant_for(grant_id, user, own=own)
        async with _vault_first():
            row = await grants.revoke(self.store, grant.id, user, self.issuer.revoke)
        self.revoker.unschedule(grant.id)
        if row.request_id is not None:
            await self._after_decision(row.request_id, issue=False)
        return row

    async def extend(
        self, grant_id: str, user: str, extra: timedelta, *, own: bool = False
    ) -> GrantRow:
        """Renew the lease by ``extra`` (within the grant's ceiling) and move the job."""
        grant = await self._grant_for(grant_id, user, own=own)
        async with _vault_first():
            row = await grants.extend(self.store, grant.id, user, extra, self.issuer.renew)
        self.revoker.schedule(row.id, row.expires_at)
        if row.request_id is not None:
            await self._after_decision(row.request_id, issue=False)
        return row

    # ------------------------------------------------------------------ cards

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
                    await self._post_full_command(channel, ts, await drawn(self._state(row)))
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
                await self.desk.redraw_for(row)  # its approvers' "waiting on you"
        return posted

    def _state(self, row: RequestRow, grant: GrantRow | None = None) -> CardState:
        target = self.config.policy.targets.get(row.target)
        rule = self.config.policy.access_rule(row.rule) if row.session else None
        return card_state(
            row,
            grant,
            self.store.clock.now(),
            shell=isinstance(target, SshTarget),
            session_kind=(target.kind if target else "session") if row.session else None,
            max_ttl=rule.max_duration if rule else None,
        )

    async def _post_card(self, channel: str, row: RequestRow) -> str:
        card = await drawn(self._state(row))
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
        state = self._state(row, card.grant)
        picture = await drawn(state)
        try:
            await self.client.chat_update(
                channel=card.channel, ts=card.ts, text=picture.text, blocks=picture.blocks
            )
            if row.status != "pending" and (shown is None or shown.startswith("pending")):
                await self._announce(card, state)
        except SLACK_ERRORS:
            await card_store.take_card_update(self.store, row.id, card.current, shown)
            raise
        await self.desk.changed(card, shown)

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

    async def sync(self) -> None:
        """One pass: expire overdue requests, issue credentials, end grants whose command
        has run, post missing cards, refresh stale ones."""
        await self.revoker.rebuild_once()
        await requests.expire_due_requests(self.store)
        for request_id in await grants.awaiting_credentials(self.store):
            await self.issue_credentials(request_id)
        await self.revoker.end_finished()
        await self.post_pending_cards()
        for request_id in await card_store.stale_cards(self.store):
            await self.refresh_card(request_id)
        await self.desk.remind_approvers()
        await self.desk.remind_expiring()

    async def run_forever(self) -> None:
        """Wake on notifications, poll as the guarantee, back off while Slack is down."""
        interval = self.config.bot.poll_interval.total_seconds()
        self.revoker.start()
        try:
            await self._loop(interval, Backoff(1.0, 30.0))
        finally:
            self.revoker.stop()

    async def _loop(self, interval: float, backoff: Backoff) -> None:
        while True:
            self._wake.clear()
            try:
                await self.sync()
                backoff.reset()
                wait = interval
            except (*SLACK_ERRORS, KeyturnError) as exc:
                wait = backoff.next()
                log.warning("bot sync failed (%s); retrying in %.1f s", exc, wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()


@dataclass(frozen=True)
class Drawn:
    text: str
    blocks: list[dict[str, Any]]
    thread: list[str]  # the rest of a command longer than the card holds


def _draw(state: CardState) -> Drawn:
    return Drawn(card_text(state), approval_card(state), command_blocks(state)[1])


async def drawn(state: CardState) -> Drawn:
    """A card, drawn in a worker thread: printing a command back from its parse tree takes
    up to a few hundred ms for the longest one an agent may send, and the bot's event loop
    serves every click meanwhile."""
    return await asyncio.to_thread(_draw, state)


class NotRecorded(DatabaseUnavailable):
    """The database failed after Vault may already have acted (revoke, extend)."""


@contextlib.asynccontextmanager
async def _vault_first() -> AsyncIterator[None]:
    """Vault acts inside the grant's transaction: if the database then fails, Vault may
    have revoked or renewed already, so the clicker must not be told nothing happened."""
    try:
        yield
    except DatabaseUnavailable as exc:
        raise NotRecorded(
            "keyturn cannot reach its database right now; Vault may already have acted, and "
            "the card will show it once the database is back — try again in a minute"
        ) from exc
