"""An HTTP target's OpenAPI file (3.0 or 3.1): its operations, and what it does not allow.

Loaded once with the policy, so a broken file is a config error, not a failure at a
request. :meth:`Spec.refusal` says, in the spec's own words, why a call is not one the API
describes (no such path or method, a path or query parameter of the wrong type, a body that
fails its schema); the classifier refuses such a call before anyone sees it. Schemas are
checked with ``jsonschema`` (draft 4 semantics for 3.0, 2020-12 for 3.1), references
resolved inside the file only.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator, Draft202012Validator
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from referencing import Registry
from referencing.jsonschema import DRAFT4, DRAFT202012

from keyturn.errors import ConfigError

METHODS = ("get", "head", "options", "post", "put", "patch", "delete")
LOCAL = "urn:keyturn:openapi"  # the file's own URI: "#/components/…" resolves inside it


@dataclass(frozen=True)
class Operation:
    method: str  # upper case
    template: tuple[str, ...]  # path segments, "{name}" for a parameter
    operation_id: str | None
    summary: str | None
    parameters: tuple[dict[str, Any], ...]
    body: dict[str, Any] | None  # requestBody

    @property
    def path(self) -> str:
        return "/" + "/".join(self.template)

    def bind(self, segments: tuple[str, ...], *, folded: bool = False) -> dict[str, str] | None:
        """The path parameters if ``segments`` fit this template, else None; ``folded``:
        literal text compared as a server that ignores case compares it."""
        if len(segments) != len(self.template):
            return None
        bound: dict[str, str] = {}
        for part, segment in zip(self.template, segments, strict=True):
            if "{" not in part:
                if (fold(part) != fold(segment)) if folded else (part != segment):
                    return None
                continue
            match = _segment_pattern(part, folded).fullmatch(fold(segment) if folded else segment)
            if match is None:
                return None
            names = re.findall(r"\{([^{}]+)\}", part)
            bound |= dict(zip(names, match.groups(), strict=True))
        return bound

    def literal_parts(self) -> int:
        return sum(len(re.sub(r"\{[^{}]+\}", "", part)) for part in self.template)


def _prepared(node: Any, v30: bool, seen: dict[int, Any], open_: set[int]) -> Any:
    """The document with every local ``$ref`` made absolute (so a schema taken out of the
    file still resolves through the registry), and, for 3.0, ``nullable: true`` as draft 4
    can check it (``type: [t, "null"]``). A node YAML shares (an alias) is prepared once,
    so a file of aliases of aliases costs its size, not its expansion; one that contains
    itself is refused."""
    if not isinstance(node, dict | list):
        return node
    if id(node) in seen:
        return seen[id(node)]
    if id(node) in open_:
        raise ConfigError("the OpenAPI file contains itself (a YAML alias inside its anchor)")
    open_.add(id(node))
    if isinstance(node, list):
        out: Any = [_prepared(v, v30, seen, open_) for v in node]
    else:
        out = {
            k: _prepared(v, v30, seen, open_)
            for k, v in node.items()
            if not (v30 and k == "nullable")
        }
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            out["$ref"] = LOCAL + node["$ref"]
        if v30 and node.get("nullable") is True and isinstance(node.get("type"), str):
            out["type"] = [node["type"], "null"]
    open_.discard(id(node))
    seen[id(node)] = out
    return out


def fold(text: str) -> str:
    """A path segment as a server that ignores case may compare it: Python's casefold, and
    the dotless and dotted i that Java's equalsIgnoreCase also takes for i."""
    return text.casefold().replace("\u0131", "i").replace("i\u0307", "i")


@functools.lru_cache(maxsize=1024)
def _segment_pattern(part: str, folded: bool) -> re.Pattern[str]:
    """A template segment (``{id}``, ``{id}.json``, ``v{major}``) as a pattern."""
    pieces = re.split(r"(\{[^{}]+\})", part)
    regex = "".join(
        f"(?P<{_group(p)}>[^/]+?)" if p.startswith("{") else re.escape(fold(p) if folded else p)
        for p in pieces
    )
    return re.compile(regex, re.DOTALL)


