"""Minting and ending credentials in Vault for approved requests.

Postgres: the bot reads ``<database_mount>/creds/<write_role>``, sets the lease to the grant's
TTL, and wraps ``{lease_id, username, password, …}`` with ``sys/wrapping/wrap``. It wraps
itself rather than asking Vault to wrap the read, because a wrapped read hides the lease id:
keyturn must know the lease before anyone can use it, or it could not revoke it on time.

HTTP: no secret at all: a wrapped ``{kind, target, command_sha256, base_url, where_sent}``,
the approval a gateway must unwrap to send the call once, and only where the card said, with
the credential the policy named then; the API's own credential is read by the gateway from
Vault at send time.

SSH: an ephemeral ed25519 key pair, signed by the Vault SSH CA for the target's principal with
``force-command`` set to the approved command (and ``source-address`` where configured),
``ttl`` = the grant's TTL, then wrapped. Certificates cannot be revoked: their TTL is the
grant's, and the key exists only in the gateway's memory while the command runs.

The wrapped payload also names the target and the approved command's sha256, so a gateway
can check it runs what was approved with what was issued for it.

A person's access (``/keyturn db|ssh``) is issued the same way but handed to the person, not
a gateway: a database login wrapped with ``vault.access_wrap_ttl`` (the wrapping token goes
in their DM and nowhere else: :class:`AccessLogin`), or their registered key signed for the
target's principal with a pty and no ``force-command`` (:class:`AccessCertificate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncssh

from keyturn.config.policy import Config
from keyturn.config.targets import HttpTarget, PostgresTarget, SshTarget
from keyturn.errors import InvalidInput
from keyturn.store.grants import Minted
from keyturn.store.models import GrantRow, RequestRow
from keyturn.vault import Lease, Vault, WrapInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccessLogin:
    """A person's database login, as their DM carries it: never stored, never logged."""

    minted: Minted
    wrapping_token: str  # single-use, around the login


@dataclass(frozen=True)
class AccessCertificate:
    """A person's SSH certificate for their own key, as their DM carries it."""

    minted: Minted
    certificate: str


def psql_url(target: PostgresTarget, username: str, password: str) -> str:
    """The target's DSN with this login in it: what ``psql`` and ``keyturn unwrap`` print.
    Its query stays whole: a person's psql must verify TLS as the target's DSN says."""
    parts = urlsplit(target.dsn)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    login = f"{quote(username, safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{login}@{host}:{parts.port or 5432}"))


def _minted(
    kind: str, wrapped: WrapInfo, ttl: timedelta, max_ttl: timedelta, **extra: str
) -> Minted:
    return Minted(
        kind=kind,
        handoff_token=wrapped.token,
        wrap_accessor=wrapped.accessor,
        handoff_ttl=timedelta(seconds=wrapped.ttl),
        ttl=ttl,
        max_ttl=max_ttl,
        **extra,
    )


