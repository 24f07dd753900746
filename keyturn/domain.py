"""Requests, approvals and grants, and the only legal ways their states change.

Pure code: no I/O, no clock (callers pass ``now``). The store loads a row, asks these objects
to make a move, and writes the result back inside one locked transaction, so every rule about
*what* may happen lives here and every rule about *when it is safe to write* lives in the store.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from uuid import UUID

from keyturn.errors import Conflict, Forbidden, InvalidInput


class RequestStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    EXECUTING = "executing"
    EXECUTED = "executed"
    FAILED = "failed"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return not REQUEST_TRANSITIONS[self]


# ``approved -> failed`` covers an approval whose credentials could never be issued.
REQUEST_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.PENDING: frozenset(
        {
            RequestStatus.APPROVED,
            RequestStatus.DENIED,
            RequestStatus.EXPIRED,
            RequestStatus.CANCELLED,
        }
    ),
    RequestStatus.APPROVED: frozenset({RequestStatus.EXECUTING, RequestStatus.FAILED}),
    RequestStatus.EXECUTING: frozenset({RequestStatus.EXECUTED, RequestStatus.FAILED}),
    RequestStatus.EXECUTED: frozenset(),
    RequestStatus.FAILED: frozenset(),
    RequestStatus.DENIED: frozenset(),
    RequestStatus.EXPIRED: frozenset(),
    RequestStatus.CANCELLED: frozenset(),
}


def came_from(target: RequestStatus) -> frozenset[RequestStatus]:
    """Every status a request may move to ``target`` from: what set-based SQL may update."""
    return frozenset(s for s, moves in REQUEST_TRANSITIONS.items() if target in moves)


class GrantStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self is not GrantStatus.ACTIVE


class Decision(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


class IllegalTransition(Conflict):
    """The object is not in a state that allows this move (e.g. it was decided already)."""

    code = "illegal_transition"

    def __init__(self, kind: str, current: str, target: str) -> None:
        super().__init__(f"{kind} is {current}; it cannot become {target}")
        self.kind = kind
        self.current = current
        self.target = target


class SelfApproval(Forbidden):
    code = "self_approval"


class AlreadyVoted(Conflict):
    code = "already_voted"


class CommandChanged(Conflict):
    """The command about to run is not the one that was approved."""

    code = "command_changed"


def command_sha256(command: str) -> str:
    return hashlib.sha256(command.encode("utf-8")).hexdigest()


TAG_LENGTH = 16  # hex characters


def request_tag(request_id: object) -> str:
    """What a target sees of a request (``application_name = 'keyturn:<tag>'``): the start of
    the id's sha256. Another agent reading the target's session list learns nothing it can use
    (ids are random and shown to no other identity); keyturn, which holds the ids, finds the
    request again (``keyturn tag``)."""
    return hashlib.sha256(str(request_id).encode()).hexdigest()[:TAG_LENGTH]


MAX_REASON = 2000  # what the deny modal allows: enforced here too, for any other client


def unprintable(text: str) -> bool:
    """Control characters (a NUL, an escape sequence), DEL or a lone surrogate: line breaks
    and tabs are fine. Nothing keyturn stores from a person may hold them."""
    return any(
        (ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF
        for c in text
    )


_SLACK_MENTION = re.compile(r"^<@([^|>]+)(?:\|[^>]*)?>$")
_SLACK_USER = re.compile(r"^[UW][A-Z0-9_]+$")  # U…/W…; the sandbox's ids have underscores


def slack_user(who: str) -> str | None:
    """The Slack user id ``who`` names, in upper case (``U123``), or None if it names none.

    One spelling at a time: ``U123``, ``u123``, ``<@U123>``, ``<@U123|alice>``, ``@U123`` or
    ``slack:U123``. Anything else — another or a doubled prefix (``@slack:U123``), letters that
    only look like these (a combining underline, full-width digits), spaces inside — names
    nobody: a human an agent acts for must be named so that the self-approval check cannot be
    spelled around.
    """
    key = who.strip()
    if mention := _SLACK_MENTION.match(key):
        key = mention.group(1)
    elif key.startswith("slack:"):
        key = key.removeprefix("slack:")
    elif key.startswith("@"):
        key = key.removeprefix("@")
    key = key.upper()
    return key if key.isascii() and _SLACK_USER.match(key) else None


def person_key(who: str) -> str:
    """One comparable form of a person's id, however a token or Slack spelled it: the Slack
    user id when ``who`` names one (:func:`slack_user`), else the text itself, folded. The
    self-approval check compares these keys, never raw strings."""
    return slack_user(who) or unicodedata.normalize("NFKC", who).strip().casefold()


def same_person(who: str, *others: str | None) -> bool:
    mine = person_key(who)
    return any(other is not None and person_key(other) == mine for other in others)


class NotApprover(Forbidden):
    code = "not_approver"


class OwnGroup(Forbidden):
    code = "own_group"


def policy_decider(rule: str | None) -> str:
    """The decider recorded when a rule approves an allowed command itself: the gateway holds
    no standing credentials for its target (SSH), so the bot mints them as for any approval."""
    return f"policy:{rule}"


@dataclass(frozen=True)
class Deciders:
    """Who may decide one request, resolved by the caller from the policy (and Slack's user
    groups; the bot resolves it for the person voting), checked with every other rule of a vote
    under the request's lock (:meth:`Request.approve`, :meth:`Request.deny`): the one place
    that says who may decide.

    ``barred``: in the requester's own group, where its access rule wants an approver from
    outside it.
    """

    people: frozenset[str]
    barred: frozenset[str] = frozenset()

    @classmethod
    def only(cls, *people: str) -> Deciders:
        return cls(frozenset(people))

    @classmethod
    def rule(cls, name: str | None) -> Deciders:
        """Only the rule itself (:func:`policy_decider`)."""
        return cls.only(policy_decider(name))

    def check(self, who: str) -> None:
        if who not in self.people:
            raise NotApprover("you are not an approver for this request; nothing was changed")
        if who in self.barred:
            raise OwnGroup(
                "you are in the requester's own group, and this access rule needs an approver"
                " from outside it; nothing was changed"
            )


@dataclass(frozen=True)
class Approval:
    approver: str
    decision: Decision
    at: datetime
    reason: str | None = None


@dataclass
class Request:
    """A command an agent asked to run on a target, or (``access``) a person's request for
    a login or certificate of their own: approved the same way, but it runs no command. Its
    credentials go to the human by DM; the request is ``executing`` while the access's grant
    lives and ``executed`` once it has ended."""

    id: UUID
    target: str
    command: str
    requester: str
    created_at: datetime
    pending_expires_at: datetime
    quorum: int = 1
    on_behalf_of: str | None = None
    status: RequestStatus = RequestStatus.PENDING
    approvals: list[Approval] = field(default_factory=list)
    decided_at: datetime | None = None
    access: bool = False

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise InvalidInput("quorum must be at least 1")

    @property
    def command_sha256(self) -> str:
        return command_sha256(self.command)

    @property
    def approvers(self) -> list[str]:
        return [a.approver for a in self.approvals if a.decision is Decision.APPROVE]

    @property
    def denial(self) -> Approval | None:
        return next((a for a in self.approvals if a.decision is Decision.DENY), None)

    def _move(self, target: RequestStatus) -> None:
        if target not in REQUEST_TRANSITIONS[self.status]:
            raise IllegalTransition("request", self.status, target)
        self.status = target

    def check_decider(
        self, who: str, deciders: Deciders, target: RequestStatus, now: datetime
    ) -> None:
        """Raise unless ``who`` may decide this request now (moving it to ``target``)."""
        deciders.check(who)
        if self.status is not RequestStatus.PENDING:
            raise IllegalTransition("request", self.status, target)
        if now >= self.pending_expires_at:  # expired, whether or not the sweep has run yet
            raise IllegalTransition("request", "past its pending TTL", target)
        if same_person(who, self.requester, self.on_behalf_of):
            raise SelfApproval("nobody may decide their own request")

    def approve(self, approver: str, deciders: Deciders, now: datetime) -> bool:
        """Record one approval; returns True when this vote reached the quorum."""
        self.check_decider(approver, deciders, RequestStatus.APPROVED, now)
        if same_person(approver, *self.approvers):
            raise AlreadyVoted(f"{approver} already approved this request")
        self.approvals.append(Approval(approver, Decision.APPROVE, now))
        if len(self.approvers) < self.quorum:
            return False
        self._move(RequestStatus.APPROVED)
        self.decided_at = now
        return True

    def deny(self, approver: str, deciders: Deciders, reason: str, now: datetime) -> None:
        """One deny ends the request, whatever the quorum; the reason goes back to the agent."""
        self.check_decider(approver, deciders, RequestStatus.DENIED, now)
        if not reason.strip():
            raise InvalidInput("a deny needs a reason")
        if len(reason) > MAX_REASON or unprintable(reason):
            raise InvalidInput(
                f"a deny reason is plain text of at most {MAX_REASON} characters: no control "
                "characters"
            )
        self.approvals.append(Approval(approver, Decision.DENY, now, reason.strip()))
        self._move(RequestStatus.DENIED)
        self.decided_at = now

    def expire(self, now: datetime) -> None:
        if self.status is RequestStatus.PENDING and now < self.pending_expires_at:
            raise IllegalTransition("request", "still within its pending TTL", "expired")
        self._move(RequestStatus.EXPIRED)
        self.decided_at = now

    def cancel(self, by: str, now: datetime) -> None:
        if not same_person(by, self.requester, self.on_behalf_of):
            raise Forbidden("only the requester may cancel a request")
        self._move(RequestStatus.CANCELLED)
        self.decided_at = now

    def start_execution(self, sha256: str) -> None:
        """Claim the approval for this exact command; an approval is used once."""
        if self.access:  # its credentials are a person's: no gateway may run with them
            raise IllegalTransition("access request", self.status, "run as a command")
        if sha256 != self.command_sha256:
            raise CommandChanged("the command does not match the approved command")
        self._move(RequestStatus.EXECUTING)

    def open_access(self) -> None:
        """A person's credentials were delivered: it is in use until its grant ends."""
        if not self.access:
            raise IllegalTransition("request", "a command, not a person's access", "open access")
        self._move(RequestStatus.EXECUTING)

    def finish(self, ok: bool) -> None:
        self._move(RequestStatus.EXECUTED if ok else RequestStatus.FAILED)

    def fail(self) -> None:
        self._move(RequestStatus.FAILED)


