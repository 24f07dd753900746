"""Delivering access: mint a login or certificate and DM it to the person who asked.

The credentials are in the DM and nowhere else (not in the card, the database or a log).
"""

from __future__ import annotations

from dataclasses import dataclass

from slack_sdk.web.async_client import AsyncWebClient

from bot.access import views
from bot.credentials import Issuer
from bot.people import SLACK_ERRORS, SlackUnavailable, dm
from keyturn.config.policy import Config
from keyturn.config.rules import AccessRule
from keyturn.config.targets import PostgresTarget, SshTarget
from keyturn.errors import InvalidInput
from keyturn.store import ssh_keys
from keyturn.store.db import Store
from keyturn.store.grants import Minted
from keyturn.store.models import RequestRow


@dataclass
class Delivery:
    config: Config
    store: Store
    client: AsyncWebClient
    issuer: Issuer

    async def deliver(self, request: RequestRow) -> Minted:
        """Issue access and DM it to its requester (``grants.issue``'s mint for a person's access).

        Raised errors change nothing: what was minted is revoked here when the DM fails, so a
        retry (Slack back) issues afresh. The credentials are in the DM and nowhere else.
        """
        rule = self.config.policy.access_rule(request.rule)
        if rule is None:
            raise InvalidInput(f"the access rule {request.rule!r} is no longer in the policy")
        target = self.config.policy.targets.get(request.target)
        if isinstance(target, PostgresTarget):
            minted, text = await self._login(request, target, rule)
        elif isinstance(target, SshTarget):
            minted, text = await self._certificate(request, target, rule)
        else:
            raise InvalidInput(f"target {request.target} is not in the policy any more")
        try:
            await dm(self.client, request.requester, text)
        except SLACK_ERRORS as exc:
            await self.issuer.unmint(minted)
            raise SlackUnavailable(f"Slack did not take the credentials DM ({exc})") from None
        return minted

    async def _login(
        self, request: RequestRow, target: PostgresTarget, rule: AccessRule
    ) -> tuple[Minted, str]:
        now = self.store.clock.now()
        login = await self.issuer.access_login(request, target, rule.max_duration, now)
        text = views.delivery(
            request_id=str(request.id),
            target=request.target,
            expires_at=now + login.minted.ttl,
            ttl=login.minted.ttl,
            vault_addr=self.config.vault.public_addr or self.issuer.vault.addr,
            wrap_ttl=self.config.vault.access_wrap_ttl,
            wrapping_token=login.wrapping_token,
        )
        return login.minted, text

    async def _certificate(
        self, request: RequestRow, target: SshTarget, rule: AccessRule
    ) -> tuple[Minted, str]:
        approved = (request.classification or {}).get("key")
        keys = await ssh_keys.keys_of(self.store, request.requester)
        key = next((k for k in keys if k.fingerprint == approved), None)
        if key is None:
            raise InvalidInput(
                f"the key {approved} this access was approved for is no longer registered;"
                " ask again"
            )
        now = self.store.clock.now()
        signed = await self.issuer.access_certificate(
            request, target, rule.max_duration, key.public_key
        )
        text = views.certificate_delivery(
            request_id=str(request.id),
            target=request.target,
            principal=target.principal,
            host=target.host,
            port=target.port,
            algorithm=key.algorithm,
            fingerprint=key.fingerprint,
            expires_at=now + signed.minted.ttl,
            certificate=signed.certificate,
        )
        return signed.minted, text
