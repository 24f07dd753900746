"""The gateway's use cases: submit a command, read (and wait for) a request.

HTTP lives in :mod:`gateway.http`; this module knows nothing of aiohttp. Errors are keyturn
errors; the edge maps them to ``{"error": {...}}`` bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from gateway.approved import Executor, digest
from gateway.auth import Authenticator
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.readonly import ReadOnlyPool
from gateway.schemas import MAX_COMMAND_BYTES, CommandIn, CommandOut
from gateway.sql import estimate_rows, run_readonly
from keyturn.classify import Identity, Verdict, check_access, classify
from keyturn.domain import Decision, RequestStatus
from keyturn.errors import Forbidden, InvalidInput, KeyturnError, NotFound, TooLarge, Unavailable
from keyturn.masking import Masker
from keyturn.policy import Policy, PostgresTarget
from keyturn.store import operations as ops
from keyturn.store.db import Store, utcnow
from keyturn.store.listener import Listener, wait_until
from keyturn.vault import Vault

log = logging.getLogger(__name__)

AGENT_TERMINAL = frozenset(
    {
        RequestStatus.EXECUTED,
        RequestStatus.FAILED,
        RequestStatus.DENIED,
        RequestStatus.EXPIRED,
        RequestStatus.CANCELLED,
    }
)
ESTIMATE_TIMEOUT = 2.0


class Blocked(Forbidden):
    code = "blocked"

    def __init__(self, message: str, rule: str | None) -> None:
        super().__init__(message)
        self.rule = rule


def _parse(raw: bytes) -> CommandIn:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object with target and command")
    command = data.get("command")
    if isinstance(command, str) and len(command.encode()) > MAX_COMMAND_BYTES:
        raise TooLarge(f"command is larger than {MAX_COMMAND_BYTES} bytes")
    try:
        return CommandIn.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"{where}: {first['msg']}") from None


@dataclass
class Gateway:
    policy: Policy
    store: Store
    listener: Listener
    journal: Journal
    auth: Authenticator
    pools: dict[str, ReadOnlyPool]
    public_url: str
    metrics: Metrics = field(default_factory=Metrics)
    executor: Executor | None = None  # runs approved commands (needs Vault)
    limiter: RateLimiter = field(init=False)
    masker: Masker = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.policy.gateway
        self.limiter = RateLimiter(cfg.rate_per_second, cfg.rate_burst)
        self.masker = Masker.from_policy(self.policy.masking)
        self._classify = functools.lru_cache(maxsize=8192)(self._classify_uncached)

    def _classify_uncached(self, target: str, command: str, who: Identity) -> Verdict:
        return classify(self.policy, target, command, who)

    # ------------------------------------------------------------------ submit

    async def submit(
        self, who: Identity, raw: bytes, idempotency_key: str | None
    ) -> tuple[int, CommandOut]:
        cmd = _parse(raw)
        check_access(self.policy, cmd.target, who)
        body_sha = hashlib.sha256(raw).hexdigest()
        if idempotency_key is not None:
            earlier = await ops.find_idempotent(self.store, who.subject, idempotency_key, body_sha)
            if earlier is not None:
                return (202 if earlier.status not in AGENT_TERMINAL else 200), self.view(
                    ops.RequestView.of(earlier)
                )
        verdict = self._classify(cmd.target, cmd.command, who)
        rule = verdict.rule.name if verdict.rule else None
        if verdict.action == "block":
            await self.journal.record(self._outcome(cmd, who, verdict, status="blocked"))
            self.metrics.commands.labels("blocked").inc()
            message = verdict.rule.message if verdict.rule and verdict.rule.message else None
            raise Blocked(message or f"blocked by rule {rule}: {'; '.join(verdict.reasons)}", rule)
        target = self.policy.targets[cmd.target]
        if verdict.action == "allow" and isinstance(target, PostgresTarget):
            return 200, await self._run_allowed(cmd, who, verdict, idempotency_key, body_sha)
        return 202, await self._hold(cmd, who, verdict, idempotency_key, body_sha)

    def _outcome(
        self, cmd: CommandIn, who: Identity, verdict: Verdict, *, status: str, **extra: Any
    ) -> ops.Outcome:
        return ops.Outcome(
            id=uuid.uuid4(),
            target=cmd.target,
            command=cmd.command,
            requester=who.subject,
            status=status,
            rule=verdict.rule.name if verdict.rule else None,
            classification={"kinds": sorted(verdict.kinds), "reasons": verdict.reasons},
            on_behalf_of=who.on_behalf_of,
            run_id=cmd.run_id,
            reason=cmd.reason,
            **extra,
        )

    async def _execute(self, cmd: CommandIn) -> tuple[dict[str, Any] | None, str | None]:
        """(masked result, None) or (None, masked error); Unavailable when the target is down."""
        started = time.perf_counter()
        try:
            async with self.pools[cmd.target].connection() as conn:
                raw = await run_readonly(conn, cmd.command, self.policy.gateway.row_limit)
        except asyncpg.PostgresError as exc:
            return None, self.masker.text(f"{exc.sqlstate}: {exc}")
        except (OSError, asyncpg.InterfaceError) as exc:
            raise Unavailable(
                f"target {cmd.target} is not reachable: {type(exc).__name__}"
            ) from None
        finally:
            self.metrics.execute_seconds.observe(time.perf_counter() - started)
        return raw.as_json() | {"rows": self.masker.rows(raw.columns, raw.rows)}, None

    async def _run_allowed(
        self, cmd: CommandIn, who: Identity, verdict: Verdict, key: str | None, body_sha: str
    ) -> CommandOut:
        if key is not None:
            return await self._run_allowed_once(cmd, who, verdict, key, body_sha)
        # Record the access while it runs: the answer waits for both, never for one after the
        # other. The outcome (status, result digest) follows in the journal's next commit.
        intent = self._outcome(cmd, who, verdict, status="executing")
        executed, recorded = await asyncio.gather(
            self._execute(cmd), self.journal.record(intent), return_exceptions=True
        )
        if isinstance(recorded, BaseException):
            raise Unavailable("cannot record the command in keyturn's database") from recorded
        if isinstance(executed, BaseException):
            self.journal.submit(ops.Completion(intent.id, who.subject, str(executed), None))
            raise executed
        result, error = executed
        result_digest = digest(result) if result is not None else None
        self.journal.submit(ops.Completion(intent.id, who.subject, error, result_digest))
        self.metrics.commands.labels("failed" if error else "allowed").inc()
        return CommandOut(
            id=str(intent.id),
            status="failed" if error else "executed",
            target=cmd.target,
            rule=intent.rule,
            created_at=utcnow(),
            result=result,
            error=error,
        )

    async def _run_allowed_once(
        self, cmd: CommandIn, who: Identity, verdict: Verdict, key: str, body_sha: str
    ) -> CommandOut:
        """With an Idempotency-Key: run, then store the result so a replay returns it."""
        result, error = await self._execute(cmd)
        outcome = self._outcome(
            cmd,
            who,
            verdict,
            status="failed" if error else "executed",
            error=error,
            result=result,
            result_digest=digest(result) if result is not None else None,
            idempotency_key=key,
            body_sha256=body_sha,
        )
        try:
            await ops.record_outcomes(self.store, [outcome])
        except (IntegrityError, asyncpg.UniqueViolationError):  # a concurrent call won
            earlier = await ops.find_idempotent(self.store, who.subject, key, body_sha)
            if earlier is None:
                raise
            return self.view(ops.RequestView.of(earlier))
        self.metrics.commands.labels("failed" if error else "allowed").inc()
        return self.view(await ops.get_request_view(self.store, outcome.id))

    async def _estimate(self, target: str, command: str) -> int | None:
        pool = self.pools.get(target)
        if pool is None:
            return None
        try:
            async with asyncio.timeout(ESTIMATE_TIMEOUT), pool.connection() as conn:
                return await estimate_rows(conn, command)
        except (TimeoutError, KeyturnError, OSError, asyncpg.PostgresError) as exc:
            log.info("no EXPLAIN estimate for a held command on %s: %s", target, exc)
            return None

    async def _hold(
        self,
        cmd: CommandIn,
        who: Identity,
        verdict: Verdict,
        key: str | None,
        body_sha: str,
    ) -> CommandOut:
        rule = verdict.rule
        estimate = await self._estimate(cmd.target, cmd.command)
        row, created = await ops.create_request(
            self.store,
            ops.NewRequest(
                target=cmd.target,
                command=cmd.command,
                requester=who.subject,
                on_behalf_of=who.on_behalf_of,
                run_id=cmd.run_id,
                reason=cmd.reason,
                rule=rule.name if rule else None,
                pending_ttl=(rule.pending_ttl if rule else None) or self.policy.pending_ttl,
                quorum=rule.quorum if rule else 1,
                grant_ttl=(rule.grant_ttl if rule else None) or self.policy.default_grant_ttl,
                classification={
                    "kinds": sorted(verdict.kinds),
                    "reasons": verdict.reasons,
                    "estimated_rows": estimate,
                },
                idempotency_key=key,
                body_sha256=body_sha,
            ),
        )
        if created and verdict.action == "allow":
            # an allowed SSH command still needs credentials from the bot: approved by policy
            row = (
                await ops.decide(self.store, row.id, f"policy:{row.rule}", Decision.APPROVE)
            ).request
        if created:
            self.metrics.commands.labels("held").inc()
        return self.view(ops.RequestView.of(row))

    # ------------------------------------------------------------------ read and wait

    async def read(self, who: Identity, request_id: str, wait: float) -> CommandOut:
        try:
            ident = uuid.UUID(request_id)
        except ValueError:
            raise NotFound(f"request {request_id} not found") from None

        async def load() -> ops.RequestView:
            row = await ops.get_request_view(self.store, ident)
            if row.requester != who.subject:
                raise NotFound(f"request {request_id} not found")  # do not reveal it exists
            return row

        if wait <= 0:
            return self.view(await load())
        self.metrics.waiters.inc()
        try:
            row = await wait_until(
                self.listener,
                "request",
                ident,
                load,
                lambda r: r.status in AGENT_TERMINAL,
                timeout=wait,
                poll_interval=wait,  # the batch poller is the polling guarantee
            )
        finally:
            self.metrics.waiters.dec()
        return self.view(row)

    def view(self, row: ops.RequestView) -> CommandOut:
        status = RequestStatus(row.status)
        waiting = status not in AGENT_TERMINAL
        return CommandOut(
            id=str(row.id),
            status=status.value,
            target=row.target,
            rule=row.rule,
            created_at=row.created_at,
            wait_url=f"{self.public_url}/v1/commands/{row.id}?wait=30" if waiting else None,
            expires_at=row.pending_expires_at if status is RequestStatus.PENDING else None,
            estimated_rows=row.estimated_rows,
            result=row.result,
            error=row.error,
            denied_by=row.denied_by,
            deny_reason=row.deny_reason,
        )

    # ------------------------------------------------------------------ background upkeep

    async def poll_forever(self) -> None:
        """The polling guarantee behind long-polls, expiry of pending requests, the gauge."""
        interval = self.policy.gateway.poll_interval.total_seconds()
        while True:
            with contextlib.suppress(KeyturnError):
                await self.poll_once()
            await asyncio.sleep(interval)

    async def poll_once(self) -> None:
        await ops.expire_due_requests(self.store)
        watched = [uuid.UUID(ident) for ident in self.listener.watched("request")]
        for ident in await ops.decided_among(self.store, watched):
            self.listener.wake("request", str(ident))
        self.metrics.pending.set(await ops.count_pending(self.store))

    async def ready(self) -> dict[str, str]:
        """Postgres and Vault reachable; raises Unavailable naming what is not."""
        await self.store.ping()
        vaults = self.vaults()
        for vault in vaults:
            await vault.health()
        return {"postgres": "ok", "vault": "ok" if vaults else "not configured"}

    def vaults(self) -> list[Vault]:
        found = [p.vault for p in self.pools.values()]
        if self.executor is not None:
            found.append(self.executor.vault)
        return list({id(v): v for v in found}.values())
