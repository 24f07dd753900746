"""Approval cards: where each request's Slack card lives, and which bot replica posts it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("slack_channel", sa.String(length=50), nullable=True))
    op.add_column("requests", sa.Column("slack_ts", sa.String(length=50), nullable=True))
    op.add_column("requests", sa.Column("card_claimed_by", sa.String(length=100), nullable=True))
    op.add_column(
        "requests", sa.Column("card_claimed_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("requests", sa.Column("card_status", sa.String(length=20), nullable=True))


def downgrade() -> None:
    op.drop_column("requests", "card_status")
    op.drop_column("requests", "card_claimed_at")
    op.drop_column("requests", "card_claimed_by")
    op.drop_column("requests", "slack_ts")
    op.drop_column("requests", "slack_channel")
