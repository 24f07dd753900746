"""The runs of a period (``keyturn runs list``): one summary a run, newest first, from one
grouping query over the steps' run names."""

from __future__ import annotations

from datetime import datetime

from keyturn.recording.runs import RunSummary
from keyturn.store.db import Store
from keyturn.store.run_steps import snapshot, steps_sql

_LIST = f"""
SELECT s.run, array_agg(DISTINCT s.agent) AS agents, min(s.at) AS started, max(s.at) AS last,
       count(*) AS steps, count(*) FILTER (WHERE s.held) AS held,
       count(*) FILTER (WHERE s.status = 'denied') AS denied,
       count(*) FILTER (WHERE s.blocked) AS blocked, array_agg(DISTINCT s.target) AS targets
FROM ({
    steps_sql(
        "r.created_at >= $1 AND ($2::text IS NULL OR r.requester = $2)",
        "k.at >= $1 AND ($2::text IS NULL OR k.agent = $2)",
    )
}) s
WHERE s.run IS NOT NULL
GROUP BY s.run
HAVING $3::text IS NULL OR $3 = ANY(array_agg(s.target))
ORDER BY max(s.at) DESC LIMIT $4
"""


async def runs_since(
    store: Store,
    since: datetime,
    *,
    agent: str | None = None,
    target: str | None = None,
    limit: int = 200,
) -> list[RunSummary]:
    """The runs with steps since ``since``, newest first; counts are of those steps."""
    async with snapshot(store) as conn:
        found = await conn.fetch(_LIST, since, agent, target, limit)
    return [
        RunSummary(
            run=row["run"],
            agents=tuple(sorted(row["agents"])),
            started=row["started"],
            last=row["last"],
            steps=row["steps"],
            held=row["held"],
            denied=row["denied"],
            blocked=row["blocked"],
            targets=tuple(sorted(row["targets"])),
        )
        for row in found
    ]
