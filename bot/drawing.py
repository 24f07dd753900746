"""A card's state from a request and its grant, and the card drawn from it off the loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from bot.cards import CardState, Credentials, Vote, approval_card, card_text, extend_choices
from bot.command_view import ApiView, command_blocks
from keyturn.classify.http import parse_call
from keyturn.classify.http_rules import against_spec
from keyturn.config.policy import Config
from keyturn.config.targets import HttpTarget, SshTarget
from keyturn.errors import InvalidInput
from keyturn.store.models import GrantRow, RequestRow

AGENT_EXTEND_CHOICES = (15 * 60, 60 * 60, 4 * 60 * 60)  # seconds, those within the max TTL


def credentials_of(row: RequestRow, grant: GrantRow | None, now: datetime) -> Credentials | None:
    if grant is None:
        if row.status == "approved" and row.issue_attempts:
            return Credentials(None, "pending", note=row.issue_error)
        return None
    return Credentials(
        grant_id=str(grant.id),
        status=grant.status,
        expires_at=grant.expires_at,
        ended_by=grant.ended_by,
        extend_choices=extend_choices(
            AGENT_EXTEND_CHOICES, grant.expires_at, grant.max_expires_at, now
        )
        if grant.lease_id
        else [],
    )


def card_state(
    row: RequestRow,
    grant: GrantRow | None,
    now: datetime,
    *,
    shell: bool = False,
    api: ApiView | None = None,
    access_kind: str | None = None,
    max_ttl: timedelta | None = None,
) -> CardState:
    classification = row.classification or {}
    return CardState(
        id=str(row.id),
        target=row.target,
        command=row.command,
        requester=row.requester,
        status=row.status,
        quorum=row.quorum,
        pending_expires_at=row.pending_expires_at,
        shell=shell,
        api=api,
        rule=row.rule,
        reasons=list(classification.get("reasons", [])),
        run_id=row.run_id,
        on_behalf_of=row.on_behalf_of,
        reason=row.reason,
        estimated_rows=classification.get("estimated_rows"),
        grant_ttl_seconds=row.grant_ttl_seconds,
        votes=[Vote(a.approver, a.decision, a.reason) for a in row.approvals],
        error=row.error,
        credentials=credentials_of(row, grant, now),
        ran=what_ran(row.result),
        access_kind=access_kind,
        ticket=classification.get("ticket"),
        ssh_key=classification.get("key"),
        max_ttl_seconds=int(max_ttl.total_seconds()) if max_ttl else None,
    )


def what_ran(result: dict[str, Any] | None) -> str | None:
    """The card's one-line account of an approved run: command tags (``UPDATE 3``) or an
    exit status; never rows or output, which may hold what masking hid from the agent."""
    if not result:
        return None
    if result.get("tags"):
        return ", ".join(str(t) for t in result["tags"])[:200]
    if result.get("exit_status") is not None:
        return f"exit {result['exit_status']}"
    return None


def state_of(config: Config, row: RequestRow, grant: GrantRow | None, now: datetime) -> CardState:
    target = config.policy.targets.get(row.target)
    rule = config.policy.access_rule(row.rule) if row.access else None
    return card_state(
        row,
        grant,
        now,
        shell=isinstance(target, SshTarget),
        api=api_view(target, row.command) if isinstance(target, HttpTarget) else None,
        access_kind=(target.kind if target else "access") if row.access else None,
        max_ttl=rule.max_duration if rule else None,
    )


def api_view(target: HttpTarget, command: str) -> ApiView:
    """Where an HTTP call goes, the header its credential rides in, its OpenAPI operation
    (found as the classifier finds it)."""
    try:
        operation, _ = against_spec(target, parse_call(command))
    except InvalidInput:  # never stored so: the card shows the raw text, flagged
        operation = None
    named = None
    if operation is not None and operation.operation_id:
        summary = f": {operation.summary}" if operation.summary else ""
        named = operation.operation_id + summary
    return ApiView(target.base_url, target.credential_header, named)


@dataclass(frozen=True)
class Drawn:
    text: str
    blocks: list[dict[str, Any]]
    thread: list[str]  # the rest of a command longer than the card holds


def _draw(state: CardState) -> Drawn:
    _, thread = command_blocks(state.id, state.command, state.shell, state.api)
    return Drawn(card_text(state), approval_card(state), thread)


async def drawn(state: CardState) -> Drawn:
    """A card, drawn in a worker thread: printing a command back from its parse tree takes
    up to a few hundred ms for the longest one an agent may send, and the bot's event loop
    serves every click meanwhile."""
    return await asyncio.to_thread(_draw, state)
