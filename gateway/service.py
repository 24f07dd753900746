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
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from pydantic import ValidationError

from gateway.approved import Executor, digest
from gateway.auth import Authenticator
from gateway.catalogs import Catalogs
from gateway.journal import Journal
from gateway.judging import Turns, judged
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.readonly import ReadOnlyLogins
from gateway.results import STALE_STATEMENT, Limits, SqlResult, finish, forget_statements
from gateway.schemas import MAX_COMMAND_BYTES, CommandIn, storable
from gateway.sql import SessionChanged, estimate_rows, run_readonly
from keyturn.agent.api import TERMINAL, CommandOut, TargetOut, TargetsOut
from keyturn.aio import Deadline
from keyturn.classify import Identity, Verdict, check_access, classify, masking_patterns, may_use
from keyturn.classify.catalog import Catalog
from keyturn.classify.patterns import Patterns
from keyturn.classify.readonly import NotReadOnly, read_plan
from keyturn.classify.sql import calls_a_function, preview_select
from keyturn.domain import Decision, RequestStatus, request_tag
from keyturn.errors import (
    Forbidden,
    InvalidInput,
    KeyturnError,
    NotFound,
    RateLimited,
    TooLarge,
    Unavailable,
)
from keyturn.masking import Masker
from keyturn.policy import Config, Rule
from keyturn.store import outcomes, reads, requests
from keyturn.store.db import Store
from keyturn.store.listener import Listener, wait_until
from keyturn.vault import Vault

log = logging.getLogger(__name__)

AGENT_TERMINAL = frozenset(RequestStatus(status) for status in TERMINAL)
ESTIMATE_TIMEOUT = 2.0
MAX_ERROR = 2000  # characters of a database error passed back to the agent
DEFAULT_DESCRIPTIONS = {
    "postgres": "PostgreSQL database: plain reads run at once, anything else waits for a human",
    "ssh": "host reached over SSH: each shell command runs as its policy allows",
}


