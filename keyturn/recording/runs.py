"""Runs: an agent's steps, in order, and what a run says about itself.

A run is the agent's ``run_id`` when it gives one. Without one, an agent's steps make one run
per idle gap: a step more than ``record.run_gap`` after the agent's previous step without a
``run_id`` opens a new run, named ``auto-<that step's id>``. The name depends only on the
steps before it, so it never changes as later steps arrive; ``auto-`` is therefore kept for
these names, and a ``run_id`` may not start with it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from keyturn.recording.output import Recorded

AUTO = "auto-"
MAX_RUN_ID = 200

Verdict = Literal["allowed", "held", "blocked"]


class BadRunId(ValueError):
    """A run id an agent may not use."""


def check_run_id(value: str) -> str:
    """``value`` as a run id, or :class:`BadRunId` saying why not."""
    if not 1 <= len(value) <= MAX_RUN_ID:
        raise BadRunId(f"a run_id is 1 to {MAX_RUN_ID} characters")
    if not value.isprintable():
        raise BadRunId("a run_id has printable characters only")
    if value.startswith(AUTO):
        raise BadRunId(f"run ids starting with {AUTO!r} name keyturn's own runs (idle gaps)")
    return value


def auto_run(value: str) -> uuid.UUID | None:
    """The first step of an idle-gap run named ``value``; None for an agent's own run id."""
    if not value.startswith(AUTO):
        return None
    try:
        return uuid.UUID(value.removeprefix(AUTO))
    except ValueError:
        return None


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
class Step:
    """One command of a run and everything that happened to it."""

    id: uuid.UUID
    agent: str
    run_id: str | None
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
    recorded: Recorded | None = None

    @property
    def decided_by(self) -> list[str]:
        """Who decided it: people, or ``policy:<rule>`` for a rule's own approval."""
        return [v.approver for v in self.votes]

    @property
    def summary(self) -> str:
        """A few words on how it went: ``allowed``, ``blocked``, ``approved by U1``…"""
        if self.verdict != "held":
            return self.verdict if self.status not in ("failed",) else f"{self.verdict}, failed"
        denial = next((v for v in self.votes if v.decision == "deny"), None)
        if denial is not None:
            return f"denied by {denial.approver}"
        approvers = [v.approver for v in self.votes if v.decision == "approve"]
        if self.status in ("executed", "failed", "executing", "approved") and approvers:
            ran = "" if self.status == "executed" else f", {self.status}"
            return f"approved by {', '.join(approvers)}{ran}"
        return f"held, {self.status}"


@dataclass(frozen=True)
class RunSummary:
    """One line of ``keyturn runs list``."""

    id: str
    agents: tuple[str, ...]
    started: datetime
    last: datetime
    steps: int
    held: int
    denied: int
    blocked: int
    targets: tuple[str, ...]


@dataclass
class Run:
    """A run's steps, oldest first; ``later`` counts steps after them left out (a limit)."""

    id: str
    steps: list[Step] = field(default_factory=list)
    later: int = 0

    @property
    def agents(self) -> list[str]:
        return sorted({s.agent for s in self.steps})
