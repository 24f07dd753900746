"""What the use cases need of a kind of target: the driver interface, and drivers by kind.

A driver (:mod:`gateway.drivers`) holds everything specific to one kind of target: how an
allowed command runs on the gateway's own standing credentials (if the kind has any), what a
held command's card is told about it beforehand, how an approved command runs with the
credentials the bot handed over, and how its output is masked. The use cases know the
interface only; the bootstrap builds the drivers and registers them by the policy's ``kind``.

A driver reports a command that did not complete as :class:`RunFailed`, saying in its
``outcome`` how the agent is answered — the use cases never see a driver's own exceptions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from keyturn.classify import Identity
from keyturn.classify.catalog import Catalog
from keyturn.config.rules import Rule
from keyturn.errors import InvalidInput, KeyturnError, NotFound
from keyturn.supervise import Loop

# How a command that did not complete is answered:
#   failed      — the target (or the gateway's checks on it) refused it: the request failed
#   busy        — it never started for want of room on the target in time: retry later
#   unreachable — the target could not be reached: the gateway is unavailable
#   error       — a keyturn error of the gateway's own (``error``), answered as itself
Answer = Literal["failed", "busy", "unreachable", "error"]
# What the agent is told when a driver raised something other than RunFailed (a bug): the
# request still ends, as failed, and the details go to the log only.
UNEXPECTED = "an unexpected error, in the gateway's log; it may have reached the target"


class RunFailed(Exception):
    """A command did not complete; ``message`` is what the agent is told and recorded.

    ``final``: a retry with the same Idempotency-Key must get this same answer (some of it may
    have reached the target, or judging refused it). Otherwise nothing reached the target and
    the key is given back, so a retry runs it.
    """

    def __init__(
        self,
        message: str,
        *,
        final: bool,
        outcome: Answer = "failed",
        error: KeyturnError | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.final = final
        self.outcome = "error" if error is not None else outcome
        self.error = error


@dataclass(frozen=True)
class Allowed:
    """An allowed command, to run once ``recorded`` (its record's commit) is done."""

    target: str
    command: str
    who: Identity
    request_id: uuid.UUID
    rule: Rule | None
    recorded: asyncio.Future[None]


def as_text(kind: str, target: str, command: str, *, as_http: bool) -> str:
    """:meth:`Driver.canonical` for kinds whose commands are text judged as sent (SQL, shell)."""
    if as_http:
        raise InvalidInput(f"{target} is a {kind} target: send command (http is for API calls)")
    return command


class Driver(Protocol):
    kind: ClassVar[str]
    description: ClassVar[str]  # for targets that have none of their own

    def canonical(self, target: str, command: str, *, as_http: bool) -> str:
        """The command as it will be judged, recorded, shown and run (one rendition), or
        InvalidInput; ``as_http``: the agent sent it in the ``http`` field, as an API call."""

    def runs_allowed(self, target: str) -> bool:
        """Whether the gateway runs an allowed command on ``target`` with standing credentials
        of its own. If not, an allowed command is approved by its rule and waits for the
        bot's credentials like any approved one."""

    async def catalog(self, target: str) -> Catalog | None:
        """What judging a command needs to know of ``target`` (None: nothing)."""

    async def run_allowed(self, allowed: Allowed) -> dict[str, Any]:
        """Run an allowed command: nothing reaches the target before ``allowed.recorded``.
        Returns the agent's (masked) result; raises RunFailed or a keyturn error."""

    async def describe_held(self, target: str, command: str, who: Identity) -> dict[str, Any]:
        """What the card and the agent are told of a held command before anyone decides
        (``estimated_rows``); empty when nothing can be known safely."""

    async def run_approved(
        self, target: str, command: str, credentials: dict[str, Any]
    ) -> dict[str, Any]:
        """Run exactly the approved command with the bot's credentials; the (masked) result.
        Raises RunFailed or a keyturn error."""

    def background(self) -> list[Loop]:
        """Its loops (the bootstrap supervises them)."""

    async def close(self) -> None:
        """Release everything it holds (connections, leases)."""


@dataclass(frozen=True)
class Described:
    """A statement as its target parses it, before anything runs (for the Postgres protocol's
    Describe): its parameters and its result's columns."""

    params: tuple[tuple[int, str], ...]  # (type oid, the type's SQL name)
    columns: tuple[tuple[str, int], ...]  # (name, type oid); a masked column is text (25)


@dataclass(frozen=True)
class SessionFacts:
    """What the sessions a target's statements run on report, for a client that asks."""

    server_version: str
    timezone: str
    search_path: tuple[str, ...]


class StatementRefused(InvalidInput):
    """The target refused to parse a statement; ``sqlstate`` is its own code."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@runtime_checkable
class Describes(Protocol):
    """A driver whose targets can parse a statement without running it (Postgres)."""

    async def describe(self, target: str, sql: str, who: Identity) -> Described:
        """``sql`` as ``target`` parses it, on ``who``'s read-only login; raises
        StatementRefused for what the target refuses, or a keyturn error."""

    async def session_facts(self, target: str) -> SessionFacts:
        """The settings ``target``'s sessions report (read once, then cached)."""


class Drivers:
    """The drivers by kind, and the kind of each target in the policy."""

    def __init__(self, kinds: Mapping[str, str], drivers: list[Driver]) -> None:
        self._by_kind = {driver.kind: driver for driver in drivers}
        self._of = {target: self._by_kind[kind] for target, kind in kinds.items()}  # hot path

    def __iter__(self) -> Iterator[Driver]:
        return iter(self._by_kind.values())

    def kind(self, kind: str) -> Driver:
        return self._by_kind[kind]

    def of(self, target: str) -> Driver:
        """The driver of ``target``, one the policy names (the use cases check access first:
        :func:`keyturn.classify.check_access`)."""
        driver = self._of.get(target)
        if driver is None:
            raise NotFound(f"unknown target {target!r}")
        return driver
