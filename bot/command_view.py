"""A command as an approver reads it: every statement (or simple command) numbered, as it
will run, with its sha256; what a card cannot hold goes to its thread, complete. Nothing is
ever cut silently. Pure: no Slack calls here."""

from __future__ import annotations

from typing import Any

from bot.slack_text import amount, chunks, code_block, escape
from keyturn.classify.shown import shown

_CARD_PIECES = 4  # longer commands go to the card's thread in full


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
    request_id: str, command: str, shell: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """The card's blocks for the command, and the thread messages that carry the rest of it
    when it is longer than a card holds. Nothing is ever cut silently."""
    what = shown(command, shell)
    summary = f"*{amount(what, shell)}* · sha256 `{what.sha256[:16]}`"
    if what.hidden:
        summary += (
            "\n:warning: *Invisible or direction-changing characters*, shown as ⟦U+…⟧: "
            + escape(", ".join(what.hidden[:6]))
            + (f" and {len(what.hidden) - 6} more" if len(what.hidden) > 6 else "")
        )
    pieces = chunks(listing(command, shell))
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
