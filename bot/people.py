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
from keyturn.config.rules import People
from keyturn.domain import Deciders
from keyturn.store.models import RequestRow

SLACK_ERRORS = (SlackApiError, OSError, asyncio.TimeoutError)


class Directory:
    """Listed users, plus members of a Slack user group (cached for ``ttl`` seconds)."""

    def __init__(self, client: AsyncWebClient, ttl: float) -> None:
        self._client = client
        self._ttl = ttl
        self._groups: dict[str, tuple[float, frozenset[str]]] = {}

    async def members(self, usergroup: str) -> frozenset[str]:
        cached = self._groups.get(usergroup)
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        resp = await self._client.usergroups_users_list(usergroup=usergroup)
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
            members = await self.members(group)
            # the requester themself hears of self-approval instead
            barred = user != row.requester and user in members and row.requester in members
        return Deciders(
            frozenset({user}) if may else frozenset(), frozenset({user}) if barred else frozenset()
        )


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
