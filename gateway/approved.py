"""Approved commands: take the bot's hand-off, unwrap it once, run exactly that command.

Procrastinate-style: a ``handoff:<request id>`` notification wakes the executor at once and a
poll every ``gateway.poll_interval`` is the guarantee. Claims use ``SKIP LOCKED``, so any
number of gateways share the work and each hand-off runs once.

Before unwrapping, the executor checks the wrapping token's ``creation_path`` (only the bot's
``sys/wrapping/wrap`` is accepted); after, that the payload names this target, this grant's
lease and the approved command's sha256. Credentials live in local variables only: they are
never logged, stored or returned, and error messages never quote them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import asyncssh

from gateway.metrics import Metrics
from gateway.results import Limits, decode_times_as_text, finish
from gateway.sql import run_approved
from gateway.ssh import run_ssh
from keyturn.aio import Deadline, spawn
from keyturn.backoff import Backoff
from keyturn.domain import IllegalTransition, command_sha256
from keyturn.errors import KeyturnError
from keyturn.masking import Masker
from keyturn.policy import Config, PostgresTarget, SshTarget
from keyturn.store import handoffs, requests
from keyturn.store.db import Store
from keyturn.store.listener import Listener
from keyturn.vault import Vault, VaultUnavailable

log = logging.getLogger(__name__)

WRAP_PATH = "sys/wrapping/wrap"
CONCURRENCY = 16  # approved commands running at once per gateway
SSH_OUTPUT_LIMIT = 64 * 1024


class HandoffRejected(KeyturnError):
    """The hand-off does not match what was approved: nothing runs."""

    code = "handoff_rejected"
    status = 403


def digest(result: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(result, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Executor:
    config: Config
    store: Store
    vault: Vault
    listener: Listener
    masker: Masker
    metrics: Metrics
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _gate: asyncio.Semaphore = field(
        init=False, default_factory=lambda: asyncio.Semaphore(CONCURRENCY)
    )
    _running: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.listener.subscribe(
            lambda kind, _ident: self._wake.set() if kind in ("handoff", "*") else None
        )

    async def run_forever(self) -> None:
        interval = self.config.gateway.poll_interval.total_seconds()
        try:
            while True:
                self._wake.clear()
                try:
                    await self.drain()
                except KeyturnError as exc:
                    log.warning("cannot claim approved commands: %s", exc.message)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
        finally:
            for task in list(self._running):
                task.cancel()

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
        except KeyturnError as exc:
            error = exc.message
        except asyncpg.PostgresError as exc:
            error = f"{exc.sqlstate}: {exc}"
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncssh.Error) as exc:
            error = f"target {request.target} failed: {type(exc).__name__}: {exc}"
        finally:
            self.metrics.execute_seconds.observe(time.perf_counter() - started)
        if error is not None:
            error = self.masker.text(error)
        try:
            await requests.finish_execution(
                self.store,
                request.id,
                result=result,
                error=error,
                result_digest=digest(result) if result is not None else None,
            )
        except IllegalTransition as exc:  # failed meanwhile as stranded: keep that outcome
            log.warning("result of %s not recorded: %s", request.id, exc.message)
            return
        self.metrics.commands.labels("approved_failed" if error else "approved_executed").inc()

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
        cfg = self.config.gateway
        if isinstance(target, PostgresTarget):
            url, kwargs = target.login(credentials["username"], credentials["password"])
            timeout_ms = int(cfg.statement_timeout.total_seconds() * 1000)
            conn = await asyncpg.connect(
                url,
                timeout=10,
                server_settings={
                    "statement_timeout": str(timeout_ms),
                    "application_name": "keyturn-gateway-approved",
                },
                **kwargs,
            )
            limits = Limits.of(cfg)
            try:
                await decode_times_as_text(conn)
                fetched, tags = await run_approved(
                    conn, command, limits, Deadline(cfg.statement_timeout.total_seconds())
                )
            finally:
                await conn.close()
            return (await finish(fetched, len(tags), self.masker, limits, tags)).as_json()
        if isinstance(target, SshTarget):
            shell = await run_ssh(
                target,
                name,
                credentials,
                command,
                timeout=cfg.ssh_timeout,
                output_limit=SSH_OUTPUT_LIMIT,
            )
            return shell.as_json() | {
                "stdout": self.masker.text(shell.stdout),
                "stderr": self.masker.text(shell.stderr),
            }
        raise HandoffRejected(f"target {name} is not in the policy any more")
