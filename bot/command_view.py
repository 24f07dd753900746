"""A command as an approver reads it: every statement (or simple command) numbered, as it
will run, with its sha256; what a card cannot hold goes to its thread, complete. Nothing is
ever cut silently. Pure: no Slack calls here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bot.slack_text import amount, chunks, code_block, escape
from keyturn.classify.http import HttpCall, parse_call
from keyturn.classify.shown import Part, Shown, shown, visible
from keyturn.errors import InvalidInput

_CARD_PIECES = 4  # longer commands go to the card's thread in full


@dataclass(frozen=True)
class ApiView:
    """What a card shows of an HTTP target around a call: where it goes, which header
    will carry the credential (named, never shown), and the OpenAPI operation."""

    base_url: str
    credential_header: str | None
    operation: str | None = None  # "createRefund: Refund part of an order"


def call_listing(call: HttpCall, api: ApiView) -> str:
    """The request as it will be sent. A JSON body is pretty-printed (the bytes sent are the
    compact form whose length and sha256 the summary gives); any other body is shown as one
    quoted string with every line break and control character escaped, so blank lines or
    carriage returns cannot push part of it out of an approver's sight."""
    lines = [f"{call.method} {api.base_url}{call.target}"]
    lines += [f"{name}: {value}" for name, value in call.headers]
    if api.credential_header:
        lines.append(f"{api.credential_header}: (the credential from Vault, added when sent)")
    if call.is_json:
        lines += ["", json.dumps(call.data, indent=2, ensure_ascii=False)]
    elif call.body:
        lines += ["", json.dumps(call.body, ensure_ascii=False)]
    return "\n".join(lines)


def _call_summary(command: str, api: ApiView) -> tuple[Shown, str, str]:
    """(what is shown, the summary line, the listing) of an HTTP call."""
    sha = hashlib.sha256(command.encode()).hexdigest()
    try:
        call = parse_call(command)
    except InvalidInput:  # never stored so; shown raw and flagged rather than hidden
        text, hidden = visible(command)
        return Shown(sha, (Part("HTTP", text),), tuple(hidden)), "*HTTP call (unreadable)*", text
    text, hidden = visible(call_listing(call, api))
    summary = f"*HTTP {call.method}*"
    if api.operation:
        summary += f" · operation `{escape(api.operation)}`"
    if call.body:
        summary += f" · body {len(call.body_bytes)} bytes, sha256 `{call.body_sha256[:16]}`"
    return Shown(sha, (Part("HTTP", text),), tuple(hidden)), summary, text


def listing(command: str, shell: bool) -> str:
    """Every statement (or simple command) numbered, as it will run."""
    what = shown(command, shell)
    if what.line is not None:  # the exact line, then each command's arguments
        commands = "\n".join(
            f"# {i}: {part.text}" for i, part in enumerate(what.parts, 1) if part.kind != "UNPARSED"
        )
        return f"$ {what.line}\n{commands}" if commands else f"$ {what.line}"
    if len(what.parts) == 1:
        return what.parts[0].text
    return "\n".join(f"-- {i}: {part.kind}\n{part.text};" for i, part in enumerate(what.parts, 1))


def command_blocks(
    request_id: str, command: str, shell: bool, api: ApiView | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The card's blocks for the command, and the thread messages that carry the rest of it
    when it is longer than a card holds. Nothing is ever cut silently. ``api``: the command
    is a call to that HTTP target."""
    if api is not None:
        what, summary, text = _call_summary(command, api)
        summary += f" · sha256 `{what.sha256[:16]}`"
    else:
        what, text = shown(command, shell), listing(command, shell)
        summary = f"*{amount(what, shell)}* · sha256 `{what.sha256[:16]}`"
    if what.hidden:
        summary += (
            "\n:warning: *Invisible or direction-changing characters*, shown as ⟦U+…⟧: "
            + escape(", ".join(what.hidden[:6]))
            + (f" and {len(what.hidden) - 6} more" if len(what.hidden) > 6 else "")
        )
    pieces = chunks(text)
    on_card, thread = pieces, []
    if len(pieces) > _CARD_PIECES:
        on_card, thread = (
            pieces[:1],
            [
                f"Request `{request_id}`, the command in full ({i}/{len(pieces)}):\n{code_block(p)}"
                for i, p in enumerate(pieces, 1)
            ],
        )
        summary += (
            f"\n:warning: *Longer than a card holds*: the beginning is below; the complete "
            f"command is in this card's thread, in {len(pieces)} parts."
        )
    blocks: list[dict[str, Any]] = [
        {"type": "section", "block_id": "what", "text": {"type": "mrkdwn", "text": summary}}
    ]
    blocks += [
        {"type": "section", "block_id": f"command_{i}", "text": {"type": "mrkdwn", "text": t}}
        for i, t in enumerate(code_block(p) for p in on_card)
    ]
    return blocks, thread
