"""The request and grant state machines, by example and by hypothesis."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from keyturn.domain import (
    REQUEST_TRANSITIONS,
    TAG_LENGTH,
    AlreadyVoted,
    CommandChanged,
    Deciders,
    Grant,
    GrantStatus,
    IllegalTransition,
    Request,
    RequestStatus,
    SelfApproval,
    command_sha256,
    person_key,
    request_tag,
    same_person,
    slack_user,
)
from keyturn.errors import Conflict, Forbidden, InvalidInput

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_request(quorum: int = 1, on_behalf_of: str | None = "U_HUMAN") -> Request:
    return Request(
        id=uuid.uuid4(),
        target="orders-db",
        command="UPDATE orders SET status = 'paid' WHERE id = 1",
        requester="crew-billing",
        on_behalf_of=on_behalf_of,
        created_at=T0,
        pending_expires_at=T0 + timedelta(minutes=15),
        quorum=quorum,
    )


def test_single_approval_reaches_quorum_of_one() -> None:
    req = make_request()
    assert req.approve("U1", Deciders.only("U1"), T0) is True
    assert req.status is RequestStatus.APPROVED
    assert req.decided_at == T0


def test_person_keys() -> None:
    assert person_key(" <@U123|ada> ") == person_key("slack:u123") == person_key("@U123") == "U123"
    assert not same_person("U123", "U124", None)


@pytest.mark.parametrize(
    ("spelled", "user"),
    [
        ("U_APPROVER", "U_APPROVER"),
        ("u_approver", "U_APPROVER"),
        ("<@U_APPROVER>", "U_APPROVER"),
        ("<@U_APPROVER|ada>", "U_APPROVER"),
        ("@U_APPROVER", "U_APPROVER"),
        ("slack:U_APPROVER", "U_APPROVER"),
        (" U_APPROVER ", "U_APPROVER"),
        # the ninth outside round approved its own requests with these: they name nobody
        ("@slack:U_APPROVER", None),
        ("slack:slack:U_APPROVER", None),
        ("U\u0332_APPROVER", None),  # a combining underline: looks the same on a card
        ("\uff35123", None),  # full-width U
        ("U APPROVER", None),
        ("alice@example.com", None),
    ],
)
def test_a_slack_user_has_one_spelling_at_a_time(spelled: str, user: str | None) -> None:
    assert slack_user(spelled.encode().decode("unicode_escape")) == user


def test_nobody_decides_after_the_pending_ttl_even_before_the_sweep() -> None:
    """The ninth round approved 3 of 4 requests past their pending TTL before the sweep."""
    req = make_request()
    with pytest.raises(IllegalTransition):
        req.approve("U1", Deciders.only("U1"), req.pending_expires_at)
    with pytest.raises(IllegalTransition):
        req.deny("U1", Deciders.only("U1"), "no", req.pending_expires_at + timedelta(seconds=1))
    assert req.status is RequestStatus.PENDING  # the sweep expires it


def test_quorum_needs_distinct_approvers() -> None:
    req = make_request(quorum=2)
    assert req.approve("U1", Deciders.only("U1"), T0) is False
    with pytest.raises(AlreadyVoted):
        req.approve("U1", Deciders.only("U1"), T0)
    assert req.status is RequestStatus.PENDING
    assert req.approvers == ["U1"]
    assert req.approve("U2", Deciders.only("U2"), T0) is True
    assert req.status is RequestStatus.APPROVED


@pytest.mark.parametrize(
    "who", ["crew-billing", "U_HUMAN", "u_human", "<@U_HUMAN>", "<@u_human|ada>", "slack:U_HUMAN"]
)
def test_nobody_decides_their_own_request(who: str) -> None:
    """However Slack or a token spells the human, it is the same person."""
    req = make_request()
    with pytest.raises(SelfApproval):
        req.approve(who, Deciders.only(who), T0)
    with pytest.raises(SelfApproval):
        req.deny(who, Deciders.only(who), "no", T0)
    assert req.status is RequestStatus.PENDING
    assert req.approvals == []


def test_deny_needs_a_reason_and_ends_the_request() -> None:
    req = make_request(quorum=2)
    req.approve("U1", Deciders.only("U1"), T0)
    with pytest.raises(InvalidInput):
        req.deny("U2", Deciders.only("U2"), "   ", T0)
    req.deny("U2", Deciders.only("U2"), "  not during the freeze ", T0)
    assert req.status is RequestStatus.DENIED
    assert req.denial is not None
    assert req.denial.reason == "not during the freeze"
    with pytest.raises(IllegalTransition):
        req.approve("U3", Deciders.only("U3"), T0)


def test_decided_request_cannot_be_decided_again() -> None:
    req = make_request()
    req.approve("U1", Deciders.only("U1"), T0)
    with pytest.raises(IllegalTransition) as info:
        req.deny("U2", Deciders.only("U2"), "late", T0)
    assert isinstance(info.value, Conflict)
    assert info.value.current == "approved"


def test_expiry_respects_the_pending_ttl() -> None:
    req = make_request()
    with pytest.raises(IllegalTransition):
        req.expire(T0 + timedelta(minutes=14))
    req.expire(T0 + timedelta(minutes=15))
    assert req.status is RequestStatus.EXPIRED


def test_only_the_requester_cancels() -> None:
    req = make_request()
    with pytest.raises(Forbidden):
        req.cancel("U1", T0)
    req.cancel("crew-billing", T0)
    assert req.status is RequestStatus.CANCELLED


def test_execution_is_for_the_approved_hash_only_and_once() -> None:
    req = make_request()
    with pytest.raises(IllegalTransition):
        req.start_execution(req.command_sha256)  # not approved yet
    req.approve("U1", Deciders.only("U1"), T0)
    with pytest.raises(CommandChanged):
        req.start_execution(command_sha256("DELETE FROM orders"))
    req.start_execution(req.command_sha256)
    with pytest.raises(IllegalTransition):
        req.start_execution(req.command_sha256)
    req.finish(ok=True)
    assert req.status is RequestStatus.EXECUTED
    assert req.status.terminal


def test_quorum_below_one_is_refused() -> None:
    with pytest.raises(InvalidInput):
        make_request(quorum=0)


def test_grant_lifecycle() -> None:
    grant = Grant(uuid.uuid4(), "crew", "orders-db", T0, T0 + timedelta(minutes=10))
    with pytest.raises(IllegalTransition):
        grant.expire(T0 + timedelta(minutes=9))
    with pytest.raises(InvalidInput):
        grant.extend(timedelta(hours=2), T0 + timedelta(hours=1), T0)
    grant.extend(timedelta(minutes=20), T0 + timedelta(hours=1), T0)
    assert grant.expires_at == T0 + timedelta(minutes=30)
    grant.revoke(T0 + timedelta(minutes=1))
    assert grant.status is GrantStatus.REVOKED
    with pytest.raises(IllegalTransition):
        grant.revoke(T0 + timedelta(minutes=2))
    with pytest.raises(IllegalTransition):
        grant.extend(timedelta(minutes=1), T0 + timedelta(hours=1), T0)


def test_transition_table_matches_the_design() -> None:
    terminal = {s for s in RequestStatus if s.terminal}
    assert terminal == {"executed", "failed", "denied", "expired", "cancelled"}
    assert REQUEST_TRANSITIONS[RequestStatus.PENDING] == {
        "approved",
        "denied",
        "expired",
        "cancelled",
    }


PEOPLE = st.sampled_from(["crew-billing", "U_HUMAN", "U1", "U2", "U3"])


class RequestMachine(RuleBasedStateMachine):
    """Random sequences of moves never reach a state the transition table forbids."""

    def __init__(self) -> None:
        super().__init__()
        self.req = make_request(quorum=2)
        self.now = T0
        self.history: list[RequestStatus] = [self.req.status]

    def _attempt(self, move: object) -> None:
        before = self.req.status
        try:
            move()  # type: ignore[operator]
        except (Conflict, Forbidden, InvalidInput):
            assert self.req.status is before, "a refused move must change nothing"
        if self.req.status is not before:
            assert self.req.status in REQUEST_TRANSITIONS[before]
            self.history.append(self.req.status)

    @rule(who=PEOPLE)
    def approve(self, who: str) -> None:
        self._attempt(lambda: self.req.approve(who, Deciders.only(who), self.now))

    @rule(who=PEOPLE, reason=st.text(max_size=5))
    def deny(self, who: str, reason: str) -> None:
        self._attempt(lambda: self.req.deny(who, Deciders.only(who), reason, self.now))

    @rule(minutes=st.integers(0, 20))
    def tick_and_expire(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)
        self._attempt(lambda: self.req.expire(self.now))

    @rule(who=PEOPLE)
    def cancel(self, who: str) -> None:
        self._attempt(lambda: self.req.cancel(who, self.now))

    @rule(same=st.booleans())
    def execute(self, same: bool) -> None:
        sha = self.req.command_sha256 if same else "0" * 64
        self._attempt(lambda: self.req.start_execution(sha))

    @precondition(lambda self: self.req.status is RequestStatus.EXECUTING)
    @rule(ok=st.booleans())
    def finish(self, ok: bool) -> None:
        self._attempt(lambda: self.req.finish(ok))

    @invariant()
    def approved_means_quorum_of_others(self) -> None:
        voters = self.req.approvers
        assert len(voters) == len(set(voters))
        assert not {"crew-billing", "U_HUMAN"} & set(voters)
        if self.req.status in (
            RequestStatus.APPROVED,
            RequestStatus.EXECUTING,
            RequestStatus.EXECUTED,
        ):
            assert len(voters) >= self.req.quorum

    @invariant()
    def terminal_is_final(self) -> None:
        for earlier in self.history[:-1]:
            assert not earlier.terminal


TestRequestMachine = RequestMachine.TestCase
TestRequestMachine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_a_session_never_runs_as_a_command_and_a_command_never_opens_a_session() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    session = Request(
        id=uuid.uuid4(),
        target="db",
        command="postgres session",
        requester="U_OMAR",
        created_at=now,
        pending_expires_at=now + timedelta(minutes=5),
        access=True,
    )
    session.approve("U_ADA", Deciders.only("U_ADA"), now)
    with pytest.raises(IllegalTransition):
        session.start_execution(session.command_sha256)
    session.open_access()
    assert session.status is RequestStatus.EXECUTING
    command = Request(
        id=uuid.uuid4(),
        target="db",
        command="UPDATE t SET x = 1 WHERE id = 1",
        requester="crew",
        created_at=now,
        pending_expires_at=now + timedelta(minutes=5),
    )
    command.approve("U_ADA", Deciders.only("U_ADA"), now)
    with pytest.raises(IllegalTransition):
        command.open_access()


def test_a_request_tag_names_the_request_only_to_keyturn() -> None:
    request_id = "0b0e8c3e-2f7e-4d33-9a4c-5b8a1c2d3e4f"
    tag = request_tag(request_id)
    assert tag == request_tag(uuid.UUID(request_id))  # str and UUID alike, as Postgres prints it
    assert len(tag) == TAG_LENGTH and all(c in "0123456789abcdef" for c in tag)
    assert tag not in request_id.replace("-", "")


@pytest.mark.parametrize("reason", ["no\x00pe", "\x1b[31mred", "x" * 2001, "half \ud800"])
def test_a_deny_reason_is_plain_text_of_bounded_length(reason: str) -> None:
    """The ninth round's NUL in a deny reason made the bot fail with a database error and a
    500 to Slack; 100,000 characters were stored and sent to the agent."""
    req = make_request()
    with pytest.raises(InvalidInput):
        req.deny("U1", Deciders.only("U1"), reason, T0)
    assert req.status is RequestStatus.PENDING
