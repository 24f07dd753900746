"""A person's own access is called access: ``requests.session`` becomes ``requests.access``
(its partial unique index renamed with it). A card's version is a JSON object with typed
fields instead of ``status:votes:grant@expiry`` text; cards already posted keep what they
show, rewritten in the new form, so no card is redrawn and no news is sent for the change.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GRANT = "split_part(shown, ':', 3)"
TO_JSON = f"""
UPDATE cards SET shown = jsonb_build_object(
    'status', split_part(shown, ':', 1),
    'votes', split_part(shown, ':', 2)::bigint,
    'grant', CASE WHEN {_GRANT} LIKE '%@%' THEN split_part({_GRANT}, '@', 1) END,
    'grant_expires', CASE WHEN {_GRANT} LIKE '%@%' THEN split_part({_GRANT}, '@', 2)::bigint END,
    'retrying', {_GRANT} = 'retry')::text
WHERE shown IS NOT NULL AND shown NOT LIKE '{{%'
"""
TO_TEXT = """
UPDATE cards SET shown = (shown::jsonb ->> 'status') || ':' || (shown::jsonb ->> 'votes') || ':'
    || CASE WHEN shown::jsonb ->> 'grant' IS NOT NULL
            THEN (shown::jsonb ->> 'grant') || '@' || (shown::jsonb ->> 'grant_expires')
            WHEN (shown::jsonb ->> 'retrying')::boolean THEN 'retry' ELSE '' END
WHERE shown LIKE '{%'
"""


def upgrade() -> None:
    op.alter_column("requests", "session", new_column_name="access")
    op.execute("ALTER INDEX uq_requests_open_session RENAME TO uq_requests_open_access")
    op.alter_column("cards", "shown", type_=sa.Text())
    op.execute(TO_JSON)


def downgrade() -> None:
    op.execute(TO_TEXT)
    op.alter_column("cards", "shown", type_=sa.String(100))
    op.execute("ALTER INDEX uq_requests_open_access RENAME TO uq_requests_open_session")
    op.alter_column("requests", "access", new_column_name="session")
