"""Run an allowed command at once: record, then run.

Nothing of the command reaches the target before its record (request row and audit event)
is committed; concurrent records share a commit (:mod:`gateway.journal`), and the outcome
follows the answer. Each agent has at most ``gateway.agent_concurrency`` allowed commands in
flight (:class:`gateway.usecases.inflight.InFlight`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.journal import AlreadyRecorded
from gateway.usecases.driver import UNEXPECTED, Allowed, Driver, RunFailed
from gateway.usecases.gateway import Gateway
from gateway.usecases.submission import Submission, outcome, recording_for
from keyturn.classify import Identity, Verdict
from keyturn.errors import KeyturnError, RateLimited, Unavailable
from keyturn.store import outcomes, reads, requests

log = logging.getLogger(__name__)


async def _committed(committing: asyncio.Future[None]) -> None:
    """Wait for a record's commit; a failure other than a keyturn error is keyturn's database
    being unavailable."""
    try:
        await committing
    except KeyturnError:  # AlreadyRecorded among them
        raise
    except Exception as exc:
        raise Unavailable("cannot record the command in keyturn's database") from exc


async def run(
    gw: Gateway, driver: Driver, who: Identity, sub: Submission, verdict: Verdict
) -> reads.RequestView:
    async with gw.in_flight.admit(who.subject):
        intent = outcome(
            sub,
            who,
            verdict,
            status="executing",
            idempotency_key=sub.idempotency_key,
            body_sha256=sub.body_sha256,
        )
        committing = gw.journal.enqueue(intent)
        allowed = Allowed(sub.target, sub.command, who, intent.id, verdict.rule, committing)
        try:
            result = await driver.run_allowed(allowed)
        except asyncio.CancelledError:
            _abandon(gw, intent, committing)
            raise
        except RunFailed as failed:
            return await _not_run(gw, sub, who, intent, committing, failed)
        except Exception:  # a driver's bug: the request must still end, as failed
            log.exception("allowed request %s: the driver failed unexpectedly", intent.id)
            unknown = RunFailed(f"the gateway failed while running it ({UNEXPECTED})", final=True)
            return await _not_run(gw, sub, who, intent, committing, unknown)
    recording = await recording_for(gw.config.record, intent.id, result)
    if sub.idempotency_key is None:
        gw.journal.submit(
            outcomes.Completion(intent.id, who.subject, None, recording.sha256, recording=recording)
        )
    else:  # a replay with this key must find the result: committed before the answer
        done = outcomes.Completion(
            intent.id, who.subject, None, recording.sha256, result, recording=recording
        )
        await _record(gw, done)
    gw.metrics.commands.labels("allowed").inc()
    return _answer(gw, sub, intent, result, None)


async def _record(gw: Gateway, ended: outcomes.Completion) -> None:
    """Commit how a request ended before answering; if that fails, the record is retried
    in the background (the command ran or failed either way: the agent is answered)."""
    try:
        await gw.journal.record(ended)
    except Exception:
        gw.journal.submit(ended)


def _abandon(gw: Gateway, intent: outcomes.Outcome, committing: asyncio.Future[None]) -> None:
    """The request was cancelled mid-way: once its record is in, say it did not finish."""

    def done(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            gw.journal.submit(
                outcomes.Completion(intent.id, intent.requester, "cancelled by the gateway", None)
            )

    committing.add_done_callback(done)


async def _earlier(gw: Gateway, who: Identity, sub: Submission) -> reads.RequestView:
    """An earlier call with the same Idempotency-Key won the record: its request answers."""
    earlier = await requests.find_by_key(
        gw.store, who.subject, sub.idempotency_key or "", sub.body_sha256
    )
    if earlier is None:
        raise Unavailable("cannot record the command in keyturn's database")
    return reads.RequestView.of(earlier)


async def _not_run(
    gw: Gateway,
    sub: Submission,
    who: Identity,
    intent: outcomes.Outcome,
    committing: asyncio.Future[None],
    failed: RunFailed,
) -> reads.RequestView:
    """An allowed command that did not complete: its record says why. Without a record
    nothing ran (an earlier call with the same key won, or keyturn's database is down);
    a command that never started gives its Idempotency-Key back, so a retry runs it."""
    try:
        await _committed(committing)
    except AlreadyRecorded:
        return await _earlier(gw, who, sub)
    recording = await recording_for(gw.config.record, intent.id, {"error": failed.message})
    ended = outcomes.Completion(
        intent.id,
        who.subject,
        failed.message,
        None,
        release_key=not failed.final,
        recording=recording,
    )
    if sub.idempotency_key is None:
        gw.journal.submit(ended)
    else:  # a replay with this key must find how it ended: committed before the answer
        await _record(gw, ended)
    if failed.outcome == "busy":
        raise RateLimited(f"{failed.message}; retry", retry_after=1.0) from None
    if failed.outcome == "failed":
        gw.metrics.commands.labels("failed").inc()
        return _answer(gw, sub, intent, None, failed.message)
    if failed.error is not None:
        raise failed.error
    raise Unavailable(f"target {sub.target} is not reachable: {failed.message}") from failed


def _answer(
    gw: Gateway,
    sub: Submission,
    intent: outcomes.Outcome,
    result: dict[str, Any] | None,
    error: str | None,
) -> reads.RequestView:
    now = gw.store.clock.now()
    return reads.RequestView(
        id=intent.id,
        target=sub.target,
        requester=intent.requester,
        status="failed" if error else "executed",
        rule=intent.rule,
        created_at=now,
        pending_expires_at=now,  # it never waited
        estimated_rows=None,
        result=result,
        error=error,
        denied_by=None,
        deny_reason=None,
    )
