"""JIT credentials: what a grant carries to the gateway, and retries of issuance.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("grants", sa.Column("kind", sa.String(length=20), nullable=True))
    op.add_column("grants", sa.Column("command_sha256", sa.String(length=64), nullable=True))
    op.add_column(
        "grants", sa.Column("one_shot", sa.Boolean(), server_default="false", nullable=False)
    )
    op.add_column("grants", sa.Column("handoff_token", sa.Text(), nullable=True))
    op.add_column(
        "grants", sa.Column("handoff_expires_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("grants", sa.Column("max_expires_at", sa.DateTime(timezone=True), nullable=True))
    # At most one live grant per request: a second issuance fails instead of leaking a lease.
    op.create_index(
        "uq_grants_active_request",
        "grants",
        ["request_id"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
    )
    op.add_column(
        "requests", sa.Column("issue_attempts", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column("requests", sa.Column("issue_after", sa.DateTime(timezone=True), nullable=True))
    op.add_column("requests", sa.Column("issue_error", sa.Text(), nullable=True))
    op.alter_column("requests", "card_status", type_=sa.String(length=100))


def downgrade() -> None:
    op.alter_column("requests", "card_status", type_=sa.String(length=20))
    op.drop_column("requests", "issue_error")
    op.drop_column("requests", "issue_after")
    op.drop_column("requests", "issue_attempts")
    op.drop_index("uq_grants_active_request", table_name="grants")
    for column in (
        "max_expires_at",
        "handoff_expires_at",
        "handoff_token",
        "one_shot",
        "command_sha256",
        "kind",
    ):
        op.drop_column("grants", column)
