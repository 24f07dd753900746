"""On-call engineers' own access: ask for a session, receive it by DM, extend or end it,
hear of every change, and see it all on the App Home.

A session is a request like an agent's (same cards, quorum and self-approval ban, same
issuing and revocation), so this module adds only what is a person's: the checks of
:class:`~keyturn.policy.AccessRule`, delivery by DM (the credentials go nowhere else), the
news and reminders, and the App Home.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from slack_sdk.web.async_client import AsyncWebClient

from bot import card_store, session_views
from bot.cards import escape
from bot.credentials import Issuer, Session
from bot.people import SLACK_ERRORS, Directory, approvers_for, check_decider, dm
from bot.session_views import Line, Waiting
from keyturn.errors import InvalidInput, KeyturnError, NotFound, Unavailable
from keyturn.policy import AccessRule, Config, SshTarget, format_duration, parse_duration
from keyturn.store import grants, requests, sessions, ssh_keys
from keyturn.store.db import Store
from keyturn.store.grants import Minted
from keyturn.store.models import GrantRow, RequestRow
from keyturn.store.sessions import Held

log = logging.getLogger(__name__)

KIND_OF_COMMAND = {"db": "postgres", "ssh": "ssh"}
COMMAND_OF_KIND = {kind: word for word, kind in KIND_OF_COMMAND.items()}
REMIND_BEFORE = timedelta(minutes=5)
EXTEND_CHOICES = (15 * 60, 30 * 60, 60 * 60)  # seconds; only those within the rule's max show
MIN_TTL = timedelta(seconds=5)  # shorter is surely a typo
MAX_REASON = 1000
MAX_TICKET = 500


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
    home_viewers: set[str] = field(default_factory=set)  # App Homes republished on change

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

    async def _choices(self, user: str) -> str:
        mine = await self.requestable(user)
        if not mine:
            return "no access rule lets you ask for any target"
        names = ", ".join(f"`{n}` ({COMMAND_OF_KIND[k]})" for n, k, _ in mine)
        return f"you may ask for {names}"

    async def ask(self, asked: Ask) -> RequestRow:
        """Check everything, then create the pending request; bad input creates nothing."""
        target = self.config.policy.targets.get(asked.target)
        if target is None:
            raise BadField(
                "target",
                f"there is no target `{asked.target[:60]}`: {await self._choices(asked.user)}",
            )
        if asked.kind is not None and asked.kind != target.kind:
            word = COMMAND_OF_KIND[target.kind]
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
            word = COMMAND_OF_KIND[target.kind]
            raise BadField(
                "reason",
                f"a reason is required: `/keyturn {word} {asked.target} "
                f"{format_duration(ttl)} <why you need it>`",
            )
        if len(reason) > MAX_REASON:
            raise BadField("reason", f"keep the reason under {MAX_REASON} characters")
        if len(asked.ticket or "") > MAX_TICKET:
            raise BadField("ticket", f"keep the ticket link under {MAX_TICKET} characters")
        details: dict[str, str] = {"ticket": asked.ticket.strip()} if asked.ticket else {}
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
        for held in await sessions.of_requester(self.store, asked.user):
            if held.request.target == asked.target:
                raise BadField(
                    "target",
                    f"you already have request `{session_views.short(held.request.id)}` for "
                    f"`{asked.target}` ({held.request.status}): see `/keyturn list`",
                )
        row, _ = await requests.create_request(
            self.store,
            requests.NewRequest(
                target=asked.target,
                command=f"{target.kind} session for {asked.user} on {asked.target}, "
                f"{format_duration(ttl)}" + (f", key {details['key']}" if "key" in details else ""),
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
        key = None
        if isinstance(target, SshTarget):
            approved = (request.classification or {}).get("key")
            keys = await ssh_keys.keys_of(self.store, request.requester)
            key = next((k for k in keys if k.fingerprint == approved), None)
            if key is None:
                raise InvalidInput(
                    f"the key {approved} this session was approved for is no longer registered;"
                    " ask again"
                )
        now = self.store.clock.now()
        session = await self.issuer.session(
            request, rule.max_duration, key.public_key if key else None, now
        )
        expires_at = now + session.minted.ttl
        if session.certificate is not None and isinstance(target, SshTarget) and key:
            text = session_views.certificate_delivery(
                request_id=str(request.id),
                target=request.target,
                principal=target.principal,
                host=target.host,
                port=target.port,
                algorithm=key.algorithm,
                fingerprint=key.fingerprint,
                expires_at=expires_at,
                certificate=session.certificate,
            )
        else:
            text = self._login_text(request, session, expires_at)
        try:
            await dm(self.client, request.requester, text)
        except SLACK_ERRORS as exc:
            await self.issuer.unmint(session.minted)
            raise SlackUnavailable(f"Slack did not take the credentials DM ({exc})") from None
        return session.minted

    def _login_text(self, request: RequestRow, session: Session, expires_at: datetime) -> str:
        assert session.wrapping_token is not None
        cfg = self.config.vault
        return session_views.delivery(
            request_id=str(request.id),
            target=request.target,
            expires_at=expires_at,
            ttl=session.minted.ttl,
            vault_addr=cfg.public_addr or self.issuer.vault.addr,
            wrap_ttl=cfg.session_wrap_ttl,
            wrapping_token=session.wrapping_token,
        )

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
        headroom = (grant.max_expires_at or grant.expires_at) - max(
            self.store.clock.now(), grant.expires_at
        )
        return [s for s in EXTEND_CHOICES if timedelta(seconds=s) <= headroom]

    async def lines(self, user: str) -> list[Line]:
        return [self.line(held) for held in await sessions.of_requester(self.store, user)]

    async def waiting_on(self, user: str) -> list[Waiting]:
        """Pending requests ``user`` may approve (not their own)."""
        found = []
        for row in await sessions.pending(self.store):
            if row.requester == user:
                continue
            try:
                await check_decider(self.directory, self.config, user, row)
            except KeyturnError:
                continue
            target = self.config.policy.targets.get(row.target)
            found.append(_waiting(row, target.kind if target else ""))
        return found

    async def _own_grant(self, user: str, grant_id: str) -> GrantRow:
        try:
            grant = await grants.get_grant(self.store, uuid.UUID(grant_id))
        except ValueError:
            raise NotFound("this button refers to no grant") from None
        held = await sessions.own(self.store, user, str(grant.request_id or ""))
        if held.grant is None or held.grant.id != grant.id:
            raise NotFound("this is not a session of yours")
        return grant

    async def _open_grant(self, user: str, typed: str) -> GrantRow:
        held = await sessions.own(self.store, user, typed)
        if held.grant is None or held.grant.status != "active":
            raise InvalidInput(
                f"request `{session_views.short(held.request.id)}` has no open session "
                f"(it is {held.request.status})"
            )
        return held.grant

    async def revoke(self, user: str, typed: str) -> GrantRow:
        """``/keyturn revoke <id>``: end one's own session now (its open connections die)."""
        return await self.end(user, await self._open_grant(user, typed))

    async def revoke_grant(self, user: str, grant_id: str) -> GrantRow:
        return await self.end(user, await self._own_grant(user, grant_id))

    async def end(self, user: str, grant: GrantRow) -> GrantRow:
        return await grants.revoke(self.store, grant.id, user, self.issuer.revoke)

    async def extend(self, user: str, typed: str, ttl: str) -> GrantRow:
        """``/keyturn extend <id> <ttl>``: more time, within the access rule's maximum."""
        grant = await self._open_grant(user, typed)
        return await self._extend(user, grant, _duration(ttl))

    async def extend_grant(self, user: str, value: str) -> GrantRow:
        """An Extend button: ``<grant id>:<seconds>``."""
        grant_id, _, seconds = value.partition(":")
        if not seconds.isdigit():
            raise InvalidInput("this button carries no valid extension; nothing was changed")
        grant = await self._own_grant(user, grant_id)
        return await self._extend(user, grant, timedelta(seconds=int(seconds)))

    async def _extend(self, user: str, grant: GrantRow, extra: timedelta) -> GrantRow:
        if not grant.lease_id:
            raise InvalidInput(
                "an SSH certificate cannot be extended: ask for a new session when it ends"
            )
        ceiling = grant.max_expires_at or grant.expires_at
        if max(grant.expires_at, self.store.clock.now()) + extra > ceiling:
            raise InvalidInput(
                f"that is past what its access rule allows: the session may last until "
                f"{session_views.at(ceiling)} at most"
            )
        return await grants.extend(self.store, grant.id, user, extra, self.issuer.renew)

    # ------------------------------------------------------------------ telling

    async def changed(self, card: card_store.Card, shown: str | None) -> None:
        """A card moved from ``shown`` to its current version: a session's requester hears
        what changed, and open App Homes are redrawn. Best effort: logged when Slack fails,
        never retried, so that a retried card update cannot say it twice."""
        if card.request.session:
            try:
                await self._tell(card, shown)
            except SLACK_ERRORS as exc:
                log.warning("could not tell the requester of %s: %s", card.request.id, exc)
        await self.republish(*([card.request.requester] if card.request.session else []))

    async def _tell(self, card: card_store.Card, shown: str | None) -> None:
        row, grant = card.request, card.grant
        denial = next((a for a in row.approvals if a.decision == "deny"), None)
        text = session_views.news(
            request_id=str(row.id),
            target=row.target,
            was=_parts(shown),
            now_is=_parts(card.current),
            approvers=[a.approver for a in row.approvals if a.decision == "approve"],
            denial=(denial.approver, denial.reason or "") if denial else None,
            error=row.error,
            ended_by=grant.ended_by if grant else None,
            pending_ttl=row.pending_expires_at - row.created_at,
        )
        if text is not None:
            await dm(self.client, row.requester, text)

    async def remind_expiring(self) -> int:
        """Warn requesters whose sessions end within 5 minutes, with Extend buttons."""
        reminded = 0
        for held in await sessions.claim_expiry_reminders(self.store, REMIND_BEFORE):
            text, blocks = session_views.reminder(self.line(held), self.store.clock.now())
            try:
                await dm(self.client, held.request.requester, text, blocks)
            except SLACK_ERRORS:
                assert held.grant is not None
                await sessions.unclaim_reminder(self.store, held.grant.id)
                raise
            reminded += 1
        return reminded

    async def remind_approvers(self) -> int:
        """A session request pending for half its pending TTL: a nudge in its card's thread
        (best effort, like every courtesy message)."""
        reminded = 0
        for overdue in await card_store.claim_approver_reminders(self.store):
            row = overdue.request
            people = approvers_for(self.config, row)
            who = " ".join(f"<@{u}>" for u in (people.users if people else []))
            if people and people.slack_usergroup:
                who += f" <!subteam^{people.slack_usergroup}>"
            waited = format_duration(self.store.clock.now() - row.created_at)
            try:
                await self.client.chat_postMessage(
                    channel=overdue.channel,
                    thread_ts=overdue.ts,
                    text=f":bell: {who.strip() or 'Approvers'}: this request has waited "
                    f"{waited}; it expires at {session_views.at(row.pending_expires_at)}.",
                )
            except SLACK_ERRORS as exc:
                log.warning("could not remind the approvers of %s: %s", row.id, exc)
                continue
            reminded += 1
        return reminded

    # ------------------------------------------------------------------ App Home

    async def publish_home(self, user: str) -> None:
        self.home_viewers.add(user)
        view = session_views.home(
            await self.lines(user), await self.waiting_on(user), self.store.clock.now()
        )
        await self.client.views_publish(user_id=user, view=view)

    async def republish(self, *users: str) -> None:
        """Redraw the App Home of ``users`` and of whoever opened theirs on this replica
        (anyone else's is drawn afresh when they open it). A courtesy: failures are logged."""
        for user in set(users) | self.home_viewers:
            try:
                await self.publish_home(user)
            except (*SLACK_ERRORS, KeyturnError) as exc:
                log.warning("could not redraw the App Home of %s: %s", user, exc)


