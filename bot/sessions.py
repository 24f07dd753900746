"""On-call engineers' own access: ask for a session, receive it by DM, hear of every change,
and see it all on the App Home.

A session is a request like an agent's (same cards, quorum and self-approval ban, same
issuing, revoking and extending in :class:`bot.service.Bot`), so this module adds only what
is a person's: the checks of :class:`~keyturn.policy.AccessRule`, delivery by DM (the
credentials go nowhere else), the news and reminders, and the App Home.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from bot import card_store, session_views
from bot.cards import extend_choices
from bot.credentials import Issuer
from bot.people import SLACK_ERRORS, Directory, approvers_for, dm
from bot.session_views import MAX_REASON, MAX_TICKET, REMIND_BEFORE, Line, Waiting
from keyturn.domain import RequestStatus, unprintable
from keyturn.errors import InvalidInput, KeyturnError, NotFound, Unavailable
from keyturn.policy import (
    AccessRule,
    Config,
    PostgresTarget,
    SshTarget,
    format_duration,
    parse_duration,
)
from keyturn.store import requests, sessions, ssh_keys
from keyturn.store.db import Store
from keyturn.store.grants import Minted
from keyturn.store.models import GrantRow, RequestRow
from keyturn.store.sessions import Held

log = logging.getLogger(__name__)

KIND_OF_COMMAND = {"db": "postgres", "ssh": "ssh"}  # /keyturn db|ssh
COMMAND_OF_KIND = {kind: word for word, kind in KIND_OF_COMMAND.items()}
SESSION_EXTEND_CHOICES = (15 * 60, 30 * 60, 60 * 60)  # seconds, those within the rule's max
MIN_TTL = timedelta(seconds=5)  # shorter is surely a typo
HOME_VIEWERS = 1000  # App Homes a replica keeps redrawing (the most recently opened)


class SlackUnavailable(Unavailable):
    code = "slack_unavailable"


class BadField(InvalidInput):
    """Bad input in one field of a request (``target``, ``ttl``, ``reason``, ``ticket``): the
    request modal shows it under that field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NotAllowed(BadField):
    code = "not_allowed"
    status = 403


@dataclass(frozen=True)
class Ask:
    """What a person typed or chose: checked by :meth:`Desk.ask`, never trusted before."""

    user: str
    target: str
    ttl: str
    reason: str
    kind: str | None = None  # postgres | ssh when typed as db/ssh; None from the modal
    ticket: str | None = None


