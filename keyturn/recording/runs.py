"""Runs: an agent's steps, in order, and what a run says about itself.

A run is the agent's ``run_id`` when it gives one. Without one, an agent's steps make one run
per idle gap: a step more than ``record.run_gap`` after the agent's previous step without a
``run_id`` opens a new run, named ``auto-<that step's id>``. Each step gets its run's name as
it is written (the store's ``keyturn_run_after``), so a name never changes; ``auto-`` is kept
for these names, and a ``run_id`` may not start with it.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from keyturn.recording.output import Recording

AUTO = "auto-"
MAX_RUN_ID = 200
# letters, digits and . _ : @ + - : nothing a terminal, a URL path or Slack reads as syntax
_RUN_ID = re.compile(r"[A-Za-z0-9._:@+-]+")

Verdict = Literal["allowed", "held", "blocked"]


class BadRunId(ValueError):
    """A run id an agent may not use."""


def check_run_id(value: str) -> str:
    """``value`` as a run id, or :class:`BadRunId` saying why not."""
    if not 1 <= len(value) <= MAX_RUN_ID:
        raise BadRunId(f"a run_id is 1 to {MAX_RUN_ID} characters")
    if not _RUN_ID.fullmatch(value):
        raise BadRunId("a run_id has letters, digits and . _ : @ + - only")
    if value.startswith(AUTO):
        raise BadRunId(f"run ids starting with {AUTO!r} name keyturn's own runs (idle gaps)")
    return value


@dataclass(frozen=True)
class Vote:
    approver: str
    decision: str  # approve | deny
    at: datetime
    reason: str | None


@dataclass(frozen=True)
class GrantLife:
    """The credentials a held step ran with: when issued, until when, how they ended."""

    id: uuid.UUID
    issued_at: datetime
    expires_at: datetime
    status: str  # active | revoked | expired
    ended_at: datetime | None
    ended_by: str | None


@dataclass(frozen=True)
class Outcome:
    """How a step went, in parts each view words its own way: ``word`` (allowed, blocked,
    approved, denied, held), the people who decided it, and a note (the rule that blocked
    it, the status a step is still in or failed with)."""

    word: str
    people: tuple[str, ...] = ()
    note: str | None = None

    def __str__(self) -> str:
        who = f" by {', '.join(self.people)}" if self.people else ""
        return f"{self.word}{who}" + (f", {self.note}" if self.note else "")


@dataclass(frozen=True)
class Step:
    """One command of a run and everything that happened to it."""

    id: uuid.UUID
    agent: str
    run_id: str | None  # as the agent gave it
    run: str  # the run's name
    at: datetime
    target: str
    command: str
    verdict: Verdict
    status: str  # the request's status; "blocked" for a blocked command
    rule: str | None
    ended_at: datetime | None = None  # when it reached its final status
    error: str | None = None
    votes: tuple[Vote, ...] = ()
    grant: GrantLife | None = None
    recording: Recording | None = None

    @property
    def outcome(self) -> Outcome:
        if self.verdict == "blocked":
            return Outcome("blocked")
        if self.verdict == "allowed":
            return Outcome("allowed", note="failed" if self.status == "failed" else None)
        denial = next((v for v in self.votes if v.decision == "deny"), None)
        if denial is not None:
            return Outcome("denied", (denial.approver,))
        approvers = tuple(v.approver for v in self.votes if v.decision == "approve")
        if approvers and self.status in ("approved", "executing", "executed", "failed"):
            note = None if self.status == "executed" else self.status
            return Outcome("approved", approvers, note)
        return Outcome("held", note=self.status)


@dataclass(frozen=True)
class RunSummary:
    """One line of ``keyturn runs list``."""

    run: str
    agents: tuple[str, ...]
    started: datetime
    last: datetime
    steps: int
    held: int
    denied: int
    blocked: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """A run's steps, oldest first; ``more``: steps after them were left out (a limit)."""

    name: str
    steps: list[Step]
    more: bool = False

    @property
    def agents(self) -> list[str]:
        return sorted({s.agent for s in self.steps})


@dataclass(frozen=True)
class RunSoFar:
    """What came before a step in its run: the last few steps, oldest first, and how many
    earlier ones there are (None: too many to count)."""

    name: str
    steps: tuple[Step, ...]
    earlier: int | None