class NotStarted(Exception):
    """An allowed command failed before its first statement reached the target."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Blocked(Forbidden):
    code = "blocked"

    def __init__(self, message: str, rule: str | None) -> None:
        super().__init__(message)
        self.rule = rule


def _estimable(command: str, masking: Patterns, catalog: Catalog | None) -> str | None:
    """The preview a held command's estimate may plan, or None (see ``Gateway._estimate``):
    one that calls a function, or that a read could not run as it is, gets no estimate."""
    query = preview_select(command)
    if query is None or calls_a_function(query):
        return None
    try:
        read_plan(query, 1, masking, catalog)
    except KeyturnError:  # NotReadOnly (a masked use, a system relation), TooComplex
        return None
    return query


def _classification(verdict: Verdict) -> dict[str, Any]:
    """What is stored (and audited) of a verdict: kinds, reasons, and what shadow rules
    would have done."""
    out: dict[str, Any] = {"kinds": sorted(verdict.kinds), "reasons": verdict.reasons}
    if verdict.shadow:
        out["shadow"] = [{"rule": rule, "action": action} for rule, action in verdict.shadow]
    return out


def _parse(raw: bytes) -> CommandIn:
    try:
        data = json.loads(raw)
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4,300 digits
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("body is not valid JSON: it nests too deeply") from None
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object with target and command")
    command = data.get("command")
    if isinstance(command, str) and len(command.encode(errors="replace")) > MAX_COMMAND_BYTES:
        raise TooLarge(f"command is larger than {MAX_COMMAND_BYTES} bytes")
    try:
        cmd = CommandIn.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"{where}: {first['msg']}") from None
    for name in ("target", "command", "reason", "run_id"):
        storable(name, getattr(cmd, name))
    return cmd


@dataclass
class Gateway:
    config: Config
    store: Store
    listener: Listener
    journal: Journal
    auth: Authenticator
    readers: ReadOnlyLogins | None  # the allowed path's logins (needs Vault)
    public_url: str
    metrics: Metrics = field(default_factory=Metrics)
    executor: Executor | None = None  # runs approved commands (needs Vault)
    catalogs: Catalogs | None = None  # each target's functions (needs the read-only logins)
    limiter: RateLimiter = field(init=False)
    masker: Masker = field(init=False)
    limits: Limits = field(init=False)
    draining: bool = field(init=False, default=False)
    turns: Turns = field(init=False, default_factory=Turns)  # one judgement per agent at once

    def __post_init__(self) -> None:
        cfg = self.config.gateway
        self.limiter = RateLimiter(cfg.rate_per_second, cfg.rate_burst)
        self.masker = Masker.from_policy(self.config.policy.masking)
        self.limits = Limits.of(cfg)
        self._classify = functools.lru_cache(maxsize=8192)(self._classify_uncached)

    def _classify_uncached(
        self, target: str, command: str, who: Identity, catalog: Catalog | None
    ) -> Verdict:
        return classify(self.config, target, command, who, catalog)

    async def _verdict(self, target: str, command: str, who: Identity) -> Verdict:
        """Cached (per catalog); judged in the judging pool, never on the event loop."""
        catalog = await self._catalog(target)
        async with self.turns.turn(who.subject):
            return await judged(self._classify, target, command, who, catalog)

    async def _catalog(self, target: str) -> Catalog | None:
        if self.catalogs is not None and self.readers is not None and target in self.readers:
            return await self.catalogs.get(target)
        return None

    # ------------------------------------------------------------------ submit

    async def submit(
        self, who: Identity, raw: bytes, idempotency_key: str | None
    ) -> tuple[int, CommandOut]:
        cmd = _parse(raw)
        check_access(self.config, cmd.target, who)
        body_sha = hashlib.sha256(raw).hexdigest()
        if idempotency_key is not None:
            earlier = await requests.find_by_key(self.store, who.subject, idempotency_key, body_sha)
            if earlier is not None:
                return (202 if earlier.status not in AGENT_TERMINAL else 200), self.view(
                    reads.RequestView.of(earlier)
                )
        verdict = await self._verdict(cmd.target, cmd.command, who)
        rule = verdict.rule.name if verdict.rule else None
        for shadow_rule, action in verdict.shadow:
            self.metrics.shadow.labels(shadow_rule, action).inc()
        if verdict.action == "block":
            await self.journal.record(self._outcome(cmd, who, verdict, status="blocked"))
            self.metrics.commands.labels("blocked").inc()
            message = verdict.rule.message if verdict.rule and verdict.rule.message else None
            raise Blocked(message or f"blocked by rule {rule}: {'; '.join(verdict.reasons)}", rule)
        if verdict.action == "allow" and self.readers is not None and cmd.target in self.readers:
            out = await self._run_allowed(cmd, who, verdict, idempotency_key, body_sha)
            return (200 if out.status in AGENT_TERMINAL else 202), out
        return 202, await self._hold(cmd, who, verdict, idempotency_key, body_sha)

    def _outcome(
        self, cmd: CommandIn, who: Identity, verdict: Verdict, *, status: str, **extra: Any
    ) -> outcomes.Outcome:
        return outcomes.Outcome(
            id=uuid.uuid4(),
            target=cmd.target,
            command=cmd.command,
            requester=who.subject,
            status=status,
            rule=verdict.rule.name if verdict.rule else None,
            classification=_classification(verdict),
            on_behalf_of=who.on_behalf_of,
            run_id=cmd.run_id,
            reason=cmd.reason,
            **extra,
        )

    async def _execute(
        self,
        readers: ReadOnlyLogins,
        cmd: CommandIn,
        who: Identity,
        request_id: uuid.UUID,
        recorded: asyncio.Future[None],
        rule: Rule | None,
    ) -> SqlResult:
        """Run an allowed command on ``who``'s own read-only login, once ``recorded``.

        Raises NotStarted for whatever failed before the first statement was sent.
        """
        cfg = self.config.gateway
        deadline = Deadline(cfg.statement_timeout.total_seconds())
        masking = masking_patterns(self.config, rule)
        catalog = await self._catalog(cmd.target)
        async with self.turns.turn(who.subject):
            plan = await judged(read_plan, cmd.command, cfg.max_statements, masking, catalog)
        started = False
        try:
            with self.metrics.execute_seconds.time():
                for attempt in (1, 2):
                    async with readers.transaction(
                        cmd.target, who.subject, request_tag(request_id), deadline
                    ) as conn:
                        await self._recorded(recorded)  # the transaction opened meanwhile
                        started = True
                        try:
                            fetched, statements = await run_readonly(
                                conn, plan, self.limits, deadline, self.masker
                            )
                            break
                        except STALE_STATEMENT:
                            forget_statements(conn)  # the schema changed under the cache
                            if attempt == 2:
                                raise
        except Exception as exc:
            if started:
                raise
            raise NotStarted(exc) from exc
        result = await finish(fetched, statements, self.masker, self.limits, masked=plan[-1].masked)
        if result.truncated:
            self.metrics.truncated.labels(result.truncated).inc()
        return result

    def _failure(self, exc: BaseException) -> str:
        """What the agent is told when its allowed command did not complete (masked)."""
        if isinstance(exc, NotStarted):
            return f"never ran: {self._failure(exc.cause)}"
        if isinstance(exc, TimeoutError):
            seconds = self.config.gateway.statement_timeout.total_seconds()
            return f"deadline exceeded: the gateway cancelled the command after {seconds:g} s"
        if isinstance(exc, SessionChanged):
            return f"{exc}; keyturn closed that connection and ran nothing more"
        if isinstance(exc, asyncpg.PostgresError):
            return self.masker.text(f"{exc.sqlstate}: {exc}"[:MAX_ERROR])
        if isinstance(exc, KeyturnError):
            return exc.message
        return f"the target connection failed: {type(exc).__name__}"

    @staticmethod
    async def _recorded(recording: asyncio.Future[None]) -> None:
        """Wait for a record's commit; a failure other than a duplicate key is a 503."""
        try:
            await recording
        except (KeyturnError, asyncpg.UniqueViolationError):
            raise
        except Exception as exc:
            raise Unavailable("cannot record the command in keyturn's database") from exc

    async def _run_allowed(
        self, cmd: CommandIn, who: Identity, verdict: Verdict, key: str | None, body_sha: str
    ) -> CommandOut:
        """Record, then run: nothing of the command runs before its record (request row +
        audit event) is committed. Concurrent records share a commit; the outcome follows."""
        assert self.readers is not None
        async with self.readers.admit(who.subject):
            intent = self._outcome(
                cmd, who, verdict, status="executing", idempotency_key=key, body_sha256=body_sha
            )
            recording = self.journal.enqueue(intent)
            try:
                result = await self._execute(
                    self.readers, cmd, who, intent.id, recording, verdict.rule
                )
            except Exception as exc:
                return await self._not_run(cmd, who, intent, recording, exc)
            except asyncio.CancelledError:
                self._abandon(intent, recording)
                raise
        body = result.as_json()
        if key is None:
            self.journal.submit(outcomes.Completion(intent.id, who.subject, None, digest(body)))
        else:  # a replay with this key must find the result: committed before the answer
            done = outcomes.Completion(intent.id, who.subject, None, digest(body), body)
            try:
                await self.journal.record(done)
            except Exception:  # the command ran: answer it; the record is retried
                self.journal.submit(done)
        self.metrics.commands.labels("allowed").inc()
        return self._answer(cmd, intent, body, None)

    def _abandon(self, intent: outcomes.Outcome, recording: asyncio.Future[None]) -> None:
        """The request was cancelled mid-way: once its record is in, say it did not finish."""

        def done(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                self.journal.submit(
                    outcomes.Completion(
                        intent.id, intent.requester, "cancelled by the gateway", None
                    )
                )

        recording.add_done_callback(done)

    async def _not_run(
        self,
        cmd: CommandIn,
        who: Identity,
        intent: outcomes.Outcome,
        recording: asyncio.Future[None],
        exc: Exception,
    ) -> CommandOut:
        """An allowed command that did not complete: its record says why. Without a record
        nothing ran (an earlier call with the same key won, or keyturn's database is down);
        a command that never started gives its Idempotency-Key back, so a retry runs it."""
        try:
            await self._recorded(recording)
        except asyncpg.UniqueViolationError:
            earlier = await requests.find_by_key(
                self.store, who.subject, intent.idempotency_key or "", intent.body_sha256 or ""
            )
            if earlier is None:
                raise exc from None
            return self.view(reads.RequestView.of(earlier))
        error = self._failure(exc)
        never_ran = isinstance(exc, NotStarted)
        self.journal.submit(
            outcomes.Completion(intent.id, who.subject, error, None, release_key=never_ran)
        )
        cause = exc.cause if isinstance(exc, NotStarted) else exc
        if isinstance(cause, TimeoutError) and never_ran:
            raise RateLimited(
                f"no read-only connection of {who.subject} became free in time; retry",
                retry_after=1.0,
            ) from None
        if isinstance(cause, TimeoutError | SessionChanged | NotReadOnly | asyncpg.PostgresError):
            self.metrics.commands.labels("failed").inc()
            return self._answer(cmd, intent, None, error)
        if isinstance(cause, KeyturnError):
            raise cause
        raise Unavailable(f"target {cmd.target} is not reachable: {type(cause).__name__}") from exc

    def _answer(
        self,
        cmd: CommandIn,
        intent: outcomes.Outcome,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> CommandOut:
        return CommandOut(
            id=str(intent.id),
            status="failed" if error else "executed",
            target=cmd.target,
            rule=intent.rule,
            created_at=self.store.clock.now(),
            result=result,
            error=error,
        )

    async def _estimate(self, target: str, command: str, who: Identity) -> int | None:
        """How many rows a held command would touch, by the planner, for the card and agent.

        The read-only role may not EXPLAIN a write (the planner checks write privileges), but
        it may plan ``SELECT 1 FROM <table> WHERE <same condition>``, which estimates the same
        rows. That estimate answers for the condition: one on a masked column (``WHERE email
        < 'm'``) would be an oracle on its values, with no human in the loop. So the preview
        is judged as a read would be, masking included, and gets no estimate unless it passes.
        Nor does one that calls a function: the planner evaluates stable calls while planning
        (``generate_series(1, ascii(substr(table_to_xml(…), k, 1)))`` estimates a character
        of any table), whatever the allowed path would think of them.
        """
        if self.readers is None or target not in self.readers:
            return None
        masking, catalog = masking_patterns(self.config), await self._catalog(target)
        async with self.turns.turn(who.subject):
            query = await judged(_estimable, command, masking, catalog)
        if query is None:
            return None
        deadline = Deadline(ESTIMATE_TIMEOUT)
        try:
            async with self.readers.transaction(target, who.subject, "estimate", deadline) as c:
                return await estimate_rows(c, query, deadline)
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
        estimate = await self._estimate(cmd.target, cmd.command, who)
        row, created = await requests.create_request(
            self.store,
            requests.NewRequest(
                target=cmd.target,
                command=cmd.command,
                requester=who.subject,
                on_behalf_of=who.on_behalf_of,
                run_id=cmd.run_id,
                reason=cmd.reason,
                rule=rule.name if rule else None,
                pending_ttl=(rule.pending_ttl if rule else None) or self.config.policy.pending_ttl,
                quorum=rule.quorum if rule else 1,
                grant_ttl=(rule.grant_ttl if rule else None)
                or self.config.policy.default_grant_ttl,
                classification=_classification(verdict) | {"estimated_rows": estimate},
                idempotency_key=key,
                body_sha256=body_sha,
                max_pending=self.config.gateway.max_pending_per_agent,
            ),
        )
        if created and verdict.action == "allow":
            # an allowed SSH command still needs credentials from the bot: approved by policy
            row = (
                await requests.decide(self.store, row.id, f"policy:{row.rule}", Decision.APPROVE)
            ).request
        if created:
            self.metrics.commands.labels("held").inc()
        return self.view(reads.RequestView.of(row))

    # ------------------------------------------------------------------ targets

    def targets(self, who: Identity) -> TargetsOut:
        """The targets ``who`` may use, for an agent (or its model) choosing one."""
        return TargetsOut(
            targets=[
                TargetOut(
                    name=name,
                    kind=target.kind,
                    description=target.description or DEFAULT_DESCRIPTIONS[target.kind],
                )
                for name, target in self.config.policy.targets.items()
                if may_use(target, who)
            ]
        )

    # ------------------------------------------------------------------ read and wait

    async def read(self, who: Identity, request_id: str, wait: float) -> CommandOut:
        try:
            ident = uuid.UUID(request_id)
        except ValueError:
            raise NotFound(f"request {request_id} not found") from None

        async def load() -> reads.RequestView:
            row = await reads.get_request_view(self.store, ident)
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
                lambda r: r.status in AGENT_TERMINAL or self.draining,
                timeout=wait,
                poll_interval=wait,  # the batch poller is the polling guarantee
            )
        finally:
            self.metrics.waiters.dec()
        return self.view(row)

    def view(self, row: reads.RequestView) -> CommandOut:
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

    def drain(self) -> None:
        """Shutting down: answer every long-poll now with its request as it stands, rather than
        holding a restart for up to ``max_wait``. Agents poll again (another replica, or this
        one once back); nothing is lost, the request lives in the database."""
        self.draining = True
        for ident in self.listener.watched("request"):
            self.listener.wake("request", ident)

    # ------------------------------------------------------------------ background upkeep

    async def poll_forever(self) -> None:
        """The polling guarantee behind long-polls, expiry of pending requests, the gauge."""
        interval = self.config.gateway.poll_interval.total_seconds()
        while True:
            with contextlib.suppress(KeyturnError):
                await self.poll_once()
            await asyncio.sleep(interval)

    async def poll_once(self) -> None:
        await requests.expire_due_requests(self.store)
        watched = [uuid.UUID(ident) for ident in self.listener.watched("request")]
        for ident in await reads.decided_among(self.store, watched):
            self.listener.wake("request", str(ident))
        self.metrics.pending.set(await reads.count_pending(self.store))

    async def ready(self) -> dict[str, str]:
        """Postgres and Vault reachable; raises Unavailable naming what is not."""
        await self.store.ping()
        vaults = self.vaults()
        for vault in vaults:
            await vault.health()
        return {"postgres": "ok", "vault": "ok" if vaults else "not configured"}

    def vaults(self) -> list[Vault]:
        found = [self.readers.vault] if self.readers is not None else []
        if self.executor is not None:
            found.append(self.executor.vault)
        return list({id(v): v for v in found}.values())
