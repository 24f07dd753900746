"""One authenticated Postgres client: its statements and portals, its transaction status,
and each message answered through the gateway's use cases.

Messages are handled one at a time, in order: a statement held for approval holds every
message behind it, so nothing pipelined after it runs early, and an error skips the rest up
to Sync (as Postgres does). Every statement that reaches a target goes through
:func:`gateway.usecases.submit.submit` as one text, parameters in place, exactly as an HTTP
API command would. What a client's ``BEGIN … COMMIT`` means is in docs/decisions.md: the
block is a status kept here; each statement runs in a transaction of its own; a write
committed at approval inside a block is announced, and a block that would roll it back says
it cannot, as an error.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pglast.parser import ParseError

from gateway.edges.pgwire import protocol as pg
from gateway.edges.pgwire.errors import (
    ABORTED,
    Fatal,
    StatementError,
    capped,
    error_of,
    failed,
    unparsed,
)
from gateway.edges.pgwire.statements import BadStatement, Prepared, Statement, prepare, split
from gateway.edges.pgwire.values import (
    TEXT,
    TYPE_NAMES,
    UNTYPED,
    cell,
    literal,
    param_text,
)
from gateway.judging import judged
from gateway.usecases import wire
from gateway.usecases.gateway import AGENT_TERMINAL, Gateway, read
from gateway.usecases.submission import Submission
from gateway.usecases.submit import Blocked, submit
from keyturn.classify import Identity
from keyturn.classify.session import Effect, SessionSettings
from keyturn.recording.runs import BadRunId, check_run_id
from keyturn.store.reads import RequestView

log = logging.getLogger(__name__)

T = TypeVar("T")
# What one connection may keep (Postgres keeps anything; keyturn is shared by every agent):
MAX_STATEMENTS = 500  # named prepared statements (asyncpg and psycopg keep 100 at most)
MAX_STATEMENT_BYTES = 4 * 1024 * 1024  # their text, together
MAX_PORTALS = 100  # named portals
MAX_SUSPENDED = 4  # portals holding rows not yet sent (each up to gateway.response_bytes)
RUN_PREFIX = "run:"  # application_name run:<id> puts the statements in run <id>


@dataclass(frozen=True)
class Settings:
    """How the edge treats its clients (from ``gateway.postgres_*``)."""

    notice_interval: float  # seconds between "still held" notices
    public_url: str  # where a held request's status can be read


@dataclass
class Portal:
    prepared: Prepared
    sql: str  # the statement with its parameters in place
    formats: tuple[int, ...]
    describe_pending: bool = False  # a Describe answered when the portal runs (see _settle)
    rows: list[list[Any]] | None = None  # rows not yet sent (an Execute with a row limit)
    error: StatementError | None = None  # how its run failed: a second Execute says it again
    types: list[int] = field(default_factory=list)
    tag: str = ""


class Session:
    """One client after authentication; :meth:`handle` answers each event in order."""

    def __init__(
        self,
        gw: Gateway,
        settings: Settings,
        who: Identity,
        target: str,
        session: SessionSettings,
        check: Callable[[], Awaitable[Identity]],
        limit: Callable[[str], None],
        send: Callable[[bytes], None],
        flush: Callable[[], Awaitable[None]],
    ) -> None:
        self.gw, self.settings, self.who, self.target = gw, settings, who, target
        self.session = session
        self._check = check  # re-checks the token (cached): an expired one ends the session
        self._limit = limit  # the identity's rate limit, shared with the HTTP API
        self._send, self._flush = send, flush
        self.statements: dict[str, Prepared] = {}
        self.portals: dict[str, Portal] = {}
        self.status = "I"  # ReadyForQuery's: idle, in a block, in a failed block
        self.committed: list[str] = []  # requests committed at approval inside this block
        self.pipelined: list[str] = []  # and outside a block, since the last Sync
        self.skipping = False  # after an error in the extended protocol, until Sync
        self.application_name = ""
        self.holding: str | None = None  # the held request a statement is waiting on
        self._simple = False  # answering a Query (no NoData in the simple protocol)

    # ------------------------------------------------------------------ dispatch

    async def handle(self, event: pg.Event) -> None:
        if isinstance(event, pg.Sync):
            await self._settle()
            self.skipping = False
            self.pipelined.clear()
            if self.status == "I":  # the implicit transaction ends: so do its portals
                self.portals.clear()
            self._send(pg.ready(self.status))
            await self._flush()
            return
        if isinstance(event, pg.Query):
            await self._settle()
            self._simple = True
            try:
                await self._query(event.sql)
            finally:
                self._simple = False
            self._send(pg.ready(self.status))
            await self._flush()
            return
        if self.skipping:
            return
        try:
            await self._extended(event)
        except Fatal:
            raise
        except Exception as exc:
            self._fail(error_of(exc))
            self.skipping = True

    async def _extended(self, event: pg.Event) -> None:
        if not (isinstance(event, pg.Execute) and self._pending_for(event.portal)):
            await self._settle()
        if isinstance(event, pg.Parse):
            await self._parse(event)
        elif isinstance(event, pg.Bind):
            await self._bind(event)
        elif isinstance(event, pg.Describe):
            await self._describe(event)
        elif isinstance(event, pg.Execute):
            await self._execute(event)
        elif isinstance(event, pg.Close):
            (self.statements if event.what == "S" else self.portals).pop(event.name, None)
            self._send(pg.CLOSE_COMPLETE)
        elif isinstance(event, pg.Flush):
            await self._flush()

    def _fail(self, error: StatementError) -> None:
        if isinstance(error, Fatal):
            raise error
        message = error.message
        if self.pipelined:  # the client may take this error for its batch's: it is not
            message += (
                f" (before it, {len(self.pipelined)} statement(s) sent with it were committed "
                f"on approval and are not undone: requests {', '.join(self.pipelined)})"
            )
        self._send(pg.error(error.sqlstate, message, hint=error.hint))
        if self.status == "T":
            self.status = "E"

    def cancelled(self, event: pg.Event) -> None:
        """The statement ``event`` started was cancelled by the client's CancelRequest."""
        held = self.holding
        still = f"; request {held} stays held for approval" if held else ""
        self._fail(StatementError("57014", f"canceling statement due to user request{still}"))
        self.holding = None
        if isinstance(event, pg.Query):
            self._send(pg.ready(self.status))
        else:
            self.skipping = True

    # ------------------------------------------------------------------ simple query

    async def _query(self, sql: str) -> None:
        try:
            capped(sql)
            statements = await self._judged(split, sql, self.session)
            refused = next((s.refused for s in statements if s.refused is not None), None)
            if refused is not None:  # before anything in the query runs, as a syntax error
                raise refused
        except (ParseError, RecursionError) as exc:
            self._fail(unparsed(exc))
            return
        except Fatal:
            raise
        except Exception as exc:
            self._fail(error_of(exc))
            return
        if not statements:
            self._send(pg.EMPTY_QUERY)
            return
        runs = [s for s in statements if s.effect is None]
        try:
            if len(statements) > 1 and runs and not await self._all_at_once(runs):
                # several statements that are not all plain reads: one request, all or nothing
                await self._run_together(statements, runs)
                return
            for statement in statements:
                await self._one(statement, statement.text, (), describe=True)
        except Fatal:
            raise
        except Exception as exc:
            self._fail(error_of(exc))

    async def _judged(self, fn: Callable[..., T], *args: Any) -> T:
        """pglast's work on a statement, off the event loop and one at a time per agent (a
        64 KiB statement takes a parser tens of milliseconds)."""
        async with self.gw.turns.turn(self.who.subject):
            return await judged(fn, *args)

    async def _all_at_once(self, runs: list[Statement]) -> bool:
        for statement in runs:
            if not await wire.runs_at_once(self.gw, self.who, self.target, statement.text):
                return False
        return True

    async def _run_together(self, statements: list[Statement], runs: list[Statement]) -> None:
        """Several statements sent as one Query (Postgres runs them as one transaction) that
        are not all plain reads: held as one request, run at approval in one transaction.
        Only a BEGIN first and a COMMIT last may go with them (the block they make is the
        request's own transaction); any other local statement among them is refused."""
        first, last = statements[0].effect, statements[-1].effect
        opens = first is not None and first.kind == "begin"
        closes = last is not None and last.kind == "commit"
        inner = statements[int(opens) : len(statements) - int(closes)]
        for statement in inner:
            if statement.effect is not None:
                raise StatementError(
                    "0A000",
                    "statements sent together that need approval are held as one request, "
                    f"run in one transaction: {statement.effect.tag} cannot be among them",
                )
        if self.status == "E":
            raise ABORTED
        if first is not None and opens:
            self._local(first)
        # each on its own lines: a statement may end in a "-- comment"
        view = await self._submit("\n;\n".join(s.text for s in runs))
        result = view.result or {}
        tags = list(result.get("tags") or [])
        for i, statement in enumerate(runs):
            if i == len(runs) - 1 and result.get("columns"):
                rows = Portal(Prepared(statement, (), 0, ()), "", ())
                self._take(rows, self._sendable(rows, result, True), statement, describe=True)
                self._data_rows(rows, rows.rows or [])
            self._send(pg.command_complete(tags[i] if i < len(tags) else statement.tag))
        self._committed(view)
        if last is not None and closes:
            self._local(last)

    # ------------------------------------------------------------------ extended protocol

    async def _parse(self, event: pg.Parse) -> None:
        capped(event.sql)
        if event.name and event.name in self.statements:
            raise StatementError("42P05", f'prepared statement "{event.name}" already exists')
        kept = sum(len(p.statement.text) for p in self.statements.values())
        if event.name and (
            len(self.statements) >= MAX_STATEMENTS or kept + len(event.sql) > MAX_STATEMENT_BYTES
        ):
            raise StatementError(
                "54000",
                f"keyturn keeps at most {MAX_STATEMENTS} prepared statements "
                f"({MAX_STATEMENT_BYTES // (1024 * 1024)} MiB of text) per connection: "
                "close some first",
            )
        try:
            prepared = await self._judged(prepare, event.sql, event.param_oids, self.session)
        except (ParseError, RecursionError) as exc:
            raise unparsed(exc) from None
        except BadStatement as exc:
            raise StatementError("42601", str(exc)) from None
        if prepared.statement.refused is not None:
            raise prepared.statement.refused
        self.statements[event.name] = prepared
        self._send(pg.PARSE_COMPLETE)

    async def _described(self, prepared: Prepared) -> None:
        """Ask the target what the statement takes and returns (once per statement)."""
        statement = prepared.statement
        if prepared.described is not None or statement.effect is not None or statement.empty:
            return
        self.who = await self._check()  # the target is asked: the token must still hold
        typed = [
            f"${i + 1}::{TYPE_NAMES[oid]}"
            if (oid := prepared.given(i)) in TYPE_NAMES
            else f"${i + 1}"
            for i in range(prepared.count)
        ]
        text = prepared.bound(typed) if prepared.placeholders else statement.text
        prepared.described = await wire.describe(self.gw, self.who, self.target, text)
        if len(prepared.described.params) != prepared.count:
            raise StatementError(
                "08P01", "the statement's parameters do not match what the target describes"
            )

    def _param_oid(self, prepared: Prepared, i: int) -> int:
        given = prepared.given(i)
        if given not in UNTYPED:
            return given
        described = prepared.described.params if prepared.described else ()
        return described[i][0] if i < len(described) else 0

    async def _bind(self, event: pg.Bind) -> None:
        prepared = self.statements.get(event.statement)
        if prepared is None:
            raise StatementError("26000", f'prepared statement "{event.statement}" does not exist')
        if len(event.params) != prepared.count:
            raise StatementError(
                "08P01",
                f"bind message supplies {len(event.params)} parameters, but prepared "
                f"statement requires {prepared.count}",
            )
        formats = event.param_formats
        if len(formats) not in (0, 1, len(event.params)):
            raise StatementError("08P01", "the number of parameter formats is wrong")
        if event.params:
            await self._described(prepared)
        literals = []
        for i, raw in enumerate(event.params):
            binary = bool(formats[i] if len(formats) > 1 else (formats[0] if formats else 0))
            oid, given = self._param_oid(prepared, i), prepared.given(i)
            text = None if raw is None else param_text(raw, binary, oid)
            literals.append(literal(text, TYPE_NAMES.get(given) if given not in UNTYPED else None))
        if event.portal and event.portal in self.portals:
            raise StatementError("42P03", f'cursor "{event.portal}" already exists')
        if event.portal and len(self.portals) >= MAX_PORTALS:
            raise StatementError(
                "54000", f"keyturn keeps at most {MAX_PORTALS} portals per connection"
            )
        sql = prepared.bound(literals) if literals else prepared.statement.text
        capped(sql)
        self.portals[event.portal] = Portal(prepared, sql, event.result_formats)
        self._send(pg.BIND_COMPLETE)

    async def _describe(self, event: pg.Describe) -> None:
        if event.what == "P":
            portal = self.portals.get(event.name)
            if portal is None:
                raise StatementError("34000", f'portal "{event.name}" does not exist')
            portal.describe_pending = True  # answered when it runs, or at the next message
            return
        prepared = self.statements.get(event.name)
        if prepared is None:
            raise StatementError("26000", f'prepared statement "{event.name}" does not exist')
        await self._described(prepared)
        oids = [self._param_oid(prepared, i) for i in range(prepared.count)]
        self._send(pg.parameter_description(oids))
        self._describe_columns(prepared, ())

    def _describe_columns(self, prepared: Prepared, formats: tuple[int, ...]) -> None:
        self._row_description(prepared.described.columns if prepared.described else (), formats)

    def _row_description(
        self, columns: Sequence[tuple[str, int]], formats: tuple[int, ...]
    ) -> None:
        """RowDescription of ``columns`` (name, type oid), or NoData for none (the simple
        protocol has no NoData: it says nothing)."""
        if columns:
            described = [pg.Column(name, oid) for name, oid in columns]
            self._send(pg.row_description(described, _formats(formats, len(columns))))
        elif not self._simple:
            self._send(pg.NO_DATA)

    def _pending_for(self, name: str) -> bool:
        portal = self.portals.get(name)
        return portal is not None and portal.describe_pending

    async def _settle(self) -> None:
        """Answer Describes of portals that did not run right after: from the target's
        description. (A portal described and then run answers from its real result, which
        saves a round trip for the clients that always do so, such as psycopg.)"""
        for portal in self.portals.values():
            if portal.describe_pending:
                portal.describe_pending = False
                await self._described(portal.prepared)
                self._describe_columns(portal.prepared, portal.formats)

    async def _execute(self, event: pg.Execute) -> None:
        portal = self.portals.get(event.portal)
        if portal is None:
            raise StatementError("34000", f'portal "{event.portal}" does not exist')
        if portal.error is not None:
            raise portal.error
        if portal.rows is None:
            describe, portal.describe_pending = portal.describe_pending, False
            statement = portal.prepared.statement
            try:
                result = await self._one(
                    statement, portal.sql, portal.formats, describe=describe, portal=portal
                )
            except Exception as exc:  # the portal ran (or was refused) once: never again
                portal.error = error_of(exc)
                raise portal.error from exc
            if result is None:
                return
        self._more(portal, event.max_rows)

    def _more(self, portal: Portal, max_rows: int) -> None:
        """Send a portal's rows, ``max_rows`` of them at most (0: all)."""
        rows = portal.rows or []
        batch = rows if max_rows <= 0 else rows[:max_rows]
        self._data_rows(portal, batch)
        portal.rows = rows[len(batch) :]
        if portal.rows:
            if sum(1 for p in self.portals.values() if p.rows) > MAX_SUSPENDED:
                portal.rows = []
                raise StatementError(
                    "54000", f"keyturn keeps at most {MAX_SUSPENDED} portals suspended at once"
                )
            self._send(pg.PORTAL_SUSPENDED)
        else:
            self._send(pg.command_complete(portal.tag))

    # ------------------------------------------------------------------ one statement

    async def _one(
        self,
        statement: Statement,
        sql: str,
        formats: tuple[int, ...],
        *,
        describe: bool,
        portal: Portal | None = None,
    ) -> dict[str, Any] | None:
        """Run one statement: answer it locally, or through the use cases; send its rows
        (a portal keeps them, to send as its Executes ask). Returns the result, if any."""
        if statement.refused is not None:
            raise statement.refused
        if statement.empty:
            self._send(pg.EMPTY_QUERY)
            return None
        if statement.effect is not None:
            self._local(statement.effect)
            if describe:
                self._row_description((), formats)
            if portal is not None:
                portal.rows, portal.tag = [], statement.effect.tag
            return {}
        if self.status == "E":
            raise ABORTED
        view = await self._submit(sql)
        result = view.result or {}
        self._committed(view)
        target = portal or Portal(Prepared(statement, (), 0, ()), sql, formats)
        result = self._sendable(target, result, describe)
        self._take(target, result, statement, describe)
        if portal is None:
            self._more(target, 0)
        return result

    def _sendable(self, portal: Portal, result: dict[str, Any], describe: bool) -> dict[str, Any]:
        """``result`` as it can be sent faithfully. Rows that cannot (a value cut at the
        per-value cap; types other than the client was told, as when lineage masks a
        column under another name) are refused; after a write committed on approval they
        are left out with a warning instead, since the write itself stands."""
        cap = result.get("truncated")
        problem = None
        if cap == "value_bytes":
            problem = StatementError(
                "54000",
                "a value is larger than the gateway's per-value cap (gateway.value_bytes): "
                "select a part of it",
            )
        described = portal.prepared.described
        types = _types(result)
        told = [oid for _, oid in described.columns] if described and not describe else types
        if result.get("columns") and told != types:
            problem = StatementError(
                "0A000",
                "the result's column types differ from the statement's description "
                "(a column masked under another name is text): describe it again",
            )
        if problem is not None and not result.get("tags"):
            raise problem
        if problem is not None:
            self._warn(f"the statement ran, but its rows are not sent: {problem.message}")
            return {**result, "rows": []}
        if cap:
            setting = "row_limit" if cap == "rows" else "response_bytes"
            self._warn(f"keyturn cut this result at its {cap} cap (gateway.{setting})")
        return result

    def _take(
        self, portal: Portal, result: dict[str, Any], statement: Statement, describe: bool
    ) -> None:
        columns, types = list(result.get("columns") or []), _types(result)
        if describe:
            self._row_description(list(zip(columns, types, strict=True)), portal.formats)
        tags = result.get("tags") or []
        rows = list(result.get("rows") or [])
        portal.types, portal.rows = types, rows
        portal.tag = tags[-1] if tags else f"{statement.tag} {len(rows)}"
        if statement.tag in ("SHOW", "EXPLAIN") and not tags:
            portal.tag = statement.tag

    def _data_rows(self, portal: Portal, rows: list[list[Any]]) -> None:
        formats = [f == 1 for f in _formats(portal.formats, len(portal.types))]
        for row in rows:
            cells = zip(row, portal.types, formats, strict=True)
            self._send(pg.data_row(cell(value, oid, binary) for value, oid, binary in cells))

    def _run_id(self) -> str | None:
        """The run a statement belongs to: ``application_name`` ``run:<id>`` names it (at
        startup, or by SET); any other name leaves it to keyturn's idle-gap runs."""
        name = self.application_name
        if not name.startswith(RUN_PREFIX):
            return None
        try:
            return check_run_id(name.removeprefix(RUN_PREFIX))
        except BadRunId as exc:
            raise StatementError("22023", f"application_name {name!r}: {exc}") from None

    async def _submit(self, sql: str) -> RequestView:
        """One statement (or several, as one request) through the use cases; waits while it
        is held, telling the client so; returns the request once executed."""
        capped(sql)
        self.holding = None
        self.who = await self._check()
        self._limit(self.who.subject)
        sub = Submission(
            target=self.target,
            command=sql,
            reason=None,
            run_id=self._run_id(),
            body_sha256=hashlib.sha256(sql.encode()).hexdigest(),
        )
        metrics = self.gw.metrics
        try:
            done, view = await submit(self.gw, self.who, sub)
        except Blocked:
            metrics.pg_statements.labels("blocked").inc()
            raise
        if not done:
            view = await self._hold(view)
        metrics.pg_statements.labels(view.status).inc()
        if view.status != "executed":
            raise failed(view)
        return view

    async def _hold(self, view: RequestView) -> RequestView:
        """Wait for a held request, telling the client now and every ``notice_interval``.
        A client that goes away or cancels leaves the request as it is (held), as an HTTP
        client that stops polling does; request_status finds it."""
        started = time.monotonic()
        link = f"{self.settings.public_url}/v1/commands/{view.id}"
        self.holding = str(view.id)
        try:
            while view.status not in AGENT_TERMINAL:
                waited = int(time.monotonic() - started)
                note = f"held for approval: request {view.id} — {link}"
                self._send(pg.notice(note if not waited else f"{note} (waiting {waited} s)"))
                await self._flush()
                view = await read(self.gw, self.who, str(view.id), self.settings.notice_interval)
        finally:
            self.gw.metrics.pg_held_seconds.observe(time.monotonic() - started)
        self.holding = None
        return view

    # ------------------------------------------------------------------ the block

    def _local(self, effect: Effect) -> None:
        """Answer a transaction-control statement or a harmless SET (see the module doc)."""
        self.gw.metrics.pg_statements.labels("local").inc()
        kind = effect.kind
        if kind == "set":
            if self.status == "E":
                raise ABORTED
            if effect.setting is not None:
                name, value = effect.setting
                if name == "application_name":
                    self.application_name = value
                self._send(pg.parameter_status(name, value))
        elif kind == "begin":
            if self.status != "I":
                self._warn("there is already a transaction in progress", "25001")
            else:
                self.status = "T"
        elif kind in ("commit", "rollback"):
            if self.status == "I":
                self._warn("there is no transaction in progress", "25P01")
            aborted = self.status == "E"
            committed, self.committed, self.status = self.committed, [], "I"
            if committed and (aborted or kind == "rollback"):
                raise StatementError(
                    "25000",
                    f"this block cannot be rolled back: {len(committed)} statement(s) in it were "
                    f"committed on approval (requests {', '.join(committed)}); nothing was undone",
                )
            if aborted:
                effect = Effect(kind, "ROLLBACK")
        elif self.status == "I":
            raise StatementError("25P01", f"{effect.tag} can only be used in transaction blocks")
        elif kind == "rollback_to":
            if self.committed:
                raise StatementError(
                    "25000",
                    "cannot roll back to a savepoint: statements in this block were committed "
                    f"on approval (requests {', '.join(self.committed)})",
                )
            self.status = "T"
        elif self.status == "E":
            raise ABORTED
        self._send(pg.command_complete(effect.tag))

    def _committed(self, view: RequestView) -> None:
        """A statement that ran on approval committed then, whatever block the client is in."""
        if view.result is None or not view.result.get("tags"):
            return
        if self.status != "I":
            self.committed.append(str(view.id))
            what = "a ROLLBACK of this block"
        elif not self._simple:  # a pipeline (asyncpg's executemany): one batch to its client
            self.pipelined.append(str(view.id))
            what = "an error later in this pipeline"
        else:
            return
        self._warn(
            f"request {view.id} was committed on its own when approved: {what} cannot undo it"
        )

    def _warn(self, message: str, sqlstate: str = "01000") -> None:
        self._send(pg.notice(message, severity="WARNING", sqlstate=sqlstate))


def _types(result: dict[str, Any]) -> list[int]:
    """Each result column's type oid (text where a result carries none)."""
    return list(result.get("types") or [TEXT] * len(result.get("columns") or []))


def _formats(formats: tuple[int, ...], n: int) -> list[int]:
    if len(formats) == 0:
        return [0] * n
    if len(formats) == 1:
        return [formats[0]] * n
    if len(formats) != n:
        raise StatementError("08P01", f"{len(formats)} result formats for {n} columns")
    return list(formats)
