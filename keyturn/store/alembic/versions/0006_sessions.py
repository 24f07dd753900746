"""Humans' own sessions (``/keyturn db|ssh``): requests that run no command, and the
reminders their requesters and approvers get; and a backoff for a grant whose revocation
fails, so that it cannot hold up every other grant's.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "requests",
        sa.Column("session", sa.Boolean(), server_default="false", nullable=False),
    )
    # one pending or open session per person and target, whatever races the bot loses
    op.create_index(
        "uq_requests_open_session",
        "requests",
        ["requester", "target"],
        unique=True,
        postgresql_where=sa.text("session AND status IN ('pending', 'approved', 'executing')"),
    )
    op.add_column("grants", sa.Column("reminded_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "grants",
        sa.Column("revoke_attempts", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("grants", sa.Column("revoke_after", sa.DateTime(timezone=True), nullable=True))
    op.add_column("cards", sa.Column("reminded_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("cards", "reminded_at")
    op.drop_column("grants", "revoke_after")
    op.drop_column("grants", "revoke_attempts")
    op.drop_column("grants", "reminded_at")
    op.drop_index("uq_requests_open_session", table_name="requests")
    op.drop_column("requests", "session")
