"""The deny modal: a deny needs a reason, which goes back to the agent. Pure: no Slack calls."""

from __future__ import annotations

from typing import Any

from keyturn.domain import MAX_REASON

DENY_MODAL = "keyturn_deny_reason"
REASON_BLOCK = "reason"
REASON_INPUT = "reason_input"


def deny_modal(request_id: str) -> dict[str, Any]:
    return {
        "type": "modal",
        "callback_id": DENY_MODAL,
        "private_metadata": request_id,
        "title": {"type": "plain_text", "text": "Deny request"},
        "submit": {"type": "plain_text", "text": "Deny"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "label": {"type": "plain_text", "text": "Why? The agent will see this."},
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_INPUT,
                    "multiline": True,
                    "max_length": MAX_REASON,
                },
            }
        ],
    }
