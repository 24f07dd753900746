"""An agent's runs read back: a run's steps in order with their votes, grants and recordings,
one step, and the run so far before a held step (its card's context).

Every step carries its run's name from the moment it is written (``requests.run``, or a
blocked command's ``recordings.run``; ``keyturn_run_after`` names the runs of steps without a
run_id), so reading a run is an index lookup however long it is. Each read is one
repeatable-read snapshot: its pages, counts and details agree.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from keyturn.domain import RequestStatus, policy_decider
from keyturn.errors import NotFound
from keyturn.recording.runs import GrantLife, Run, RunSoFar, Step, Verdict, Vote
from keyturn.store.db import Store
from keyturn.store.recordings import recording_of

MAX_COUNT = 100_000  # earlier steps counted for a card; past it, "many"

_POLICY = policy_decider("") + "%"  # a rule's own approval: the step was allowed
_HELD = (
    "r.pending_expires_at > r.created_at AND NOT EXISTS (SELECT 1 FROM approvals a"
    f" WHERE a.request_id = r.id AND a.approver LIKE '{_POLICY}')"
)
_WAITING = tuple(s.value for s in RequestStatus if not s.terminal)


def steps_sql(where_r: str, where_k: str) -> str:
    """Requests and blocked commands as steps, each side filtered by its own condition
    (``r``: requests, ``k``: blocked commands' recordings)."""
    return f"""
    SELECT r.id, r.requester AS agent, r.run_id, r.run, r.created_at AS at, r.target,
           r.command, r.status, r.rule, false AS blocked, r.updated_at AS changed_at, r.error,
           {_HELD} AS held
    FROM requests r WHERE NOT r.access AND {where_r}
    UNION ALL
    SELECT k.step_id, k.agent, k.run_id, k.run, k.at, k.target, k.command, 'blocked', k.rule,
           true, k.at, NULL, false
    FROM recordings k WHERE k.request_id IS NULL AND {where_k}"""


_OF_RUN = (
    "SELECT * FROM ("
    + steps_sql(
        "r.run = $1 AND ($2::text IS NULL OR r.requester = $2)"
        " AND (NOT $4::boolean OR r.status = ANY($5::text[]))",
        "k.run = $1 AND ($2::text IS NULL OR k.agent = $2) AND NOT $4::boolean",
    )
    + ") s ORDER BY s.at, s.id LIMIT $3"
)
_BEFORE = steps_sql(
    "r.run = $1 AND r.requester = $2 AND (r.created_at, r.id) < ($3, $4)",
    "k.run = $1 AND k.agent = $2 AND (k.at, k.step_id) < ($3, $4)",
)
_LAST_BEFORE = f"SELECT * FROM ({_BEFORE}) s ORDER BY s.at DESC, s.id DESC LIMIT $5"
_COUNT_BEFORE = f"SELECT count(*) FROM (SELECT 1 FROM ({_BEFORE}) s LIMIT $5) capped"
_ONE = "SELECT * FROM (" + steps_sql("r.id = $1", "k.step_id = $1") + ") s"


@contextlib.asynccontextmanager
async def snapshot(store: Store) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a read-only, repeatable-read transaction: one view of the store."""
    async with (
        store.raw_connection() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        yield conn


async def run(
    store: Store,
    name: str,
    *,
    agent: str | None = None,
    limit: int = 1000,
    waiting: bool = False,
    outputs: bool = True,
) -> Run:
    """The first ``limit`` steps of run ``name``; ``agent`` keeps to one identity's steps (a
    run_id two agents share is one run), ``waiting`` to requests not yet ended. NotFound
    when it has none."""
    async with snapshot(store) as conn:
        rows = await conn.fetch(_OF_RUN, name, agent, limit + 1, waiting, list(_WAITING))
        steps = await detailed(conn, rows[:limit], outputs=outputs)
    if not steps and not waiting:
        raise NotFound(f"run {name} not found")
    return Run(name, steps, more=len(rows) > limit)


async def step(store: Store, step_id: uuid.UUID) -> Step | None:
    """One step, with its votes, grant and recording."""
    async with snapshot(store) as conn:
        row = await conn.fetchrow(_ONE, step_id)
        return None if row is None else (await detailed(conn, [row]))[0]


async def so_far(store: Store, step_id: uuid.UUID, *, last: int) -> RunSoFar | None:
    """The run a step belongs to, its last ``last`` steps before it (outputs not read), and
    how many came earlier; None for a request that is no agent's step."""
    async with snapshot(store) as conn:
        this = await conn.fetchrow(_ONE, step_id)
        if this is None or this["run"] is None:
            return None
        where = (this["run"], this["agent"], this["at"], this["id"])
        rows = list(reversed(await conn.fetch(_LAST_BEFORE, *where, last)))
        counted = int(await conn.fetchval(_COUNT_BEFORE, *where, MAX_COUNT))
        steps = await detailed(conn, rows, outputs=False)
    earlier = None if counted >= MAX_COUNT else counted - len(rows)
    return RunSoFar(this["run"], tuple(steps), earlier)


async def detailed(
    conn: asyncpg.Connection, rows: Sequence[asyncpg.Record], *, outputs: bool = True
) -> list[Step]:
    """Steps with their votes, grants and recordings (their outputs only when ``outputs``):
    three queries for all of them."""
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
        k["step_id"]: recording_of(k, k["output"])
        for k in await conn.fetch(
            "SELECT step_id, kept, CASE WHEN $2 THEN output END AS output, output_bytes,"
            " output_sha256, truncated, stored_sha256 FROM recordings"
            " WHERE step_id = ANY($1::uuid[])",
            ids,
            outputs,
        )
    }
    return [
        _step(row, tuple(votes.get(row["id"], ())), grants.get(row["id"]), kept) for row in rows
    ]


def _step(
    row: asyncpg.Record, votes: tuple[Vote, ...], grant: GrantLife | None, kept: dict[Any, Any]
) -> Step:
    verdict: Verdict = "blocked" if row["blocked"] else "held" if row["held"] else "allowed"
    status = row["status"]
    ended = status == "blocked" or RequestStatus(status).terminal
    return Step(
        id=row["id"],
        agent=row["agent"],
        run_id=row["run_id"],
        run=row["run"],
        at=row["at"],
        target=row["target"],
        command=row["command"],
        verdict=verdict,
        status=status,
        rule=row["rule"],
        ended_at=row["changed_at"] if ended else None,
        error=row["error"],
        votes=votes,
        grant=grant,
        recording=kept.get(row["id"]),
    )
