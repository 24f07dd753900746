"""Approved commands: take the bot's hand-off, unwrap it once, run exactly that command.

Procrastinate-style: a ``handoff:<request id>`` notification wakes the executor at once and a
pass every ``gateway.poll_interval`` is the guarantee (the bootstrap supervises the loop).
Claims use ``SKIP LOCKED``, so any number of gateways share the work and each hand-off runs
once.

Before unwrapping, the executor checks the wrapping token's ``creation_path`` (only the bot's
``sys/wrapping/wrap`` is accepted); after, that the payload names this target, this grant's
lease and the approved command's sha256; then the target's driver runs it. Credentials live
in local variables only: they are never logged, stored or returned, and error messages never
quote them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from gateway.metrics import Metrics
from gateway.usecases.driver import UNEXPECTED, Drivers, RunFailed
from gateway.usecases.submission import recording_for
from keyturn.aio import cancel, spawn
from keyturn.backoff import Backoff
from keyturn.config.policy import Config
from keyturn.domain import IllegalTransition, command_sha256
from keyturn.errors import DatabaseUnavailable, KeyturnError
from keyturn.masking import Masker
from keyturn.recording.output import Recording
from keyturn.store import executions, handoffs
from keyturn.store.db import Store
from keyturn.store.listener import Listener
from keyturn.vault import Vault, VaultUnavailable

log = logging.getLogger(__name__)

WRAP_PATH = "sys/wrapping/wrap"
CONCURRENCY = 16  # approved commands running at once per gateway
# how long an outcome waits for keyturn's Postgres, as a share of bot.stranded_after (4 min of
# the default 5): the gateway that ran a command records it before the bot calls it lost
RECORD_SHARE = 0.8


class HandoffRejected(KeyturnError):
    """The hand-off does not match what was approved: nothing runs."""

    code = "handoff_rejected"
    status = 403


@dataclass
class Executor:
    config: Config
    store: Store
    vault: Vault
    listener: Listener
    drivers: Drivers
    masker: Masker
    metrics: Metrics
    wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _gate: asyncio.Semaphore = field(
        init=False, default_factory=lambda: asyncio.Semaphore(CONCURRENCY)
    )
    _running: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.listener.subscribe(
            lambda kind, _ident: self.wake.set() if kind in ("handoff", "*") else None
        )

    async def close(self) -> None:
        """Shutting down: approved commands still running are cancelled."""
        for task in list(self._running):
            await cancel(task)

    async def drain(self) -> int:
        """Claim every waiting hand-off and start running each; returns how many."""
        claimed = 0
        while True:
            await self._gate.acquire()
            try:
                handoff = await handoffs.claim_handoff(self.store)
            except BaseException:
                self._gate.release()
                raise
            if handoff is None:
                self._gate.release()
                return claimed
            claimed += 1
            spawn(self._running, self._run_and_release(handoff))

    async def _run_and_release(self, handoff: handoffs.Handoff) -> None:
        try:
            await self.run(handoff)
        finally:
            self._gate.release()

    async def run(self, handoff: handoffs.Handoff) -> None:
        """Unwrap, check, run, record. Every failure is recorded on the request."""
        request = handoff.request
        started = time.perf_counter()
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            credentials = await self._unwrap(handoff)
            result = await self._execute(request.target, request.command, credentials)
        except HandoffRejected as exc:
            log.error("approved request %s not run: %s", request.id, exc.message)
            error = exc.message
        except (KeyturnError, RunFailed) as exc:
            error = exc.message
        except Exception:  # a driver's bug: the request must still end, as failed
            log.exception("approved request %s: the driver failed unexpectedly", request.id)
            error = f"the gateway failed while running it ({UNEXPECTED})"
        finally:
            self.metrics.execute_seconds.observe(time.perf_counter() - started)
        if error is not None:
            error = self.masker.text(error)
        # a driver's timing of its output (SSH: when each chunk arrived) is the recording's,
        # not part of what the agent is answered
        timing = result.pop("timing", None) if result is not None else None
        seen = {"error": error} if result is None else result
        recording = await recording_for(self.config.record, request.id, seen, timing)
        try:
            await self._record(request.id, result, error, recording)
        except IllegalTransition as exc:  # failed meanwhile as stranded: keep that outcome
            log.warning("result of %s not recorded: %s", request.id, exc.message)
            return
        self.metrics.commands.labels("approved_failed" if error else "approved_executed").inc()

    async def _record(
        self,
        request_id: uuid.UUID,
        result: dict[str, Any] | None,
        error: str | None,
        recording: Recording,
    ) -> None:
        """Record how the run ended, retried while keyturn's Postgres is away: the command has
        run (or failed) on the target, and that outcome is the only one the request may get.
        Given up after ``RECORD_SHARE`` of ``bot.stranded_after``, before the bot fails a run
        it believes lost."""
        backoff = Backoff(0.25, 5.0)
        record_for = self.config.bot.stranded_after.total_seconds() * RECORD_SHARE
        deadline = time.monotonic() + record_for
        while True:
            try:
                await executions.finish_execution(
                    self.store, request_id, result=result, error=error, recording=recording
                )
                return
            except DatabaseUnavailable as exc:
                wait = backoff.next()
                if time.monotonic() + wait > deadline:
                    log.error("outcome of %s lost: Postgres away too long (%s)", request_id, exc)
                    raise
                log.warning("outcome of %s waits for Postgres: %s", request_id, exc.message)
                await asyncio.sleep(wait)

    async def _unwrap(self, handoff: handoffs.Handoff) -> dict[str, Any]:
        """Retry while Vault is unavailable, as long as the wrapping token lives: the claim
        took it out of the database, so only this process can still use it."""
        deadline = handoff.grant.handoff_expires_at
        backoff = Backoff(0.25, 5.0)
        while True:
            try:
                return await self._unwrap_once(handoff)
            except VaultUnavailable as exc:
                wait = backoff.next()
                now = self.store.clock.now()
                if deadline is None or now + timedelta(seconds=wait) >= deadline:
                    raise
                log.warning("Vault unavailable while taking %s: %s", handoff.request.id, exc)
                await asyncio.sleep(wait)

    async def _unwrap_once(self, handoff: handoffs.Handoff) -> dict[str, Any]:
        request, grant = handoff.request, handoff.grant
        await self.vault.ensure_login()
        info = await self.vault.lookup_wrapping(handoff.token)
        if info.get("creation_path") != WRAP_PATH:
            raise HandoffRejected(
                f"the hand-off was not wrapped by keyturn (creation_path "
                f"{info.get('creation_path')!r}); possible tampering"
            )
        payload: dict[str, Any] = (await self.vault.unwrap(handoff.token)).get("data") or {}
        expected = {
            "kind": grant.kind,
            "target": request.target,
            "command_sha256": command_sha256(request.command),
        }
        if grant.lease_id:
            expected["lease_id"] = grant.lease_id
        wrong = sorted(k for k, v in expected.items() if payload.get(k) != v)
        if wrong or grant.command_sha256 != expected["command_sha256"]:
            raise HandoffRejected(
                f"the hand-off does not match the approved request ({', '.join(wrong) or 'sha'})"
            )
        return payload

    async def _execute(
        self, name: str, command: str, credentials: dict[str, Any]
    ) -> dict[str, Any]:
        target = self.config.policy.targets.get(name)
        if target is None:
            raise HandoffRejected(f"target {name} is not in the policy any more")
        return await self.drivers.kind(target.kind).run_approved(name, command, credentials)
