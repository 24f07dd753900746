"""Who the bot is in Slack, for Bolt's authorization of each request Slack sends.

Bolt's default for one workspace asks Slack's Web API (``auth.test``) at the first request it
receives and refuses that request when the Web API does not answer: an Approve clicked while
Slack's Web API fails (a partial outage, a storm of 5xx) would be turned away, and a restarted
bot would turn away every click until the Web API is back. keyturn holds the bot token and
the signing secret has already proved the request is Slack's, so requests are authorized with
the token at once; ``auth.test`` (the bot's user and bot ids) is asked in the background until
it answers once, and added from then on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.authorization import AuthorizeResult
from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 10.0


class SlackIdentity:
    def __init__(self, client: AsyncWebClient) -> None:
        self._client = client
        self._ids: dict[str, Any] | None = None  # auth.test's answer, once Slack gave it
        self._lookup: asyncio.Task[None] | None = None

    def authorizer(self) -> Callable[..., Awaitable[AuthorizeResult]]:
        """Bolt's ``authorize`` (a plain function: Bolt passes arguments by their names)."""

        async def authorize(
            enterprise_id: str | None, team_id: str | None, user_id: str | None
        ) -> AuthorizeResult:
            return self.result(enterprise_id, team_id, user_id)

        return authorize

    def result(
        self, enterprise_id: str | None, team_id: str | None, user_id: str | None
    ) -> AuthorizeResult:
        """Never waits on Slack's Web API: the ids are added once auth.test has answered."""
        if self._ids is None and (self._lookup is None or self._lookup.done()):
            self._lookup = asyncio.create_task(self._look_up(), name="keyturn-slack-identity")
        ids = self._ids or {}
        return AuthorizeResult(
            enterprise_id=enterprise_id or ids.get("enterprise_id"),
            team_id=team_id or ids.get("team_id"),
            bot_token=self._client.token,
            bot_id=ids.get("bot_id"),
            bot_user_id=ids.get("user_id"),
            user_id=user_id,
        )

    async def _look_up(self) -> None:
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                answer = await self._client.auth_test()
        except Exception as exc:  # Slack's Web API away: the next request asks again
            log.warning("Slack's auth.test did not answer (%s); asking again later", exc)
            return
        self._ids = dict(answer.data) if isinstance(answer.data, dict) else {}
