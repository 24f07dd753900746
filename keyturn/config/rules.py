"""Rules on agents' commands, people's access rules, masking, and the tests rules must pass."""

from __future__ import annotations

import shlex
from datetime import timedelta
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from keyturn.config.durations import Duration, format_duration
from keyturn.config.model import Model, Name, Subject

# What a SQL rule can match; keyturn.classify assigns these.
SqlKind = Literal[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "create",
    "alter",
    "drop",
    "truncate",
    "grant",
    "revoke",
    "copy",
    "call",
    "do",
    "set",
    "lock",
    "maintenance",
    "transaction",
    "prepare",
    "execute",
    "explain",
    "delete_without_where",
    "update_without_where",
    "function_call",
    "any",
]


Detector = Literal["email", "credit_card", "us_ssn", "phone"]


class People(Model):
    """Slack people: listed user ids and/or the members of one user group."""

    slack_usergroup: str | None = None
    users: list[str] = []

    @model_validator(mode="after")
    def _someone(self) -> People:
        if not self.slack_usergroup and not self.users:
            raise ValueError("name a slack_usergroup or at least one user")
        return self


HTTP_METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")


class Condition(Model):
    """A condition on one query parameter or JSON body field; a bare value means equals.
    A field that is absent, or of another type, never meets a condition."""

    equals: str | int | float | bool | None = None
    one_of: list[str | int | float | bool] | None = None
    at_most: float | None = None
    at_least: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_value(cls, data: Any) -> Any:
        return data if isinstance(data, dict) else {"equals": data}

    @model_validator(mode="after")
    def _something(self) -> Condition:
        if self.equals is None and self.one_of is None and self.at_most is self.at_least is None:
            raise ValueError("a condition needs equals, one_of, at_most or at_least")
        return self


def _http_pattern(pattern: str) -> str:
    method, _, path = pattern.partition(" ")
    if method != "*" and method not in HTTP_METHODS:
        raise ValueError(f"{pattern!r}: the method must be * or one of {', '.join(HTTP_METHODS)}")
    if not path.startswith("/") or "//" in path or any(c in path for c in "?#%; \\"):
        raise ValueError(
            f"{pattern!r} must be METHOD /path with * or ** segments, e.g. GET /orders/*"
        )
    for segment in path[1:].split("/"):
        if segment in (".", "..") or ("*" in segment and segment not in ("*", "**")):
            raise ValueError(f"{pattern!r}: a segment is a name, * (one) or ** (any number)")
    return pattern


class Match(Model):
    sql: list[SqlKind] | None = None
    shell: list[str] | None = None
    # HTTP targets: "METHOD /path" patterns and/or OpenAPI operation ids, then conditions
    http: list[str] | None = None
    operation: list[Name] | None = None
    query: dict[str, Condition] | None = None
    body: dict[str, Condition] | None = None

    @field_validator("http")
    @classmethod
    def _http_patterns(cls, value: list[str] | None) -> list[str] | None:
        return [_http_pattern(p) for p in value] if value is not None else None

    @field_validator("shell")
    @classmethod
    def _argument_patterns(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or ():
            try:
                words = shlex.split(pattern)
            except ValueError as exc:
                raise ValueError(f"{pattern!r} is not a list of arguments: {exc}") from None
            if not words or words[0] in ("*", "**"):
                raise ValueError(f"{pattern!r} must start with the program it allows")
        return value

    @model_validator(mode="after")
    def _something(self) -> Match:
        if not (self.sql or self.shell or self.http or self.operation):
            raise ValueError("a match needs sql kinds, shell patterns, http patterns or operations")
        if (self.query or self.body) and not (self.http or self.operation):
            raise ValueError("query and body conditions go with http patterns or operations")
        return self


class Rule(Model):
    name: Name
    target: str = "*"
    subjects: list[Subject] | None = None
    match: Match
    action: Literal["allow", "hold", "block"]
    approvers: People | None = None
    quorum: int = Field(default=1, ge=1, le=10)
    grant_ttl: Duration | None = None
    pending_ttl: Duration | None = None
    message: str | None = None
    # shadow: record what the rule would have done (audit, /metrics) without enforcing it
    mode: Literal["enforce", "shadow"] = "enforce"
    # functions an allow rule lets take masked columns as plain arguments, e.g. [count]
    masked_uses: list[Name] = []

    @model_validator(mode="after")
    def _hold_only_fields(self) -> Rule:
        if self.action != "hold":
            for name in ("approvers", "grant_ttl", "pending_ttl"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} only applies to action: hold")
        if self.masked_uses and self.action != "allow":
            raise ValueError("masked_uses only applies to action: allow")
        if (
            self.approvers
            and not self.approvers.slack_usergroup
            and self.quorum > len(set(self.approvers.users))
        ):
            raise ValueError(
                f"quorum {self.quorum} needs at least {self.quorum} distinct approvers"
            )
        return self


class AccessRule(Model):
    """Who may ask for access of their own (``/keyturn db|ssh|request``), on which
    targets, for how long, and who must approve it. The first rule that names the target and
    the requester decides."""

    name: Name
    targets: list[str] = Field(default=["*"], min_length=1)
    requesters: People
    approvers: People
    quorum: int = Field(default=1, ge=1, le=10)
    durations: list[Duration] = Field(
        default=[timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1)], min_length=1
    )  # the request modal's choices
    max_duration: Duration = timedelta(hours=1)  # what a typed TTL and Extend may reach
    pending_ttl: Duration | None = None
    # An approver in one of requesters.slack_usergroup's members is a peer of the requester:
    # False (the default) lets only people outside that group approve.
    own_group_may_approve: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> AccessRule:
        longest = max(self.durations)
        if longest > self.max_duration:
            raise ValueError(
                f"the duration {format_duration(longest)} is longer than max_duration "
                f"{format_duration(self.max_duration)}"
            )
        if not self.approvers.slack_usergroup and self.quorum > len(set(self.approvers.users)):
            raise ValueError(
                f"quorum {self.quorum} needs at least {self.quorum} distinct approvers"
            )
        return self

    def covers(self, target: str) -> bool:
        return "*" in self.targets or target in self.targets


class PolicyTest(Model):
    """A case the policy must decide as stated: run by check-config and `keyturn policy test`.
    For an HTTP target the command is the call's text form: ``POST /orders/7/refunds``, then
    ``Content-Type: application/json``, a blank line and the body."""

    target: str
    command: str = Field(min_length=1)
    subject: str = "agent:keyturn-policy-test"  # as `agent:<sub>`; groups below
    groups: list[str] = []
    expect: Literal["allow", "hold", "block"]
    rule: str | None = None  # the rule expected to decide (None: not checked)
    masked: list[str] | None = None  # result columns expected masked (SELECTs)

    @field_validator("subject")
    @classmethod
    def _agent(cls, value: str) -> str:
        if not value.startswith("agent:") or len(value) == 6:
            raise ValueError(f"{value!r} must be agent:<sub> (put groups in groups)")
        return value


class Masking(Model):
    columns: list[str] = []
    detectors: list[Detector] = []
