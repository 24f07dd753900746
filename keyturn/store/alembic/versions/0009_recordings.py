"""Agent runs: each step's output as the agent saw it (``recordings``), and the indexes that
find an agent's steps in order and a run's by its id.

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


def upgrade() -> None:
    op.create_table(
        "recordings",
        sa.Column("step_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("request_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("target", sa.String(200), nullable=False),
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
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "kept IN ('none', 'tags', 'masked')", name=op.f("ck_recordings_kept_known")
        ),
        sa.CheckConstraint(
            "(request_id IS NULL) = (command IS NOT NULL)",
            name=op.f("ck_recordings_command_if_blocked"),
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["requests.id"],
            name=op.f("fk_recordings_request_id_requests"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("step_id", name=op.f("pk_recordings")),
        sa.UniqueConstraint("request_id", name=op.f("uq_recordings_request_id")),
    )
    op.create_index("ix_recordings_run_id", "recordings", ["run_id"])
    op.create_index(
        "ix_recordings_blocked",
        "recordings",
        ["agent", "at"],
        postgresql_where=sa.text("request_id IS NULL"),
    )
    op.create_index(
        "ix_recordings_kept_at",
        "recordings",
        ["at"],
        postgresql_where=sa.text("output IS NOT NULL"),
    )
    op.create_index("ix_requests_requester_created", "requests", ["requester", "created_at"])
    op.create_index("ix_requests_run_id", "requests", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_requests_run_id", table_name="requests")
    op.drop_index("ix_requests_requester_created", table_name="requests")
    op.drop_table("recordings")
