"""Submit a command: judge it, then refuse it, run it at once, or hold it for a human."""

from __future__ import annotations

from dataclasses import replace

from gateway.usecases import allowed, hold
from gateway.usecases.gateway import AGENT_TERMINAL, Gateway
from gateway.usecases.submission import Submission, outcome, recording_for
from keyturn.classify import Identity, check_access
from keyturn.errors import Forbidden
from keyturn.store import reads, requests


class Blocked(Forbidden):
    code = "blocked"

    def __init__(self, message: str, rule: str | None) -> None:
        super().__init__(message)
        self.rule = rule


async def submit(gw: Gateway, who: Identity, sub: Submission) -> tuple[bool, reads.RequestView]:
    """The request as it stands, and whether it has ended (an edge answers 200, else 202).

    A replay of an Idempotency-Key with the same body answers the earlier request."""
    check_access(gw.config, sub.target, who)
    if sub.idempotency_key is not None:
        earlier = await requests.find_by_key(
            gw.store, who.subject, sub.idempotency_key, sub.body_sha256
        )
        if earlier is not None:
            return earlier.status in AGENT_TERMINAL, reads.RequestView.of(earlier)
    driver = gw.drivers.of(sub.target)
    sub = replace(sub, command=driver.canonical(sub.target, sub.command, as_http=sub.as_http))
    verdict = await gw.verdict(sub.target, sub.command, who)
    rule = verdict.rule.name if verdict.rule else None
    for shadow_rule, action in verdict.shadow:
        gw.metrics.shadow.labels(shadow_rule, action).inc()
    if verdict.action == "block":
        message = verdict.rule.message if verdict.rule and verdict.rule.message else None
        why = "; ".join(verdict.reasons)
        refused = Blocked(message or (f"blocked by rule {rule}: {why}" if rule else why), rule)
        blocked = outcome(sub, who, verdict, status="blocked")
        seen = {"error": {"code": refused.code, "message": refused.message, "rule": rule}}
        recording = await recording_for(gw.config.record, blocked.id, seen)
        await gw.journal.record(replace(blocked, recording=recording))
        gw.metrics.commands.labels("blocked").inc()
        raise refused
    if verdict.action == "allow" and driver.runs_allowed(sub.target):
        out = await allowed.run(gw, driver, who, sub, verdict)
        return out.status in AGENT_TERMINAL, out
    if verdict.action == "allow":
        return False, await hold.approve_by_rule(gw, who, sub, verdict)
    return False, await hold.hold(gw, who, sub, verdict)