def _duration(typed: str) -> timedelta:
    try:
        return parse_duration(typed.strip())
    except ValueError:
        raise BadField(
            "ttl", f"`{typed[:20]}` is not a duration: type one such as 15m, 30m or 1h"
        ) from None


def _ttl(typed: str, rule: AccessRule) -> timedelta:
    ttl = _duration(typed)
    if ttl < MIN_TTL:
        raise BadField("ttl", f"ask for at least {format_duration(MIN_TTL)}")
    if ttl > rule.max_duration:
        raise BadField(
            "ttl",
            f"{format_duration(ttl)} is longer than access rule `{rule.name}` allows: "
            f"ask for {format_duration(rule.max_duration)} or less",
        )
    return ttl


def _parts(version: str | None) -> tuple[str, str | None]:
    """(request status, grant status) of a card version (see bot.card_store)."""
    if not version:
        return "pending", None
    status, _, rest = version.partition(":")
    grant = rest.partition(":")[2]
    return status, grant.partition("@")[0] if "@" in grant else None


def _waiting(row: RequestRow, kind: str) -> Waiting:
    if row.session:
        ttl = format_duration(timedelta(seconds=row.grant_ttl_seconds or 0))
        what = f"a {ttl} {session_views.KIND_WORD.get(kind, kind)}"
    else:
        first = (row.command.strip().splitlines() or [""])[0]
        what = "to run " + escape(first[:80] + ("…" if len(row.command) > 80 else ""))
    return Waiting(str(row.id), row.target, row.requester, what, row.session)
