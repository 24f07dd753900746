"""Bolt listeners: thin. Ack at once, call one Bot use case, tell the clicker if nothing changed."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot import commands
from bot.access import views
from bot.access.ask import Ask, BadField
from bot.access.home_view import (
    DURATION_BLOCK,
    DURATION_INPUT,
    REQUEST_MODAL,
    TARGET_BLOCK,
    TARGET_INPUT,
    TICKET_BLOCK,
    TICKET_INPUT,
    WHY_BLOCK,
    WHY_INPUT,
)
from bot.access.views import ACCESS_EXTEND, ACCESS_REVOKE
from bot.cards import APPROVE, DENY, EXTEND, REVOKE
from bot.deny_modal import DENY_MODAL, REASON_BLOCK, REASON_INPUT
from bot.people import SLACK_ERRORS, dm
from bot.run_view import VIEW_RUN
from bot.service import Bot, NotRecorded
from bot.slack_text import escape
from keyturn.aio import spawn
from keyturn.config.durations import parse_duration
from keyturn.domain import AlreadyVoted, IllegalTransition
from keyturn.errors import DatabaseUnavailable, InvalidInput, KeyturnError, NotFound
from keyturn.vault import VaultForbidden, VaultRequestError, VaultUnavailable

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
    if isinstance(exc, VaultForbidden | VaultRequestError):
        # Vault's own words name leases and roles: for the operator, not for the clicker
        log.warning("Vault refused a person's action: %s", exc.message)
        return "Vault refused that, so nothing was changed; the bot's log has Vault's answer"
    if isinstance(exc, AlreadyVoted):
        return "you already approved this request; it needs another approver"
    if isinstance(exc, IllegalTransition):
        return f"this {exc.kind} is already {exc.current}; nothing was changed"
    if isinstance(exc, NotFound):
        return f"{exc.message}; nothing was changed"
    return exc.message


Click = Callable[[str, str, dict[str, Any]], Awaitable[object]]


Listener = TypeVar("Listener", bound=Callable[..., Awaitable[None]])


def _tracked(tasks: set[asyncio.Task[Any]], listener: Listener) -> Listener:
    """``listener``, its task held in ``tasks`` while it runs.

    Bolt runs each listener in a task of its own after the ack, which nothing else holds: the
    bot drains ``tasks`` at shutdown, so a click being handled is finished, not cut off with
    its store closed under it. (Bolt reads the argument names through ``__wrapped__``.)
    """

    @functools.wraps(listener)
    async def run(**kwargs: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await listener(**kwargs)
        finally:
            tasks.discard(task)

    return run  # type: ignore[return-value]


def _on_click(
    app: AsyncApp, tasks: set[asyncio.Task[Any]], action: str | re.Pattern[str], use_case: Click
) -> None:
    """Ack, run ``use_case(value, user, body)``; a keyturn error is told to the clicker: in
    the channel they clicked in, or by DM for a click on their App Home."""

    async def listener(ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        value, user = body["actions"][0]["value"], body["user"]["id"]
        try:
            await use_case(value, user, body)
        except KeyturnError as exc:
            channel = (body.get("container") or {}).get("channel_id")
            if channel:
                await client.chat_postEphemeral(channel=channel, user=user, text=tell(exc))
            else:
                await dm(client, user, tell(exc))

    app.action(action)(_tracked(tasks, listener))


def _extension(value: str) -> tuple[str, timedelta]:
    """``<grant id>:<seconds>`` from an Extend button."""
    grant_id, _, seconds = value.partition(":")
    try:
        if not (seconds.isascii() and seconds.isdigit()):
            raise ValueError(seconds)
        return grant_id, parse_duration(int(seconds))
    except ValueError:
        raise InvalidInput("this button carries no valid extension; nothing was changed") from None


def _chosen(values: dict[str, Any], block: str, action: str) -> str:
    option = (values.get(block, {}).get(action) or {}).get("selected_option") or {}
    return str(option.get("value") or "")


def _typed(values: dict[str, Any], block: str, action: str) -> str:
    return str((values.get(block, {}).get(action) or {}).get("value") or "")


# where the request form shows a refusal, by the field it concerns
_FIELD_BLOCKS = {"ttl": DURATION_BLOCK, "reason": WHY_BLOCK, "ticket": TICKET_BLOCK}


def register(app: AsyncApp, bot: Bot) -> None:
    def tracked(listener: Listener) -> Listener:
        return _tracked(bot.tasks, listener)

    _on_click(
        app,
        bot.tasks,
        APPROVE,
        lambda request_id, user, body: bot.approve(
            request_id, user, on_card=(body.get("container") or {}).get("type") == "message"
        ),
    )
    _on_click(
        app,
        bot.tasks,
        DENY,
        lambda request_id, user, body: bot.open_deny(request_id, user, body["trigger_id"]),
    )
    _on_click(app, bot.tasks, REVOKE, lambda grant_id, user, _body: bot.revoke(grant_id, user))
    _on_click(
        app,
        bot.tasks,
        VIEW_RUN,
        lambda request_id, user, body: bot.view_run(request_id, user, body["trigger_id"]),
    )

    def extend(*, own: bool) -> Click:
        async def click(value: str, user: str, _body: dict[str, Any]) -> object:
            grant_id, extra = _extension(value)
            return await bot.extend(grant_id, user, extra, own=own)

        return click

    _on_click(app, bot.tasks, re.compile(f"^{EXTEND}_\\d+$"), extend(own=False))
    # a person's own access, from their DM or App Home
    _on_click(app, bot.tasks, re.compile(f"^{ACCESS_EXTEND}_\\d+$"), extend(own=True))
    _on_click(
        app,
        bot.tasks,
        ACCESS_REVOKE,
        lambda grant_id, user, _body: bot.revoke(grant_id, user, own=True),
    )

    @app.view(DENY_MODAL)
    @tracked
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
    @tracked
    async def keyturn_command(
        ack: AsyncAck, command: dict[str, Any], client: AsyncWebClient
    ) -> None:
        # Answered in the ack itself (Slack shows it to the person alone): each use case
        # here is one or two short transactions; what is slow (cards, credentials) follows.
        user, text = command["user_id"], (command.get("text") or "").strip()
        try:
            if text == "request":  # a form: acked empty, then opened with the trigger
                form = await bot.asking.request_form(user, command["channel_id"])
                await ack()
                await client.views_open(trigger_id=command["trigger_id"], view=form)
                return
            answer = await commands.run(bot, user, text)
        except KeyturnError as exc:
            await ack(escape(tell(exc)))  # refusals may quote what was typed: never markup
            return
        await ack(answer)
        if text.partition(" ")[0] in commands.ASKS:
            spawn(bot.tasks, bot.home.republish(requester=user))

    @app.view(REQUEST_MODAL)
    @tracked
    async def request_submitted(
        ack: AsyncAck, body: dict[str, Any], view: dict[str, Any], client: AsyncWebClient
    ) -> None:
        user, values = body["user"]["id"], view["state"]["values"]
        asked = Ask(
            user,
            _chosen(values, TARGET_BLOCK, TARGET_INPUT),
            _chosen(values, DURATION_BLOCK, DURATION_INPUT),
            _typed(values, WHY_BLOCK, WHY_INPUT),
            ticket=_typed(values, TICKET_BLOCK, TICKET_INPUT) or None,
        )
        try:
            row = await bot.asking.ask(asked)
        except BadField as exc:
            block = _FIELD_BLOCKS.get(exc.field, TARGET_BLOCK)
            await ack(response_action="errors", errors={block: tell(exc)})
            return
        except KeyturnError as exc:
            await ack(response_action="errors", errors={TARGET_BLOCK: tell(exc)})
            return
        await ack()
        channel = view.get("private_metadata") or ""
        text = views.confirmation(
            row.id, row.target, row.grant_ttl_seconds or 0, bot.config.approval_channel(row.target)
        )
        try:
            if channel.startswith(("C", "G")):
                await client.chat_postEphemeral(channel=channel, user=user, text=text)
            else:
                await dm(client, user, text)
        except SLACK_ERRORS as exc:
            log.warning("could not confirm request %s to %s: %s", row.id, user, exc)
        spawn(bot.tasks, bot.home.republish(requester=user))

    @app.event("app_home_opened")
    @tracked
    async def home_opened(event: dict[str, Any]) -> None:
        if event.get("tab", "home") == "home":
            await bot.home.publish_home(event["user"])

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        log.error("listener failed on a %s payload: %r", body.get("type"), error)
