"""A run as an approver sees it: the steps before a held command on its card, and the whole
timeline in a modal (View run), newest first. Pure: no Slack calls.

Every step is keyturn's words (when, what happened) around the agent's text set apart by
:func:`bot.slack_text.literal`; outputs are never shown here, only their size: a card goes to
a channel, and an output is the agent's to read.
"""

from __future__ import annotations

from typing import Any

from bot.slack_text import at, escape, literal
from keyturn.recording.runs import RunSoFar, Step

VIEW_RUN = "keyturn_view_run"
CARD_STEPS = 5  # the steps before a held command its card shows
MODAL_BLOCKS = 100  # Slack's limit for a view
MODAL_STEPS = MODAL_BLOCKS - 2  # and a heading and an "…and N earlier" line
COMMAND_CHARS = 90  # of each step's command on a card or in the modal


_ICONS = {
    "blocked": ":no_entry:",
    "allowed": ":white_check_mark:",
    "approved": ":heavy_check_mark:",
    "denied": ":x:",
    "held": ":hourglass:",
}


def _outcome(step: Step) -> str:
    """How a step went (:attr:`~keyturn.recording.runs.Step.outcome`) in Slack's words. Its
    deciders are named, never mentioned: a card's context must not ping them again."""
    went = step.outcome
    who = f" by {', '.join(literal(p) for p in went.people)}" if went.people else ""
    rule = f" by rule {literal(step.rule)}" if went.word == "blocked" and step.rule else ""
    note = f" ({escape(went.note)})" if went.note else ""
    return f"{_ICONS[went.word]} {went.word}{who}{rule}{note}"


def step_line(step: Step) -> str:
    """One step on one line: when, where, what happened, the command (cut, set apart)."""
    command = (
        step.command if len(step.command) <= COMMAND_CHARS else step.command[:COMMAND_CHARS] + "…"
    )
    size = f" · output {step.recording.bytes} B" if step.recording is not None else ""
    return f"{at(step.at)} · {literal(step.target)} · {_outcome(step)}{size}\n{literal(command)}"


def card_blocks(run: RunSoFar, request_id: str) -> list[dict[str, Any]]:
    """The card's "run so far": the last steps before this one, and a View run button."""
    if run.earlier is None:
        earlier = "many earlier steps"
    else:
        earlier = f"{run.earlier} earlier step{'s' if run.earlier != 1 else ''}"
    if not run.steps:
        head = f"*Run* {literal(run.name)}: this is its first step."
    else:
        more = f", and {earlier}" if run.earlier != 0 else ""
        head = (
            f"*Run so far* {literal(run.name)}: the last {len(run.steps)} steps before this "
            f"one{more} (already decided; outputs are not shown here)"
        )
    lines = "\n".join(f"• {step_line(s)}" for s in run.steps)
    text = head + ("\n" + lines if lines else "")
    return [
        _section(text) | {"block_id": "run"},
        {
            "type": "actions",
            "block_id": "run_actions",
            "elements": [
                {
                    "type": "button",
                    "action_id": VIEW_RUN,
                    "value": request_id,
                    "text": {"type": "plain_text", "text": "View run"},
                }
            ],
        },
    ]


def run_modal(run: RunSoFar, agent: str) -> dict[str, Any]:
    """The run up to a held command, newest first, within Slack's 100 blocks: the newest
    steps that fit, and how many earlier ones there are."""
    dropped = max(len(run.steps) - MODAL_STEPS, 0)
    steps = run.steps[dropped:]
    earlier = None if run.earlier is None else run.earlier + dropped
    first = None if earlier is None else earlier + 1
    total = "many steps" if first is None else f"{first + len(steps) - 1} steps"
    head = f"*{total}* of run {literal(run.name)} by {literal(agent)}, newest first"
    blocks: list[dict[str, Any]] = [_section(head)]
    for i, step in reversed(list(enumerate(steps))):
        number = f"*{first + i}.* " if first is not None else ""
        blocks.append(_section(f"{number}{step_line(step)}"))
    if earlier != 0:
        more = f"…and {'many' if earlier is None else earlier} earlier: "
        more += f"keyturn runs show {literal(run.name)}"
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    title = "Run " + run.name
    return {
        "type": "modal",
        "title": {"type": "plain_text", "text": title if len(title) <= 24 else title[:23] + "…"},
        "close": {"type": "plain_text", "text": "Close"},
        "blocks": blocks,
    }


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:2990]}}
