"""What the Postgres protocol's edge needs beyond submit and read: a statement described
before it runs, and the settings a client is told its session has.

Both go to the target's driver through :class:`gateway.usecases.driver.Describes`, after the
same access check as a command: a Postgres client reaches only the Postgres targets its
identity may use.
"""

from __future__ import annotations

from gateway.usecases.driver import Described, Describes, SessionFacts
from gateway.usecases.gateway import Gateway
from keyturn.classify import Identity, check_access
from keyturn.errors import InvalidInput


def _describer(gw: Gateway, who: Identity, target: str) -> Describes:
    check_access(gw.config, target, who)
    driver = gw.drivers.of(target)
    if not isinstance(driver, Describes):
        raise InvalidInput(
            f"{target} is a {driver.kind} target: the Postgres protocol reaches Postgres "
            "targets only"
        )
    return driver


async def describe(gw: Gateway, who: Identity, target: str, sql: str) -> Described:
    return await _describer(gw, who, target).describe(target, sql, who)


async def session_facts(gw: Gateway, who: Identity, target: str) -> SessionFacts:
    return await _describer(gw, who, target).session_facts(target)


async def runs_at_once(gw: Gateway, who: Identity, target: str, command: str) -> bool:
    """Whether ``command`` would run at once as an allowed read (judged as submit would,
    from the same cache): statements sent together run one by one only if each would."""
    check_access(gw.config, target, who)
    driver = gw.drivers.of(target)
    command = driver.canonical(target, command, as_http=False)
    verdict = await gw.verdict(target, command, who)
    return verdict.action == "allow" and driver.runs_allowed(target)
