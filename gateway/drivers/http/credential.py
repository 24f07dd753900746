"""An HTTP target's credential for one call: read from Vault when the call is sent, never
kept after it, and scrubbed from whatever the API answers.

An API may echo what it was sent (httpbin does; so do debugging endpoints and error pages
that quote the request). The answer passes through :meth:`Credential.scrub` before anything
else reads it: every spelling of the key an echo is likely to use (as sent, JSON-escaped,
percent-encoded, base64 at any alignment) is replaced, and a cut answer loses a tail as long
as the longest of them, whatever it holds. Then what the agent would be shown is checked
again as decoders would read it (:meth:`Credential.leaks`: JSON and HTML escapes,
percent-encoding in any case, hex): an answer that still carries the key is not shown.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import re
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote

from gateway.usecases.driver import RunFailed
from keyturn.backoff import Backoff
from keyturn.config.targets import HttpTarget
from keyturn.errors import KeyturnError
from keyturn.vault import Vault, VaultUnavailable

log = logging.getLogger(__name__)

MASK = b"***"
SHORTEST = 4  # shorter values are not scrubbed (they would mangle every answer)


def _base64_inside(raw: bytes) -> set[bytes]:
    """The key's base64 wherever it starts in a longer encoded text (an echo that encodes
    the whole request): at each of the three byte alignments, the characters that depend on
    the key alone (the first and last block also hold their neighbours' bits)."""
    found = set()
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * pad + raw).rstrip(b"=")
            middle = encoded[4 if pad else 0 : len(encoded) - 4]
            if len(middle) >= 2 * SHORTEST:
                found.add(middle)
    return found


def _spellings(value: str) -> set[bytes]:
    raw = value.encode()
    return {
        raw,
        json.dumps(value)[1:-1].encode(),
        quote(value, safe="").encode(),
        quote_plus(value).encode(),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        *_base64_inside(raw),
    }


_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\(/)")


def _json_unescaped(text: str) -> str:
    return _JSON_ESCAPE.sub(lambda m: m.group(2) or chr(int(m.group(1), 16)), text)


@dataclass(frozen=True)
class Credential:
    headers: dict[str, str]  # what is added to the call
    spellings: tuple[bytes, ...] = ()  # longest first
    secrets: tuple[str, ...] = ()  # the header's value and each field in it

    @classmethod
    def of(cls, header: str, value: str, secrets: list[str]) -> Credential:
        found: set[bytes] = set()
        kept_secrets = tuple(s for s in {value, *secrets} if len(s) >= SHORTEST)
        for secret in kept_secrets:
            found |= _spellings(secret)
        return cls({header: value}, tuple(sorted(found, key=len, reverse=True)), kept_secrets)

    def leaks(self, text: str) -> bool:
        """Whether ``text`` still carries the key as some decoder would read it."""
        if not self.secrets:
            return False
        views = (text, html.unescape(text), unquote(text), _json_unescaped(text))
        lowered = text.lower()
        return any(
            any(secret in view for view in views) or secret.encode().hex() in lowered
            for secret in self.secrets
        )

    def scrub(self, data: bytes, *, cut: bool = False) -> bytes:
        """``data`` without the credential; ``cut``: it was cut short, so its last bytes go
        too, as many as the longest spelling has whatever they hold, since a tail could be
        the start of one. Never only when they look like one: what is cut would then tell
        an agent, guess by guess, how the key begins."""
        for spelling in self.spellings:
            data = data.replace(spelling, MASK)
        if cut and self.spellings:
            data = data[: max(0, len(data) - len(self.spellings[0]))]
        return data

    def scrub_text(self, text: str) -> str:
        for spelling in self.spellings:  # ASCII: the key is one line of ASCII
            text = text.replace(spelling.decode(), MASK.decode())
        return text


NONE = Credential({})


async def read_credential(vault: Vault | None, target: HttpTarget, wait: float) -> Credential:
    """The credential for one call, read now: nothing is sent without it. While Vault is
    unavailable it is retried for up to ``wait`` seconds (an approved call waits; an allowed
    one does not)."""
    if target.credential_header is None:
        return NONE
    if vault is None:
        raise RunFailed(
            "the gateway has no Vault for credentials", final=False, outcome="unreachable"
        )
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait
    backoff = Backoff(0.5, 10.0)
    while True:
        try:
            await vault.ensure_login()
            if target.vault.identity_token:
                secret = {"token": await vault.identity_token(target.vault.identity_token)}
            else:
                secret = await vault.kv_secret(*target.vault.kv_mount_path)
            break
        except KeyturnError as exc:
            delay = backoff.next()
            if isinstance(exc, VaultUnavailable) and loop.time() + delay <= give_up:
                log.warning("waiting for Vault to send an approved call: %s", exc.message)
                await asyncio.sleep(delay)
                continue
            if not isinstance(exc, VaultUnavailable):  # the operator's: Vault's policy, a path
                log.error("the key of an HTTP target cannot be read: %s", exc.message)
            raise RunFailed(
                f"the API's credential cannot be read ({exc.message}): nothing was sent",
                final=False,
                outcome="unreachable",
            ) from None
    try:
        value = target.inject.render(secret)
    except ValueError as exc:
        log.error("the key of an HTTP target cannot be used: %s", exc)
        raise RunFailed(f"{exc}; nothing was sent", final=False, outcome="unreachable") from None
    used = [str(secret[name]) for name in target.inject.fields()]
    return Credential.of(target.inject.header, value, used)
