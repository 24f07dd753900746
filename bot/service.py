"""The bot's use cases: take votes, issue, revoke and extend credentials; one pass of upkeep.

Bolt listeners (:mod:`bot.app`) ack at once and call these. Cards are
:mod:`bot.card_keeper`'s, a person's own access :mod:`bot.access`'s, all wired by
:mod:`bot.bootstrap`. Every decision is committed in
Postgres (the same operations the rest of keyturn uses) before any Slack call, so Slack being
slow or down loses nothing: the card catches up on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import timedelta

from slack_sdk.web.async_client import AsyncWebClient

from bot import card_store
from bot.access.ask import Asking
from bot.access.deliver import Delivery
from bot.access.home import Home
from bot.access.news import News
from bot.card_keeper import CardKeeper
from bot.credentials import Issuer
from bot.deny_modal import deny_modal
from bot.people import SLACK_ERRORS, Directory
from bot.revocation import Revoker
from bot.run_view import MODAL_STEPS, run_modal
from keyturn.aio import spawn
from keyturn.backoff import Backoff
from keyturn.config.policy import Config
from keyturn.domain import Deciders, Decision, RequestStatus
from keyturn.errors import DatabaseUnavailable, InvalidInput, KeyturnError, NotFound, Unavailable
from keyturn.store import decisions, grants, requests, run_steps
from keyturn.store.db import Store
from keyturn.store.listener import Listener
from keyturn.store.models import GrantRow, RequestRow
from keyturn.vault import VaultUnauthenticated

log = logging.getLogger(__name__)

MAX_RETRY_DELAY = 60.0


def retry_delay(attempts: int) -> timedelta:
    """Backoff between attempts to issue credentials: about 1 s, 2 s, 4 s, … at most a
    minute (the attempt count lives in the request row: replicas share it)."""
    backoff = Backoff(1.0, MAX_RETRY_DELAY, attempt=max(attempts - 1, 0))
    return timedelta(seconds=backoff.next())


@dataclass
class Bot:
    config: Config
    store: Store
    listener: Listener
    client: AsyncWebClient
    issuer: Issuer
    directory: Directory
    revoker: Revoker
    asking: Asking  # a person asks for access
    delivery: Delivery  # a person's access, by DM
    home: Home  # a person's own access and what waits on them; App Homes
    news: News  # what a person hears of their access
    cards: CardKeeper
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # run the next pass now
    cards_wake: asyncio.Event = field(default_factory=asyncio.Event)  # and the cards' pass
    tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.listener.subscribe(self._notified)

    def _notified(self, kind: str, ident: str) -> None:
        self.catch_up()
        if kind == "grant":
            spawn(self.tasks, self.revoker.on_grant(uuid.UUID(ident)))
        elif kind == "*":  # reconnected: notifications may have been lost
            spawn(self.tasks, self.revoker.reschedule_all())

    # ------------------------------------------------------------------ who decides

    async def _voting(self, request_id: str, user: str) -> tuple[RequestRow, Deciders]:
        """The request a click names, and who may decide it (checked with the vote)."""
        try:
            row = await requests.get_request(self.store, uuid.UUID(request_id))
        except ValueError:
            raise NotFound("this card refers to no request") from None
        return row, await self.directory.deciders(self.config, row, user)

    # ------------------------------------------------------------------ votes

    async def approve(self, request_id: str, user: str, *, on_card: bool = True) -> None:
        """Record an approval. Raises a keyturn error when nothing changed: the Slack edge
        (:mod:`bot.app`) tells the clicker why. A command is approved on its card only, the
        one place that shows every statement as it will run (``on_card``: the click came from
        a message, not an App Home that an older release drew with a shortened command)."""
        row, deciders = await self._voting(request_id, user)
        if not on_card and not row.access:
            raise InvalidInput("approve a command on its card, where every statement is shown")
        result = await decisions.decide(
            self.store, row.id, user, Decision.APPROVE, deciders=deciders
        )
        await self._after_decision(row.id, issue=result.decided)

    async def open_deny(self, request_id: str, user: str, trigger_id: str) -> None:
        """Open the reason modal, only for someone who may deny."""
        row, deciders = await self._voting(request_id, user)
        row.domain().check_decider(user, deciders, RequestStatus.DENIED, self.store.clock.now())
        await self.client.views_open(trigger_id=trigger_id, view=deny_modal(request_id))

    async def view_run(self, request_id: str, user: str, trigger_id: str) -> None:
        """Open the run behind a request (its steps up to it, newest first) for someone who
        may decide the request: a card's channel sees the command, its deciders the run."""
        row, deciders = await self._voting(request_id, user)
        deciders.check(user)
        if row.access:
            raise InvalidInput("a person's own access belongs to no agent run")
        found = await run_steps.so_far(self.store, row.id, last=MODAL_STEPS - 1)
        step = await run_steps.step(self.store, row.id)
        if found is None or step is None:
            raise NotFound("this request belongs to no run")
        run = replace(found, steps=(*found.steps, step))
        await self.client.views_open(trigger_id=trigger_id, view=run_modal(run, row.requester))

    async def deny(self, request_id: str, user: str, reason: str) -> None:
        """Record a denial; the modal is answered as soon as it is committed (Slack allows
        3 s), and the card and the thread follow in the background."""
        if not reason.strip():
            raise InvalidInput("a reason is required: the agent will see it")
        row, deciders = await self._voting(request_id, user)
        await decisions.decide(self.store, row.id, user, Decision.DENY, reason, deciders=deciders)
        spawn(self.tasks, self._after_decision(row.id, issue=False))

    async def _after_decision(self, request_id: uuid.UUID, *, issue: bool) -> None:
        """What follows a committed decision. It is decided whatever happens here, so a
        failure is the bot loop's to finish (it issues and refreshes on its next pass), never
        reported to the clicker as if nothing had happened."""
        try:
            if issue:
                await self.issue_credentials(request_id)
            await self.cards.refresh_card(request_id)
        except (*SLACK_ERRORS, KeyturnError) as exc:
            log.warning("after deciding %s: %s; the next pass catches up", request_id, exc)
            self.catch_up()

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
        """An agent's credentials go to a gateway; a person's access goes to them by DM."""
        if request.access:
            return await self.delivery.deliver(request)
        return await self.issuer.mint(request)

    async def _grant_for(self, grant_id: str, user: str, *, own: bool) -> GrantRow:
        """The grant ``user`` may revoke or extend: as an approver of its request, or
        (``own``) as the person whose access it is."""
        try:
            grant = await grants.get_grant(self.store, uuid.UUID(grant_id))
        except ValueError:
            raise NotFound("this refers to no grant") from None
        if grant.request_id is None:
            raise NotFound("this grant belongs to no request")
        if own:
            await self.home.check_own(user, grant)
        else:
            _, deciders = await self._voting(str(grant.request_id), user)
            deciders.check(user)
        return grant

    async def revoke(self, grant_id: str, user: str, *, own: bool = False) -> GrantRow:
        """Revoke now: the lease dies in Vault (its database sessions end), the card says who
        did it."""
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

    def catch_up(self) -> None:
        """Run both loops' next passes now."""
        self.wake.set()
        self.cards_wake.set()

    async def sync(self) -> None:
        """One pass of the bot's loop (supervised by its bootstrap): expire overdue requests,
        issue credentials, end grants whose command has run. Postgres and Vault only: Slack
        being away must not slow any of it (cards have a loop of their own)."""
        await self.revoker.rebuild_once()
        await decisions.expire_due_requests(self.store)
        for request_id in await grants.awaiting_credentials(self.store):
            await self.issue_credentials(request_id)
        await self.revoker.end_finished()

    async def sync_cards(self) -> None:
        """One pass of the cards' loop: post missing cards, refresh stale ones, remind."""
        await self.cards.post_pending_cards()
        for request_id in await card_store.stale_cards(self.store):
            await self.cards.refresh_card(request_id)
        await self.cards.remind_approvers()
        await self.news.remind_expiring()


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
