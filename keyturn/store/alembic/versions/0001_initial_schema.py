"""Initial schema: requests, approvals, grants and the audit chain.

Besides the tables: triggers that keep a stored command immutable and the audit log
append-only, and the audit chain's head row.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRIGGERS = [
    """
    CREATE FUNCTION keyturn_request_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.command IS DISTINCT FROM OLD.command
           OR NEW.command_sha256 IS DISTINCT FROM OLD.command_sha256
           OR NEW.target IS DISTINCT FROM OLD.target
           OR NEW.requester IS DISTINCT FROM OLD.requester
           OR NEW.on_behalf_of IS DISTINCT FROM OLD.on_behalf_of THEN
            RAISE EXCEPTION 'a stored request''s command, target and requester are immutable'
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER requests_immutable BEFORE UPDATE ON requests
    FOR EACH ROW EXECUTE FUNCTION keyturn_request_immutable()
    """,
    """
    CREATE FUNCTION keyturn_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END $$
    """,
    """
    CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION keyturn_append_only()
    """,
]

# The audit chain is computed by the database, so no writer can forge a position in it and an
# append is one INSERT. keyturn/audit.py recomputes the same digest to verify:
# sha256 over length-prefixed fields (prev_hash, seq, at in epoch microseconds, kind, actor,
# request_id, grant_id, data as jsonb text).
AUDIT_CHAIN = [
    """
    CREATE FUNCTION keyturn_audit_hash(
        prev_hash text, seq bigint, at timestamptz, kind text, actor text,
        request_id uuid, grant_id uuid, data jsonb
    ) RETURNS text LANGUAGE sql IMMUTABLE AS $$
        SELECT encode(sha256(convert_to(
            (SELECT string_agg(length(f) || ':' || f, '|' ORDER BY n)
             FROM unnest(ARRAY[
                prev_hash, seq::text,
                ((extract(epoch FROM at) * 1000000)::bigint)::text,
                kind, actor, coalesce(request_id::text, ''), coalesce(grant_id::text, ''),
                data::text
             ]) WITH ORDINALITY AS t(f, n)),
            'UTF8')), 'hex')
    $$
    """,
    """
    CREATE FUNCTION keyturn_audit_chain() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        head_seq bigint;
        head_hash text;
    BEGIN
        SELECT seq, hash INTO head_seq, head_hash FROM audit_head WHERE id = 1 FOR UPDATE;
        IF NOT FOUND THEN
            head_seq := 0;
            head_hash := repeat('0', 64);
            INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, head_hash);
        END IF;
        NEW.seq := head_seq + 1;
        NEW.at := now();
        NEW.prev_hash := head_hash;
        NEW.hash := keyturn_audit_hash(NEW.prev_hash, NEW.seq, NEW.at, NEW.kind, NEW.actor,
                                       NEW.request_id, NEW.grant_id, NEW.data);
        UPDATE audit_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
        RETURN NEW;
    END $$
    """,
    """
    CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION keyturn_audit_chain()
    """,
]

DROP_TRIGGERS = [
    "DROP TRIGGER IF EXISTS audit_events_chain ON audit_events",
    "DROP FUNCTION IF EXISTS keyturn_audit_chain()",
    "DROP FUNCTION IF EXISTS keyturn_audit_hash(text, bigint, timestamptz, text, text, uuid, uuid, jsonb)",
    "DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events",
    "DROP FUNCTION IF EXISTS keyturn_append_only()",
    "DROP TRIGGER IF EXISTS requests_immutable ON requests",
    "DROP FUNCTION IF EXISTS keyturn_request_immutable()",
]


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.UUID(), nullable=True),
        sa.Column("grant_id", sa.UUID(), nullable=True),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("hash", name=op.f("uq_audit_events_hash")),
    )
    op.create_index(
        op.f("ix_audit_events_request_id"), "audit_events", ["request_id"], unique=False
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.create_table(
        "requests",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("command_sha256", sa.String(length=64), nullable=False),
        sa.Column("requester", sa.String(length=200), nullable=False),
        sa.Column("on_behalf_of", sa.String(length=200), nullable=True),
        sa.Column("run_id", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("rule", sa.String(length=200), nullable=True),
        sa.Column("classification", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("quorum", sa.Integer(), nullable=False),
        sa.Column("grant_ttl_seconds", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("body_sha256", sa.String(length=64), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("pending_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "command_sha256 = encode(sha256(convert_to(command, 'UTF8')), 'hex')",
            name=op.f("ck_requests_command_sha256_matches"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'executing', 'executed', 'failed', 'denied', 'expired', 'cancelled')",
            name=op.f("ck_requests_status_known"),
        ),
        sa.CheckConstraint("quorum >= 1", name=op.f("ck_requests_quorum_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_requests")),
        sa.UniqueConstraint("requester", "idempotency_key", name="uq_requests_idempotency"),
    )
    op.create_index(op.f("ix_requests_status"), "requests", ["status"], unique=False)
    op.create_index(
        "ix_requests_status_pending",
        "requests",
        ["pending_expires_at"],
        unique=False,
        postgresql_where="status = 'pending'",
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.UUID(), nullable=False),
        sa.Column("approver", sa.String(length=200), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "decision IN ('approve', 'deny')", name=op.f("ck_approvals_decision_known")
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["requests.id"],
            name=op.f("fk_approvals_request_id_requests"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
    )
    op.create_index(op.f("ix_approvals_request_id"), "approvals", ["request_id"], unique=False)
    op.create_table(
        "grants",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("request_id", sa.UUID(), nullable=True),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("lease_id", sa.Text(), nullable=True),
        sa.Column("wrap_accessor", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_by", sa.String(length=200), nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'revoked', 'expired')", name=op.f("ck_grants_status_known")
        ),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name=op.f("fk_grants_request_id_requests")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grants")),
    )
    op.create_index(
        "ix_grants_active_expiry",
        "grants",
        ["expires_at"],
        unique=False,
        postgresql_where="status = 'active'",
    )
    op.create_index(op.f("ix_grants_request_id"), "grants", ["request_id"], unique=False)
    for statement in TRIGGERS + AUDIT_CHAIN:
        op.execute(statement)
    op.execute(f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{'0' * 64}')")


def downgrade() -> None:
    for statement in DROP_TRIGGERS:
        op.execute(statement)
    op.drop_index(op.f("ix_grants_request_id"), table_name="grants")
    op.drop_index(
        "ix_grants_active_expiry", table_name="grants", postgresql_where="status = 'active'"
    )
    op.drop_table("grants")
    op.drop_index(op.f("ix_approvals_request_id"), table_name="approvals")
    op.drop_table("approvals")
    op.drop_index(
        "ix_requests_status_pending", table_name="requests", postgresql_where="status = 'pending'"
    )
    op.drop_index(op.f("ix_requests_status"), table_name="requests")
    op.drop_table("requests")
    op.drop_table("audit_head")
    op.drop_index(op.f("ix_audit_events_request_id"), table_name="audit_events")
    op.drop_table("audit_events")
