"""Tables. Postgres is the single source of truth; rows mirror the domain objects, and each
row maps itself to its domain object and back (``domain()``, ``save()``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from keyturn.domain import Approval, Decision, Grant, GrantStatus, Request, RequestStatus

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSONB}


class RequestRow(Base):
    __tablename__ = "requests"
    __table_args__ = (
        CheckConstraint(
            "command_sha256 = encode(sha256(convert_to(command, 'UTF8')), 'hex')",
            name="command_sha256_matches",
        ),
        CheckConstraint("quorum >= 1", name="quorum_positive"),
        CheckConstraint(
            "status IN ('pending', 'approved', 'executing', 'executed', 'failed', 'denied',"
            " 'expired', 'cancelled')",
            name="status_known",
        ),
        UniqueConstraint("requester", "idempotency_key", name="uq_requests_idempotency"),
        Index(
            "ix_requests_status_pending",
            "pending_expires_at",
            postgresql_where="status = 'pending'",
        ),
        Index(
            "uq_requests_open_access",
            "requester",
            "target",
            unique=True,
            postgresql_where="access AND status IN ('pending', 'approved', 'executing')",
        ),
        # a run's steps in order; one agent's of a run_id several share
        Index("ix_requests_run", "run", "requester", "created_at"),
        Index(  # an agent's latest step without a run_id (keyturn_run_after)
            "ix_requests_implicit",
            "requester",
            "created_at",
            postgresql_where="run_id IS NULL AND NOT access",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    target: Mapped[str] = mapped_column(String(200))
    command: Mapped[str] = mapped_column(Text)
    command_sha256: Mapped[str] = mapped_column(String(64))
    requester: Mapped[str] = mapped_column(String(200))
    on_behalf_of: Mapped[str | None] = mapped_column(String(200))
    run_id: Mapped[str | None] = mapped_column(String(200))  # as the agent gave it
    run: Mapped[str | None] = mapped_column(String(200))  # its run's name (agents' steps)
    reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), index=True)
    rule: Mapped[str | None] = mapped_column(String(200))
    classification: Mapped[dict[str, Any]] = mapped_column(default=dict)
    quorum: Mapped[int] = mapped_column(Integer, default=1)
    grant_ttl_seconds: Mapped[int | None] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    body_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    pending_expires_at: Mapped[datetime]
    decided_at: Mapped[datetime | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    # credentials for an approved request: retried with backoff while Vault is unavailable
    issue_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    issue_after: Mapped[datetime | None]
    issue_error: Mapped[str | None] = mapped_column(Text)
    # a person's request for access of their own: it runs no command (keyturn.domain.Request)
    access: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")

    approvals: Mapped[list[ApprovalRow]] = relationship(
        back_populates="request", order_by="ApprovalRow.id", lazy="selectin"
    )

    def domain(self) -> Request:
        return Request(
            id=self.id,
            target=self.target,
            command=self.command,
            requester=self.requester,
            on_behalf_of=self.on_behalf_of,
            created_at=self.created_at,
            pending_expires_at=self.pending_expires_at,
            quorum=self.quorum,
            status=RequestStatus(self.status),
            approvals=[
                Approval(a.approver, Decision(a.decision), a.at, a.reason) for a in self.approvals
            ],
            decided_at=self.decided_at,
            access=self.access,
        )

    def save(self, req: Request, now: datetime) -> None:
        """Write back what the domain object changed: its status and any new votes."""
        for vote in req.approvals[len(self.approvals) :]:
            self.approvals.append(
                ApprovalRow(
                    request_id=self.id,
                    approver=vote.approver,
                    decision=vote.decision,
                    reason=vote.reason,
                    at=vote.at,
                )
            )
        self.status = req.status
        self.decided_at = req.decided_at
        self.updated_at = now


class ApprovalRow(Base):
    __tablename__ = "approvals"
    __table_args__ = (CheckConstraint("decision IN ('approve', 'deny')", name="decision_known"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    request_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("requests.id", ondelete="RESTRICT"), index=True
    )
    approver: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(10))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime]

    request: Mapped[RequestRow] = relationship(back_populates="approvals")


class CardRow(Base):
    """The bot's bookkeeping for one request's approval card: claimed by one replica, posted
    once (channel + ts), and which version of the request it shows (see bot/card_store.py)."""

    __tablename__ = "cards"

    request_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True
    )
    channel: Mapped[str | None] = mapped_column(String(50))
    ts: Mapped[str | None] = mapped_column(String(50))
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_at: Mapped[datetime | None]
    shown: Mapped[str | None] = mapped_column(Text)  # bot.card_store.CardVersion, as JSON
    reminded_at: Mapped[datetime | None]  # approvers reminded at half the pending TTL


class GrantRow(Base):
    __tablename__ = "grants"
    __table_args__ = (
        Index("ix_grants_active_expiry", "expires_at", postgresql_where="status = 'active'"),
        CheckConstraint("status IN ('active', 'revoked', 'expired')", name="status_known"),
        Index(
            "uq_grants_active_request",
            "request_id",
            unique=True,
            postgresql_where="status = 'active'",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    request_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("requests.id"), index=True)
    subject: Mapped[str] = mapped_column(String(200))
    target: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    lease_id: Mapped[str | None] = mapped_column(Text)
    wrap_accessor: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    ended_by: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str | None] = mapped_column(String(20))  # postgres | ssh
    command_sha256: Mapped[str | None] = mapped_column(String(64))  # the approved command
    one_shot: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # The single-use, short-lived Vault wrapping token the gateway consumes (never the
    # credentials themselves); cleared when a gateway claims it.
    handoff_token: Mapped[str | None] = mapped_column(Text)
    handoff_expires_at: Mapped[datetime | None]
    max_expires_at: Mapped[datetime | None]  # the role's ceiling for Extend
    reminded_at: Mapped[datetime | None]  # a person warned before their access ends
    # a revocation Vault refused is tried again after a backoff, not first in every pass
    revoke_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    revoke_after: Mapped[datetime | None]

    def domain(self) -> Grant:
        return Grant(
            id=self.id,
            subject=self.subject,
            target=self.target,
            created_at=self.created_at,
            expires_at=self.expires_at,
            request_id=self.request_id,
            status=GrantStatus(self.status),
            ended_at=self.ended_at,
        )

    def save(self, grant: Grant, by: str | None) -> None:
        """Write back the grant's status and expiry; an end records who and drops the
        hand-off token."""
        self.status = grant.status
        self.expires_at = grant.expires_at
        if grant.ended_at is not None and self.ended_at is None:
            self.ended_at, self.ended_by = grant.ended_at, by
            self.handoff_token = None


class SshKeyRow(Base):
    """A person's registered SSH public key: what the SSH CA signs for their own access."""

    __tablename__ = "ssh_keys"
    __table_args__ = (
        UniqueConstraint("owner", "fingerprint", name="uq_ssh_keys_owner"),
        UniqueConstraint("fingerprint", name="uq_ssh_keys_fingerprint"),  # one owner per key
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(50), index=True)  # a Slack user id
    fingerprint: Mapped[str] = mapped_column(String(100))
    algorithm: Mapped[str] = mapped_column(String(40))
    bits: Mapped[int | None] = mapped_column(Integer)
    public_key: Mapped[str] = mapped_column(Text)
    added_at: Mapped[datetime]


