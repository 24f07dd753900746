"""Approval cards as Block Kit, from a request's state. Pure: no Slack calls here.

Whatever came from an agent or a person is written through :mod:`bot.slack_text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bot.command_view import ApiView, command_blocks
from bot.run_view import card_blocks as run_blocks
from bot.slack_text import ONE_LINE, escape, literal, mention
from keyturn.classify.shown import visible
from keyturn.config.durations import format_duration
from keyturn.recording.runs import RunSoFar

APPROVE = "keyturn_approve"
DENY = "keyturn_deny"
REVOKE = "keyturn_revoke"
EXTEND = "keyturn_extend"  # one button per choice: keyturn_extend_<seconds>


@dataclass(frozen=True)
class Vote:
    approver: str
    decision: str
    reason: str | None = None


@dataclass(frozen=True)
class CardState:
    id: str
    target: str
    command: str
    requester: str
    status: str
    quorum: int
    pending_expires_at: datetime
    shell: bool = False  # an SSH target's command (else SQL)
    api: ApiView | None = None  # an HTTP target's call
    rule: str | None = None
    reasons: list[str] = field(default_factory=list)
    run_id: str | None = None
    on_behalf_of: str | None = None
    reason: str | None = None
    estimated_rows: int | None = None
    grant_ttl_seconds: int | None = None
    votes: list[Vote] = field(default_factory=list)
    error: str | None = None
    credentials: Credentials | None = None
    ran: str | None = None  # what the approved run reported: command tags or an exit status
    # a person's request for access of their own (postgres | ssh), not an agent's command
    access_kind: str | None = None
    ticket: str | None = None
    max_ttl_seconds: int | None = None  # how far the requester may extend it
    ssh_key: str | None = None  # the fingerprint an SSH access's certificate is for
    run: RunSoFar | None = None  # an agent's steps before this one in its run


@dataclass(frozen=True)
class Credentials:
    """The grant behind an approved request, as its card shows it."""

    grant_id: str | None  # None while issuance waits for Vault
    status: str  # active | revoked | expired | pending
    expires_at: datetime | None = None
    ended_by: str | None = None
    note: str | None = None  # why issuance is waiting
    extend_choices: list[int] = field(default_factory=list)  # seconds, all within max TTL


def _duration(seconds: int | None) -> str:
    return format_duration(timedelta(seconds=seconds)) if seconds else "—"


def _outcome(state: CardState) -> str:
    approvers = [v.approver for v in state.votes if v.decision == "approve"]
    who = ", ".join(mention(a) for a in approvers)
    denial = next((v for v in state.votes if v.decision == "deny"), None)
    if state.status == "pending":
        return f"Approvals: {len(approvers)}/{state.quorum}" + (f" ({who})" if who else "")
    if state.status == "denied" and denial is not None:
        return f":x: Denied by {mention(denial.approver)}: {literal(denial.reason or '')}"
    if state.status == "expired":
        return ":hourglass: Expired: nobody decided in time"
    if state.status == "cancelled":
        return ":no_entry_sign: Cancelled by the requester"
    if state.status == "failed" and state.error:
        who_text = who or "policy"
        return f":warning: Approved by {who_text}; failed: {literal(state.error)}"
    verbs = _ACCESS_VERBS if state.access_kind else _VERBS
    verb = verbs.get(state.status, state.status)
    ran = f": `{escape(state.ran)}`" if state.status == "executed" and state.ran else ""
    return f":white_check_mark: {verb} by {who or 'policy'}{ran}"


_VERBS = {
    "approved": "Approved",
    "executing": "Approved, running",
    "executed": "Approved and run",
    "failed": "Approved; the run failed",
}
_ACCESS_VERBS = {
    "approved": "Approved",
    "executing": "Approved, access open",
    "executed": "Approved; the access is over",
    "failed": "Approved; nothing could be issued",
}
_ACCESS_HEADERS = {
    "pending": "Access requested",
    "executing": "Approved: access open",
    "executed": "Access over",
    "failed": "Approved: failed",
}
KIND_WORDS = {"postgres": "database login", "ssh": "SSH certificate"}


# The card's title says where the request stands, so a glance at the channel tells.
_HEADERS = {
    "pending": "Approval needed",
    "approved": "Approved",
    "executing": "Approved: running",
    "executed": "Approved and run",
    "failed": "Approved: failed",
    "denied": "Denied",
    "expired": "Expired",
    "cancelled": "Cancelled",
}


def card_text(state: CardState) -> str:
    """The notification text (shown where blocks are not)."""
    rule = f" ({escape(state.rule)})" if state.rule else ""
    what = "Access requested" if state.access_kind else "Approval needed"
    return f"{what} on {escape(state.target)}{rule}: {state.status}"


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": text, "emoji": False}}


def _access_blocks(state: CardState) -> list[dict[str, Any]]:
    """What a person asked for, in place of a command: the card says what access, for how long."""
    kind = KIND_WORDS.get(state.access_kind or "", "access")
    fields = [
        f"*Requester*\n{mention(state.requester)}",
        f"*Target*\n`{escape(state.target)}`",
        f"*Access*\n{kind}",
        f"*For*\n{_duration(state.grant_ttl_seconds)}",
    ]
    extend = (
        f" (they may extend it up to {_duration(state.max_ttl_seconds)} in all)"
        if state.max_ttl_seconds and state.max_ttl_seconds > (state.grant_ttl_seconds or 0)
        else ""
    )
    text = (
        f":bust_in_silhouette: *Human request for access*, not a single command: "
        f"{mention(state.requester)} would get their own {kind} on `{escape(state.target)}` "
        f"for {_duration(state.grant_ttl_seconds)}{extend}."
    )
    if state.ssh_key:
        text += f" The certificate is for their key `{escape(state.ssh_key)}`."
    return [
        _header(_ACCESS_HEADERS.get(state.status) or _HEADERS[state.status]),
        {
            "type": "section",
            "block_id": "who",
            "fields": [{"type": "mrkdwn", "text": f} for f in fields],
        },
        {"type": "section", "block_id": "what", "text": {"type": "mrkdwn", "text": text}},
    ]


def _command_card_blocks(state: CardState) -> list[dict[str, Any]]:
    fields = [
        f"*Requester*\n{literal(state.requester)}",
        f"*On behalf of*\n{mention(state.on_behalf_of)}",
        f"*Target*\n`{escape(state.target)}`",
        f"*Run*\n{literal(state.run_id) if state.run_id else '—'}",
    ]
    return [
        _header(_HEADERS[state.status]),
        {
            "type": "section",
            "block_id": "who",
            "fields": [{"type": "mrkdwn", "text": f} for f in fields],
        },
        *command_blocks(state.id, state.command, state.shell, state.api)[0],
    ]


def approval_card(state: CardState) -> list[dict[str, Any]]:
    found: list[str] = []  # the classifier's reasons: keyturn's words around the command's own
    if state.access_kind:
        blocks = _access_blocks(state)
        rule = f"Access rule `{escape(state.rule or '')}`"
    else:
        blocks = _command_card_blocks(state)
        rule = f"Rule `{escape(state.rule)}`" if state.rule else "No rule matched (held by default)"
        found = list(state.reasons)
    facts = []  # keyturn's own, ahead of anything another writer said
    if state.estimated_rows is not None:
        facts.append(f"EXPLAIN estimate: ~{state.estimated_rows} rows")
    if state.status == "pending":
        facts.append(f"Pending until {state.pending_expires_at:%Y-%m-%d %H:%M:%S} UTC")
    facts.append(f"grant TTL {_duration(state.grant_ttl_seconds)}")
    said = [f"Reason given: {literal(state.reason)}"] if state.reason else []
    said += [f"Ticket: {literal(state.ticket)}"] if state.ticket else []
    elements: list[dict[str, Any]] = [{"type": "mrkdwn", "text": rule[:2900]}]
    if found:  # they quote identifiers from the command: plain text, on one line
        quoted = visible(" · ".join(found).translate(ONE_LINE))[0]
        elements.append({"type": "plain_text", "text": quoted[:2900], "emoji": False})
    elements.append({"type": "mrkdwn", "text": " · ".join(facts)})
    if said:
        elements.append({"type": "mrkdwn", "text": " · ".join(said)})
    blocks.append({"type": "context", "block_id": "why", "elements": elements})
    if state.run is not None:
        blocks += run_blocks(state.run, state.id)
    blocks.append(
        {
            "type": "section",
            "block_id": "outcome",
            "text": {"type": "mrkdwn", "text": _outcome(state)},
        }
    )
    if state.credentials is not None:
        blocks += _credentials_blocks(state.credentials)
    if state.status == "pending":
        blocks.append(
            {
                "type": "actions",
                "block_id": "decide",
                "elements": [
                    button(APPROVE, "Approve", state.id, "primary"),
                    button(DENY, "Deny", state.id, "danger"),
                ],
            }
        )
    return blocks


def extend_choices(
    choices: tuple[int, ...], expires_at: datetime, ceiling: datetime | None, now: datetime
) -> list[int]:
    """The extensions (seconds) that keep a grant within its ceiling."""
    headroom = (ceiling or expires_at) - max(now, expires_at)
    return [s for s in choices if timedelta(seconds=s) <= headroom]


def _credentials_text(creds: Credentials) -> str:
    until = f"{creds.expires_at:%H:%M:%S} UTC" if creds.expires_at else "—"
    if creds.status == "pending":
        return f":hourglass_flowing_sand: Credentials pending: {escape(creds.note or '')}; retrying"
    if creds.status == "active":
        return f":key: Credentials active until {until}"
    if creds.status == "revoked":
        by = mention(creds.ended_by) if creds.ended_by != "keyturn" else "keyturn"
        return f":lock: Credentials revoked by {by}"
    return f":lock: Credentials expired at {until}"


def button(action_id: str, text: str, value: str, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "action_id": action_id,
        "value": value,
        "text": {"type": "plain_text", "text": text},
    }
    if style:
        button["style"] = style
    return button


def _credentials_blocks(creds: Credentials) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "block_id": "credentials",
            "text": {"type": "mrkdwn", "text": _credentials_text(creds)},
        }
    ]
    if creds.status == "active" and creds.grant_id:
        buttons = [button(REVOKE, "Revoke now", creds.grant_id, "danger")]
        buttons += [
            button(f"{EXTEND}_{s}", f"Extend +{_duration(s)}", f"{creds.grant_id}:{s}")
            for s in creds.extend_choices
        ]
        blocks.append({"type": "actions", "block_id": "grant", "elements": buttons})
    return blocks


def outcome_message(state: CardState) -> str:
    """Posted in the card's thread (and DMed to the on-behalf-of human) once decided."""
    return f"{_outcome(state)} (request `{state.id}`)"
