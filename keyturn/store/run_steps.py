"""An agent's runs read back: steps in order with their votes, grants and recordings, the
runs of a period, and the run so far before a held step (its card's context).

Idle-gap runs (:mod:`keyturn.recording.runs`) are found from the steps themselves: a run
starts at a step with no step of the same agent (without a ``run_id``) less than
``record.run_gap`` before it. Reading one walks the agent's steps in pages along the
``(requester, created_at)`` index, so no read holds more than a page and a run's limit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg

from keyturn.domain import policy_decider
from keyturn.errors import NotFound
from keyturn.recording.output import Kept, Recorded
from keyturn.recording.runs import (
    AUTO,
    GrantLife,
    Run,
    RunSummary,
    Step,
    Verdict,
    Vote,
    auto_run,
)
from keyturn.store.db import Store

PAGE = 500
MAX_WALK = 50_000  # steps walked back to find where an idle-gap run began

_POLICY = policy_decider("") + "%"  # a rule's own approval: the step was allowed
_HELD = (
    "r.pending_expires_at > r.created_at AND NOT EXISTS (SELECT 1 FROM approvals a"
    f" WHERE a.request_id = r.id AND a.approver LIKE '{_POLICY}')"
)


def _steps(where_r: str, where_k: str) -> str:
    """Requests and blocked commands as steps, filtered by each side's condition."""
    return f"""
    SELECT r.id, r.requester AS agent, r.run_id, r.created_at AS at, r.target, r.command,
           r.status, r.rule, false AS blocked, r.pending_expires_at > r.created_at AS waited,
           r.updated_at AS changed_at, r.error, {_HELD} AS held
    FROM requests r WHERE NOT r.access AND {where_r}
    UNION ALL
    SELECT k.step_id, k.agent, k.run_id, k.at, k.target, k.command, 'blocked', k.rule, true,
           false, k.at, NULL, false
    FROM recordings k WHERE k.request_id IS NULL AND {where_k}"""


_EXPLICIT = (
    "SELECT * FROM ("
    + _steps(
        "r.run_id = $1 AND ($2::text IS NULL OR r.requester = $2)",
        "k.run_id = $1 AND ($2::text IS NULL OR k.agent = $2)",
    )
    + ") s ORDER BY s.at, s.id LIMIT $3"
)
_AFTER, _BEFORE = (
    "SELECT * FROM ("
    + _steps(
        f"r.requester = $1 AND r.run_id IS NULL AND (r.created_at, r.id) {op} ($2, $3)",
        f"k.agent = $1 AND k.run_id IS NULL AND (k.at, k.step_id) {op} ($2, $3)",
    )
    + f") s ORDER BY s.at {order}, s.id {order} LIMIT $4"
    for op, order in ((">", "ASC"), ("<", "DESC"))
)
_ONE = "SELECT * FROM (" + _steps("r.id = $1", "k.step_id = $1") + ") s"
_EARLIER_EXPLICIT = (
    "SELECT count(*) FROM ("
    + _steps(
        "r.run_id = $1 AND r.requester = $2 AND (r.created_at, r.id) < ($3, $4)",
        "k.run_id = $1 AND k.agent = $2 AND (k.at, k.step_id) < ($3, $4)",
    )
    + ") s"
)
_LAST_EXPLICIT = (
    "SELECT * FROM ("
    + _steps(
        "r.run_id = $1 AND r.requester = $2 AND (r.created_at, r.id) < ($3, $4)",
        "k.run_id = $1 AND k.agent = $2 AND (k.at, k.step_id) < ($3, $4)",
    )
    + ") s ORDER BY s.at DESC, s.id DESC LIMIT $5"
)


@dataclass(frozen=True)
class RunSoFar:
    """What came before a step in its run: the last few steps, oldest first, and how many
    earlier ones are left out (None: more than keyturn walks back to count)."""

    run: str
    steps: list[Step]
    earlier: int | None


async def run(
    store: Store, name: str, gap: timedelta, *, agent: str | None = None, limit: int = 1000
) -> Run:
    """The run named ``name`` (an agent's run_id, or ``auto-<step id>``), at most ``limit``
    steps of it; ``agent`` keeps to one identity's steps. NotFound when it has none."""
    first = auto_run(name)
    async with store.raw_connection() as conn:
        if first is None:
            rows = await conn.fetch(_EXPLICIT, name, agent, limit + 1)
        else:
            rows = await _idle_gap_run(conn, first, gap, agent, limit + 1)
        steps = await _detailed(conn, rows[:limit])
    if not steps:
        raise NotFound(f"run {name} not found")
    return Run(name, steps, later=max(len(rows) - limit, 0))


