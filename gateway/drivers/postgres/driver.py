"""The ``postgres`` driver (:class:`gateway.usecases.driver.Driver`).

Allowed commands run on the agent's own read-only login (:mod:`.logins`), statement by
statement as :func:`keyturn.classify.readonly.read_plan` splits them, each checked against
the server's own word (:mod:`.sql`). Approved commands run on the login the bot handed over,
in one transaction. Every result and every error the agent sees is masked here.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import asyncpg

from gateway.drivers.postgres.catalogs import CATALOG_IDENTITY, Catalogs
from gateway.drivers.postgres.fetch import (
    STALE_STATEMENT,
    columns_of,
    decode_times_as_text,
    describe,
    forget_statements,
)
from gateway.drivers.postgres.logins import ReadOnlyLogins
from gateway.drivers.postgres.sql import (
    ConnectionChanged,
    estimate_rows,
    run_approved,
    run_readonly,
)
from gateway.drivers.postgres.values import TEXT, Limits, SqlResult, finish
from gateway.judging import Turns, judged
from gateway.metrics import Metrics
from gateway.usecases.driver import (
    Allowed,
    Described,
    RunFailed,
    SessionFacts,
    StatementRefused,
    as_text,
)
from keyturn.aio import Deadline
from keyturn.classify import Identity, masking_patterns
from keyturn.classify.catalog import Catalog
from keyturn.classify.patterns import Patterns
from keyturn.classify.readonly import NotReadOnly, Statement, read_plan
from keyturn.classify.sql import calls_a_function, preview_select
from keyturn.config.policy import Config
from keyturn.config.targets import PostgresTarget
from keyturn.domain import request_tag
from keyturn.errors import InvalidInput, KeyturnError, Unavailable
from keyturn.masking import Masker
from keyturn.supervise import Loop

log = logging.getLogger(__name__)

ESTIMATE_TIMEOUT = 2.0
CONNECT_TIMEOUT = 10.0
UNREVOKED_RETRY = 5.0  # seconds between tries at read-only leases Vault could not revoke
MAX_ERROR = 2000  # characters of a database error passed back to the agent
# What the agent is told as a failed command (status "failed"); anything else that stops a
# command is the target being unreachable, or a keyturn error of its own.
FAILED = (TimeoutError, ConnectionChanged, NotReadOnly, asyncpg.PostgresError)


def _estimable(command: str, masking: Patterns, catalog: Catalog | None) -> str | None:
    """The preview a held command's estimate may plan, or None (see
    :meth:`PostgresDriver.describe_held`): one that calls a function, or that a read could
    not run as it is, gets no estimate."""
    query = preview_select(command)
    try:
        if query is None or calls_a_function(query):
            return None
        read_plan(query, 1, masking, catalog)
    except (KeyturnError, RecursionError):  # NotReadOnly (a masked use…), TooComplex
        return None
    return query


FACTS_SQL = (
    "SELECT current_setting('server_version') AS server_version,"
    " current_setting('TimeZone') AS timezone, current_setting('search_path') AS search_path"
)


def _type_name(schema: str, name: str) -> str:
    """A type as SQL names it (asyncpg spells an array type ``int4[]``)."""
    base, array = (name[:-2], "[]") if name.endswith("[]") else (name, "")
    return '"' + schema.replace('"', '""') + '"."' + base.replace('"', '""') + '"' + array


class PostgresDriver:
    kind: ClassVar[str] = "postgres"
    description: ClassVar[str] = (
        "PostgreSQL database: plain reads run at once, anything else waits for a human"
    )

    def __init__(
        self,
        config: Config,
        masker: Masker,
        metrics: Metrics,
        turns: Turns,
        logins: ReadOnlyLogins | None,  # the allowed path's logins (needs Vault)
        catalogs: Catalogs | None = None,
    ) -> None:
        self.config = config
        self.masker = masker
        self.metrics = metrics
        self.turns = turns
        self.logins = logins
        self.catalogs = catalogs
        self.limits = Limits.of(config.gateway)
        self._facts: dict[str, SessionFacts] = {}

    def canonical(self, target: str, command: str, *, as_http: bool) -> str:
        return as_text(self.kind, target, command, as_http=as_http)

    def runs_allowed(self, target: str) -> bool:
        return self.logins is not None and target in self.logins

    async def catalog(self, target: str) -> Catalog | None:
        if self.catalogs is not None and self.runs_allowed(target):
            return await self.catalogs.get(target)
        return None

    # ------------------------------------------------------------------ allowed

    async def run_allowed(self, allowed: Allowed) -> dict[str, Any]:
        cfg = self.config.gateway
        masking = masking_patterns(self.config, allowed.rule)
        try:
            catalog = await self.catalog(allowed.target)
            async with self.turns.turn(allowed.who.subject):
                plan = await judged(
                    read_plan, allowed.command, cfg.max_statements, masking, catalog
                )
        except KeyturnError as exc:  # judging refused it: the same answer every time
            raise self._failed(exc, started=True) from exc
        result = await self._read(allowed, plan)
        if result.truncated:
            self.metrics.truncated.labels(result.truncated).inc()
        return result.as_json()

    async def _read(self, allowed: Allowed, plan: tuple[Statement, ...]) -> SqlResult:
        """Run ``allowed``'s plan on its agent's own read-only login, once recorded; whatever
        stops it is a RunFailed saying whether anything may have reached the target."""
        assert self.logins is not None
        cfg = self.config.gateway
        deadline = Deadline(cfg.statement_timeout.total_seconds())
        subject = allowed.who.subject
        label = request_tag(allowed.request_id)
        started = False
        try:
            with self.metrics.execute_seconds.time():
                for attempt in (1, 2):
                    async with self.logins.transaction(
                        allowed.target, subject, label, deadline
                    ) as c:
                        await allowed.recorded  # the transaction opened meanwhile
                        started = True
                        try:
                            fetched, statements = await run_readonly(
                                c, plan, self.limits, deadline, self.masker
                            )
                            break
                        except STALE_STATEMENT:
                            forget_statements(c)  # the schema changed under the cache
                            if attempt == 2:
                                raise
            masked = plan[-1].masked
            return await finish(fetched, statements, self.masker, self.limits, masked=masked)
        except Exception as exc:
            raise self._failed(exc, started=started) from exc

    def _failed(self, exc: Exception, *, started: bool) -> RunFailed:
        """What the agent is told when its allowed command did not complete (masked)."""
        if isinstance(exc, TimeoutError) and not started:
            busy = "never ran: no read-only connection became free in time"
            return RunFailed(busy, final=False, outcome="busy")
        message = self._message(exc) if started else f"never ran: {self._message(exc)}"
        if isinstance(exc, FAILED):
            return RunFailed(message, final=started)
        if isinstance(exc, KeyturnError):
            return RunFailed(message, final=started, error=exc)
        return RunFailed(message, final=started, outcome="unreachable")

    def _message(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            seconds = self.config.gateway.statement_timeout.total_seconds()
            return f"deadline exceeded: the gateway cancelled the command after {seconds:g} s"
        if isinstance(exc, ConnectionChanged):
            return f"{exc}; keyturn closed that connection and ran nothing more"
        if isinstance(exc, asyncpg.PostgresError):
            return self.masker.text(f"{exc.sqlstate}: {exc}"[:MAX_ERROR])
        if isinstance(exc, KeyturnError):
            return exc.message
        return f"the target connection failed: {type(exc).__name__}"

    # ------------------------------------------------------------------ held

    async def describe_held(self, target: str, command: str, who: Identity) -> dict[str, Any]:
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
        if self.logins is None or not self.runs_allowed(target):
            return {"estimated_rows": None}
        masking, catalog = masking_patterns(self.config), await self.catalog(target)
        async with self.turns.turn(who.subject):
            query = await judged(_estimable, command, masking, catalog)
        if query is None:
            return {"estimated_rows": None}
        deadline = Deadline(ESTIMATE_TIMEOUT)
        try:
            async with self.logins.transaction(target, who.subject, "estimate", deadline) as c:
                return {"estimated_rows": await estimate_rows(c, query, deadline)}
        except (TimeoutError, KeyturnError, OSError, asyncpg.PostgresError) as exc:
            log.info("no EXPLAIN estimate for a held command on %s: %s", target, exc)
            return {"estimated_rows": None}

    # ------------------------------------------------------------------ described

    async def describe(self, target: str, sql: str, who: Identity) -> Described:
        """Parse ``sql`` on ``who``'s read-only login, inside the gateway's read-only
        transaction: Parse and Describe run nothing (privileges are checked at execution), so
        a write is described as safely as a read. A column masked by its name is described
        as text; one lineage masks under another name shows when it runs (the wire edge
        then refuses a result whose types differ from what it described)."""
        if self.logins is None or not self.runs_allowed(target):
            raise InvalidInput(f"{target} has no read-only login to describe statements with")
        deadline = Deadline(ESTIMATE_TIMEOUT)
        try:
            async with self.logins.transaction(target, who.subject, "describe", deadline) as c:
                state = await describe(c, sql, deadline)
                params, attributes = state._get_parameters(), columns_of(state)
        except asyncpg.PostgresError as exc:
            raise StatementRefused(self._message(exc).split(": ", 1)[-1], exc.sqlstate) from exc
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"target {target} is not reachable: {type(exc).__name__}") from exc
        names = tuple(a.name for a in attributes)
        hidden = self.masker.masked_columns(names)
        return Described(
            params=tuple((p.oid, _type_name(p.schema, p.name)) for p in params),
            columns=tuple(
                (a.name, TEXT if hide else a.type.oid)
                for a, hide in zip(attributes, hidden, strict=True)
            ),
        )

    async def session_facts(self, target: str) -> SessionFacts:
        facts = self._facts.get(target)
        if facts is not None:
            return facts
        if self.logins is None or not self.runs_allowed(target):
            raise InvalidInput(f"{target} has no read-only login to read its settings with")
        deadline = Deadline(ESTIMATE_TIMEOUT)
        try:
            async with self.logins.transaction(target, CATALOG_IDENTITY, "facts", deadline) as c:
                row = await c.fetchrow(FACTS_SQL, timeout=deadline.left())
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"target {target} is not reachable: {type(exc).__name__}") from exc
        assert row is not None
        path = tuple(part.strip().strip('"') for part in row["search_path"].split(","))
        facts = SessionFacts(row["server_version"], row["timezone"], path)
        self._facts[target] = facts
        return facts

    # ------------------------------------------------------------------ approved

    async def run_approved(
        self, target: str, command: str, credentials: dict[str, Any]
    ) -> dict[str, Any]:
        policy_target = self.config.policy.targets[target]
        assert isinstance(policy_target, PostgresTarget)
        cfg = self.config.gateway
        try:
            url, kwargs = policy_target.login(credentials["username"], credentials["password"])
            conn = await asyncpg.connect(
                url,
                timeout=CONNECT_TIMEOUT,
                server_settings={
                    # the server's own timeout is a backstop a second past the gateway's
                    # deadline, so the agent reads which deadline it met
                    "statement_timeout": str(
                        int(cfg.statement_timeout.total_seconds() * 1000) + 1000
                    ),
                    "application_name": "keyturn-gateway-approved",
                },
                **kwargs,
            )
            try:
                await decode_times_as_text(conn)
                fetched, tags = await run_approved(
                    conn, command, self.limits, Deadline(cfg.statement_timeout.total_seconds())
                )
            except TimeoutError as exc:  # the statement's deadline, not the connect's
                raise RunFailed(self._message(exc), final=True) from exc
            finally:
                await conn.close()
        except asyncpg.PostgresError as exc:
            raise RunFailed(self._message(exc), final=True) from exc
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            message = f"target {target} failed: {type(exc).__name__}: {exc}"
            raise RunFailed(self.masker.text(message), final=True) from exc
        result = await finish(fetched, len(tags), self.masker, self.limits, tags)
        return result.as_json()

    # ------------------------------------------------------------------ upkeep

    def background(self) -> list[Loop]:
        if self.logins is None:
            return []
        return [
            Loop("readonly-reaper", self.logins.close_idle, self.logins.reap_interval()),
            Loop("readonly-revoker", self.logins.unrevoked.retry, UNREVOKED_RETRY),
        ]

    async def close(self) -> None:
        if self.logins is not None:
            await self.logins.close()
