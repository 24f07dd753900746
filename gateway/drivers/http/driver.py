"""The ``http`` driver: an agent's API call sent exactly as judged, the credential added at
send time, the answer capped and masked.

What is sent is the call's canonical form (:mod:`keyturn.classify.http`) parsed from the
recorded command: the approved or allowed text is the one rendition. To it the driver adds
only ``Host`` (from ``base_url``), ``Content-Length``, ``User-Agent``, ``Accept-Encoding:
identity`` and the credential header, read from Vault for this call and dropped after it (a
KV v2 secret, or an identity token minted for it). It connects to the configured host alone:
no proxies from the environment, TLS verified against the system's CAs or ``ca_file``,
redirects never followed (a 3xx is the agent's answer), compression never decoded.

The answer (:mod:`.response`) is read up to ``max_response_bytes`` before ``timeout`` ends,
the credential scrubbed from it (:mod:`.credential`), then masked. An error status is a
result, not a failure.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, ClassVar

import aiohttp
from yarl import URL

from gateway.drivers.http.credential import Credential, read_credential
from gateway.drivers.http.response import Responses
from gateway.usecases.driver import Allowed, RunFailed
from keyturn import __version__
from keyturn.classify import Identity
from keyturn.classify.catalog import Catalog
from keyturn.classify.http import HttpCall, parse_call
from keyturn.config.targets import HttpTarget
from keyturn.errors import KeyturnError, TooLarge
from keyturn.masking import Masker
from keyturn.supervise import Loop
from keyturn.vault import Vault

log = logging.getLogger(__name__)

CONNECTIONS = 32  # per target, at once
CREDENTIAL_WAIT = 120.0  # seconds an approved call waits for Vault to come back, unsent


class HttpDriver:
    kind: ClassVar[str] = "http"
    description: ClassVar[str] = (
        "HTTP API: calls its policy allows run at once, anything else waits for a human"
    )

    def __init__(self, targets: dict[str, HttpTarget], vault: Vault | None, masker: Masker) -> None:
        self._targets = targets
        self._vault = vault
        self._masker = masker
        self._responses = Responses(masker)
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def canonical(self, target: str, command: str, *, as_http: bool) -> str:
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
        credential = asyncio.ensure_future(read_credential(self._vault, target, wait=0.0))
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
        the approval itself, naming where the card said the call goes and with which
        credential (a policy changed since cannot send it elsewhere, or with another key).
        The API's credential is read now, from Vault."""
        settings = self._targets[target]
        if credentials.get("where_sent") != settings.where_sent:
            raise RunFailed(
                f"{target}'s base_url, CA or credential is not the one approved (approved for "
                f"{credentials.get('base_url')}): not sent",
                final=False,
            )
        call = self._call(command)
        credential = await read_credential(self._vault, settings, CREDENTIAL_WAIT)
        return await self._send(target, call, credential)

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

    async def _send(self, name: str, call: HttpCall, credential: Credential) -> dict[str, Any]:
        target = self._targets[name]
        headers = {
            **dict(call.headers),
            "Accept-Encoding": "identity",
            "User-Agent": f"keyturn/{__version__}",
            **credential.headers,
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
                return await self._responses.shown(response, target.max_response_bytes, credential)
        except aiohttp.ClientConnectorError as exc:
            message = f"{name} cannot be reached: {type(exc).__name__}: {exc.os_error}"
            raise RunFailed(
                self._masker.text(credential.scrub_text(message)),
                final=False,
                outcome="unreachable",
            ) from None
        except TimeoutError:
            message = f"{name} did not answer within {target.timeout.total_seconds():g} s"
            raise RunFailed(message, final=True) from None
        except aiohttp.ClientError as exc:  # the text could quote what was sent: not shown
            raise RunFailed(f"{name} failed: {type(exc).__name__}", final=True) from None