async def _idle_gap_run(
    conn: asyncpg.Connection, first: uuid.UUID, gap: timedelta, agent: str | None, limit: int
) -> list[asyncpg.Record]:
    start = await conn.fetchrow(_ONE, first)
    if start is None or start["run_id"] is not None or agent not in (None, start["agent"]):
        return []
    if await _previous(conn, start, gap) is not None:
        return []  # it continues an earlier run: not the first step of one
    rows = [start]
    while len(rows) < limit:
        wanted = min(PAGE, limit - len(rows))
        page = await conn.fetch(_AFTER, start["agent"], rows[-1]["at"], rows[-1]["id"], wanted)
        for row in page:
            if row["at"] - rows[-1]["at"] > gap:
                return rows
            rows.append(row)
        if len(page) < wanted:
            break
    return rows


async def _previous(
    conn: asyncpg.Connection, step: asyncpg.Record, gap: timedelta
) -> asyncpg.Record | None:
    """The agent's step without a run_id just before ``step``, if within ``gap``."""
    before = await conn.fetch(_BEFORE, step["agent"], step["at"], step["id"], 1)
    if before and step["at"] - before[0]["at"] <= gap:
        return before[0]
    return None


async def step(store: Store, step_id: uuid.UUID) -> Step | None:
    """One step, with its votes, grant and recording."""
    async with store.raw_connection() as conn:
        row = await conn.fetchrow(_ONE, step_id)
        return None if row is None else (await _detailed(conn, [row]))[0]


async def so_far(
    store: Store, step_id: uuid.UUID, gap: timedelta, *, last: int = 5
) -> RunSoFar | None:
    """The run a step belongs to and its last ``last`` steps before it."""
    async with store.raw_connection() as conn:
        step = await conn.fetchrow(_ONE, step_id)
        if step is None:
            return None
        if step["run_id"] is not None:
            args = (step["run_id"], step["agent"], step["at"], step["id"])
            rows = list(reversed(await conn.fetch(_LAST_EXPLICIT, *args, last)))
            counted = int(await conn.fetchval(_EARLIER_EXPLICIT, *args)) - len(rows)
            return RunSoFar(step["run_id"], await _detailed(conn, rows), counted)
        walked = await _walk_back(conn, step, gap)
        start = walked[-1] if walked else step
        name = f"{AUTO}{start['id']}" if len(walked) < MAX_WALK else "?"
        rows = list(reversed(walked[:last]))
        earlier = len(walked) - len(rows) if len(walked) < MAX_WALK else None
        return RunSoFar(name, await _detailed(conn, rows), earlier)


async def _walk_back(conn: asyncpg.Connection, step: asyncpg.Record, gap: timedelta) -> list[Any]:
    """The idle-gap run's steps before ``step``, newest first (at most MAX_WALK)."""
    walked: list[asyncpg.Record] = []
    newest = step
    while len(walked) < MAX_WALK:
        page = await conn.fetch(_BEFORE, step["agent"], newest["at"], newest["id"], PAGE)
        for row in page:
            if newest["at"] - row["at"] > gap:
                return walked
            walked.append(row)
            newest = row
        if len(page) < PAGE:
            break
    return walked