class AuditEventRow(Base):
    """Append-only: triggers number and chain each insert and refuse UPDATE and DELETE; the
    hash chain reveals what a superuser might still do. Insert kind, actor, ids and data only."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(50))
    actor: Mapped[str] = mapped_column(String(200))
    request_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), index=True)
    grant_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditHeadRow(Base):
    """One row: the newest event. Locking it serializes appends; it also anchors the tail."""

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class RecordingRow(Base):
    """One step of an agent's run, as kept (keyturn.recording.output): the output the agent
    saw and its hashes. A blocked command has no request row: its step is this row alone,
    with its agent, run, target and command. ``output`` is deleted by retention; every hash
    stays."""

    __tablename__ = "recordings"
    __table_args__ = (
        CheckConstraint("kept IN ('none', 'tags', 'masked')", name="kept_known"),
        CheckConstraint(
            "(request_id IS NULL) = (command IS NOT NULL AND agent IS NOT NULL AND run IS NOT NULL"
            " AND target IS NOT NULL)",
            name="blocked_step",
        ),
        Index("ix_recordings_run", "run", "agent", "at", postgresql_where="run IS NOT NULL"),
        Index(
            "ix_recordings_implicit",
            "agent",
            "at",
            postgresql_where="request_id IS NULL AND run_id IS NULL",
        ),
        Index("ix_recordings_kept_at", "at", postgresql_where="output IS NOT NULL"),
    )

    step_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    request_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("requests.id", ondelete="RESTRICT"), unique=True
    )
    # a blocked command's step (a request's are on its row)
    agent: Mapped[str | None] = mapped_column(String(200))
    run_id: Mapped[str | None] = mapped_column(String(200))
    run: Mapped[str | None] = mapped_column(String(200))
    target: Mapped[str | None] = mapped_column(String(200))
    command: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[str | None] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    kept: Mapped[str] = mapped_column(String(10))
    output: Mapped[str | None] = mapped_column(Text)  # canonical JSON, fitted to the cap
    output_bytes: Mapped[int] = mapped_column(BigInteger)  # the full output's
    output_sha256: Mapped[str] = mapped_column(String(64))
    truncated: Mapped[bool] = mapped_column(Boolean)
    stored_sha256: Mapped[str] = mapped_column(String(64))
    purged_at: Mapped[datetime | None]