@dataclass
class Desk:
    config: Config
    store: Store
    client: AsyncWebClient
    directory: Directory
    issuer: Issuer
    home_viewers: dict[str, None] = field(default_factory=dict)  # insertion-ordered set

    # ------------------------------------------------------------------ asking

    async def rule_for(self, user: str, target: str) -> AccessRule | None:
        """The first access rule that names ``target`` and lets ``user`` ask for it."""
        for rule in self.config.policy.access_rules(target):
            if await self.directory.allows(user, rule.requesters):
                return rule
        return None

    async def requestable(self, user: str) -> list[tuple[str, str, AccessRule]]:
        """(target, kind, rule) for every target ``user`` may ask for."""
        found: list[tuple[str, str, AccessRule]] = []
        for name, target in sorted(self.config.policy.targets.items()):
            rule = await self.rule_for(user, name)
            if rule is not None:
                found.append((name, target.kind, rule))
        return found

    async def request_form(self, user: str, channel: str) -> dict[str, Any]:
        """``/keyturn request``: a form listing only what this person may ask for."""
        mine = await self.requestable(user)
        if not mine:
            raise InvalidInput(
                "no access rule lets you ask for any target: ask your keyturn admins"
            )
        durations = sorted({d for _, _, rule in mine for d in rule.durations})
        targets = [(name, kind) for name, kind, _ in mine]
        return session_views.request_modal(targets, durations, channel)

    async def _choices(self, user: str) -> str:
        mine = await self.requestable(user)
        if not mine:
            return "no access rule lets you ask for any target"
        names = ", ".join(f"`{n}` ({COMMAND_OF_KIND[k]})" for n, k, _ in mine)
        return f"you may ask for {names}"

    async def ask(self, asked: Ask) -> RequestRow:
        """Check everything, then create the pending request; bad input creates nothing."""
        for name in ("target", "ttl", "reason", "ticket"):
            if unprintable(getattr(asked, name) or ""):
                raise BadField(name, "that holds control characters: type plain text")
        target = self.config.policy.targets.get(asked.target)
        if target is None:
            raise BadField(
                "target",
                f"there is no target `{asked.target[:60]}`: {await self._choices(asked.user)}",
            )
        word = COMMAND_OF_KIND[target.kind]
        if asked.kind is not None and asked.kind != target.kind:
            raise BadField(
                "target",
                f"`{asked.target}` is a{'n' if word == 'ssh' else ''} {word} target: type "
                f"`/keyturn {word} {asked.target} <ttl> <reason>`",
            )
        rule = await self.rule_for(asked.user, asked.target)
        if rule is None:
            raise NotAllowed(
                "target",
                f"no access rule lets you ask for `{asked.target}`: "
                f"{await self._choices(asked.user)}",
            )
        ttl = _ttl(asked.ttl, rule)
        reason = " ".join(asked.reason.split())
        if not reason:
            raise BadField(
                "reason",
                f"a reason is required: `/keyturn {word} {asked.target} "
                f"{format_duration(ttl)} <why you need it>`",
            )
        if len(reason) > MAX_REASON:
            raise BadField("reason", f"keep the reason under {MAX_REASON} characters")
        ticket = " ".join((asked.ticket or "").split())
        if len(ticket) > MAX_TICKET:
            raise BadField("ticket", f"keep the ticket link under {MAX_TICKET} characters")
        details = {"ticket": ticket} if ticket else {}
        if isinstance(target, SshTarget):
            keys = await ssh_keys.keys_of(self.store, asked.user)
            if not keys:
                raise BadField(
                    "target",
                    "register an SSH key first: `/keyturn ssh-key add <public key>` "
                    "(the certificate is made for your own key)",
                )
            # the approvers approve this key: one added later cannot take the certificate
            details["key"] = keys[-1].fingerprint
        if already := await sessions.of_requester(self.store, asked.user, asked.target):
            first = already[0].request
            raise BadField(
                "target",
                f"you already have request `{session_views.short(first.id)}` for "
                f"`{asked.target}` ({first.status}): see `/keyturn list`",
            )
        key = f", key {details['key']}" if "key" in details else ""
        row, _ = await requests.create_request(
            self.store,
            requests.NewRequest(
                target=asked.target,
                command=f"{target.kind} session for {asked.user} on {asked.target}, "
                f"{format_duration(ttl)}{key}",
                requester=asked.user,
                pending_ttl=rule.pending_ttl or self.config.policy.pending_ttl,
                quorum=rule.quorum,
                reason=reason,
                rule=rule.name,
                classification=details,
                grant_ttl=ttl,
                session=True,
            ),
        )
        return row

    # ------------------------------------------------------------------ delivering

    async def deliver(self, request: RequestRow) -> Minted:
        """Issue a session and DM it to its requester (``grants.issue``'s mint for sessions).

        Raised errors change nothing: what was minted is revoked here when the DM fails, so a
        retry (Slack back) issues afresh. The credentials are in the DM and nowhere else.
        """
        rule = self.config.policy.access_rule(request.rule)
        if rule is None:
            raise InvalidInput(f"the access rule {request.rule!r} is no longer in the policy")
        target = self.config.policy.targets.get(request.target)
        if isinstance(target, PostgresTarget):
            minted, text = await self._login(request, target, rule)
        elif isinstance(target, SshTarget):
            minted, text = await self._certificate(request, target, rule)
        else:
            raise InvalidInput(f"target {request.target} is not in the policy any more")
        try:
            await dm(self.client, request.requester, text)
        except SLACK_ERRORS as exc:
            await self.issuer.unmint(minted)
            raise SlackUnavailable(f"Slack did not take the credentials DM ({exc})") from None
        return minted

    async def _login(
        self, request: RequestRow, target: PostgresTarget, rule: AccessRule
    ) -> tuple[Minted, str]:
        now = self.store.clock.now()
        login = await self.issuer.session_login(request, target, rule.max_duration, now)
        text = session_views.delivery(
            request_id=str(request.id),
            target=request.target,
            expires_at=now + login.minted.ttl,
            ttl=login.minted.ttl,
            vault_addr=self.config.vault.public_addr or self.issuer.vault.addr,
            wrap_ttl=self.config.vault.session_wrap_ttl,
            wrapping_token=login.wrapping_token,
        )
        return login.minted, text

    async def _certificate(
        self, request: RequestRow, target: SshTarget, rule: AccessRule
    ) -> tuple[Minted, str]:
        approved = (request.classification or {}).get("key")
        keys = await ssh_keys.keys_of(self.store, request.requester)
        key = next((k for k in keys if k.fingerprint == approved), None)
        if key is None:
            raise InvalidInput(
                f"the key {approved} this session was approved for is no longer registered;"
                " ask again"
            )
        now = self.store.clock.now()
        signed = await self.issuer.session_certificate(
            request, target, rule.max_duration, key.public_key
        )
        text = session_views.certificate_delivery(
            request_id=str(request.id),
            target=request.target,
            principal=target.principal,
            host=target.host,
            port=target.port,
            algorithm=key.algorithm,
            fingerprint=key.fingerprint,
            expires_at=now + signed.minted.ttl,
            certificate=signed.certificate,
        )
        return signed.minted, text

    # ------------------------------------------------------------------ holding

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
        return extend_choices(SESSION_EXTEND_CHOICES, grant.expires_at, grant.max_expires_at, now)

    async def lines(self, user: str) -> list[Line]:
        return [self.line(held) for held in await sessions.of_requester(self.store, user)]

    async def waiting_on(self, user: str) -> list[Waiting]:
        """Pending requests ``user`` may approve (not their own)."""
        found = []
        for row in await requests.pending_requests(self.store):
            if row.requester == user:
                continue
            deciders = await self.directory.deciders(self.config, row)
            try:
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
                    row.session,
                    kind,
                    ttl,
                    row.command,
                    channel,
                )
            )
        return found

    async def check_own(self, user: str, grant: GrantRow) -> None:
        """Raise unless ``grant`` is a session ``user`` asked for."""
        held = await sessions.own(self.store, user, str(grant.request_id or ""))
        if held.grant is None or held.grant.id != grant.id:
            raise NotFound("this is not a session of yours")

    async def open_grant(self, user: str, typed: str) -> GrantRow:
        """The open session of ``user``'s that ``typed`` (an id or its start) names."""
        held = await sessions.own(self.store, user, typed)
        if held.grant is None or held.grant.status != "active":
            raise InvalidInput(
                f"request `{session_views.short(held.request.id)}` has no open session "
                f"(it is {held.request.status})"
            )
        return held.grant

    # ------------------------------------------------------------------ telling

    async def changed(self, card: card_store.Card, shown: str | None) -> None:
        """A card moved from ``shown`` to its current version: a session's requester hears
        what changed, and the App Homes it touches are redrawn. Best effort: logged when
        Slack fails, never retried, so that a retried card update cannot say it twice."""
        row = card.request
        if row.session:
            try:
                await self._tell(card, shown)
            except SLACK_ERRORS as exc:
                log.warning("could not tell the requester of %s: %s", row.id, exc)
        await self.redraw_for(row)

    async def _tell(self, card: card_store.Card, shown: str | None) -> None:
        row, grant = card.request, card.grant
        denial = next((a for a in row.approvals if a.decision == "deny"), None)
        text = session_views.news(
            request_id=str(row.id),
            target=row.target,
            was=card_store.parse_version(shown),
            now_is=card_store.parse_version(card.current),
            approvers=[a.approver for a in row.approvals if a.decision == "approve"],
            denial=(denial.approver, denial.reason or "") if denial else None,
            error=row.error,
            ended_by=grant.ended_by if grant else None,
            pending_ttl=row.pending_expires_at - row.created_at,
        )
        if text is not None:
            await dm(self.client, row.requester, text)

    async def redraw_for(self, row: RequestRow) -> None:
        """Redraw the App Homes a change to ``row`` touches: its approvers' (those opened
        here) and, for a session, its requester's."""
        people = approvers_for(self.config, row)
        approvers = set(people.users) if people else set()
        if people and people.slack_usergroup:
            try:
                approvers |= await self.directory.members(people.slack_usergroup)
            except SLACK_ERRORS as exc:
                log.warning("could not list %s: %s", people.slack_usergroup, exc)
        await self.republish(*approvers, requester=row.requester if row.session else None)

    async def remind_expiring(self) -> int:
        """Warn requesters whose sessions end within :data:`REMIND_BEFORE`, with Extend
        buttons; a warning Slack refused is tried again on the next pass."""
        reminded = 0
        for due in await sessions.claim_expiry_reminders(self.store, REMIND_BEFORE):
            line = self.line(Held(due.request, due.grant))
            text, blocks = session_views.reminder(
                line, due.grant.expires_at, self.store.clock.now()
            )
            try:
                await dm(self.client, due.request.requester, text, blocks)
            except SLACK_ERRORS as exc:
                log.warning("could not warn %s: %s", due.request.requester, exc)
                await sessions.unclaim_reminder(self.store, due.grant.id)
                continue
            reminded += 1
        return reminded

    async def remind_approvers(self) -> int:
        """A request pending for half its pending TTL: a nudge in its card's thread (best
        effort, like every courtesy message)."""
        reminded = 0
        for overdue in await card_store.claim_approver_reminders(self.store):
            row = overdue.request
            people = approvers_for(self.config, row)
            text = session_views.approver_reminder(
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

    # ------------------------------------------------------------------ App Home

    async def publish_home(self, user: str) -> None:
        """Draw ``user``'s App Home, and keep redrawing it on changes that concern them."""
        self.home_viewers.pop(user, None)
        self.home_viewers[user] = None
        while len(self.home_viewers) > HOME_VIEWERS:
            self.home_viewers.pop(next(iter(self.home_viewers)))
        lines, waiting = await self.lines(user), await self.waiting_on(user)
        # off the loop: each agent command is printed back to count its statements (see drawn)
        view = await asyncio.to_thread(session_views.home, lines, waiting, self.store.clock.now())
        await self.client.views_publish(user_id=user, view=view)

    async def republish(self, *users: str, requester: str | None = None) -> None:
        """Redraw the App Homes of ``users`` that were opened on this replica (anyone else's
        is drawn afresh when they open it) and of ``requester`` (a session's, whose own
        request changed). A courtesy: failures are logged."""
        redraw = {u for u in users if u in self.home_viewers} | (
            {requester} if requester else set()
        )
        for user in sorted(redraw):
            try:
                await self.publish_home(user)
            except (*SLACK_ERRORS, KeyturnError) as exc:
                log.warning("could not redraw the App Home of %s: %s", user, exc)


def _ttl(typed: str, rule: AccessRule) -> timedelta:
    too_long = BadField(
        "ttl",
        f"`{typed.strip()[:20]}` is longer than access rule `{rule.name}` allows: "
        f"ask for {format_duration(rule.max_duration)} or less",
    )
    try:
        ttl = parse_duration(typed.strip())
    except ValueError as exc:
        if "longer than" in str(exc):  # past any sensible duration
            raise too_long from None
        raise BadField(
            "ttl", f"`{typed[:20]}` is not a duration: type one such as 15m, 30m or 1h"
        ) from None
    if ttl < MIN_TTL:
        raise BadField("ttl", f"ask for at least {format_duration(MIN_TTL)}")
    if ttl > rule.max_duration:
        raise too_long
    return ttl
