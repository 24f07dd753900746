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
from typing import Any

import aiohttp

from gateway.drivers.http.credential import Credential
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
PARSE_IN_THREAD = 64 * 1024  # JSON bodies larger than this are parsed and masked off the loop
TEXT_TYPES = ("application/xml", "application/x-www-form-urlencoded", "application/javascript")


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str) -> bool:
    media = media_type(content_type)
    return media == "application/json" or media.endswith("+json")


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


class Answers:
    def __init__(self, masker: Masker) -> None:
        self.masker = masker

    async def of(
        self, response: aiohttp.ClientResponse, limit: int, credential: Credential
    ) -> dict[str, Any]:
        raw, truncated = await read_capped(response, limit)
        body = credential.scrub(raw, cut=truncated)
        headers = {
            name: self.masker.text(credential.scrub_text(response.headers[name]))
            for name in SHOWN_HEADERS
            if name in response.headers
        }
        out: dict[str, Any] = {
            "status": response.status,
            "headers": headers,
            "bytes": len(raw),
            "truncated": truncated,
        }
        return out | await self._body(
            body,
            truncated,
            response.headers.get("Content-Type", ""),
            response.headers.get("Content-Encoding", "identity"),
        )

    async def _body(
        self, body: bytes, truncated: bool, content_type: str, encoding: str
    ) -> dict[str, Any]:
        if not body:
            return {}
        if encoding.lower() != "identity":
            return {"note": f"a {encoding} compressed body is not shown"}
        if is_json(content_type) and truncated:
            return {"note": "a JSON body larger than the target's max_response_bytes is not shown"}
        if is_json(content_type):
            big = len(body) > PARSE_IN_THREAD
            parsed = await asyncio.to_thread(self._json, body) if big else self._json(body)
            if parsed is not None:
                return parsed
        if not is_text(content_type) and not is_json(content_type):
            return {"note": f"a {media_type(content_type)} body is not shown"}
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            if not truncated:
                return {"note": "a body that is not UTF-8 text is not shown"}
            text = body.decode("utf-8", errors="ignore")  # cut inside a character
        return {"text": self.masker.text(text)}

    def _json(self, body: bytes) -> dict[str, Any] | None:
        try:
            return {"json": self.masker.json(json.loads(body))}
        except (ValueError, RecursionError):
            return None  # not JSON after all: shown as masked text
