"""Slack people: who may decide a request, who is in which user group, how to reach one.

Who decides comes from the policy: an agent's request from the rule that held it (else
``slack.approvers``), a person's access from its access rule, which may also bar the
requester's own user group. Groups are resolved through Slack's API and cached briefly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from keyturn.config.policy import Config
from keyturn.config.rules import AccessRule, People
from keyturn.domain import Deciders
from keyturn.errors import Unavailable
from keyturn.store.models import RequestRow

SLACK_ERRORS = (SlackApiError, OSError, asyncio.TimeoutError)
LOOKUP_SECONDS = 2.0  # one user group lookup, retries included
FAILURE_SECONDS = 10.0  # a failed lookup is not tried again sooner


class SlackUnavailable(Unavailable):
    code = "slack_unavailable"


class Directory:
    """Listed users, plus members of a Slack user group (cached for ``ttl`` seconds)."""

    def __init__(self, client: AsyncWebClient, ttl: float) -> None:
        self._client = client
        self._ttl = ttl
        self._groups: dict[str, tuple[float, frozenset[str]]] = {}
        self._failures: dict[str, tuple[float, str]] = {}  # usergroup -> (when, why)

    async def members(self, usergroup: str) -> frozenset[str]:
        """Who is in ``usergroup`` (cached); SlackUnavailable when Slack cannot say: whoever
        needed to know is told that nothing was changed, and nothing is.

        Bounded: a person's click or ``/keyturn`` is answered within Slack's 3 s, so one
        lookup waits at most :data:`LOOKUP_SECONDS` (the client's own retries included) and a
        failure is remembered for :data:`FAILURE_SECONDS`, not met again request by request."""
        now = time.monotonic()
        cached = self._groups.get(usergroup)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        failed = self._failures.get(usergroup)
        if failed is not None and now - failed[0] < FAILURE_SECONDS:
            raise SlackUnavailable(failed[1])
        try:
            async with asyncio.timeout(LOOKUP_SECONDS):
                resp = await self._client.usergroups_users_list(usergroup=usergroup)
        except SLACK_ERRORS as exc:
            why = "it took too long" if isinstance(exc, TimeoutError) else str(exc)
            message = (
                f"keyturn cannot read Slack user group {usergroup} right now ({why}); nothing "
                "was changed — try again in a minute"
            )
            self._failures[usergroup] = (now, message)
            raise SlackUnavailable(message) from None
        self._failures.pop(usergroup, None)
        members = frozenset(resp.get("users") or [])
        self._groups[usergroup] = (time.monotonic(), members)
        return members

    async def allows(self, user: str, people: People | None) -> bool:
        if people is None:
            return False
        if user in people.users:
            return True
        if not people.slack_usergroup:
            return False
        return user in await self.members(people.slack_usergroup)

    async def deciders(self, config: Config, row: RequestRow, user: str) -> Deciders:
        """Whether ``user`` may decide ``row``, resolved for :class:`keyturn.domain.Deciders`
        (which checks it with every other rule of voting, under the request's lock).

        Resolved for this one person, as far as it takes: someone the policy lists needs no
        call to Slack, so a user group Slack cannot list now stops only its members' votes."""
        may = await self.allows(user, approvers_for(config, row))
        rule = config.policy.access_rule(row.rule) if row.access else None
        group = rule.requesters.slack_usergroup if rule is not None else None
        barred = False
        if may and rule is not None and group and not rule.own_group_may_approve:
            # the group as it was when the requester asked (see own_group); leaving it since,
            # or taking a peer out of it, bars nobody less. The requester themself hears of
            # self-approval instead.
            asked = (row.classification or {}).get(OWN_GROUP)
            if not isinstance(asked, list):  # asked before keyturn kept it: the group now
                asked = await own_group(self, rule, row.requester) or []
            barred = user != row.requester and user in asked
        return Deciders(
            frozenset({user}) if may else frozenset(), frozenset({user}) if barred else frozenset()
        )


OWN_GROUP = "own_group"  # where a request for access keeps its requester's own group


async def own_group(directory: Directory, rule: AccessRule, requester: str) -> list[str] | None:
    """The members of ``requester``'s own group, kept with their request when its access rule
    wants an approver from outside it: who is barred is settled when they ask, so nobody
    changing the group later (the requester leaving it, a peer taking themself out) moves
    the bar."""
    group = rule.requesters.slack_usergroup
    if not group or rule.own_group_may_approve:
        return None
    members = await directory.members(group)
    return sorted(members) if requester in members else []


def approvers_for(config: Config, row: RequestRow) -> People | None:
    """Who may decide ``row``: its access rule's approvers for a person's access (nobody, once the
    rule has left the policy); for an agent's command, its rule's, else ``slack.approvers``."""
    if row.access:
        rule = config.policy.access_rule(row.rule)
        return rule.approvers if rule is not None else None
    agent_rule = next((r for r in config.policy.rules if r.name == row.rule), None)
    if agent_rule is not None and agent_rule.approvers is not None:
        return agent_rule.approvers
    return config.slack.approvers


async def dm(
    client: AsyncWebClient, user: str, text: str, blocks: list[dict[str, Any]] | None = None
) -> None:
    """Post to ``user``'s DM with the app (credentials go nowhere else)."""
    opened = await client.conversations_open(users=user)
    await client.chat_postMessage(channel=opened["channel"]["id"], text=text, blocks=blocks)
