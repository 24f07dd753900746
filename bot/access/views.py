"""What on-call engineers read about their own access: the credentials DM, the news of each
change, the reminder before expiry, ``/keyturn list`` and ``pending``. Pure: no Slack calls.

Credentials appear in exactly one place, :func:`delivery` (a DM), and nowhere else: every
other text names a request by its id and a target by its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bot.cards import KIND_WORDS, button
from bot.slack_text import amount, at, escape, literal, mention
from keyturn.classify.shown import shown
from keyturn.config.durations import format_duration
from keyturn.store.access import SHORT_ID

ACCESS_EXTEND = "keyturn_session_extend"  # one button per choice: keyturn_session_extend_<s>
ACCESS_REVOKE = "keyturn_session_revoke"  # (the action ids buttons already posted carry)
MAX_REASON = 1000  # characters
MAX_TICKET = 500
REMIND_BEFORE = timedelta(minutes=5)  # a person is warned this long before their access ends


def short(request_id: object) -> str:
    """The part of a request id people type: enough to tell their requests apart."""
    return str(request_id)[:SHORT_ID]


def left(until: datetime, now: datetime) -> str:
    seconds = int((until - now).total_seconds())
    return format_duration(timedelta(seconds=seconds)) + " left" if seconds > 0 else "ending now"


@dataclass(frozen=True)
class Line:
    """One piece of a person's access as lists and App Home show it."""

    request_id: str
    target: str
    kind: str  # postgres | ssh
    status: str  # the request's
    ttl_seconds: int
    grant_id: str | None = None
    grant_status: str | None = None
    expires_at: datetime | None = None
    extend_choices: list[int] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.grant_status == "active"


@dataclass(frozen=True)
class Waiting:
    """A request waiting on someone as approver: a person's access or an agent's command."""

    request_id: str
    target: str
    requester: str
    access: bool
    kind: str  # the target's: postgres | ssh
    ttl_seconds: int
    command: str
    channel: str | None = None  # where its card is (the target's approval channel)


def describe(line: Line, now: datetime) -> str:
    ident = f"`{short(line.request_id)}`"
    what = f"{KIND_WORDS.get(line.kind, line.kind)} on `{escape(line.target)}`"
    if line.open and line.expires_at is not None:
        return f"{ident} {what}: open until {at(line.expires_at)} ({left(line.expires_at, now)})"
    if line.status == "pending":
        ttl = format_duration(timedelta(seconds=line.ttl_seconds))
        return f"{ident} {what} for {ttl}: waiting for approval"
    return f"{ident} {what}: approved, credentials on their way"


def listing(lines: list[Line], now: datetime) -> str:
    if not lines:
        return (
            "You have no pending or open access. Ask with "
            "`/keyturn db <target> <ttl> <reason>`, `/keyturn ssh …` or `/keyturn request`."
        )
    return "Your access:\n" + "\n".join(f"• {describe(line, now)}" for line in lines)


def waiting_listing(waiting: list[Waiting]) -> str:
    if not waiting:
        return "Nothing is waiting on you."
    return "Waiting on you:\n" + "\n".join(f"• {waiting_text(w)}" for w in waiting)


def waiting_text(w: Waiting) -> str:
    """A person's access in full (there is no command to show); an agent's command only by how
    much it is and its sha256, and where its card is. The card is the one place that shows a command
    (every statement as it will run): any shorter rendition here (a first line, 80 characters)
    could hide the part that matters, so only the card offers Approve for a command."""
    where = f"`{short(w.request_id)}`"
    if w.access:
        ttl = format_duration(timedelta(seconds=w.ttl_seconds))
        asks = f"{mention(w.requester)} asks for a {ttl} {KIND_WORDS.get(w.kind, w.kind)}"
        return f"{where} {asks} on `{escape(w.target)}`"
    shell = w.kind == "ssh"
    what = shown(w.command, shell)
    card = f"its card in <#{w.channel}>" if w.channel else "its card"
    return (
        f"{where} {literal(w.requester)} asks to run {amount(what, shell)} on "
        f"`{escape(w.target)}` (sha256 `{what.sha256[:16]}`): read and decide it on {card}"
    )


def delivery(
    *,
    request_id: str,
    target: str,
    expires_at: datetime,
    ttl: timedelta,
    vault_addr: str,
    wrap_ttl: timedelta,
    wrapping_token: str,
) -> str:
    """The DM that carries a database login's wrapping token, and what to do with it."""
    return "\n".join(
        [
            f":key: *Your database login for `{escape(target)}` is ready* "
            f"(request `{short(request_id)}`).",
            f"Unwrap it within {format_duration(wrap_ttl)}; it works once:",
            f"```keyturn unwrap --vault-addr {vault_addr} {wrapping_token}```",
            "It prints a ready `psql` connection string "
            f"(`VAULT_ADDR={vault_addr} bao unwrap <token>` works too).",
            f"The login ends at {at(expires_at)} ({format_duration(ttl)}): your open sessions "
            f"are killed then. I will remind you {format_duration(REMIND_BEFORE)} before, with "
            "Extend buttons.",
            ":warning: If unwrapping says the token was already used and you did not use it, "
            "report it to your security team now: someone else may hold your login.",
        ]
    )


