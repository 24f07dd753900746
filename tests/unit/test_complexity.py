"""Judging a command costs bounded work, whatever shape an agent gives it.

The red team's 1,636-character query of 19 nested WITH RECURSIVE CTEs took 23 s to judge (the
recursive branch was followed twice per level). Each analysis is meant to be linear; each also
spends from one budget per command, so a shape nobody foresaw ends as ``too_complex``. The CPU
figures are in ``bench/complexity.py``; here the work is counted, which does not depend on the
machine.
"""

from __future__ import annotations

import pytest

from keyturn.classify import Identity, classify, masking_patterns
from keyturn.classify.budget import WORK_LIMIT, Budget, budget
from keyturn.classify.catalog import Catalog
from keyturn.classify.readonly import read_plan
from keyturn.classify.shell import MAX_TOKENS
from keyturn.errors import TooComplex
from tests.unit.test_classify import POLICY, lax_policy

OPS = Identity("crew-ops")
KiB64 = 64 * 1024


def nested_recursive(levels: int) -> str:
    """Each CTE the first branch of its parent's UNION: the red team's shape."""
    query = "SELECT email AS x FROM t"
    for i in range(levels):
        query = (
            f"WITH RECURSIVE r{i}(x) AS (({query}) UNION ALL SELECT x FROM r{i} WHERE false)"
            f" SELECT x FROM r{i}"
        )
    return query


def judged(command: str, target: str = "db") -> tuple[str, Budget]:
    """The verdict's action (or ``too_complex``) and the work it took."""
    config = lax_policy() if target == "db" else POLICY
    with budget() as spent:
        try:
            return classify(config, target, command, OPS).action, spent
        except TooComplex:
            return "too_complex", spent


@pytest.mark.parametrize("levels", [19, 60])
def test_nested_recursive_ctes_cost_work_linear_in_their_size(levels: int) -> None:
    command = nested_recursive(levels)
    action, spent = judged(command)
    assert action == "allow", action  # the masked column travels as itself: a read
    assert spent.spent < 20 * len(command), spent.spent  # about a unit per node


ADVERSARIAL_SQL = {
    # the parse-tree walk: as many nodes as 64 KiB makes
    "walk": "SELECT 1 FROM t WHERE " + " AND ".join(["id = 1"] * 5000),
    # lineage: every column reference looked up in 3,000 FROM items
    "lineage": "SELECT a1.id FROM "
    + ", ".join(f"t a{i}" for i in range(3000))
    + " WHERE "
    + " AND ".join(f"a{i}.id = 1" for i in range(2000)),
    # lineage: 2,000 CTEs, each reading the one before
    "ctes": "WITH c0 AS (SELECT * FROM t), "
    + ", ".join(f"c{i} AS (SELECT * FROM c{i - 1})" for i in range(1, 2000))
    + " SELECT * FROM c1999",
    # the catalog: 5,000 calls, each judged
    "catalog": "SELECT " + ", ".join(["lower(name)"] * 5000) + " FROM t",
    # printing back: a long IN list
    "printing": "SELECT 1 FROM t WHERE id IN (" + ", ".join(["1"] * 15000) + ")",
    # nesting: past what the parser and walk follow
    "nesting": "SELECT email FROM t" + " UNION ALL SELECT email FROM t" * 2500,
}


@pytest.mark.parametrize("shape", list(ADVERSARIAL_SQL))
def test_the_worst_sql_of_each_analysis_is_judged_or_refused_within_the_budget(
    shape: str,
) -> None:
    command = ADVERSARIAL_SQL[shape][:KiB64]
    action, spent = judged(command)
    assert action in ("allow", "hold", "too_complex")
    assert spent.spent <= WORK_LIMIT + 3000  # one spend past the limit, at most


def test_spreading_work_over_many_from_items_is_refused_not_ground_through() -> None:
    assert judged(ADVERSARIAL_SQL["lineage"])[0] == "too_complex"


def test_the_read_plan_brings_its_own_budget() -> None:
    """The gateway plans an allowed command again before running it: bounded there too."""
    catalog = Catalog.of([], ["pg_catalog"], [("t", ["id", "email"])])
    with pytest.raises(TooComplex):
        read_plan(ADVERSARIAL_SQL["lineage"], 20, masking_patterns(lax_policy()), catalog)


ADVERSARIAL_SHELL = {
    "words": "ls " + " ".join(["x"] * 30000),
    "wrapper": "sudo " + " ".join(["a"] * 30000),  # every tail could be the wrapped command
    "pipes": " | ".join(["ls"] * 15000),
    "script": "bash -c '" + " ; ".join(["ls"] * 8000) + "'",
    # one "word" to a whitespace count, 21,333 nested parses to bashlex (2.5 s of CPU)
    "backticks": "echo " + "`a`" * 21333,
    "expansions": "echo " + "$a" * 30000,
    "substitutions": "echo " + "$(a)" * 15000,
}


@pytest.mark.parametrize("shape", list(ADVERSARIAL_SHELL))
def test_a_shell_line_with_too_many_words_is_refused_before_it_is_parsed(shape: str) -> None:
    action, spent = judged(ADVERSARIAL_SHELL[shape][:KiB64], "web")
    assert action == "too_complex"
    assert spent.spent == 0  # refused by counting, before bashlex's parse in Python


def test_a_wrapper_pays_for_every_tail_it_may_run() -> None:
    """``sudo`` with n words makes n tails to match against the rules: n²/2 words."""
    words = MAX_TOKENS - 1
    action, spent = judged("sudo " + " ".join(["a"] * (words - 1)), "web")
    assert action == "too_complex"
    assert spent.spent > WORK_LIMIT


def test_a_long_argument_against_a_pattern_is_linear() -> None:
    command = "grep " + "a" * 30000 + " /var/log/" + "b" * 30000
    action, spent = judged(command, "web")
    assert action == "allow"
    assert spent.spent < len(command) + 1000  # the line's length (for bashlex) and a little
