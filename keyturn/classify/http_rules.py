"""Judging an HTTP call: the OpenAPI file first (what the API does not describe is refused),
then the rules, first match wins, nothing matching means hold.

Like the other kinds, an ``allow`` rule must match the call the strict way and a ``block`` or
``hold`` rule matches it the broad way, so a spelling the server may read differently can
only make a call *more* guarded:

* a pattern's ``*`` method covers only GET, HEAD and OPTIONS in an allow rule, every method
  in a block or hold rule;
* an allow rule's path matches case for case and slash for slash; a block or hold rule's
  also matches ``/ORDERS/7/`` for ``/orders/*`` (servers that ignore case or a trailing
  slash exist);
* a condition on a query parameter sent twice must hold for every value to allow, and for
  any value to block or hold (servers differ on which one they read);
* a field that is absent, or of another type (a number sent as a string, a body that is not
  JSON), never meets a condition: the call falls through to a later rule, or is held.
"""

from __future__ import annotations

import math
from typing import Any

from keyturn.classify.budget import spend
from keyturn.classify.http import READ_METHODS, HttpCall
from keyturn.config.rules import Condition, Rule
from keyturn.config.targets import HttpTarget
from keyturn.openapi import Operation


def _segments_match(pattern: list[str], path: list[str]) -> bool:
    """``*`` is one non-empty segment, ``**`` any number (none included)."""
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_segments_match(rest, path[i:]) for i in range(len(path) + 1))
    if not path or (head == "*" and not path[0]):
        return False
    return (head == "*" or head == path[0]) and _segments_match(rest, path[1:])


def pattern_matches(pattern: str, call: HttpCall, *, strict: bool) -> bool:
    spend()
    method, _, path = pattern.partition(" ")
    if method == "*":
        if strict and call.method not in READ_METHODS:
            return False
    elif method != call.method:
        return False
    want, have = path[1:].split("/"), list(call.segments)
    if not strict:
        want = [s if s in ("*", "**") else s.casefold() for s in want]
        have = [s.casefold() for s in have]
        if want[-1:] == [""]:
            want.pop()
        if have[-1:] == [""]:
            have.pop()
    return _segments_match(want, have)


def _same(want: Any, have: Any) -> bool:
    """Equal values of the same JSON type (``true`` is not ``1``, ``"5"`` is not ``5``)."""
    if isinstance(want, bool) or isinstance(have, bool):
        return isinstance(want, bool) and isinstance(have, bool) and want == have
    if isinstance(want, int | float) and isinstance(have, int | float):
        return want == have
    return isinstance(want, str) and isinstance(have, str) and want == have


def _number(value: Any) -> int | float | None:
    """A JSON number (compared exactly: Python compares any int with a float exactly, and
    an integer too large for a float must not overflow into an error)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def meets(condition: Condition, value: Any) -> bool:
    if condition.equals is not None and not _same(condition.equals, value):
        return False
    if condition.one_of is not None and not any(_same(w, value) for w in condition.one_of):
        return False
    if condition.at_most is not None or condition.at_least is not None:
        number = _number(value)
        if number is None:
            return False
        if condition.at_most is not None and number > condition.at_most:
            return False
        if condition.at_least is not None and number < condition.at_least:
            return False
    return True


def _query_meets(condition: Condition, text: str) -> bool:
    """A query value is text; written as a number, it also meets numeric conditions
    (``limit=50`` meets ``at_most: 100``, and ``equals: "50"`` as well as ``equals: 50``)."""
    if meets(condition, text):
        return True
    try:
        number: int | float = int(text, 10) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return False
    return math.isfinite(number) and meets(condition, number)


def _field(data: Any, dotted: str) -> tuple[bool, Any]:
    node = data
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def conditions_met(rule: Rule, call: HttpCall, *, strict: bool) -> bool:
    for name, condition in (rule.match.query or {}).items():
        values = [v for k, v in call.query if k == name]
        results = [_query_meets(condition, v) for v in values]
        if not values or not (all(results) if strict else any(results)):
            return False
    for name, condition in (rule.match.body or {}).items():  # a body that is not JSON: no fields
        found, value = _field(call.data, name)
        if not found or not meets(condition, value):
            return False
    return True


def rule_matches(rule: Rule, call: HttpCall, operation: Operation | None) -> str | None:
    """What of ``rule`` matched the call (for the reasons), or None."""
    strict = rule.action == "allow"
    hit = next((p for p in rule.match.http or () if pattern_matches(p, call, strict=strict)), None)
    if (
        hit is None
        and operation is not None
        and operation.operation_id in (rule.match.operation or ())
    ):
        hit = f"operation {operation.operation_id}"
    if hit is None or not conditions_met(rule, call, strict=strict):
        return None
    return hit


def kinds_of(call: HttpCall) -> frozenset[str]:
    return frozenset({"read" if call.method in READ_METHODS else "write", call.method.lower()})


def against_spec(target: HttpTarget, call: HttpCall) -> tuple[Operation | None, str | None]:
    """The call's OpenAPI operation, and why the file does not allow the call (or None)."""
    if target.spec is None:
        return None, None
    operation, why = target.spec.find(call.method, call.segments)
    if operation is None:
        return None, why
    body = (call.is_json, call.data, call.header("Content-Type"))
    return operation, target.spec.refusal(operation, call.segments, call.query, body)
