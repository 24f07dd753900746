"""The ``http`` driver: an agent's API call sent exactly as judged, the credential added at
send time, the answer capped and masked.

What is sent is the call's canonical form (:mod:`keyturn.classify.http`) parsed from the
recorded command: the approved or allowed text is the one rendition. To it the driver adds
only ``Host`` (from ``base_url``), ``Content-Length``, ``User-Agent``, ``Accept-Encoding:
identity`` and the credential header, read from Vault for this call and dropped after it (a
KV v2 secret, or an identity token minted for it). It connects to the configured host alone:
no proxies from the environment, TLS verified against the system's CAs or ``ca_file``,
redirects never followed (a 3xx is the agent's answer), compression never decoded.

The answer: status, a few headers, and the body up to ``max_response_bytes`` before
``timeout`` ends. A JSON body is parsed and masked by key and by detectors; a JSON body cut
short is not shown at all (keys cannot be masked in half a document); text is masked by the
detectors; anything else is counted, not shown. An error status is a result, not a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any, ClassVar

import aiohttp
from yarl import URL

from gateway.usecases.driver import Allowed, RunFailed
from keyturn import __version__
from keyturn.backoff import Backoff
from keyturn.classify import Identity
from keyturn.classify.catalog import Catalog
from keyturn.classify.http import HttpCall, parse_call
from keyturn.config.targets import HttpTarget
from keyturn.errors import KeyturnError, TooLarge
from keyturn.masking import Masker
from keyturn.supervise import Loop
from keyturn.vault import Vault, VaultUnavailable

log = logging.getLogger(__name__)

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
CONNECTIONS = 32  # per target, at once
CREDENTIAL_WAIT = 120.0  # seconds an approved call waits for Vault to come back, unsent
PARSE_IN_THREAD = 64 * 1024  # JSON bodies larger than this are parsed and masked off the loop
CHUNK = 64 * 1024


def _json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _text_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return (
        media.startswith("text/")
        or media
        in (
            "application/xml",
            "application/x-www-form-urlencoded",
            "application/javascript",
        )
        or media.endswith("+xml")
    )


class HttpDriver:
    kind: ClassVar[str] = "http"
    description: ClassVar[str] = (
        "HTTP API: calls its policy allows run at once, anything else waits for a human"
    )

    def __init__(self, targets: dict[str, HttpTarget], vault: Vault | None, masker: Masker) -> None:
        self._targets = targets
        self._vault = vault
        self._masker = masker
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def canonical(self, target: str, command: str, *, is_call: bool) -> str:
        """Either form (a structured call, or its text) becomes the canonical text."""
        call = parse_call(command)
        limit = self._targets[target].max_body_bytes
        if len(call.body_bytes) > limit:
            raise TooLarge(f"the body is larger than {target}'s max_body_bytes ({limit})")
        return call.render()

    def runs_allowed(self, target: str) -> bool:
        return True

    async def catalog(self, target: str) -> Catalog | None:
        return None

    async def describe_held(self, target: str, command: str, who: Identity) -> dict[str, Any]:
        return {}

    async def run_allowed(self, allowed: Allowed) -> dict[str, Any]:
        """The credential is read while the record commits (both per call); nothing is
        sent before both are done."""
        call = self._call(allowed.command)
        target = self._targets[allowed.target]
        credential = asyncio.ensure_future(self._credential(target, wait=0.0))
        try:
            await allowed.recorded
        except BaseException as exc:
            credential.cancel()
            credential.add_done_callback(lambda t: t.cancelled() or t.exception())
            if not isinstance(exc, Exception):
                raise
            error = exc if isinstance(exc, KeyturnError) else None
            raise RunFailed("never ran: not recorded", final=False, error=error) from exc
        return await self._send(allowed.target, call, await credential)

    async def run_approved(
        self, target: str, command: str, credentials: dict[str, Any]
    ) -> dict[str, Any]:
        """``credentials`` is the bot's hand-off, already checked against the approved hash:
        the approval itself. The API's credential is read now, from Vault."""
        call = self._call(command)
        return await self._send(
            target, call, await self._credential(self._targets[target], CREDENTIAL_WAIT)
        )

    def background(self) -> list[Loop]:
        return []

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    # ------------------------------------------------------------------ sending

    def _call(self, command: str) -> HttpCall:
        """The recorded call (judged in this form when it was submitted)."""
        try:
            return parse_call(command)
        except KeyturnError as exc:
            raise RunFailed(f"not an HTTP call: {exc.message}", final=True) from None

    def _session(self, name: str) -> aiohttp.ClientSession:
        session = self._sessions.get(name)
        if session is None or session.closed:
            target = self._targets[name]
            context = ssl.create_default_context(
                cafile=str(target.ca_file) if target.ca_file else None
            )
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONNECTIONS, ssl=context),
                trust_env=False,  # no proxy, netrc or CA from the environment
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),  # no cookie of one call in another
            )
            self._sessions[name] = session
        return session

    async def _credential(self, target: HttpTarget, wait: float) -> dict[str, str]:
        """The credential header for one call, read now; nothing is sent without it. An
        approved call waits up to ``wait`` seconds for Vault to come back."""
        if not (target.vault.kv or target.vault.identity_token):
            return {}
        if self._vault is None:
            raise RunFailed(
                "the gateway has no Vault for credentials", final=False, outcome="unreachable"
            )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                await self._vault.ensure_login()
                if target.vault.identity_token:
                    secret = {
                        "token": await self._vault.identity_token(target.vault.identity_token)
                    }
                else:
                    secret = await self._vault.kv_secret(*target.vault.kv_mount_path)
                break
            except VaultUnavailable as exc:
                delay = backoff.next()
                if loop.time() + delay > give_up:
                    raise RunFailed(
                        f"the API's credential cannot be read ({exc.message}): nothing was sent",
                        final=False,
                        outcome="unreachable",
                    ) from None
                log.warning("waiting for Vault to send an approved call: %s", exc.message)
                await asyncio.sleep(delay)
            except KeyturnError as exc:
                raise RunFailed(
                    f"the API's credential cannot be read: {exc.message}; nothing was sent",
                    final=False,
                    outcome="error",
                    error=exc,
                ) from None
        try:
            return {target.inject.header: target.inject.render(secret)}
        except ValueError as exc:
            raise RunFailed(f"{exc}; nothing was sent", final=False) from None

    async def _send(self, name: str, call: HttpCall, credential: dict[str, str]) -> dict[str, Any]:
        target = self._targets[name]
        headers = {
            **dict(call.headers),
            "Accept-Encoding": "identity",
            "User-Agent": f"keyturn/{__version__}",
            **credential,
        }
        url = URL(target.base_url + call.target, encoded=True)
        timeout = aiohttp.ClientTimeout(total=target.timeout.total_seconds())
        try:
            async with self._session(name).request(
                call.method,
                url,
                headers=headers,
                data=call.body_bytes if call.body else None,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                body, truncated = await self._read(response, target.max_response_bytes)
                return await self._answer(response, body, truncated)
        except aiohttp.ClientConnectorError as exc:
            message = f"{name} cannot be reached: {type(exc).__name__}: {exc.os_error}"
            raise RunFailed(
                self._masker.text(message), final=False, outcome="unreachable"
            ) from None
        except TimeoutError:
            message = f"{name} did not answer within {target.timeout.total_seconds():g} s"
            raise RunFailed(message, final=True) from None
        except aiohttp.ClientError as exc:
            message = f"{name} failed: {type(exc).__name__}"
            raise RunFailed(message, final=True) from None

    async def _read(self, response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
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

    async def _answer(
        self, response: aiohttp.ClientResponse, body: bytes, truncated: bool
    ) -> dict[str, Any]:
        headers = {
            name: self._masker.text(response.headers[name])
            for name in SHOWN_HEADERS
            if name in response.headers
        }
        out: dict[str, Any] = {
            "status": response.status,
            "headers": headers,
            "bytes": len(body),
            "truncated": truncated,
        }
        content_type = response.headers.get("Content-Type", "")
        encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
        if not body or encoded:
            return out | ({"note": "a compressed body is not shown"} if body else {})
        if _json_type(content_type) and truncated:
            return out | {"note": "a JSON body larger than max_response_bytes is not shown"}
        if _json_type(content_type):
            if len(body) > PARSE_IN_THREAD:
                shown = await asyncio.to_thread(self._json, body)
            else:
                shown = self._json(body)
            if shown is not None:
                return out | shown
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            if truncated:  # cut inside a character
                text = body.decode("utf-8", errors="ignore")
            else:
                return out | {"note": f"a binary body ({content_type or 'no type'}) is not shown"}
        if not (_text_type(content_type) or _json_type(content_type) or not content_type):
            return out | {"note": f"a {content_type} body is not shown"}
        return out | {"text": self._masker.text(text)}

    def _json(self, body: bytes) -> dict[str, Any] | None:
        try:
            return {"json": self._masker.json(json.loads(body))}
        except (ValueError, RecursionError):
            return None  # not JSON after all: shown as masked text
