"""The policy file's own tests: cases a team writes beside its rules and reviews in CI.

Each case names a target, a command and who asks, and the action the policy must take
(optionally the deciding rule, and for a SELECT the result columns that come back masked).
``keyturn check-config`` and ``keyturn policy test`` run them; a failing case is named with
what happened instead. Functions are judged by keyturn's built-in lists here (no target is
asked for its catalog), and shadow rules are recorded, never enforced, as in production.
"""

from __future__ import annotations

import pglast
from pglast import ast

from keyturn.classify import Identity, classify
from keyturn.classify.sql import parse
from keyturn.config.policy import Config
from keyturn.config.rules import PolicyTest
from keyturn.errors import KeyturnError
from keyturn.masking import Masker


def result_columns(command: str) -> list[str]:
    """The names of the last statement's result columns, as far as the text tells them."""
    try:
        statements = parse(command)
    except pglast.parser.ParseError:
        return []
    last = statements[-1].stmt if statements else None
    if not isinstance(last, ast.SelectStmt):
        return []
    names = []
    for target in last.targetList or ():
        if not isinstance(target, ast.ResTarget):
            continue
        value = target.val
        if target.name is not None:
            names.append(target.name)
        elif isinstance(value, ast.ColumnRef):
            field = (value.fields or ())[-1]
            names.append(field.sval or "" if isinstance(field, ast.String) else "*")
        elif isinstance(value, ast.FuncCall):
            names.append(str(getattr((value.funcname or ())[-1], "sval", "?column?")))
        else:
            names.append("?column?")
    return names


def _failure(config: Config, masker: Masker, i: int, case: PolicyTest) -> str | None:
    who = Identity(case.subject.removeprefix("agent:"), frozenset(case.groups))
    where = f"tests[{i}] ({case.expect} {case.command[:60]!r} on {case.target})"
    try:
        verdict = classify(config, case.target, case.command, who)
    except KeyturnError as exc:
        return f"{where}: refused as bad input: {exc.message}"
    rule = verdict.rule.name if verdict.rule else None
    if verdict.action != case.expect or (case.rule is not None and rule != case.rule):
        why = "; ".join(verdict.reasons[-2:])
        return f"{where}: got {verdict.action} by rule {rule or '(none)'}: {why}"
    if case.masked is not None:
        masked = [c for c in result_columns(case.command) if masker.masked_column(c)]
        if sorted(masked) != sorted(case.masked):
            return f"{where}: masked {masked}, expected {case.masked}"
    return None


def failing_cases(config: Config) -> list[str]:
    """One line per case the policy does not decide as its test says."""
    masker = Masker.from_policy(config.policy.masking)
    found = [_failure(config, masker, i, case) for i, case in enumerate(config.policy.tests)]
    return [f for f in found if f is not None]
