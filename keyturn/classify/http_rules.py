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
* to allow, a condition's parameter must be in one place only (the query or a JSON body),
  spelled exactly as the rule spells it, with no other name a server may read as it, and
  every copy must meet it; and the call may carry no body keyturn cannot read as a server
  would (a form, multipart, text). To block or hold, any copy in the query, a form body or
  a JSON body, in any such spelling, meets it (:func:`conditions_met`);
* a field that is absent, or of another type (a number sent as a string), never meets a
  condition: the call falls through to a later rule, or is held; a query value meets a
  numeric condition only written as a plain decimal (``1e2`` is 100 to one server and 1 to
  another).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keyturn.classify.budget import spend
from keyturn.classify.http import READ_METHODS, HttpCall, parameter_names
from keyturn.classify.json_body import folded
from keyturn.config.rules import Condition, Rule
from keyturn.config.targets import HttpTarget
from keyturn.openapi import Operation, fold, plain_number


def _segments_match(pattern: list[str], path: list[str]) -> bool:
    """``*`` is one non-empty segment, ``**`` any number (none included). One pass of
    dynamic programming over (pattern, path) positions: work is their product at most
    (a path has at most ~1,000 segments), however many ``**`` a pattern has."""
    # fits[j]: pattern[:i] matches path[:j], for the i of the current row
    fits = [True] + [False] * len(path)
    for part in pattern:
        spend()
        if part == "**":
            row, seen = [], False
            for fit in fits:
                seen = seen or fit
                row.append(seen)
        else:
            row = [False] + [
                fits[j] and (part == segment if part != "*" else segment != "")
                for j, segment in enumerate(path)
            ]
        fits = row
    return fits[-1]


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
        want = [s if s in ("*", "**") else fold(s) for s in want]
        have = [fold(s) for s in have]
        if want[-1:] == [""]:
            want.pop()
        if have[-1:] == [""]:
            have.pop()
    return _segments_match(want, have)


def _same(want: Any, have: Any, *, fold: bool = False) -> bool:
    """Equal values of the same JSON type (``true`` is not ``1``, ``"5"`` is not ``5``);
    ``fold``: text compared without case (``True`` is ``true`` to many servers)."""
    if isinstance(want, bool) or isinstance(have, bool):
        return isinstance(want, bool) and isinstance(have, bool) and want == have
    if isinstance(want, int | float) and isinstance(have, int | float):
        return want == have
    if fold and isinstance(want, str) and isinstance(have, str):
        return folded(want) == folded(have)
    return isinstance(want, str) and isinstance(have, str) and want == have


def _number(value: Any) -> int | float | None:
    """A JSON number (compared exactly: Python compares any int with a float exactly, and
    an integer too large for a float must not overflow into an error)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def meets(condition: Condition, value: Any, *, fold: bool = False) -> bool:
    if condition.equals is not None and not _same(condition.equals, value, fold=fold):
        return False
    if condition.one_of is not None and not any(
        _same(w, value, fold=fold) for w in condition.one_of
    ):
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


def _query_meets(condition: Condition, text: str, *, fold: bool = False) -> bool:
    """A query value is text; written as a plain decimal number, it also meets numeric
    conditions (``limit=50`` meets ``at_most: 100``, and ``equals: "50"`` as well as
    ``equals: 50``)."""
    if meets(condition, text, fold=fold):
        return True
    number = plain_number(text)
    return number is not None and meets(condition, number, fold=fold)


def _field(data: Any, dotted: str, *, fold: bool = False) -> tuple[bool, Any]:
    node = data
    for part in dotted.split("."):
        if isinstance(node, dict):
            keys = [k for k in node if k == part or (fold and folded(k) == folded(part))]
            if not keys:
                return False, None
            node = node[keys[0]]  # keys differing only in case were refused (check_json)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _aliases(pairs: Sequence[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    """The pairs a server may read as ``name`` (:func:`parameter_names`)."""
    wanted = parameter_names(name)
    found = []
    for k, v in pairs:
        spend()
        if parameter_names(k) & wanted:
            found.append((k, v))
    return found


def _in_json(call: HttpCall, name: str) -> list[Any]:
    """The values of every key, at any depth of a JSON body, a server may read as the
    parameter ``name`` (its last part: ``refund.amount`` is ``amount`` to Rails' wrapped
    params), and of a literal dotted key (lodash's ``_.get`` reads ``"refund.amount"``)."""
    wanted = parameter_names(name.split(".")[-1])
    return [
        value
        for key, value in call.json_keys
        if parameter_names(key) & wanted or ("." in name and folded(key) == folded(name))
    ]


def _strict(rule: Rule, call: HttpCall) -> bool:
    """An allow rule's conditions: each parameter in one place only, spelled exactly as
    the rule spells it, every copy meeting it; and no body keyturn cannot read as a server
    would (form, multipart, text), which could carry the parameter too."""
    if call.body and not call.is_json:
        return False
    for name, condition in (rule.match.query or {}).items():
        named = _aliases(call.query, name)
        if not named or any(k != name for k, _ in named) or _in_json(call, name):
            return False
        if not all(_query_meets(condition, v) for _, v in named):
            return False
    for name, condition in (rule.match.body or {}).items():
        found, value = _field(call.data, name)
        parts = name.split(".")
        elsewhere = _aliases(call.query, parts[0]) or _aliases(call.query, parts[-1])
        copies = len(_in_json(call, name))  # the one at the rule's path, and no other
        if not found or not meets(condition, value) or elsewhere or copies != 1:
            return False
    return True


def _broad(rule: Rule, call: HttpCall) -> bool:
    """A block or hold rule's conditions: met by any copy, in the query, a form body or a
    JSON body (at any depth), in any spelling a server may read as the parameter."""
    pairs = (*call.query, *call.form_pairs)
    conditions = [*(rule.match.query or {}).items(), *(rule.match.body or {}).items()]
    for name, condition in conditions:
        found, value = _field(call.data, name, fold=True)
        values = [value] if found else []
        values += _in_json(call, name)
        in_json = any(meets(condition, v, fold=True) for v in values)
        named = _aliases(pairs, name.split(".")[-1])
        if not in_json and not any(_query_meets(condition, v, fold=True) for _, v in named):
            return False
    return True


def conditions_met(rule: Rule, call: HttpCall, *, strict: bool) -> bool:
    """Servers merge query and body parameters (Rails, Laravel), read names without case
    or with PHP's mangling (ASP.NET, PHP), nest them (``r[amount]``) and parse bodies keyturn
    does not: an allow rule's reading is the narrowest, a guard's the widest."""
    if not (rule.match.query or rule.match.body):
        return True
    return _strict(rule, call) if strict else _broad(rule, call)


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
    body = (call.is_json, call.data, call.header("Content-Type"), call.form_pairs)
    return operation, target.spec.refusal(operation, call.segments, call.query, body)
