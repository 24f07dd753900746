"""The App Home tab and the ``/keyturn request`` modal. Pure: no Slack calls."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from bot.access.views import (
    MAX_REASON,
    MAX_TICKET,
    Line,
    Waiting,
    describe,
    grant_actions,
    listing,
    waiting_text,
)
from bot.cards import APPROVE, DENY, KIND_WORDS, button
from bot.run_view import VIEW_RUN
from bot.slack_text import at
from keyturn.config.durations import format_duration

REQUEST_MODAL = "keyturn_request"
TARGET_BLOCK, TARGET_INPUT = "target", "target_input"
DURATION_BLOCK, DURATION_INPUT = "duration", "duration_input"
WHY_BLOCK, WHY_INPUT = "why", "why_input"
TICKET_BLOCK, TICKET_INPUT = "ticket", "ticket_input"
# Slack refuses a view of more than 100 blocks: the App Home shows at most this many of each
HOME_ACCESS, HOME_WAITING = 15, 25


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def home(lines: list[Line], waiting: list[Waiting], now: datetime) -> dict[str, Any]:
    """The App Home tab: my access (Extend, End now), then requests waiting on me."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": "Your access"}}
    ]
    if not lines:
        blocks.append(_section(listing([], now)))
    for line in lines[:HOME_ACCESS]:
        blocks.append(_section(describe(line, now)))
        if line.open:
            blocks += grant_actions(line, revoke=True)
    if len(lines) > HOME_ACCESS:
        blocks.append(_section(f"…and {len(lines) - HOME_ACCESS} more: `/keyturn list`"))
    blocks += [
        {"type": "divider"},
        {"type": "header", "text": {"type": "plain_text", "text": "Waiting on you"}},
    ]
    if not waiting:
        blocks.append(_section("Nothing is waiting on you."))
    for w in waiting[:HOME_WAITING]:
        blocks.append(_section(waiting_text(w)))
        if w.access:  # a command is decided on its card only: see _waiting_text
            block = f"decide_{w.request_id}"
            elements = [
                button(APPROVE, "Approve", w.request_id, "primary"),
                button(DENY, "Deny", w.request_id, "danger"),
            ]
        else:  # an agent's command: what its run did before it
            block, elements = f"run_{w.request_id}", [button(VIEW_RUN, "View run", w.request_id)]
        blocks.append({"type": "actions", "block_id": block, "elements": elements})
    if len(waiting) > HOME_WAITING:
        blocks.append(_section(f"…and {len(waiting) - HOME_WAITING} more: `/keyturn pending`"))
    blocks.append(
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": f"Updated {at(now)} · `/keyturn help`"}],
        }
    )
    return {"type": "home", "blocks": blocks}


def request_modal(
    targets: list[tuple[str, str]], durations: list[timedelta], channel: str
) -> dict[str, Any]:
    """``/keyturn request``: ``targets`` as (name, kind) this person may ask for."""

    def option(text: str, value: str) -> dict[str, Any]:
        return {"text": {"type": "plain_text", "text": text}, "value": value}

    def field(block: str, action: str, label: str, element: dict[str, Any], **kw: Any) -> Any:
        element = element | {"action_id": action}
        return {
            "type": "input",
            "block_id": block,
            "label": _plain(label),
            "element": element,
            **kw,
        }

    return {
        "type": "modal",
        "callback_id": REQUEST_MODAL,
        "private_metadata": channel,
        "title": _plain("Request access"),
        "submit": _plain("Request"),
        "close": _plain("Cancel"),
        "blocks": [
            field(
                TARGET_BLOCK,
                TARGET_INPUT,
                "Target",
                {
                    "type": "static_select",
                    "options": [
                        option(f"{name} ({KIND_WORDS.get(kind, kind)})", name)
                        for name, kind in targets
                    ],
                },
            ),
            field(
                DURATION_BLOCK,
                DURATION_INPUT,
                "For how long",
                {
                    "type": "static_select",
                    "options": [
                        option(format_duration(d), format_duration(d)) for d in sorted(durations)
                    ],
                },
            ),
            field(
                WHY_BLOCK,
                WHY_INPUT,
                "Why? Approvers see this.",
                {"type": "plain_text_input", "multiline": True, "max_length": MAX_REASON},
            ),
            field(
                TICKET_BLOCK,
                TICKET_INPUT,
                "Ticket or incident link",
                {"type": "plain_text_input", "max_length": MAX_TICKET},
                optional=True,
            ),
        ],
    }


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text}
