"""What an agent is shown of an API's answer: status, a few headers and the body, read up to
the target's cap, the credential scrubbed out first, then masked.

A JSON body is parsed and masked by key (the policy's masked column names, at any depth) and
by the detectors on every string; a JSON body cut short is not shown at all (keys cannot be
masked in half a document); text is masked by the detectors; a compressed or binary body is
counted, not shown. An error status is an answer like any other.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp

from gateway.drivers.http.credential import Credential
from keyturn.classify.http import is_json, media_type
from keyturn.masking import Masker

# Response headers an agent is shown (never Set-Cookie, never the server's internals).
SHOWN_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Encoding",
    "Location",
    "ETag",
    "Last-Modified",
    "Retry-After",
    "Link",
    "X-Request-Id",
    "X-Total-Count",
)
CHUNK = 64 * 1024
IN_THREAD = 64 * 1024  # larger bodies are parsed, scrubbed and masked off the event loop
TEXT_TYPES = ("application/xml", "application/x-www-form-urlencoded", "application/javascript")


def is_text(content_type: str) -> bool:
    media = media_type(content_type)
    return not media or media.startswith("text/") or media in TEXT_TYPES or media.endswith("+xml")


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes; True when there was more (the connection is then closed
    rather than drained: a 200 MB answer is never read)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await response.content.read(min(CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    response.close()
    return b"".join(chunks)[:limit], True


def _utf8(body: bytes, truncated: bool) -> str | None:
    """The body as UTF-8 text (a cut body may end inside a character), or None: bytes
    that are not UTF-8 text, or that hold NUL (UTF-16 looks like that), are not text."""
    for end in range(len(body), max(len(body) - 4, -1) if truncated else len(body) - 1, -1):
        try:
            text = body[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return None if "\x00" in text else text
    return None


def _strings(value: Any) -> list[str]:
    """Every string in a shown answer, keys included."""
    found, stack = [], [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            found += [str(k) for k in node]
            stack += list(node.values())
        elif isinstance(node, list):
            stack += node
    return found


_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")


def _named(content_type: str) -> str:
    """A content type for a note, only if it is one: a note is keyturn's own words, so the
    API's header text (which could say anything to a model) is never quoted."""
    media = media_type(content_type)
    return media if _MEDIA_TYPE.fullmatch(media) else "an unnamed type"


WITHHELD = "the answer quotes the API's credential in a form keyturn cannot cut out: not shown"


class Responses:
    def __init__(self, masker: Masker) -> None:
        self.masker = masker

    async def shown(
        self, response: aiohttp.ClientResponse, limit: int, credential: Credential
    ) -> dict[str, Any]:
        raw, truncated = await read_capped(response, limit)
        headers = {}
        for name in SHOWN_HEADERS:
            if name in response.headers:
                # bytes that are not UTF-8 come as lone surrogates: Masker.text replaces them
                value = self.masker.text(credential.scrub_text(response.headers[name]))
                if not credential.leaks(value):
                    headers[name] = value
        out: dict[str, Any] = {
            "status": response.status,
            "headers": headers,
            "bytes": len(raw),
            "truncated": truncated,
        }
        content_type = response.headers.get("Content-Type", "")
        encoding = response.headers.get("Content-Encoding", "identity")
        args = (raw, truncated, content_type, encoding, credential)
        if len(raw) > IN_THREAD:  # scrubbing, parsing and masking a large body take CPU
            return out | await asyncio.to_thread(self._body, *args)
        return out | self._body(*args)

    def _body(
        self, raw: bytes, truncated: bool, content_type: str, encoding: str, credential: Credential
    ) -> dict[str, Any]:
        body = credential.scrub(raw, cut=truncated)
        shown = self._shown(body, truncated, content_type, encoding, credential)
        if credential.secrets and credential.leaks("\n".join(_strings(shown))):
            return {"note": WITHHELD}
        return shown

    def _shown(
        self, body: bytes, truncated: bool, content_type: str, encoding: str, credential: Credential
    ) -> dict[str, Any]:
        if not body:
            return {}
        if encoding.lower() != "identity":
            return {"note": "a compressed body is not shown"}
        if is_json(content_type) and truncated:
            return {"note": "a JSON body larger than the target's max_response_bytes is not shown"}
        text = _utf8(body, truncated)
        if text is None:
            return {"note": f"a binary body ({_named(content_type)}) is not shown"}
        if is_json(content_type):
            try:
                return {"json": self.masker.json(json.loads(text), clean=credential.scrub_text)}
            except (ValueError, RecursionError):
                pass  # not JSON after all (a BOM, an XSSI prefix): read as text below
        elif not is_text(content_type):
            return {"note": f"a body of type {_named(content_type)} is not shown"}
        if self.masker.names_masked_key(text):  # CSV, XML, JSON keyturn could not parse...
            return {"note": "a text answer that names a masked field is not shown: fields are "
                    "masked in JSON answers only"}  # fmt: skip
        return {"text": self.masker.text(credential.scrub_text(text))}