@dataclass
class Grant:
    """Credentials issued for a request or a human, alive until ``expires_at``."""

    id: UUID
    subject: str
    target: str
    created_at: datetime
    expires_at: datetime
    request_id: UUID | None = None
    status: GrantStatus = GrantStatus.ACTIVE
    ended_at: datetime | None = None

    def _end(self, status: GrantStatus, now: datetime) -> None:
        if self.status.terminal:
            raise IllegalTransition("grant", self.status, status)
        self.status = status
        self.ended_at = now

    def revoke(self, now: datetime) -> None:
        self._end(GrantStatus.REVOKED, now)

    def expire(self, now: datetime) -> None:
        if now < self.expires_at:
            raise IllegalTransition("grant", "not yet due", GrantStatus.EXPIRED)
        self._end(GrantStatus.EXPIRED, now)

    def extend(self, by: timedelta, max_expires_at: datetime, now: datetime) -> None:
        """Move ``expires_at`` later, never past the role's ceiling."""
        if self.status.terminal:
            raise IllegalTransition("grant", self.status, "extended")
        if by <= timedelta(0):
            raise InvalidInput("an extension must be positive")
        new = max(self.expires_at, now) + by
        if new > max_expires_at:
            raise InvalidInput(
                f"that is past its maximum: it may last until {max_expires_at:%H:%M:%S} UTC at most"
            )
        self.expires_at = new
