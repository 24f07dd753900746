"""A development identity provider: real RSA, EC and Ed25519 keys, a JWKS endpoint, tokens.

Tests use it to mint good and bad agent tokens; ``keyturn dev`` uses it so agents get a working
token without an account anywhere. The JWKS endpoint counts its fetches so tests can check the
gateway's key cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


def dev_token(
    secret: str,
    sub: str,
    *,
    ttl: int = 3600,
    groups: list[str] | None = None,
    on_behalf_of: str | None = None,
    audience: str = "keyturn",
) -> str:
    """An HS256 agent token for a gateway running with KEYTURN_GATEWAY_DEV_SECRET (dev only)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "aud": audience, "iat": now, "exp": now + ttl}
    if groups:
        claims["groups"] = groups
    if on_behalf_of:
        claims["act"] = {"sub": on_behalf_of}
    return jwt.encode(claims, secret, algorithm="HS256")


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass
class DevIdP:
    issuer: str = "https://idp.keyturn.dev"
    audience: str = "keyturn"
    keys: dict[str, PrivateKey] = field(default_factory=dict)
    jwks_fetches: int = 0
    _runner: web.AppRunner | None = None
    url: str = ""

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = {
                "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                "ec-1": ec.generate_private_key(ec.SECP256R1()),
                "ed-1": ed25519.Ed25519PrivateKey.generate(),
            }

    @staticmethod
    def _alg_for(key: PrivateKey) -> str:
        if isinstance(key, rsa.RSAPrivateKey):
            return "RS256"
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return "ES256"
        return "EdDSA"

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            public = key.public_key()
            if isinstance(public, rsa.RSAPublicKey):
                jwk = json.loads(RSAAlgorithm.to_jwk(public))
            elif isinstance(public, ec.EllipticCurvePublicKey):
                jwk = json.loads(ECAlgorithm.to_jwk(public))
            else:
                jwk = json.loads(OKPAlgorithm.to_jwk(public))
            jwk.update(kid=kid, use="sig", alg=self._alg_for(key))
            out.append(jwk)
        return {"keys": out}

    def public_pem(self, kid: str = "rsa-1") -> bytes:
        return (
            self.keys[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def token(
        self,
        sub: str,
        *,
        kid: str = "rsa-1",
        ttl: int = 300,
        groups: list[str] | None = None,
        on_behalf_of: str | None = None,
        raw_on_behalf_of: Any = None,
        **claims: Any,
    ) -> str:
        """A valid token unless ``claims`` override ``exp``, ``aud``, ``iss``, ``nbf``…

        ``on_behalf_of`` names the human as RFC 8693 does (``act.sub``); ``raw_on_behalf_of``
        sets the plain ``on_behalf_of`` claim, as some identity providers spell it."""
        now = int(time.time())
        body: dict[str, Any] = {
            "sub": sub,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
        }
        if groups is not None:
            body["groups"] = groups
        if on_behalf_of is not None:
            body["act"] = {"sub": on_behalf_of}
        if raw_on_behalf_of is not None:
            body["on_behalf_of"] = raw_on_behalf_of
        body.update(claims)
        key = self.keys[kid]
        return jwt.encode(body, key, algorithm=self._alg_for(key), headers={"kid": kid})

    async def start(self) -> str:
        """Serve ``/.well-known/jwks.json`` on a free loopback port; returns the JWKS URL."""

        async def jwks(_request: web.Request) -> web.Response:
            self.jwks_fetches += 1
            return web.json_response(self.jwks())

        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