def _group(piece: str) -> str:
    """A regex group name for ``{name}`` (names are free text in OpenAPI)."""
    return "p_" + "".join(c if c.isalnum() else f"_{ord(c):x}_" for c in piece[1:-1])


# A number as every server reads it: no exponent, "_", "+", leading zero or space ("100000e-3"
# is 100 to Python's float(), 100000 to JavaScript's parseInt and Ruby's to_i; "1_0_0" is
# 100 to Python's int(), 1 to parseInt).
_PLAIN_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")


def plain_number(text: str) -> int | float | None:
    """``text`` as a number, if it is written as one the same way for every reader."""
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text) if "." in text else int(text)


def _typed(value: str, schema: dict[str, Any]) -> Any:
    """A path or query value as its schema's type would have it (text otherwise, which then
    fails the schema's type)."""
    kind = schema.get("type")
    if isinstance(kind, list):  # 3.1's ["integer", "null"], 3.0's nullable as keyturn keeps it
        kind = next((k for k in kind if k != "null"), None)
    number = plain_number(value) if kind in ("integer", "number") else None
    if number is not None and (kind == "number" or isinstance(number, int)):
        return number
    if kind == "boolean" and value in ("true", "false"):
        return value == "true"
    return value


class Spec:
    def __init__(self, document: dict[str, Any], source: str) -> None:
        version = str(document.get("openapi", ""))
        if not version.startswith(("3.0.", "3.1.")):
            raise ConfigError(f"{source}: not an OpenAPI 3.0 or 3.1 file (openapi: {version!r})")
        self.source = source
        self._v30 = version.startswith("3.0.")
        try:
            self.document = _prepared(document, self._v30, {}, set())
        except RecursionError:
            raise ConfigError(f"{source}: the OpenAPI file nests too deeply") from None
        spec = DRAFT4 if self._v30 else DRAFT202012
        self._registry: Registry[Any] = Registry().with_resource(
            LOCAL, spec.create_resource(self.document)
        )
        self.operations = tuple(self._operations())
        ids = [op.operation_id for op in self.operations if op.operation_id]
        if len(ids) != len(set(ids)):
            raise ConfigError(f"{source}: an operationId is used twice")

    @classmethod
    def load(cls, path: Path) -> Spec:
        try:
            text = path.read_text(encoding="utf-8")
            document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the OpenAPI file: {exc}") from None
        if not isinstance(document, dict) or not isinstance(document.get("paths"), dict):
            raise ConfigError(f"{path}: an OpenAPI file needs openapi and paths")
        return cls(document, str(path))

    def _resolve(self, node: Any) -> Any:
        """One level of ``$ref`` inside the file (parameters, request bodies)."""
        if isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if not ref.startswith(LOCAL + "#/"):
                raise ConfigError(f"{self.source}: only references inside the file ({ref})")
            try:
                return self._registry.resolver(LOCAL).lookup(ref).contents
            except Exception as exc:  # referencing's Unresolvable and its kin
                raise ConfigError(f"{self.source}: cannot resolve {ref}: {exc}") from None
        return node

    def _operations(self) -> Iterator[Operation]:
        for path, item in self.document["paths"].items():
            if not isinstance(path, str) or not path.startswith("/") or not isinstance(item, dict):
                raise ConfigError(f"{self.source}: paths: {path!r} is not a path")
            shared = [self._resolve(p) for p in item.get("parameters", [])]
            for method in METHODS:
                op = item.get(method)
                if not isinstance(op, dict):
                    continue
                own = [self._resolve(p) for p in op.get("parameters", [])]
                named = {(p.get("in"), p.get("name")): p for p in shared + own}
                body = self._resolve(op.get("requestBody")) if "requestBody" in op else None
                yield Operation(
                    method=method.upper(),
                    template=tuple(path[1:].split("/")),
                    operation_id=op.get("operationId"),
                    summary=op.get("summary"),
                    parameters=tuple(named.values()),
                    body=body,
                )

    def operation_ids(self) -> set[str]:
        return {op.operation_id for op in self.operations if op.operation_id}

    def find(self, method: str, segments: tuple[str, ...]) -> tuple[Operation | None, str]:
        """The operation for a call (concrete paths before templated ones), or why none.

        A server that ignores case (Express by default) may route ``/orders/EXPORT`` to
        ``/orders/export`` where the file's own reading is ``/orders/{id}``: a call whose
        operation differs between the two readings is refused, so a rule keyed on an
        operation cannot be dodged by a spelling."""
        fitting = [op for op in self.operations if op.bind(segments) is not None]
        folded = [op for op in self.operations if op.bind(segments, folded=True) is not None]
        if not folded:
            return None, "the API's OpenAPI file has no path like it"
        same = [op for op in fitting if op.method == method]
        same_folded = [op for op in folded if op.method == method]
        if not same_folded:
            allowed = ", ".join(sorted({op.method for op in folded}))
            return None, f"the API's OpenAPI file allows only {allowed} there"
        best_folded = max(same_folded, key=Operation.literal_parts)
        best = max(same, key=Operation.literal_parts) if same else None
        if best is not best_folded:
            return None, (
                f"to a server that ignores case this is {best_folded.path}: send it as the "
                "API's OpenAPI file spells it"
            )
        return best, ""

    def _validator(self, schema: Any) -> Validator:
        cls = Draft4Validator if self._v30 else Draft202012Validator
        return cls(schema, registry=self._registry)

    def _error(self, where: str, value: Any, schema: Any) -> str | None:
        if not isinstance(schema, dict):
            return None
        error = best_match(self._validator(schema).iter_errors(value))
        if error is None:
            return None
        inner = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
        return f"{where}{inner}: {error.message}"

    def refusal(
        self,
        op: Operation,
        segments: tuple[str, ...],
        query: tuple[tuple[str, str], ...],
        body: tuple[bool, Any, str | None, Sequence[tuple[str, str]]],
    ) -> str | None:
        """Why the spec does not allow this call of ``op``, or None. ``body`` is (is JSON,
        parsed JSON, content type or None, a form body's pairs as the guards read them)."""
        bound = op.bind(segments) or {}
        for param in op.parameters:
            where, name = param.get("in"), str(param.get("name"))
            if where not in ("path", "query"):
                continue
            schema = param.get("schema") or {}
            if where == "path":
                values = [bound[name]] if name in bound else []
            else:  # every copy, in any case: servers differ on which one they read
                values = [v for k, v in query if k.casefold() == name.casefold()]
            if not values:
                if param.get("required"):
                    return f"{where} parameter {name} is required"
                continue
            if schema.get("type") == "array":
                items = schema.get("items") or {}
                typed: Any = [_typed(v, items) for v in values]
            elif len(values) > 1:
                return f"{where} parameter {name} is given {len(values)} times"
            else:
                typed = _typed(values[0], schema)
            error = self._error(f"{where} parameter {name}", typed, schema)
            if error:
                return error
        is_json, data, content_type, form = body
        if op.body is None:
            return "the operation takes no body" if content_type else None
        if content_type is None:
            return "the operation needs a body" if op.body.get("required") else None
        content = op.body.get("content") or {}
        media = content_type.split(";", 1)[0].strip().lower()
        if media not in content:
            return f"the operation takes {', '.join(content) or 'no body'}, not {media}"
        schema = (content[media] or {}).get("schema")
        if not schema:
            return None
        if is_json:
            return self._error("body", data, schema)
        if media == "application/x-www-form-urlencoded":
            return self._form_error(form, schema)
        return f"keyturn cannot check a {media} body against the OpenAPI file's schema"

    def _form_error(self, form: Sequence[tuple[str, str]], schema: dict[str, Any]) -> str | None:
        """A form body as its schema's types read it (a name given twice is an array's)."""
        fields: dict[str, list[str]] = {}
        for name, value in form:
            fields.setdefault(name, []).append(value)
        properties = schema.get("properties") or {}
        typed: dict[str, Any] = {}
        for name, values in fields.items():
            field = properties.get(name) or {}
            if field.get("type") == "array":
                typed[name] = [_typed(v, field.get("items") or {}) for v in values]
            elif len(values) > 1:
                return f"body field {name} is given {len(values)} times"
            else:
                typed[name] = _typed(values[0], field)
        return self._error("body", typed, schema)
