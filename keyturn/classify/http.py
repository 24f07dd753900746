"""An agent's HTTP API call in one canonical form: what is judged, stored, shown and sent.

An agent's call (method, path, query, headers, body) is checked and normalised once, here,
into an :class:`HttpCall`; its text form (:meth:`HttpCall.render`, an HTTP request without
host or credential) is the request's ``command``: hashed, recorded, shown on the card and
parsed back by the driver to send. So there is one rendition of a call: a path is judged as
the decoded, dot-resolved segments the server will see, and sent as their encoding; a JSON
body is judged as parsed and sent as that value serialised by keyturn, so duplicate keys or
odd spellings cannot mean one thing to a rule and another to the API.

What cannot be given one meaning is refused (:class:`~keyturn.errors.InvalidInput`), never
guessed at: an encoded ``/`` or ``\\``, ``//``, ``;`` (matrix parameters some servers strip),
control characters, raw non-ASCII, invalid or overlong UTF-8, a header outside the
allowlist, a JSON body that could mean two things (:mod:`keyturn.classify.json_body`), a
``_method`` override.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_plus, unquote_to_bytes, urlencode

from keyturn.classify.budget import spend
from keyturn.classify.json_body import dump_json, folded, load_json
from keyturn.config.rules import HTTP_METHODS
from keyturn.errors import InvalidInput

METHODS = HTTP_METHODS
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What an agent may set: content negotiation, conditional requests, idempotency and tracing.
# Not Prefer: it changes what a write does (PostgREST's resolution=merge-duplicates makes an
# insert an upsert) and no rule can see it.
# Never credentials, cookies, routing or framing (Host, Content-Length, Transfer-Encoding,
# X-Forwarded-*, Proxy-*): keyturn sets those, or nobody does.
HEADERS = {
    name.lower(): name
    for name in (
        "Accept",
        "Accept-Language",
        "Content-Type",
        "If-Match",
        "If-None-Match",
        "If-Modified-Since",
        "If-Unmodified-Since",
        "Idempotency-Key",
        "X-Request-Id",
    )
}
MAX_PATH = 2048
MAX_QUERY_PAIRS = 100
MAX_HEADER_VALUE = 1024
SAFE_IN_SEGMENT = "-._~!$&'()*+,=:"  # left as they are when a segment is encoded
_STILL_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")


@dataclass(frozen=True)
class HttpCall:
    method: str
    segments: tuple[str, ...]  # decoded; a trailing "" is a trailing slash
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]  # allowlisted names, canonical case, sorted
    body: str  # exactly what is sent, as UTF-8; "" for none
    is_json: bool = False
    data: Any = None  # the parsed JSON body, when is_json

    @property
    def target(self) -> str:
        """The request target as sent: the encoded path and query."""
        path = "/" + "/".join(quote(s, safe=SAFE_IN_SEGMENT) for s in self.segments)
        return f"{path}?{urlencode(self.query, quote_via=quote)}" if self.query else path

    @property
    def body_bytes(self) -> bytes:
        return self.body.encode()

    @property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body_bytes).hexdigest()

    @functools.cached_property
    def json_keys(self) -> tuple[tuple[str, Any], ...]:
        """Every (key, value) of a JSON body, at any depth: where a server may find a
        parameter (Rails' wrapped params, lodash's paths). Computed once per call, within
        the judging budget."""
        found: list[tuple[str, Any]] = []
        stack = [self.data] if self.is_json else []
        while stack:
            spend()
            node = stack.pop()
            if isinstance(node, dict):
                found += node.items()
                stack += node.values()
            elif isinstance(node, list):
                stack += node
        return tuple(found)

    @functools.cached_property
    def form_pairs(self) -> tuple[tuple[str, str], ...]:
        """A form body's name=value pairs split as Rack splits them (on ``&`` and ``;``,
        names stripped); none for any other body. Computed once per call."""
        if media_type(self.header("Content-Type") or "") != "application/x-www-form-urlencoded":
            return ()
        pairs = []
        for part in re.split(r"[&;]", self.body):
            name, _, value = part.partition("=")
            pairs.append((unquote_plus(name).strip(), unquote_plus(value)))
        return tuple(pairs)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def render(self) -> str:
        """The text form: request line, headers, and the body after a blank line."""
        lines = [f"{self.method} {self.target}", *(f"{k}: {v}" for k, v in self.headers)]
        text = "\n".join(lines)
        return f"{text}\n\n{self.body}" if self.body else text


def _text(where: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidInput(f"{where} is longer than {limit} characters")
    if any(not ch.isprintable() for ch in value):
        raise InvalidInput(f"{where} must not contain control characters")
    return value


def method_of(value: object) -> str:
    if not isinstance(value, str) or value.upper() not in METHODS:
        raise InvalidInput(f"method must be one of {', '.join(METHODS)}")
    return value.upper()


def segments_of(path: object) -> tuple[str, ...]:
    """A relative path's decoded, dot-resolved segments, or InvalidInput saying why not."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidInput("path must be a relative path starting with / (no scheme or host)")
    if len(path) > MAX_PATH:
        raise InvalidInput(f"path is longer than {MAX_PATH} characters")
    if not path.isascii() or not path.isprintable() or " " in path:
        raise InvalidInput("path must be ASCII without spaces or control characters (encode them)")
    for raw, why in (
        ("?", "send the query in query"),
        ("#", "a fragment is never sent"),
        ("\\", "a backslash"),
    ):
        if raw in path:
            raise InvalidInput(f"path must not contain {raw!r}: {why}")
    if "//" in path:
        raise InvalidInput("path must not contain // (an empty segment or another host)")
    resolved: list[str] = []
    raw_segments = path[1:].split("/")
    for i, raw in enumerate(raw_segments):
        try:
            segment = unquote_to_bytes(raw).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise InvalidInput("path has percent-escapes that are not valid UTF-8") from None
        if "/" in segment or "\\" in segment:
            raise InvalidInput("path must not contain an encoded / or \\ (%2F, %5C)")
        if _STILL_ENCODED.search(segment):  # %252e: ".." to a chain that decodes twice
            raise InvalidInput("path is percent-encoded twice (%25…): encode it once")
        if ";" in segment:  # raw or encoded: servers that strip matrix parameters exist
            raise InvalidInput("path must not contain ; (matrix parameters)")
        if not segment.isprintable():
            raise InvalidInput("path must not contain control characters, raw or encoded")
        dots = unicodedata.normalize("NFKC", segment)
        if dots in (".", ".."):
            if segment not in (".", ".."):
                raise InvalidInput("path has a segment that only looks like . or ..")
            if segment == ".." and resolved:
                resolved.pop()
            if i == len(raw_segments) - 1:  # "/a/b/.." is the directory "/a/"
                resolved.append("")
            continue
        if segment == "" and i != len(raw_segments) - 1:
            raise InvalidInput("path must not contain an empty segment")
        resolved.append(segment)
    return tuple(resolved) if resolved != [""] else ("",)