def certificate_delivery(
    *,
    request_id: str,
    target: str,
    principal: str,
    host: str,
    port: int,
    algorithm: str,
    fingerprint: str,
    expires_at: datetime,
    certificate: str,
) -> str:
    """The DM that carries an SSH certificate for the person's own key."""
    key = "~/.ssh/id_" + {"ssh-rsa": "rsa", "ssh-ed25519": "ed25519"}.get(algorithm, "ecdsa")
    cert_file = f"~/.ssh/keyturn-{target}-cert.pub"
    port_flag = f" -p {port}" if port != 22 else ""
    return "\n".join(
        [
            f":key: *Your SSH certificate for `{escape(target)}` is ready* "
            f"(request `{short(request_id)}`), for your key `{escape(fingerprint)}` as "
            f"`{escape(principal)}`, valid until {at(expires_at)}.",
            f"Save it as `{cert_file}`:",
            f"```{certificate.strip()}```",
            "Then connect with:",
            f"```ssh -i {key} -o CertificateFile={cert_file}{port_flag} {principal}@{host}```",
            "A certificate cannot be extended or recalled once issued: it stops working at "
            "its expiry.",
        ]
    )


def news(
    *,
    request_id: str,
    target: str,
    was: tuple[str, str | None],
    now_is: tuple[str, str | None],
    approvers: list[str],
    denial: tuple[str, str] | None,
    error: str | None,
    ended_by: str | None,
    pending_ttl: timedelta,
) -> str | None:
    """What changed for the requester between two (request status, grant status) pairs."""
    ident = f"Your request `{short(request_id)}` for `{escape(target)}`"
    (old, old_grant), (new, new_grant) = was, now_is
    if old == "pending" and new != "pending":
        if new == "denied" and denial is not None:
            who, reason = denial
            return f":x: {ident} was denied by {mention(who)}: {escape(reason)}"
        if new == "expired":
            return (
                f":hourglass: {ident} expired: nobody decided within "
                f"{format_duration(pending_ttl)}. Ask again if you still need it."
            )
        if new == "cancelled":
            return f":no_entry_sign: {ident} was cancelled."
        if new in ("approved", "executing"):
            who = ", ".join(mention(a) for a in approvers) or "policy"
            return f":white_check_mark: {ident} was approved by {who}."
    if new == "failed" and old != "failed":
        return f":warning: {ident} was approved, but nothing could be issued: {escape(error or '')}"
    if old_grant == "active" and new_grant in ("revoked", "expired"):
        if new_grant == "revoked":
            by = "keyturn" if ended_by in (None, "keyturn") else mention(ended_by)
            return f":lock: Your access to `{escape(target)}` was revoked by {by}."
        return f":lock: Your access to `{escape(target)}` has ended: it expired."
    return None


def reminder(line: Line, expires_at: datetime, now: datetime) -> tuple[str, list[dict[str, Any]]]:
    """Sent :data:`REMIND_BEFORE` a person's access ends: Extend within the rule's maximum, or
    not."""
    text = (
        f":alarm_clock: Your {KIND_WORDS.get(line.kind, line.kind)} on `{escape(line.target)}` "
        f"ends at {at(expires_at)} ({left(expires_at, now)})."
    )
    if not line.extend_choices:
        text += " It cannot be extended further; ask again if you need more time."
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    blocks += grant_actions(line, revoke=False)
    return text, blocks


def grant_actions(line: Line, *, revoke: bool) -> list[dict[str, Any]]:
    if not line.grant_id:
        return []
    buttons = [
        button(
            f"{ACCESS_EXTEND}_{s}",
            f"Extend +{format_duration(timedelta(seconds=s))}",
            f"{line.grant_id}:{s}",
        )
        for s in line.extend_choices
    ]
    if revoke:
        buttons.append(button(ACCESS_REVOKE, "End now", line.grant_id, "danger"))
    if not buttons:
        return []
    return [{"type": "actions", "block_id": f"grant_{line.grant_id}", "elements": buttons}]


def confirmation(request_id: object, target: str, ttl_seconds: int, channel: str | None) -> str:
    """What a person reads once their request is made."""
    where = f" in <#{channel}>" if channel else ""
    return (
        f"Asked for {format_duration(timedelta(seconds=ttl_seconds))} on `{escape(target)}` "
        f"(request `{short(request_id)}`): waiting for approval{where}. "
        "I will DM you the credentials once it is approved."
    )
