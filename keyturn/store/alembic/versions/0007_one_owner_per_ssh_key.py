"""One owner per SSH public key: a certificate names the person whose key it signs, so two
people holding one key could not be told apart in a login. Later registrations of a key that
someone registered first are dropped (they were the ones that could not be told apart).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "DELETE FROM ssh_keys k USING ssh_keys first"
        " WHERE k.fingerprint = first.fingerprint AND k.id > first.id"
    )
    op.create_unique_constraint("uq_ssh_keys_fingerprint", "ssh_keys", ["fingerprint"])


def downgrade() -> None:
    op.drop_constraint("uq_ssh_keys_fingerprint", "ssh_keys", type_="unique")