def _scalar(where: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and json.dumps(value) not in ("NaN", "Infinity", "-Infinity"):
        return json.dumps(value)
    if isinstance(value, str):
        return _text(where, value, MAX_HEADER_VALUE)
    raise InvalidInput(f"{where} must be a string, number or boolean")


def query_of(value: object) -> tuple[tuple[str, str], ...]:
    """``{"k": v | [v, …]}`` or ``[[k, v], …]`` -> ordered pairs of text."""
    if value is None:
        return ()
    pairs: list[tuple[object, object]] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            items = item if isinstance(item, list) else [item]
            pairs += [(key, one) for one in items]
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [(k, v) for k, v in value]
    else:
        raise InvalidInput("query must be an object or a list of [name, value] pairs")
    if len(pairs) > MAX_QUERY_PAIRS:
        raise InvalidInput(f"query has more than {MAX_QUERY_PAIRS} parameters")
    out = []
    for key, item in pairs:
        if not isinstance(key, str) or not key:
            raise InvalidInput("query names must be non-empty strings")
        out.append((_scalar(f"query name {key[:40]!r}", key), _scalar(f"query {key[:40]}", item)))
    return tuple(out)


def headers_of(value: object) -> dict[str, str]:
    """Allowlisted headers by canonical name; one value each, one line each."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput("headers must be an object of name: value")
    out: dict[str, str] = {}
    for name, item in value.items():
        canonical = HEADERS.get(str(name).lower())
        if canonical is None:
            allowed = ", ".join(HEADERS.values())
            raise InvalidInput(f"header {str(name)[:60]!r} may not be set by an agent ({allowed})")
        if canonical in out:
            raise InvalidInput(f"header {canonical} is given twice")
        if not isinstance(item, str):
            raise InvalidInput(f"header {canonical} must be a string")
        if not item.isascii() or item != item.strip():
            raise InvalidInput(f"header {canonical} must be ASCII without surrounding spaces")
        out[canonical] = _text(f"header {canonical}", item, MAX_HEADER_VALUE)
    return out


def media_type(content_type: str) -> str:
    """``application/json`` of ``Application/JSON; charset=utf-8``: what precedes the first
    ``;``, ``,`` or space, where Rack, Rails and PHP cut it."""
    return re.split(r"[;,\s]", content_type.strip(), maxsplit=1)[0].lower()


def is_json(content_type: str) -> bool:
    """JSON as keyturn reads a body, sent or answered: its media type is ``…/json`` or
    ``…+json`` (``text/json`` too, as ASP.NET and Laravel read it)."""
    media = media_type(content_type)
    return media.endswith(("/json", "+json"))


def _one_type(content_type: str) -> None:
    """A Content-Type one server reads as JSON (Laravel looks for ``/json`` anywhere in it)
    and another as a form (Rack cuts it at ``;``, ``,`` or a space) means two things, as
    does a list of types: refused."""
    if "," in content_type:
        raise InvalidInput("Content-Type must name one type (no commas)")
    if "json" in content_type.lower() and not is_json(content_type):
        raise InvalidInput(
            f"Content-Type {media_type(content_type)} with json in it reads as JSON to some "
            "servers and not to others: send application/json, or no json in the type"
        )


@functools.lru_cache(maxsize=4096)
def parameter_names(name: str) -> frozenset[str]:
    """The names a server may read a parameter as: without case, with PHP's ``.`` and space
    as ``_``, and each part of a nested ``r[amount]`` (Rails, PHP, qs)."""
    mangled = folded(name).lstrip(" ").replace(".", "_").replace(" ", "_")  # PHP's reading
    return frozenset({mangled, *(part for part in re.split(r"[\[\]]+", mangled) if part)})


def _check_charset(content_type: str) -> None:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            raise InvalidInput("Content-Type: bodies are sent as UTF-8 (charset=utf-8 or none)")


def call_of(
    method: object,
    path: object,
    *,
    query: object = None,
    headers: object = None,
    json_body: tuple[bool, Any] = (False, None),
    text: object = None,
) -> HttpCall:
    """A call from an agent's parts. ``json_body`` is (given, value): JSON ``null`` is a body."""
    has_json, data = json_body
    named = headers_of(headers)
    if has_json and text is not None:
        raise InvalidInput("send json or text, not both")
    content_type = named.get("Content-Type")
    if text is not None:
        if not isinstance(text, str):
            raise InvalidInput("text must be a string")
        if content_type is None:
            raise InvalidInput("a text body needs its Content-Type header")
        if is_json(content_type):
            has_json, data = True, load_json(text)
    if has_json:
        content_type = content_type or "application/json"
        if not is_json(content_type):
            raise InvalidInput(f"a JSON body cannot be sent as {content_type}")
        named["Content-Type"] = content_type
        body = dump_json(data)
    elif text is not None:
        assert isinstance(text, str)
        body = text
    elif content_type is not None:
        raise InvalidInput("Content-Type without a body (send json or text)")
    else:
        body = ""
    if content_type is not None:
        _one_type(content_type)
        _check_charset(content_type)
    if "\x00" in body:
        raise InvalidInput("the body must not contain NUL characters")
    call = HttpCall(
        method=method_of(method),
        segments=segments_of(path),
        query=query_of(query),
        headers=tuple(sorted(named.items())),
        body=body,
        is_json=has_json,
        data=data if has_json else None,
    )
    _no_method_override(call)
    return call


def _no_method_override(call: HttpCall) -> None:
    """Rails, Laravel, Symfony and others let a ``_method`` parameter turn a POST into a
    DELETE: a call would be judged by one method and run as another. Refused wherever a
    server may read one: a query name, a JSON body's keys, or anywhere in a body that is not
    JSON (form, multipart or any other: keyturn does not parse those as servers do)."""
    names = [k for k, _ in call.query]
    if call.is_json and isinstance(call.data, dict):
        names += list(call.data)
    elif call.body and "_method" in re.sub(r"[. \[]", "_", unquote_plus(call.body).casefold()):
        names.append("_method")  # PHP reads ".method", " method" and "[method" as _method
    if any("_method" in parameter_names(name) for name in names):
        raise InvalidInput("_method overrides the method on many servers: send the method itself")


def parse_call(command: str) -> HttpCall:
    """A call from its text form (:meth:`HttpCall.render`), checked as strictly as
    :func:`call_of`: parsing and rendering again gives the same call."""
    head, blank, body = command.partition("\n\n")
    line, *header_lines = head.split("\n")
    method, space, target = line.partition(" ")
    if not space:
        raise InvalidInput("an HTTP call starts with METHOD /path, e.g. GET /orders")
    path, question, raw_query = target.partition("?")
    try:
        query = (
            parse_qsl(raw_query, keep_blank_values=True, strict_parsing=True) if question else []
        )
    except ValueError:
        raise InvalidInput("the query is not name=value pairs joined by &") from None
    headers: dict[str, str] = {}
    for header in header_lines:
        name, colon, value = header.partition(":")
        if not colon or name.strip() != name:
            raise InvalidInput(f"not a header line: {header[:60]!r}")
        if name in headers or HEADERS.get(name.lower()) in headers:
            raise InvalidInput(f"header {name} is given twice")
        headers[name] = value.strip()
    has_type = headers_of(headers).get("Content-Type") is not None
    if blank and not has_type:
        raise InvalidInput("a body needs its Content-Type header")
    return call_of(
        method,
        path,
        query=[[k, v] for k, v in query],
        headers=headers,
        text=body if has_type else None,  # an empty body keeps its Content-Type
    )
