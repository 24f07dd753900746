"""Text that is safe to put in Slack, from anyone's words: escaped, literal, cut to Slack's
limits. Pure: no Slack calls here.

Everything that came from an agent or a person (command, reason, run id, identity) is escaped,
so ``<!channel>``, ``<@U…>`` or ``<http://x|y>`` inside it render as text and ping nobody.
Only Slack user ids keyturn itself knows (approvers, a well-formed on-behalf-of id) become
mentions.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from keyturn.classify.shown import Shown, visible
from keyturn.config.durations import format_duration

_SLACK_USER = re.compile(r"^[UW][A-Z0-9_]{2,30}$")


_MAX_COMMAND = 2800  # a section's text is limited to 3,000 characters


def escape(text: str) -> str:
    """Slack's mrkdwn escaping: with ``&``, ``<`` and ``>`` escaped nothing is a control word."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# What another writer's text may not carry into a card: line breaks (shown as ⏎) and the
# backtick that would end the inline code it is shown in (shown as U+02CB, its look-alike).
ONE_LINE = str.maketrans({"\r": "", "\n": "⏎"})


_LITERAL = ONE_LINE | str.maketrans({"`": "\u02cb"})


LITERAL_MAX = 300  # characters of another writer's text on a card: it cannot crowd out ours


def literal(text: str) -> str:
    """Text an agent or a requester wrote (a reason, run id, on-behalf-of, ticket, their
    name, an error the target quoted), shown inert and set apart from keyturn's own words:
    inline code, where Slack formats nothing, on one line, at most :data:`LITERAL_MAX`
    characters, with every other invisible or direction-changing character shown as
    ``⟦U+…⟧`` and ``&<>`` escaped so nothing is a link or a mention."""
    shown = visible(text.translate(_LITERAL))[0]
    if len(shown) > LITERAL_MAX:
        shown = shown[: LITERAL_MAX - 1] + "…"
    return f"`{escape(shown)}`" if shown else "—"


def mention(user: str | None) -> str:
    if user and _SLACK_USER.match(user):
        return f"<@{user}>"
    return literal(user or "")


_FENCE = re.compile("`{3,}")  # any run of three or more: four would still close a fence


def code_block(text: str) -> str:
    """``text`` as a code block; callers keep it within a section (see :func:`chunks`)."""
    body = _FENCE.sub(lambda run: "\u200b".join(run.group()), escape(text))  # ``` ends ours
    if body.startswith("`"):  # nor may a backtick at either end join our own fence
        body = "\u200b" + body
    if body.endswith("`"):
        body += "\u200b"
    return f"```{body}```"


# What a character costs inside a code block: escaped entities, and at most one zero-width
# space per backtick where a fence is broken up (and one at either end).
_COST = {"&": 5, "<": 4, ">": 4, "`": 2}


def chunks(text: str, size: int = _MAX_COMMAND) -> list[str]:
    """``text`` cut into pieces whose code blocks fit a section: at line ends where it can,
    inside a line where it must. Every character is kept."""
    out: list[str] = []
    piece: list[str] = []
    used = 0
    for line in text.splitlines(keepends=True):
        for char in line:
            cost = _COST.get(char, 1)
            if used + cost > size:
                out.append("".join(piece))
                piece, used = [], 0
            piece.append(char)
            used += cost
        if used > size * 3 // 4:  # near full: start the next line in a new piece
            out.append("".join(piece))
            piece, used = [], 0
    if piece or not out:
        out.append("".join(piece))
    return [p.rstrip("\n") for p in out]


def amount(what: Shown, shell: bool) -> str:
    """ "2 statements", "1 command": how much the card shows (beside the sha256 it binds)."""
    noun = "command" if shell else "statement"
    return f"{len(what.parts)} {noun}{'s' if len(what.parts) != 1 else ''}"


def approver_reminder(
    users: list[str], usergroup: str | None, waited: timedelta, expires_at: datetime
) -> str:
    """The nudge in a card's thread at half its pending TTL."""
    who = [f"<@{u}>" for u in users] + ([f"<!subteam^{usergroup}>"] if usergroup else [])
    return (
        f":bell: {' '.join(who) or 'Approvers'}: this request has waited "
        f"{format_duration(waited)}; it expires at {at(expires_at)}."
    )


def at(when: datetime) -> str:
    return f"{when:%H:%M:%S} UTC"
