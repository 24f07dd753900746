"""Bolt listeners: thin. Ack at once, call one Bot use case, tell the clicker if nothing changed."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot import commands
from bot.cards import APPROVE, DENY, DENY_MODAL, EXTEND, REASON_BLOCK, REASON_INPUT, REVOKE, escape
from bot.service import Bot, NotRecorded
from keyturn.domain import AlreadyVoted, IllegalTransition
from keyturn.errors import DatabaseUnavailable, KeyturnError, NotFound
from keyturn.vault import VaultUnavailable

log = logging.getLogger(__name__)


def tell(exc: KeyturnError) -> str:
    """What a person reads when their click changed nothing: the one place that says it."""
    if isinstance(exc, NotRecorded):
        return exc.message
    if isinstance(exc, DatabaseUnavailable):
        return (
            "keyturn cannot reach its database right now; nothing was decided — "
            "try again in a minute"
        )
    if isinstance(exc, VaultUnavailable):
        return "keyturn cannot reach Vault right now; nothing was changed — try again in a minute"
    if isinstance(exc, AlreadyVoted):
        return "you already approved this request; it needs another approver"
    if isinstance(exc, IllegalTransition):
        return f"this {exc.kind} is already {exc.current}; nothing was changed"
    if isinstance(exc, NotFound):
        return f"{exc.message}; nothing was changed"
    return exc.message


def _clicked(body: dict[str, Any]) -> tuple[str, str, str]:
    """(button value, user, channel) of a button click."""
    return body["actions"][0]["value"], body["user"]["id"], body["container"]["channel_id"]


Click = Callable[[str, str, dict[str, Any]], Awaitable[None]]


def _on_click(app: AsyncApp, action: str | re.Pattern[str], use_case: Click) -> None:
    """Ack, run ``use_case(value, user, body)``; a keyturn error is told to the clicker."""

    async def listener(ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        value, user, channel = _clicked(body)
        try:
            await use_case(value, user, body)
        except KeyturnError as exc:
            await client.chat_postEphemeral(channel=channel, user=user, text=tell(exc))

    app.action(action)(listener)


def register(app: AsyncApp, bot: Bot) -> None:
    _on_click(app, APPROVE, lambda request_id, user, _body: bot.approve(request_id, user))
    _on_click(
        app,
        DENY,
        lambda request_id, user, body: bot.open_deny(request_id, user, body["trigger_id"]),
    )
    _on_click(app, REVOKE, lambda grant_id, user, _body: bot.revoke(grant_id, user))
    _on_click(
        app, re.compile(f"^{EXTEND}_\\d+$"), lambda value, user, _body: bot.extend(value, user)
    )

    @app.view(DENY_MODAL)
    async def deny_reason(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        # Decide before acking (a few ms): a refusal goes back into the modal itself.
        reason = view["state"]["values"][REASON_BLOCK][REASON_INPUT].get("value") or ""
        try:
            await bot.deny(view["private_metadata"], body["user"]["id"], reason)
        except KeyturnError as exc:
            await ack(response_action="errors", errors={REASON_BLOCK: tell(exc)})
        else:
            await ack()

    @app.command("/keyturn")
    async def keyturn_command(ack: AsyncAck, command: dict[str, Any]) -> None:
        # Answered in the ack itself (Slack shows it to the person alone): each use case
        # here is one short transaction.
        try:
            answer = await commands.run(bot.store, command["user_id"], command.get("text") or "")
        except KeyturnError as exc:
            answer = escape(tell(exc))  # refusals may quote what was typed: never markup
        await ack(answer)

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        log.error("listener failed on a %s payload: %r", body.get("type"), error)
