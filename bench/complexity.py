"""Judging cost: run ``python bench/complexity.py`` (after scripts/test has set up .venv).

The worst command of each shape an agent may send (up to 64 KiB, the shapes of
``tests/unit/test_complexity.py``), judged as the gateway judges it: the CPU each takes to be
judged or refused (target: at most 0.5 s), beside the floor measured in the same run, which
is PostgreSQL's own parser (pglast) reading the same text. No services are needed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from keyturn.cli import quiet_libraries

quiet_libraries()  # before asyncssh is imported below, or it warns about DSA

import pglast  # noqa: E402

from bench.stack import report  # noqa: E402
from keyturn.classify import Identity, classify  # noqa: E402
from keyturn.classify.sql import parse  # noqa: E402
from keyturn.errors import TooComplex  # noqa: E402
from tests.unit.test_classify import POLICY, lax_policy  # noqa: E402
from tests.unit.test_complexity import (  # noqa: E402
    ADVERSARIAL_SHELL,
    ADVERSARIAL_SQL,
    KiB64,
    nested_recursive,
)

TARGET = 0.5  # seconds of CPU to judge or refuse one command


def cpu(work: Callable[[], object]) -> tuple[float, str]:
    start = time.process_time()
    try:
        work()
        outcome = "judged"
    except TooComplex:
        outcome = "too_complex"
    except pglast.parser.ParseError:
        outcome = "unparsed"
    return time.process_time() - start, outcome


def main() -> None:
    who = Identity("crew-ops")
    shapes = {"nested-recursive-60": nested_recursive(60), **ADVERSARIAL_SQL}
    for name, command in shapes.items():
        command = command[:KiB64]
        floor, _ = cpu(lambda command=command: pglast.parse_sql(command))  # type: ignore[misc]
        parse.cache_clear()
        spent, outcome = cpu(
            lambda command=command: classify(lax_policy(), "db", command, who)  # type: ignore[misc]
        )
        report(f"sql {name} ({outcome}), CPU", spent, "s", f"<= {TARGET}", spent <= TARGET)
        print(f"{'':<4}{len(command):,} bytes; parser alone {floor:.3f} s: {spent / floor:.1f}x")
    for name, command in ADVERSARIAL_SHELL.items():
        command = command[:KiB64]
        spent, outcome = cpu(
            lambda command=command: classify(POLICY, "web", command, who)  # type: ignore[misc]
        )
        report(f"shell {name} ({outcome}), CPU", spent, "s", f"<= {TARGET}", spent <= TARGET)


if __name__ == "__main__":
    main()
