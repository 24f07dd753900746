"""Agent authentication: Bearer JWTs verified with pyjwt.

Keys come from a JWKS URL (PyJWKClient, cached; an unknown ``kid`` triggers at most one refetch
per ``REFETCH_INTERVAL``) or a configured public key. Algorithms are an explicit allow-list;
``none`` never passes, and HS256 only with a configured development secret, never with a
public key as the HMAC secret. Verified tokens are cached until they expire, so a busy agent
pays for signature checks once per token.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient

from keyturn.classify import Identity
from keyturn.config.process import GatewayAuth
from keyturn.domain import slack_user
from keyturn.errors import ConfigError, Unauthorized, Unavailable

REFETCH_INTERVAL = 10.0
CACHE_SIZE = 10_000
CACHE_SECONDS = 3600.0

_REASONS: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token is for another audience"),
    (jwt.InvalidIssuerError, "token is from an unexpected issuer"),
    (jwt.InvalidSignatureError, "bad token signature"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidKeyError, "token key does not fit its algorithm"),
]


class Authenticator:
    def __init__(self, cfg: GatewayAuth, dev_secret: str | None = None) -> None:
        self._cfg = cfg
        self._dev_secret = dev_secret
        if "HS256" in cfg.algorithms and not dev_secret:
            raise ConfigError(
                "gateway.auth.algorithms lists HS256, which needs KEYTURN_GATEWAY_DEV_SECRET "
                "(development only)"
            )
        asymmetric = [a for a in cfg.algorithms if a != "HS256"]
        if asymmetric and not (cfg.jwks_url or cfg.public_key_file):
            raise ConfigError("gateway.auth needs jwks_url or public_key_file")
        self._public_key: Any = None
        if cfg.public_key_file:
            try:
                self._public_key = cfg.public_key_file.read_bytes()
            except OSError as exc:
                raise ConfigError(f"gateway.auth.public_key_file: {exc.strerror}") from None
        self._jwks = (
            PyJWKClient(cfg.jwks_url, cache_jwk_set=True, lifespan=300, timeout=5)
            if cfg.jwks_url
            else None
        )
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = 0.0
        self._fetch_lock = asyncio.Lock()
        self._cache: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    async def authenticate(self, header: str | None) -> Identity:
        if not header or not header.startswith("Bearer "):
            raise Unauthorized("missing bearer token (Authorization: Bearer <JWT>)")
        token = header[7:].strip()
        cached = self._cache.get(token)
        if cached is not None and time.time() < cached[1]:
            self._cache.move_to_end(token)
            return cached[0]
        identity, expires = await self._verify(token)
        self._cache[token] = (identity, expires)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return identity

    async def _verify(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, ValueError, TypeError, RecursionError):
            raise Unauthorized("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._cfg.algorithms:
            raise Unauthorized(f"token algorithm {alg!r} is not allowed")
        key = self._dev_secret if alg == "HS256" else await self._key(header.get("kid"))
        if key is None:
            raise Unauthorized(f"token algorithm {alg!r} is not configured")
        require = ["exp", "sub", "aud"] + (["iss"] if self._cfg.issuer else [])
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._cfg.audience,
                issuer=self._cfg.issuer,
                leeway=self._cfg.leeway_seconds,
                options={"require": require},
            )
        except jwt.InvalidTokenError as exc:
            reason = next((msg for cls, msg in _REASONS if isinstance(exc, cls)), "invalid token")
            raise Unauthorized(reason) from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            # claims pyjwt cannot even compare (an exp of 1e400, a nested monster): not a token
            raise Unauthorized("invalid token") from None
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):  # pyjwt takes "123"
            raise Unauthorized("token exp must be a number")
        # cached until the token expires, an hour at most (exp may be any size of number)
        until = min(exp + self._cfg.leeway_seconds, time.time() + CACHE_SECONDS)
        return _identity(claims, self._cfg.groups_claim), float(until)

    async def _key(self, kid: object) -> Any:
        if self._jwks is None:
            return self._public_key
        if not isinstance(kid, str):
            raise Unauthorized("token has no key id (kid)")
        if kid not in self._keys:
            await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise Unauthorized("token signed by an unknown key")
        return key.key

    async def _refresh(self) -> None:
        async with self._fetch_lock:
            if time.monotonic() - self._fetched_at < REFETCH_INTERVAL and self._keys:
                return
            assert self._jwks is not None
            try:
                jwk_set = await asyncio.to_thread(self._jwks.get_jwk_set, True)
            except jwt.PyJWKClientError as exc:
                raise Unavailable(
                    f"cannot fetch the identity provider's signing keys: {exc}"
                ) from None
            finally:
                self._fetched_at = time.monotonic()
            self._keys = {k.key_id: k for k in jwk_set.keys if k.key_id}


MAX_NAME = 200  # characters of a sub, a group or on_behalf_of: what keyturn can record
MAX_GROUPS = 200


def _name(value: str, claim: str) -> str:
    # isprintable() is False for NUL, controls and lone surrogates: all unstorable
    if not value or len(value) > MAX_NAME or not value.isprintable():
        raise Unauthorized(f"token {claim} must be 1 to {MAX_NAME} printable characters")
    return value


def _identity(claims: dict[str, Any], groups_claim: str) -> Identity:
    subject = claims.get("sub")
    if not isinstance(subject, str):
        raise Unauthorized("token sub must be a non-empty string")
    groups = claims.get(groups_claim) or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise Unauthorized(f"token claim {groups_claim} must be a list of strings")
    if len(groups) > MAX_GROUPS:
        raise Unauthorized(f"token claim {groups_claim} lists more than {MAX_GROUPS} groups")
    return Identity(
        _name(subject, "sub"),
        frozenset(_name(g, groups_claim) for g in groups),
        _human(claims),
    )


def _human(claims: dict[str, Any]) -> str | None:
    """The Slack user an agent acts for (``act.sub``, RFC 8693, or ``on_behalf_of``), who may
    then not approve its requests. A claim that is there but malformed is refused, never
    dropped: dropping it would let that person approve what they asked for."""
    act, behalf = claims.get("act"), claims.get("on_behalf_of")
    if act is not None and not (isinstance(act, dict) and isinstance(act.get("sub"), str)):
        raise Unauthorized("token claim act must be an object with a string sub")
    if behalf is not None and not isinstance(behalf, str):
        raise Unauthorized("token claim on_behalf_of must be a string")
    claimed: list[str] = [act["sub"]] if isinstance(act, dict) else []
    claimed += [behalf] if isinstance(behalf, str) else []
    named = [_name(h, "on_behalf_of") for h in claimed]
    people = {slack_user(h) for h in named}
    if None in people:
        raise Unauthorized(
            "the human a token acts for (act.sub, on_behalf_of) must be a Slack user id (U…)"
        )
    if len(people) > 1:
        raise Unauthorized("token claims act.sub and on_behalf_of name different people")
    return people.pop() if people else None
