"""Hold a command for a human; or record an allowed one approved by its rule, when the
gateway has no credentials of its own to run it with."""

from __future__ import annotations

from typing import Any

from gateway.usecases.gateway import Gateway
from gateway.usecases.submission import Submission, classification
from keyturn.classify import Identity, Verdict
from keyturn.domain import Deciders, Decision, policy_decider
from keyturn.store import decisions, reads, requests
from keyturn.store.models import RequestRow


async def _request(
    gw: Gateway, who: Identity, sub: Submission, verdict: Verdict, details: dict[str, Any]
) -> tuple[RequestRow, bool]:
    rule, policy = verdict.rule, gw.config.policy
    return await requests.create_request(
        gw.store,
        requests.NewRequest(
            target=sub.target,
            command=sub.command,
            requester=who.subject,
            on_behalf_of=who.on_behalf_of,
            run_id=sub.run_id,
            reason=sub.reason,
            rule=rule.name if rule else None,
            pending_ttl=(rule.pending_ttl if rule else None) or policy.pending_ttl,
            quorum=rule.quorum if rule else 1,
            grant_ttl=(rule.grant_ttl if rule else None) or policy.default_grant_ttl,
            classification=classification(verdict) | details,
            idempotency_key=sub.idempotency_key,
            body_sha256=sub.body_sha256,
            max_pending=gw.config.gateway.max_pending_per_agent,
            run_gap=gw.config.record.run_gap,
        ),
    )


async def hold(gw: Gateway, who: Identity, sub: Submission, verdict: Verdict) -> reads.RequestView:
    """A pending request, with what its driver can tell the approvers beforehand."""
    details = await gw.drivers.of(sub.target).describe_held(sub.target, sub.command, who)
    row, created = await _request(gw, who, sub, verdict, details)
    if created:
        gw.metrics.commands.labels("held").inc()
    return reads.RequestView.of(row)


async def approve_by_rule(
    gw: Gateway, who: Identity, sub: Submission, verdict: Verdict
) -> reads.RequestView:
    """An allowed command the gateway cannot run on standing credentials of its own (an SSH
    command: every run needs a certificate): recorded, then approved in the rule's name
    (``policy:<rule>``), so the bot mints its credentials as for any approval and the
    executor runs it. No human is asked, and the audit log says the rule decided."""
    row, created = await _request(gw, who, sub, verdict, {})
    if created:
        decided = await decisions.decide(
            gw.store,
            row.id,
            policy_decider(row.rule),
            Decision.APPROVE,
            deciders=Deciders.rule(row.rule),
        )
        row = decided.request
        gw.metrics.commands.labels("held").inc()
    return reads.RequestView.of(row)
