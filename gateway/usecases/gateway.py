"""The gateway as its use cases see it: what they share, and the small use cases.

Edges (:mod:`gateway.edges`) parse and authenticate, then call a use case: :mod:`.submit`
(which runs an allowed command, :mod:`.allowed`, or holds it, :mod:`.hold`), :func:`read`
(and wait), :func:`targets`; :mod:`.approved` runs what humans approved. Use cases know
nothing of HTTP, nor of Postgres or SSH: each kind of target is a driver (:mod:`.driver`).
Errors are keyturn errors; each edge maps them to its own answers.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from dataclasses import dataclass, field

from gateway.journal import Journal
from gateway.judging import Turns, judged
from gateway.metrics import Metrics
from gateway.usecases.driver import Drivers
from gateway.usecases.inflight import InFlight
from keyturn.agent.api import TERMINAL, OperationOut, RunOut, TargetOut, TargetsOut
from keyturn.classify import Identity, Verdict, classify, may_use
from keyturn.classify.catalog import Catalog
from keyturn.config.policy import Config
from keyturn.config.targets import HttpTarget, TargetBase
from keyturn.domain import RequestStatus
from keyturn.errors import NotFound
from keyturn.recording.runs import Run
from keyturn.recording.timeline import step_json
from keyturn.store import decisions, reads, run_steps
from keyturn.store.db import Store
from keyturn.store.listener import Listener, wait_until
from keyturn.vault import Vault

AGENT_TERMINAL = frozenset(RequestStatus(status) for status in TERMINAL)


@dataclass
class Gateway:
    config: Config
    store: Store
    listener: Listener
    journal: Journal
    drivers: Drivers
    metrics: Metrics
    turns: Turns  # one judgement per agent at once
    in_flight: InFlight  # allowed commands running per agent
    vaults: list[Vault]  # every Vault client, for /readyz
    draining: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._classify = functools.lru_cache(maxsize=8192)(self._classify_uncached)

    def _classify_uncached(
        self, target: str, command: str, who: Identity, catalog: Catalog | None
    ) -> Verdict:
        return classify(self.config, target, command, who, catalog)

    async def verdict(self, target: str, command: str, who: Identity) -> Verdict:
        """Cached (per catalog); judged in the judging pool, never on the event loop."""
        catalog = await self.drivers.of(target).catalog(target)
        async with self.turns.turn(who.subject):
            return await judged(self._classify, target, command, who, catalog)

    def drain(self) -> None:
        """Shutting down: answer every long-poll now with its request as it stands, rather than
        holding a restart for up to ``max_wait``. Agents poll again (another replica, or this
        one once back); nothing is lost, the request lives in the database."""
        self.draining = True
        for ident in self.listener.watched("request"):
            self.listener.wake("request", ident)


def targets(gw: Gateway, who: Identity) -> TargetsOut:
    """The targets ``who`` may use, for an agent (or its model) choosing one."""
    return TargetsOut(
        targets=[
            TargetOut(
                name=name,
                kind=target.kind,
                description=target.description or gw.drivers.kind(target.kind).description,
                operations=_operations(target),
            )
            for name, target in gw.config.policy.targets.items()
            if may_use(target, who)
        ]
    )


def _operations(target: TargetBase) -> list[OperationOut] | None:
    spec = target.spec if isinstance(target, HttpTarget) else None
    if spec is None:
        return None
    return [
        OperationOut(
            method=op.method, path=op.path, operation_id=op.operation_id, summary=op.summary
        )
        for op in spec.operations
    ]


async def read(gw: Gateway, who: Identity, request_id: str, wait: float) -> reads.RequestView:
    """``who``'s request as it stands, or once it ends (within ``wait`` seconds)."""
    try:
        ident = uuid.UUID(request_id)
    except ValueError:
        raise NotFound(f"request {request_id} not found") from None

    async def load() -> reads.RequestView:
        row = await reads.get_request_view(gw.store, ident)
        if row.requester != who.subject:
            raise NotFound(f"request {request_id} not found")  # do not reveal it exists
        return row

    if wait <= 0:
        return await load()
    gw.metrics.waiters.inc()
    try:
        row = await wait_until(
            gw.listener,
            "request",
            ident,
            load,
            lambda r: r.status in AGENT_TERMINAL or gw.draining,
            timeout=wait,
            poll_interval=wait,  # the batch poller is the polling guarantee
        )
    finally:
        gw.metrics.waiters.dec()
    return row


async def poll(gw: Gateway) -> None:
    """The polling guarantee behind long-polls, expiry of pending requests, the gauge."""
    await decisions.expire_due_requests(gw.store)
    watched = [uuid.UUID(ident) for ident in gw.listener.watched("request")]
    for ident in await reads.decided_among(gw.store, watched):
        gw.listener.wake("request", str(ident))
    gw.metrics.pending.set(await reads.count_pending(gw.store))


async def agent_run(
    gw: Gateway, who: Identity, name: str, limit: int, *, waiting: bool = False
) -> RunOut:
    """``who``'s own steps of run ``name`` (``waiting``: only requests not yet ended):
    another identity's run is not found, as if it did not exist."""
    found = await run_steps.run(gw.store, name, agent=who.subject, limit=limit, waiting=waiting)
    return await asyncio.to_thread(_run_out, found)  # up to 1000 outputs parsed: off the loop


def _run_out(found: Run) -> RunOut:
    steps = [step_json(step, n) for n, step in enumerate(found.steps, 1)]
    return RunOut.model_validate({"name": found.name, "steps": steps, "more": found.more})


async def ready(gw: Gateway) -> dict[str, str]:
    """Postgres and Vault reachable; raises Unavailable naming what is not."""
    await gw.store.ping()
    for vault in gw.vaults:
        await vault.health()
    return {"postgres": "ok", "vault": "ok" if gw.vaults else "not configured"}
