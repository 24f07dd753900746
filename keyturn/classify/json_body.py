"""A JSON body as keyturn judges and sends it: parsed strictly, serialised once.

Whatever a JSON body could mean to one parser and not another is refused: a key twice
(Python keeps the last, many servers the first), ``NaN`` and ``Infinity`` (not JSON), two keys
that are one to a server that ignores case, nesting past :data:`MAX_JSON_DEPTH`. What is
sent is :func:`dump_json` of what was judged, so spelling (``5.0e1``, escapes, spaces) never
reaches the API.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from keyturn.errors import InvalidInput
from keyturn.openapi import fold

MAX_JSON_DEPTH = 64


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidInput(f"the JSON body has the key {key[:60]!r} twice")
        seen[key] = value
    return seen


def _refuse_constant(name: str) -> Any:
    raise InvalidInput(f"the JSON body has {name}, which JSON does not allow")


def folded(key: str) -> str:
    """A name as a server that ignores case may read it (NFKC, then :func:`fold`)."""
    return fold(unicodedata.normalize("NFKC", key))


def check_json(value: Any) -> None:
    """Refuse a body whose meaning differs between parsers: nested deeper than
    :data:`MAX_JSON_DEPTH`, or an object with two keys that are one key to a server that
    matches keys without case (Go's encoding/json, ASP.NET): ``amount`` and ``AMOUNT``,
    ``s`` and the long s (U+017F). A rule would read one, the server perhaps the other."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidInput(f"the JSON body nests deeper than {MAX_JSON_DEPTH}")
        if isinstance(node, str):
            _encodable(node)
        elif isinstance(node, dict):
            seen: dict[str, str] = {}
            for key in node:
                _encodable(key)
                one = folded(key)
                if one in seen:
                    raise InvalidInput(
                        f"the JSON body has keys {seen[one][:40]!r} and {key[:40]!r}, one "
                        "key to servers that ignore case: send one"
                    )
                seen[one] = key
            stack += [(child, depth + 1) for child in node.values()]
        elif isinstance(node, list):
            stack += [(child, depth + 1) for child in node]


def _encodable(text: str) -> None:
    """A lone surrogate (``\\ud800`` in JSON) cannot be sent as UTF-8 or stored."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidInput("the JSON body has a lone surrogate (\\ud800…): not UTF-8") from None


def dump_json(value: Any) -> str:
    """The one serialisation of a JSON body keyturn sends (compact, key order kept)."""
    check_json(value)
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"the JSON body cannot be sent: {exc}") from None


def load_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidInput(f"the JSON body nests deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