async def _detailed(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> list[Step]:
    """Steps with their votes, grants and recordings: three queries for all of them."""
    ids = [row["id"] for row in rows]
    votes: dict[uuid.UUID, list[Vote]] = {}
    for v in await conn.fetch(
        "SELECT request_id, approver, decision, at, reason FROM approvals"
        " WHERE request_id = ANY($1::uuid[]) ORDER BY id",
        ids,
    ):
        votes.setdefault(v["request_id"], []).append(Vote(*list(v)[1:]))
    grants = {
        g["request_id"]: GrantLife(*list(g)[1:])
        for g in await conn.fetch(
            "SELECT DISTINCT ON (request_id) request_id, id, created_at, expires_at, status,"
            " ended_at, ended_by FROM grants WHERE request_id = ANY($1::uuid[])"
            " ORDER BY request_id, created_at DESC",
            ids,
        )
    }
    kept = {
        k["step_id"]: Recorded(
            k["step_id"],
            _kept(k["kept"]),
            k["output"],
            k["output_bytes"],
            k["output_sha256"],
            k["truncated"],
            k["stored_sha256"],
        )
        for k in await conn.fetch(
            "SELECT step_id, kept, output, output_bytes, output_sha256, truncated,"
            " stored_sha256 FROM recordings WHERE step_id = ANY($1::uuid[])",
            ids,
        )
    }
    return [
        _step(row, tuple(votes.get(row["id"], ())), grants.get(row["id"]), kept) for row in rows
    ]


def _kept(value: str) -> Kept:
    if value not in ("none", "tags", "masked"):
        raise ValueError(f"unknown recording kind {value!r}")
    return cast(Kept, value)


_FINAL = frozenset({"executed", "failed", "denied", "expired", "cancelled", "blocked"})


def _step(
    row: asyncpg.Record,
    votes: tuple[Vote, ...],
    grant: GrantLife | None,
    kept: dict[uuid.UUID, Recorded],
) -> Step:
    verdict: Verdict = "blocked" if row["blocked"] else "held" if row["held"] else "allowed"
    return Step(
        id=row["id"],
        agent=row["agent"],
        run_id=row["run_id"],
        at=row["at"],
        target=row["target"],
        command=row["command"],
        verdict=verdict,
        status=row["status"],
        rule=row["rule"],
        ended_at=row["changed_at"] if row["status"] in _FINAL else None,
        error=row["error"],
        votes=votes,
        grant=grant,
        recorded=kept.get(row["id"]),
    )


_LIST = (
    "WITH steps AS ("
    + _steps(
        "r.created_at >= $1 AND ($2::text IS NULL OR r.requester = $2)",
        "k.at >= $1 AND ($2::text IS NULL OR k.agent = $2)",
    )
    + """
), marked AS (
    SELECT s.*, (s.run_id IS NULL
                 AND coalesce(s.at - lag(s.at) OVER w > $3::interval, true)) AS opens
    FROM steps s WINDOW w AS (PARTITION BY s.agent, s.run_id IS NULL ORDER BY s.at, s.id)
), grouped AS (
    SELECT m.*, CASE WHEN m.run_id IS NULL THEN sum(m.opens::int) OVER w END AS grp
    FROM marked m WINDOW w AS (PARTITION BY m.agent, m.run_id IS NULL ORDER BY m.at, m.id)
)
SELECT g.run_id, (array_agg(g.id ORDER BY g.at, g.id))[1] AS first_id, min(g.grp) AS grp,
       array_agg(DISTINCT g.agent) AS agents, min(g.at) AS started, max(g.at) AS last,
       count(*) AS steps, count(*) FILTER (WHERE g.held) AS held,
       count(*) FILTER (WHERE g.status = 'denied') AS denied,
       count(*) FILTER (WHERE g.blocked) AS blocked, array_agg(DISTINCT g.target) AS targets
FROM grouped g
GROUP BY g.run_id, CASE WHEN g.run_id IS NULL THEN g.agent END, g.grp
HAVING $4::text IS NULL OR $4 = ANY(array_agg(g.target))
ORDER BY max(g.at) DESC LIMIT $5"""
)


async def runs_since(
    store: Store,
    since: datetime,
    gap: timedelta,
    *,
    agent: str | None = None,
    target: str | None = None,
    limit: int = 200,
) -> list[RunSummary]:
    """The runs with steps since ``since``, newest first; counts are of those steps. An
    idle-gap run that began earlier keeps the name of its real first step."""
    async with store.raw_connection() as conn:
        found = await conn.fetch(_LIST, since, agent, gap, target, limit)
        summaries = []
        for row in found:
            name = row["run_id"]
            if name is None:
                name = f"{AUTO}{row['first_id']}"
                if row["grp"] == 1:  # the window's first: it may go on from before it
                    first = await conn.fetchrow(_ONE, row["first_id"])
                    walked = await _walk_back(conn, first, gap)
                    name = f"{AUTO}{walked[-1]['id']}" if walked else name
            summaries.append(
                RunSummary(
                    id=name,
                    agents=tuple(sorted(row["agents"])),
                    started=row["started"],
                    last=row["last"],
                    steps=row["steps"],
                    held=row["held"],
                    denied=row["denied"],
                    blocked=row["blocked"],
                    targets=tuple(sorted(row["targets"])),
                )
            )
    return summaries
