"""Cards get their own table: the bot's bookkeeping leaves the request row.

Where each approval card was posted, which replica claimed it, and which version of the
request it shows move from five ``requests`` columns to ``cards`` (one row per request that
has a card or a claim). Data is copied both ways.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MOVED = ("slack_channel", "slack_ts", "card_claimed_by", "card_claimed_at", "card_status")


def upgrade() -> None:
    op.create_table(
        "cards",
        sa.Column("request_id", UUID(as_uuid=True), nullable=False),
        sa.Column("channel", sa.String(length=50), nullable=True),
        sa.Column("ts", sa.String(length=50), nullable=True),
        sa.Column("claimed_by", sa.String(length=100), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("shown", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["requests.id"],
            name="fk_cards_request_id_requests",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("request_id", name="pk_cards"),
    )
    op.execute(
        "INSERT INTO cards (request_id, channel, ts, claimed_by, claimed_at, shown)"
        " SELECT id, slack_channel, slack_ts, card_claimed_by, card_claimed_at, card_status"
        " FROM requests WHERE slack_ts IS NOT NULL OR card_claimed_by IS NOT NULL"
    )
    for column in _MOVED:
        op.drop_column("requests", column)


def downgrade() -> None:
    op.add_column("requests", sa.Column("slack_channel", sa.String(length=50), nullable=True))
    op.add_column("requests", sa.Column("slack_ts", sa.String(length=50), nullable=True))
    op.add_column("requests", sa.Column("card_claimed_by", sa.String(length=100), nullable=True))
    op.add_column(
        "requests", sa.Column("card_claimed_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("requests", sa.Column("card_status", sa.String(length=100), nullable=True))
    op.execute(
        "UPDATE requests r SET slack_channel = c.channel, slack_ts = c.ts,"
        " card_claimed_by = c.claimed_by, card_claimed_at = c.claimed_at, card_status = c.shown"
        " FROM cards c WHERE c.request_id = r.id"
    )
    op.drop_table("cards")
