"""Agent runs: each step's output as the agent saw it (``recordings``, a blocked command's step
with it), every agent step's run (``requests.run``), and the function that names the run of a
step written without a run_id.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The run a step of ``agent`` at ``at`` joins when it names none: the run of the agent's
# latest step without a run_id, if that is at most ``gap`` earlier (or later: a held request's
# time is the gateway's clock, which may run ahead of the database's); else a new one named
# for ``step``. Called as steps are written, so every step carries its run and reading a run is an
# index lookup, however long it is.
RUN_AFTER = """
CREATE FUNCTION keyturn_run_after(agent text, step uuid, at timestamptz, gap interval)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT p.run FROM (
            (SELECT r.run, r.created_at AS at FROM requests r
             WHERE r.requester = $1 AND r.run_id IS NULL AND NOT r.access AND r.run IS NOT NULL
             ORDER BY r.created_at DESC LIMIT 1)
            UNION ALL
            (SELECT k.run, k.at FROM recordings k
             WHERE k.request_id IS NULL AND k.agent = $1 AND k.run_id IS NULL
             ORDER BY k.at DESC LIMIT 1)
        ) p WHERE p.at >= $3 - $4 ORDER BY p.at DESC LIMIT 1),
        'auto-' || $2)
$$
"""
# A blocked command has no request row: its recording is its step, with all of it.
BLOCKED_HAS = (
    "(request_id IS NULL) = (command IS NOT NULL AND agent IS NOT NULL AND run IS NOT NULL"
    " AND target IS NOT NULL)"
)
# Requests already stored join runs as they would have: their run_id, or idle gaps of 15 min
# (the default record.run_gap).
BACKFILL_NAMED = "UPDATE requests SET run = run_id WHERE run_id IS NOT NULL AND NOT access"
BACKFILL = """
UPDATE requests r SET run = 'auto-' || g.first
FROM (
    SELECT id, first_value(id) OVER (PARTITION BY requester, grp ORDER BY created_at, id) AS first
    FROM (
        SELECT id, requester, created_at,
               sum(CASE WHEN opens THEN 1 ELSE 0 END)
                   OVER (PARTITION BY requester ORDER BY created_at, id) AS grp
        FROM (
            SELECT id, requester, created_at, coalesce(created_at - lag(created_at)
                OVER (PARTITION BY requester ORDER BY created_at, id) > interval '15 minutes',
                true) AS opens
            FROM requests WHERE run_id IS NULL AND NOT access
        ) marked
    ) grouped
) g
WHERE r.id = g.id
"""


def upgrade() -> None:
    op.add_column("requests", sa.Column("run", sa.String(200), nullable=True))
    op.create_table(
        "recordings",
        sa.Column("step_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("request_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("agent", sa.String(200), nullable=True),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("run", sa.String(200), nullable=True),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("command", sa.Text(), nullable=True),
        sa.Column("rule", sa.String(200), nullable=True),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("kept", sa.String(10), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("output_bytes", sa.BigInteger(), nullable=False),
        sa.Column("output_sha256", sa.String(64), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("stored_sha256", sa.String(64), nullable=False),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "kept IN ('none', 'tags', 'masked')", name=op.f("ck_recordings_kept_known")
        ),
        sa.CheckConstraint(BLOCKED_HAS, name=op.f("ck_recordings_blocked_step")),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["requests.id"],
            name=op.f("fk_recordings_request_id_requests"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("step_id", name=op.f("pk_recordings")),
        sa.UniqueConstraint("request_id", name=op.f("uq_recordings_request_id")),
    )
    op.create_index("ix_requests_run", "requests", ["run", "requester", "created_at"])
    op.create_index(
        "ix_requests_implicit",
        "requests",
        ["requester", "created_at"],
        postgresql_where=sa.text("run_id IS NULL AND NOT access"),
    )
    op.create_index(
        "ix_recordings_run",
        "recordings",
        ["run", "agent", "at"],
        postgresql_where=sa.text("run IS NOT NULL"),
    )
    op.create_index(
        "ix_recordings_implicit",
        "recordings",
        ["agent", "at"],
        postgresql_where=sa.text("request_id IS NULL AND run_id IS NULL"),
    )
    op.create_index(
        "ix_recordings_kept_at",
        "recordings",
        ["at"],
        postgresql_where=sa.text("output IS NOT NULL"),
    )
    op.execute(BACKFILL_NAMED)
    op.execute(BACKFILL)
    op.execute(RUN_AFTER)


def downgrade() -> None:
    op.execute("DROP FUNCTION keyturn_run_after(text, uuid, timestamptz, interval)")
    op.drop_index("ix_requests_implicit", table_name="requests")
    op.drop_index("ix_requests_run", table_name="requests")
    op.drop_table("recordings")
    op.drop_column("requests", "run")
