"""Asking for access: ``/keyturn db|ssh``, the request modal, and every check of an
:class:`~keyturn.config.rules.AccessRule` before a request exists. Bad input creates nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bot.access import home_view, views
from bot.access.views import MAX_REASON, MAX_TICKET
from bot.people import OWN_GROUP, Directory, own_group
from keyturn.config.durations import format_duration, parse_duration
from keyturn.config.policy import Config
from keyturn.config.rules import AccessRule
from keyturn.config.targets import SshTarget
from keyturn.domain import unprintable
from keyturn.errors import InvalidInput
from keyturn.store import access, requests, ssh_keys
from keyturn.store.db import Store
from keyturn.store.models import RequestRow

KIND_OF_COMMAND = {"db": "postgres", "ssh": "ssh"}  # /keyturn db|ssh
COMMAND_OF_KIND = {kind: word for word, kind in KIND_OF_COMMAND.items()}
MIN_TTL = timedelta(seconds=5)  # shorter is surely a typo


class BadField(InvalidInput):
    """Bad input in one field of a request (``target``, ``ttl``, ``reason``, ``ticket``): the
    request modal shows it under that field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NoAccessRule(BadField):
    code = "not_allowed"
    status = 403


@dataclass(frozen=True)
class Ask:
    """What a person typed or chose: checked by :meth:`Asking.ask`, never trusted before."""

    user: str
    target: str
    ttl: str
    reason: str
    kind: str | None = None  # postgres | ssh when typed as db/ssh; None from the modal
    ticket: str | None = None


@dataclass
class Asking:
    config: Config
    store: Store
    directory: Directory

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
            if target.kind not in COMMAND_OF_KIND:  # an HTTP API: for agents' calls only
                continue
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
        return home_view.request_modal(targets, durations, channel)

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
        word = COMMAND_OF_KIND.get(target.kind)
        if word is None:
            choices = await self._choices(asked.user)
            raise BadField(
                "target",
                f"`{asked.target}` is an HTTP API: keyturn guards agents' calls to it, and "
                f"gives people access to databases and hosts only; {choices}",
            )
        if asked.kind is not None and asked.kind != target.kind:
            raise BadField(
                "target",
                f"`{asked.target}` is a{'n' if word == 'ssh' else ''} {word} target: type "
                f"`/keyturn {word} {asked.target} <ttl> <reason>`",
            )
        rule = await self.rule_for(asked.user, asked.target)
        if rule is None:
            raise NoAccessRule(
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
        details: dict[str, Any] = {"ticket": ticket} if ticket else {}
        if (group := await own_group(self.directory, rule, asked.user)) is not None:
            details[OWN_GROUP] = group
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
        if already := await access.of_requester(self.store, asked.user, asked.target):
            first = already[0].request
            raise BadField(
                "target",
                f"you already have request `{views.short(first.id)}` for "
                f"`{asked.target}` ({first.status}): see `/keyturn list`",
            )
        key = f", key {details['key']}" if "key" in details else ""
        row, _ = await requests.create_request(
            self.store,
            requests.NewRequest(
                target=asked.target,
                command=f"{target.kind} access for {asked.user} on {asked.target}, "
                f"{format_duration(ttl)}{key}",
                requester=asked.user,
                pending_ttl=rule.pending_ttl or self.config.policy.pending_ttl,
                quorum=rule.quorum,
                reason=reason,
                rule=rule.name,
                classification=details,
                grant_ttl=ttl,
                access=True,
            ),
        )
        return row


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
