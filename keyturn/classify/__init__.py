"""Classification: a command on a target, by an identity -> allow, hold or block, and why.

Rules are tried in order and the first that matches wins; nothing matching means hold. A
``block`` or ``hold`` rule matches when *any* part of the command matches it; an ``allow`` rule
only when *every* part does (every SQL kind is listed, every shell command matches a pattern
and nothing unsafe is involved), so ``SELECT 1; DROP TABLE t`` can never ride on a reads rule.
What cannot be parsed is held.
"""

from __future__ import annotations

import functools
import os.path
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from keyturn.classify.argv import argv_matches, compile_pattern
from keyturn.classify.budget import budget
from keyturn.classify.catalog import Catalog
from keyturn.classify.http import parse_call
from keyturn.classify.http_rules import against_spec, kinds_of, rule_matches
from keyturn.classify.options import ALWAYS_RISKY, RISKY_OPTIONS
from keyturn.classify.patterns import Patterns
from keyturn.classify.readonly import NotReadOnly, read_plan
from keyturn.classify.shell import INTERPRETERS, WRAPPERS, analyze_shell
from keyturn.classify.sql import analyze_sql
from keyturn.config.policy import Config
from keyturn.config.rules import Rule
from keyturn.config.targets import HttpTarget, PostgresTarget, SshTarget, TargetBase
from keyturn.errors import Forbidden, NotFound

Action = Literal["allow", "hold", "block"]


@dataclass(frozen=True)
class Identity:
    """Who asks: the JWT ``sub``, its groups, and the human it acts for, if any."""

    subject: str
    groups: frozenset[str] = frozenset()
    on_behalf_of: str | None = None

    def listed_in(self, subjects: list[str]) -> bool:
        """``agent:X`` matches only a ``sub`` of X, ``group:G`` only a groups claim holding G."""
        for entry in subjects:
            kind, _, name = entry.partition(":")
            if (kind == "agent" and name == self.subject) or (
                kind == "group" and name in self.groups
            ):
                return True
        return False


@dataclass(frozen=True)
class Verdict:
    action: Action
    rule: Rule | None
    reasons: list[str] = field(default_factory=list)
    kinds: frozenset[str] = frozenset()
    # shadow rules that matched before the deciding one: what they would have done
    shadow: tuple[tuple[str, Action], ...] = ()

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "action": self.action,
            "rule": self.rule.name if self.rule else None,
            "reasons": self.reasons,
        }
        if self.shadow:
            out["shadow"] = [{"rule": rule, "action": action} for rule, action in self.shadow]
        return out


class NotAllowed(Forbidden):
    code = "not_allowed"


def masking_patterns(config: Config, rule: Rule | None = None) -> Patterns:
    """The policy's masked columns, with the uses ``rule`` (the deciding one) allows."""
    uses = tuple(rule.masked_uses) if rule is not None else ()
    return _patterns(tuple(config.policy.masking.columns), uses)


@functools.lru_cache(maxsize=256)
def _patterns(columns: tuple[str, ...], uses: tuple[str, ...]) -> Patterns:
    return Patterns.of(columns, uses)


def may_use(target: TargetBase, who: Identity) -> bool:
    """A target with ``subjects`` is for them alone; one without is for every identity."""
    return target.subjects is None or who.listed_in(target.subjects)


def check_access(config: Config, target_name: str, who: Identity) -> TargetBase:
    """The target, if ``who`` may use it at all (before any classification)."""
    target = config.policy.targets.get(target_name)
    if target is None:
        raise NotFound(f"unknown target {target_name!r}")
    if not may_use(target, who):
        raise NotAllowed(f"{who.subject} may not use target {target_name}")
    return target


def _applies(rule: Rule, target_name: str, who: Identity | None) -> bool:
    if rule.target not in ("*", target_name):
        return False
    return rule.subjects is None or (who is not None and who.listed_in(rule.subjects))


def classify(
    config: Config,
    target_name: str,
    command: str,
    who: Identity | None = None,
    catalog: Catalog | None = None,
) -> Verdict:
    """``catalog``: the target's functions (the gateway passes it; without, built-in lists).

    Raises TooComplex once judging it has taken :data:`~keyturn.classify.budget.WORK_LIMIT`.
    """
    target = config.policy.targets.get(target_name)
    if target is None:
        raise NotFound(f"unknown target {target_name!r}")
    with budget():
        if isinstance(target, PostgresTarget):
            return _classify_sql(config, target_name, command, who, catalog)
        if isinstance(target, SshTarget):
            return _classify_shell(config, target_name, command, who)
        if isinstance(target, HttpTarget):
            return _classify_http(config, target_name, target, command, who)
    # a new kind of target is judged by its own parser, never by another kind's
    raise NotImplementedError(f"no classifier for targets of kind {target.kind!r}")