class Issuer:
    def __init__(self, config: Config, vault: Vault) -> None:
        self.config = config
        self.vault = vault

    def grant_ttl(self, request: RequestRow, max_ttl: timedelta) -> timedelta:
        asked = (
            timedelta(seconds=request.grant_ttl_seconds or 0)
            or self.config.policy.default_grant_ttl
        )
        return min(asked, max_ttl)

    async def mint(self, request: RequestRow) -> Minted:
        await self.vault.ensure_login()
        target = self.config.policy.targets.get(request.target)
        if isinstance(target, PostgresTarget):
            return await self._postgres(request, target)
        if isinstance(target, SshTarget):
            return await self._ssh(request, target)
        if isinstance(target, HttpTarget):
            return await self._http(request, target)
        raise InvalidInput(f"target {request.target} is not in the policy any more")

    async def _wrapped_login(
        self,
        target: PostgresTarget,
        ttl: timedelta,
        wrap_ttl: timedelta,
        payload: Callable[[Lease], dict[str, Any]],
    ) -> tuple[Lease, WrapInfo]:
        """A write login whose Vault lease (and the role's VALID UNTIL) ends with the grant,
        so Vault's own expiry is the backstop behind keyturn's revocation, wrapped single-use.
        Whatever fails after Vault issued it revokes it."""
        mount = self.config.vault.database_mount
        lease = await self.vault.creds(f"{mount}/creds/{target.vault.write_role}")
        try:
            if lease.duration != int(ttl.total_seconds()):
                await self.vault.renew_lease(lease.lease_id, ttl)
            wrapped = await self.vault.wrap(payload(lease), wrap_ttl)
        except BaseException:
            await self.vault.revoke_lease(lease.lease_id)
            raise
        return lease, wrapped

    async def _postgres(self, request: RequestRow, target: PostgresTarget) -> Minted:
        ttl = self.grant_ttl(request, target.vault.max_ttl)
        lease, wrapped = await self._wrapped_login(
            target,
            ttl,
            self.config.vault.wrap_ttl,
            lambda lease: {
                "kind": "postgres",
                "target": request.target,
                "command_sha256": request.command_sha256,
                "lease_id": lease.lease_id,
                "username": lease.data["username"],
                "password": lease.data["password"],
            },
        )
        return _minted("postgres", wrapped, ttl, target.vault.max_ttl, lease_id=lease.lease_id)

    async def _ssh(self, request: RequestRow, target: SshTarget) -> Minted:
        cfg = self.config.vault
        ttl = self.grant_ttl(request, target.vault.max_ttl)
        key = asyncssh.generate_private_key("ssh-ed25519")
        options = {"force-command": request.command}
        if target.source_address:
            options["source-address"] = target.source_address
        certificate, serial = await self.vault.sign_ssh_key(
            f"{cfg.ssh_mount}/sign/{target.vault.ssh_role}",
            key.export_public_key().decode(),
            principal=target.principal,
            ttl=ttl,
            critical_options=options,
        )
        payload: dict[str, Any] = {
            "kind": "ssh",
            "target": request.target,
            "command_sha256": request.command_sha256,
            "principal": target.principal,
            "private_key": key.export_private_key().decode(),
            "certificate": certificate,
        }
        wrapped = await self.vault.wrap(payload, cfg.wrap_ttl)
        # a certificate's validity is fixed when it is signed: its max TTL is its TTL
        return _minted("ssh", wrapped, ttl, ttl, serial=serial)

    async def _http(self, request: RequestRow, target: HttpTarget) -> Minted:
        """An HTTP call's hand-off carries no secret: it is the approval, bound to the
        call's sha256, that lets a gateway send it once. The gateway reads the API's
        credential from Vault when it sends (so a rotation in between is honoured)."""
        ttl = self.grant_ttl(request, target.vault.max_ttl)
        payload = {
            "kind": "http",
            "target": request.target,
            "command_sha256": request.command_sha256,
            "base_url": target.base_url,  # where the card said it goes
            "where_sent": target.where_sent,  # and with which credential
        }
        wrapped = await self.vault.wrap(payload, self.config.vault.wrap_ttl)
        return _minted("http", wrapped, ttl, ttl)

    async def access_login(
        self, request: RequestRow, target: PostgresTarget, max_ttl: timedelta, now: datetime
    ) -> AccessLogin:
        """A person's own database login, wrapped for ``vault.access_wrap_ttl``."""
        await self.vault.ensure_login()
        ttl = self.grant_ttl(request, max_ttl)

        def payload(lease: Lease) -> dict[str, Any]:
            user, password = lease.data["username"], lease.data["password"]
            return {
                "kind": "postgres",
                "target": request.target,
                "request": str(request.id),
                "username": user,
                "password": password,
                "psql": psql_url(target, user, password),
                "expires_at": (now + ttl).isoformat(),
            }

        lease, wrapped = await self._wrapped_login(
            target, ttl, self.config.vault.access_wrap_ttl, payload
        )
        minted = Minted(
            "postgres", ttl, max_ttl, lease_id=lease.lease_id, wrap_accessor=wrapped.accessor
        )
        return AccessLogin(minted, wrapped.token)

    async def access_certificate(
        self, request: RequestRow, target: SshTarget, max_ttl: timedelta, public_key: str
    ) -> AccessCertificate:
        """A person's own key signed for the target's principal: a pty, no force-command."""
        await self.vault.ensure_login()
        ttl = self.grant_ttl(request, max_ttl)
        options = {"source-address": target.source_address} if target.source_address else {}
        certificate, serial = await self.vault.sign_ssh_key(
            f"{self.config.vault.ssh_mount}/sign/{target.vault.ssh_role}",
            public_key,
            principal=target.principal,
            ttl=ttl,
            critical_options=options,
            extensions={"permit-pty": ""},
        )
        return AccessCertificate(Minted("ssh", ttl, ttl, serial=serial), certificate)

    async def unmint(self, minted: Minted) -> None:
        if minted.lease_id:
            await self.vault.revoke_lease(minted.lease_id)

    async def revoke(self, grant: GrantRow) -> None:
        """Revoke a grant's lease (idempotent); an SSH grant has none to revoke."""
        if grant.lease_id:
            await self.vault.ensure_login()
            await self.vault.revoke_lease(grant.lease_id)

    async def renew(self, grant: GrantRow, ttl: timedelta) -> timedelta:
        if not grant.lease_id:
            raise InvalidInput("this grant has no lease to renew")
        await self.vault.ensure_login()
        return timedelta(seconds=await self.vault.renew_lease(grant.lease_id, ttl))

    def lease_prefixes(self) -> list[str]:
        """Where this bot's leases live: the orphan sweep lists these."""
        mount = self.config.vault.database_mount
        roles = {t.vault.write_role for t in self.config.policy.postgres_targets().values()}
        return [f"{mount}/creds/{role}/" for role in sorted(roles)]
