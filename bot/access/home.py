"""A person's own access and what waits on them: ``/keyturn list|pending``, the App Home.

App Homes opened on this replica are redrawn when something that concerns them changes (the
most recently opened :data:`HOME_VIEWERS`); anyone else's is drawn afresh when opened.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from slack_sdk.web.async_client import AsyncWebClient

from bot.access import home_view, views
from bot.access.views import Line, Waiting
from bot.cards import extend_choices
from bot.people import SLACK_ERRORS, Directory, SlackUnavailable, approvers_for
from keyturn.config.policy import Config
from keyturn.domain import RequestStatus
from keyturn.errors import InvalidInput, KeyturnError, NotFound
from keyturn.store import access, requests
from keyturn.store.access import Held
from keyturn.store.db import Store
from keyturn.store.models import GrantRow, RequestRow

log = logging.getLogger(__name__)

ACCESS_EXTEND_CHOICES = (15 * 60, 30 * 60, 60 * 60)  # seconds, those within the rule's max
HOME_VIEWERS = 1000  # App Homes a replica keeps redrawing (the most recently opened)


@dataclass
class Home:
    config: Config
    store: Store
    client: AsyncWebClient
    directory: Directory
    viewers: dict[str, None] = field(default_factory=dict)  # insertion-ordered set

    def line(self, held: Held) -> Line:
        row, grant = held.request, held.grant
        target = self.config.policy.targets.get(row.target)
        return Line(
            request_id=str(row.id),
            target=row.target,
            kind=target.kind if target else "postgres",
            status=row.status,
            ttl_seconds=row.grant_ttl_seconds or 0,
            grant_id=str(grant.id) if grant else None,
            grant_status=grant.status if grant else None,
            expires_at=grant.expires_at if grant else None,
            extend_choices=self._extend_choices(grant),
        )

    def _extend_choices(self, grant: GrantRow | None) -> list[int]:
        if grant is None or grant.status != "active" or not grant.lease_id:
            return []  # an SSH certificate's validity is fixed when it is signed
        now = self.store.clock.now()
        return extend_choices(ACCESS_EXTEND_CHOICES, grant.expires_at, grant.max_expires_at, now)

    async def lines(self, user: str) -> list[Line]:
        return [self.line(held) for held in await access.of_requester(self.store, user)]

    async def waiting_on(self, user: str) -> list[Waiting]:
        """Pending requests ``user`` may approve (not their own)."""
        found = []
        for row in await requests.pending_requests(self.store):
            if row.requester == user:
                continue
            try:  # one request Slack cannot place (its group unreadable) hides only itself
                deciders = await self.directory.deciders(self.config, row, user)
                row.domain().check_decider(
                    user, deciders, RequestStatus.APPROVED, self.store.clock.now()
                )
            except KeyturnError:
                continue
            target = self.config.policy.targets.get(row.target)
            kind = target.kind if target else ""
            ttl = row.grant_ttl_seconds or 0
            channel = self.config.approval_channel(row.target)
            found.append(
                Waiting(
                    str(row.id),
                    row.target,
                    row.requester,
                    row.access,
                    kind,
                    ttl,
                    row.command,
                    channel,
                )
            )
        return found

    async def check_own(self, user: str, grant: GrantRow) -> None:
        """Raise unless ``grant`` is access ``user`` asked for."""
        held = await access.own(self.store, user, str(grant.request_id or ""))
        if held.grant is None or held.grant.id != grant.id:
            raise NotFound("this is not your access")

    async def open_grant(self, user: str, typed: str) -> GrantRow:
        """The open access of ``user``'s that ``typed`` (an id or its start) names."""
        held = await access.own(self.store, user, typed)
        if held.grant is None or held.grant.status != "active":
            raise InvalidInput(
                f"request `{views.short(held.request.id)}` has no open access "
                f"(it is {held.request.status})"
            )
        return held.grant

    async def redraw_for(self, row: RequestRow) -> None:
        """Redraw the App Homes a change to ``row`` touches: its approvers' (those opened
        here) and, for a person's access, its requester's."""
        people = approvers_for(self.config, row)
        approvers = set(people.users) if people else set()
        if people and people.slack_usergroup:
            try:
                approvers |= await self.directory.members(people.slack_usergroup)
            except SlackUnavailable as exc:
                log.warning("could not list %s: %s", people.slack_usergroup, exc)
        await self.republish(*approvers, requester=row.requester if row.access else None)

    async def publish_home(self, user: str) -> None:
        """Draw ``user``'s App Home, and keep redrawing it on changes that concern them."""
        self.viewers.pop(user, None)
        self.viewers[user] = None
        while len(self.viewers) > HOME_VIEWERS:
            self.viewers.pop(next(iter(self.viewers)))
        lines, waiting = await self.lines(user), await self.waiting_on(user)
        # off the loop: each agent command is printed back to count its statements (see drawn)
        view = await asyncio.to_thread(home_view.home, lines, waiting, self.store.clock.now())
        await self.client.views_publish(user_id=user, view=view)

    async def republish(self, *users: str, requester: str | None = None) -> None:
        """Redraw the App Homes of ``users`` that were opened on this replica (anyone else's
        is drawn afresh when they open it) and of ``requester`` (a person's, whose own
        request changed). A courtesy: failures are logged."""
        redraw = {u for u in users if u in self.viewers} | ({requester} if requester else set())
        for user in sorted(redraw):
            try:
                await self.publish_home(user)
            except (*SLACK_ERRORS, KeyturnError) as exc:
                log.warning("could not redraw the App Home of %s: %s", user, exc)