def _classify_sql(
    config: Config, target_name: str, command: str, who: Identity | None, catalog: Catalog | None
) -> Verdict:
    verdict = _sql_rules(config, target_name, command, who, catalog)
    if verdict.action == "allow":
        try:
            masking = masking_patterns(config, verdict.rule)
            read_plan(command, config.gateway.max_statements, masking, catalog)
        except NotReadOnly as exc:  # whatever the rules say, a human decides
            reasons = [*verdict.reasons, f"held: {exc.message}"]
            return Verdict("hold", None, reasons, verdict.kinds, verdict.shadow)
    return verdict


def _first_rule(
    config: Config,
    target_name: str,
    who: Identity | None,
    matched: Callable[[Rule], list[str] | None],
    unmatched: list[str],
    kinds: frozenset[str] = frozenset(),
) -> Verdict:
    """The first rule for this target and identity that ``matched`` (its reasons, or None
    when the rule does not match or is not for this kind of command) decides; shadow rules
    that match before it are recorded, never enforced; no rule: hold."""
    shadow: list[tuple[str, Action]] = []
    for rule in config.policy.rules:
        if not _applies(rule, target_name, who):
            continue
        reasons = matched(rule)
        if reasons is None:
            continue
        if rule.mode == "shadow":
            shadow.append((rule.name, rule.action))
        else:
            return Verdict(rule.action, rule, reasons, kinds, tuple(shadow))
    reasons = [*unmatched, "no rule matched: held by default"]
    return Verdict("hold", None, reasons, kinds, tuple(shadow))


def _sql_rules(
    config: Config, target_name: str, command: str, who: Identity | None, catalog: Catalog | None
) -> Verdict:
    analysis = analyze_sql(command, catalog)
    kinds = frozenset(analysis.kinds)
    if not analysis.parsed:
        return Verdict(
            "hold", None, [*analysis.reasons, "held: only parsed commands can be allowed"]
        )

    def matched(rule: Rule) -> list[str] | None:
        if rule.match.sql is None:
            return None
        listed = set(rule.match.sql)
        if "any" in listed:
            hit = True
        elif rule.action == "allow":
            hit = kinds <= listed
        else:
            hit = bool(kinds & listed)
        return (analysis.reasons or [f"matches {sorted(kinds)}"]) if hit else None

    return _first_rule(config, target_name, who, matched, analysis.reasons, kinds)


def _hit(argv: list[str], patterns: list[str], *, whole: bool) -> bool:
    return any(argv_matches(compile_pattern(p), argv, whole=whole) for p in patterns)


def _classify_shell(
    config: Config, target_name: str, command: str, who: Identity | None
) -> Verdict:
    analysis = analyze_shell(command)
    if not analysis.parsed:
        return Verdict(
            "hold", None, [*analysis.reasons, "held: only parsed commands can be allowed"]
        )
    commands = analysis.commands

    def matched(rule: Rule) -> list[str] | None:
        patterns = rule.match.shell
        if patterns is None:
            return None
        if rule.action == "allow":  # every command, argument for argument, and nothing unsafe
            hit = not analysis.unsafe and all(_hit(argv, patterns, whole=True) for argv in commands)
        else:  # any command (or one run by another), with any arguments past the pattern's
            hit = any(_hit(argv, patterns, whole=False) for argv in commands + analysis.inner)
        return (analysis.reasons or [f"matches {patterns}"]) if hit else None

    return _first_rule(config, target_name, who, matched, analysis.reasons)


def _classify_http(
    config: Config, target_name: str, target: HttpTarget, command: str, who: Identity | None
) -> Verdict:
    """Raises InvalidInput for text that is not a call (the edges build calls; a policy test
    or a hand-typed command may not be one)."""
    call = parse_call(command)
    kinds = kinds_of(call)
    operation, refusal = against_spec(target, call)
    if refusal:
        return Verdict("block", None, [f"not allowed by the API's OpenAPI file: {refusal}"], kinds)

    def matched(rule: Rule) -> list[str] | None:
        if not (rule.match.http or rule.match.operation):
            return None
        hit = rule_matches(rule, call, operation)
        return [f"matches {hit}"] if hit is not None else None

    return _first_rule(config, target_name, who, matched, [], kinds)


def policy_warnings(config: Config) -> list[str]:
    """Allow rules naming programs that can run or write other things: keyturn holds their
    risky uses whatever the pattern says, but such a rule is broader than it looks."""
    found = []
    for i, rule in enumerate(config.policy.rules):
        for j, pattern in enumerate(rule.match.shell or () if rule.action == "allow" else ()):
            program = os.path.basename(compile_pattern(pattern)[0])
            if program in WRAPPERS or program in INTERPRETERS:
                why = "runs other programs: every use is held"
            elif program in ALWAYS_RISKY:
                why = f"{ALWAYS_RISKY[program]}: every use is held"
            elif program in RISKY_OPTIONS:
                why = f"with some options {RISKY_OPTIONS[program][2]}: those uses are held"
            else:
                continue
            found.append(f"rules[{i}].match.shell[{j}]: {program} {why}")
    return found
