"""The soak's figures: what the end state says about every held write, and how each path
fared before, during and after each fault."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.soak_load import PATHS, Approver, Load, Sample
from bench.stack import percentile
from keyturn.domain import RequestStatus

SWEEP = 15.0  # seconds: bot.sweep_interval's default, which the soak keeps
WINDOW = 60.0  # seconds of "before" and "after" around a fault
SLOW = 3.0  # a call this many times its path's p99 before a fault (and 1 s) was hurt by it
TERMINAL = tuple(s.value for s in RequestStatus if s.terminal)  # a request's outcomes


@dataclass(frozen=True)
class Fault:
    name: str
    start: float  # monotonic: injected
    back: float  # monotonic: the component answers again
    wall: float  # time.time() at ``start``, to hold against the database's timestamps

    @property
    def down(self) -> float:
        return self.back - self.start


@dataclass(frozen=True)
class Outcomes:
    held: int
    lost: int  # requests that never reached an outcome, whether an agent knew their id or not
    two_outcomes: int  # two terminal events, or the agent told one thing and the record another
    ran_twice: int
    misrecorded: int  # ran but not recorded executed, or recorded executed but never ran
    leases_left: int  # write logins still in Vault
    roles_left: int  # dynamic roles still in the target
    active_left: int  # grants still active
    overdue: int  # grants that outlived their end by more than the sweep plus the downtime
    worst_lag: float  # the most any grant outlived its end, less the downtime it overlapped

    @classmethod
    def of(
        cls,
        load: Load,
        statuses: dict[str, str],
        unsettled: int,
        doubled: int,
        ends: Sequence[tuple[float, float]],
        ran: dict[int, int],
        roles: int,
        leases: int,
        active: int,
        faults: Sequence[Fault],
    ) -> Outcomes:
        lost, two, misrecorded = unsettled, 0, 0
        for request_id, (row, seen) in load.held.items():
            status = statuses.get(request_id)
            lost += status is None  # an id the agent was given, and no such request
            two += seen in TERMINAL and seen != status
            misrecorded += (status == "executed") != (ran.get(row, 0) >= 1)
        lags = [ended - due - _overlap(faults, due, ended) for ended, due in ends]
        return cls(
            held=len(load.held),
            lost=lost,
            two_outcomes=two + doubled,
            ran_twice=sum(n > 1 for n in ran.values()),
            misrecorded=misrecorded,
            leases_left=leases,
            roles_left=roles,
            active_left=active,
            overdue=sum(lag > SWEEP for lag in lags),
            worst_lag=max(lags, default=0.0),
        )


def _overlap(faults: Sequence[Fault], start: float, end: float) -> float:
    """Seconds of ``[start, end]`` (wall clock) during which a fault had a component down."""
    return sum(max(0.0, min(end, f.wall + f.down) - max(start, f.wall)) for f in faults)


def _window(samples: list[Sample], path: str, start: float, end: float) -> list[Sample]:
    return [s for s in samples if s.path == path and start <= s.start < end]


def _figures(samples: list[Sample]) -> str:
    if not samples:
        return f"{'-':>8} {'-':>8} {0:>6} {0:>4}"
    took = [s.seconds * 1000 for s in samples]
    failed = sum(not s.ok for s in samples)
    return (
        f"{percentile(took, 0.5):>8.1f} {percentile(took, 0.99):>8.1f} {len(samples):>6} "
        f"{failed:>4}"
    )


def recovered(samples: list[Sample], fault: Fault, until: float) -> float:
    """Seconds from the fault until agents were whole again: the end of the last call it
    hurt (failed, or took over ``SLOW`` times its path's p99 before and over a second),
    looking no further than ``until`` (the next fault), or until the component was back if
    it hurt none."""
    whole = fault.back
    for path in PATHS:
        before = _window(samples, path, fault.start - WINDOW, fault.start)
        p99 = percentile([s.seconds for s in before], 0.99) if before else 0.0
        slow = max(SLOW * p99, 1.0)
        for s in _window(samples, path, fault.start, until):
            if not s.ok or s.seconds > slow:
                whole = max(whole, s.end)
    return whole - fault.start


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def print_report(
    load: Load,
    outcomes: Outcomes,
    faults: Sequence[Fault],
    t0: float,
    memory: dict[str, tuple[int, int]],
    approver: Approver,
) -> None:
    seconds = max(s.end for s in load.samples) - t0 if load.samples else 0.0
    print(
        f"\n{len(load.samples)} commands in {seconds:.0f} s; {outcomes.held} held writes; "
        f"{approver.clicks} clicks ({approver.refused} not taken, clicked again)"
    )
    print(f"\n{'end state':<58} {'measured':>9}  target")
    for name, value in (
        ("requests lost (never reached an outcome)", outcomes.lost),
        ("requests with two outcomes", outcomes.two_outcomes),
        ("commands run twice", outcomes.ran_twice),
        ("commands recorded other than they ran", outcomes.misrecorded),
        ("write leases left in Vault", outcomes.leases_left),
        ("dynamic roles left in the target (gateway stopped)", outcomes.roles_left),
        ("grants still active", outcomes.active_left),
        (f"grants that outlived their end by > sweep ({SWEEP:g} s) + downtime", outcomes.overdue),
    ):
        print(f"{name:<58} {value:>9}  0 {'PASS' if value == 0 else 'FAIL'}")
    print(f"{'the most a grant outlived its end, less downtime':<58} {outcomes.worst_lag:>8.1f}s")
    ends = [f.start for f in faults[1:]] + [max((s.start for s in load.samples), default=0.0)]
    took = [recovered(load.samples, f, until) for f, until in zip(faults, ends, strict=True)]
    print(f"\n{'fault':<44} {'down':>6} {'whole again':>12}")
    for fault, seconds in zip(faults, took, strict=True):
        print(f"{fault.name:<44} {fault.down:>5.1f}s {seconds:>11.1f}s")
    print(f"\n{'fault / path / window':<52} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6} {'fail':>4}")
    for fault, seconds in zip(faults, took, strict=True):
        whole = fault.start + seconds
        for path in PATHS:
            for label, start, end in (
                ("before", fault.start - WINDOW, fault.start),
                ("during", fault.start, whole),
                ("after", whole, whole + WINDOW),
            ):
                row = f"{fault.name[:30]} / {path} / {label}"
                print(f"{row:<52} {_figures(_window(load.samples, path, start, end))}")
    print(f"\n{'memory (RSS)':<40} {'from':>9} {'to':>9} {'growth':>8}  target")
    for name, (first, last) in memory.items():
        if not first:
            print(f"{name:<40} {'':>9} {_mib(last):>9}")
            continue
        growth = (last / first - 1) * 100
        print(f"{name:<40} {_mib(first):>9} {_mib(last):>9} {growth:>7.1f}%  <= 10 %")
