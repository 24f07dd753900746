"""SSH keys people register for their own sessions (``/keyturn ssh-key add``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ssh_keys",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("owner", sa.String(length=50), nullable=False),
        sa.Column("fingerprint", sa.String(length=100), nullable=False),
        sa.Column("algorithm", sa.String(length=40), nullable=False),
        sa.Column("bits", sa.Integer(), nullable=True),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ssh_keys"),
        sa.UniqueConstraint("owner", "fingerprint", name="uq_ssh_keys_owner"),
    )
    op.create_index("ix_ssh_keys_owner", "ssh_keys", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_ssh_keys_owner", table_name="ssh_keys")
    op.drop_table("ssh_keys")
