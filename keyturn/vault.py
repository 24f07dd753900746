"""The one place that talks to Vault / OpenBao.

hvac is blocking, so every call runs in a worker thread (a pool of its own, so a sweep that
revokes hundreds of leases at once is not throttled by the loop's small default executor) and
the event loop never waits on the network. The reads on an agent's hot path (an HTTP
target's key, read for every call it sends) go over aiohttp instead: a thread hop and
requests' overhead cost more than the read (1.1 ms against 0.44 ms p50 on OpenBao).
Failures become keyturn errors that say what is wrong and what to do:
:class:`VaultUnavailable` (down or unreachable), :class:`VaultSealed`, :class:`VaultForbidden`
(the token's policy refuses), :class:`VaultUnauthenticated`.

A process logs in once with AppRole and a background task renews its token at two thirds of
its TTL, logging in again when renewal is refused or the token reaches its max TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import aiohttp
import hvac
import hvac.exceptions
import requests

from keyturn.aio import cancel
from keyturn.backoff import Backoff
from keyturn.errors import ConfigError, Forbidden, KeyturnError, NotFound, Unavailable

if TYPE_CHECKING:
    from keyturn.config.policy import Config
    from keyturn.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

THREADS = 16  # concurrent Vault calls per process


class VaultUnavailable(Unavailable):
    code = "vault_unavailable"


class VaultSealed(VaultUnavailable):
    code = "vault_sealed"


class VaultForbidden(Forbidden):
    code = "vault_forbidden"


class VaultUnauthenticated(VaultForbidden):
    code = "vault_unauthenticated"


class WrapTokenInvalid(VaultForbidden):
    """Already unwrapped, expired or never issued: treat a second use as a possible leak."""

    code = "wrap_token_invalid"


class VaultRequestError(KeyturnError):
    """Vault understood the request and refused it as invalid (a 400)."""

    code = "vault_bad_request"
    status = 502


@dataclass(frozen=True)
class AppRoleLogin:
    role_id: str
    secret_id: str
    mount: str = "approle"


@dataclass(frozen=True)
class WrapInfo:
    token: str
    accessor: str
    ttl: int
    creation_path: str


@dataclass(frozen=True)
class Lease:
    lease_id: str
    duration: int
    renewable: bool
    data: dict[str, Any]


def _first(errors: list[str] | None) -> str:
    return "; ".join(e for e in errors or [] if e).strip() or "no detail"


def _translate(exc: BaseException, addr: str, what: str) -> KeyturnError:
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return VaultUnavailable(
            f"Vault at {addr} is not reachable ({what}): is it running and is the address right?"
        )
    if isinstance(exc, hvac.exceptions.VaultDown):
        return VaultSealed(f"Vault at {addr} is sealed ({what}): unseal it, then retry")
    if isinstance(exc, hvac.exceptions.VaultNotInitialized):
        return VaultUnavailable(f"Vault at {addr} is not initialized ({what})")
    if isinstance(exc, hvac.exceptions.Unauthorized):
        return VaultUnauthenticated(f"Vault refused the token ({what}): {_first(exc.errors)}")
    if isinstance(exc, hvac.exceptions.Forbidden):
        return VaultForbidden(f"Vault refused {what}: permission denied by policy")
    if isinstance(exc, hvac.exceptions.InvalidPath):
        return NotFound(f"Vault has nothing at {what}")
    if isinstance(exc, hvac.exceptions.InvalidRequest):
        return VaultRequestError(f"Vault rejected {what}: {_first(exc.errors)}")
    if isinstance(exc, hvac.exceptions.VaultError):
        return VaultUnavailable(f"Vault at {addr} failed on {what}: {_first(exc.errors)}")
    return VaultUnavailable(f"Vault at {addr} failed on {what}: {type(exc).__name__}")


class Vault:
    """An async facade over one hvac client. Create it, then ``await login()`` or pass a token."""

    def __init__(
        self,
        addr: str,
        *,
        token: str | None = None,
        approle: AppRoleLogin | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
    ) -> None:
        self.addr = addr.rstrip("/")
        self._approle = approle
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=THREADS)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._client = hvac.Client(
            url=self.addr, token=token, timeout=timeout, verify=verify, session=session
        )
        self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="keyturn-vault")
        self._timeout = timeout
        self._verify = verify
        self._renewer: asyncio.Task[None] | None = None
        self._aio: aiohttp.ClientSession | None = None  # the hot path's reads
        self._login_lock = asyncio.Lock()
        self._token_ttl = 0

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
            raise _translate(exc, self.addr, what) from None

    # ------------------------------------------------------------ generic paths

    async def read(self, path: str, *, wrap_ttl: str | None = None) -> dict[str, Any] | None:
        """GET; None when nothing is there."""
        result = await self._call(path, self._client.read, path, wrap_ttl=wrap_ttl)
        return result if isinstance(result, dict) else None

    async def write(
        self, path: str, data: dict[str, Any] | None = None, *, wrap_ttl: str | None = None
    ) -> dict[str, Any] | None:
        result = await self._call(
            path, self._client.write_data, path, data=data or {}, wrap_ttl=wrap_ttl
        )
        return result if isinstance(result, dict) else None

    async def list_keys(self, path: str) -> list[str]:
        result = await self._call(path, self._client.list, path)
        if not isinstance(result, dict):
            return []
        keys: list[str] = result.get("data", {}).get("keys", [])
        return keys

    async def delete(self, path: str) -> None:
        await self._call(path, self._client.delete, path)

    async def read_text(self, path: str) -> str:
        """GET a raw (non-JSON) endpoint such as ``ssh/public_key``."""
        url = f"{self.addr}/v1/{path}"

        def get() -> str:
            resp = requests.get(url, timeout=self._timeout, verify=self._verify)
            if resp.status_code == 503:
                raise hvac.exceptions.VaultDown(errors=["sealed"])
            if resp.status_code >= 400:
                raise hvac.exceptions.InvalidRequest(errors=[resp.text.strip()[:200]])
            return resp.text

        return await self._call(path, get)

    # ------------------------------------------------------------ auth and token upkeep

    @property
    def token(self) -> str | None:
        token: str | None = self._client.token
        return token

    async def ensure_login(self) -> None:
        """Log in once, on first use; a process can start while Vault is still down."""
        if self._approle is not None and self._renewer is None:
            async with self._login_lock:
                if self._renewer is None:
                    await self.login()

    async def login(self) -> None:
        """AppRole login (no-op for token clients); starts the renewal task."""
        if self._approle is None:
            return
        login = self._approle
        try:
            resp = await self._call(
                f"auth/{login.mount}/login",
                self._client.auth.approle.login,
                role_id=login.role_id,
                secret_id=login.secret_id,
                mount_point=login.mount,
            )
        except (VaultRequestError, VaultForbidden) as exc:
            raise VaultUnauthenticated(
                f"Vault refused the AppRole login at auth/{login.mount}: the role_id or secret_id "
                "is wrong, expired or used up (check KEYTURN_*_ROLE_ID and KEYTURN_*_SECRET_ID)"
            ) from exc
        self._token_ttl = int(resp["auth"]["lease_duration"])
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_loop(), name="keyturn-vault-renewer")

    async def _renew_loop(self) -> None:
        backoff = Backoff(2.0, 60.0)
        while True:
            await asyncio.sleep(max(self._token_ttl * 2 / 3, 1.0))
            try:
                resp = await self._call("auth/token/renew-self", self._client.auth.token.renew_self)
                granted = int(resp["auth"]["lease_duration"])
                # Near max TTL Vault grants less than asked: log in again rather than run dry.
                if granted < self._token_ttl / 2:
                    await self.login()
                else:
                    self._token_ttl = granted
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except KeyturnError as exc:
                log.warning("Vault token renewal failed (%s); logging in again", exc.message)
                try:
                    await self.login()
                except KeyturnError as again:
                    log.warning("Vault login failed: %s", again.message)
                    self._token_ttl = max(1, round(backoff.next()))
            except Exception:  # never a silently dead renewer: the token would just run out
                log.exception("Vault token renewal failed unexpectedly; retrying")
                self._token_ttl = max(1, round(backoff.next()))

    async def close(self) -> None:
        await cancel(self._renewer)
        self._renewer = None
        if self._aio is not None:
            await self._aio.close()
            self._aio = None
        with contextlib.suppress(Exception):
            self._client.adapter.close()
        self._threads.shutdown(wait=False)

    async def health(self) -> dict[str, Any]:
        """Raises VaultSealed / VaultUnavailable unless Vault is initialized and unsealed."""
        result = await self._call("sys/health", self._client.sys.read_health_status, method="GET")
        if isinstance(result, dict):
            return result
        if result.status_code == 503:
            raise VaultSealed(f"Vault at {self.addr} is sealed: unseal it, then retry")
        if result.status_code >= 500:
            raise VaultUnavailable(f"Vault at {self.addr} is unhealthy ({result.status_code})")
        body: dict[str, Any] = result.json()
        return body

    # ------------------------------------------------------------ secrets

    async def wrapped_read(self, path: str, wrap_ttl: timedelta) -> WrapInfo:
        """Read ``path`` into a single-use wrapping token instead of plain data."""
        result = await self.read(path, wrap_ttl=f"{int(wrap_ttl.total_seconds())}s")
        return _wrap_info(path, result)

    async def wrap(self, data: dict[str, Any], wrap_ttl: timedelta) -> WrapInfo:
        result = await self.write(
            "sys/wrapping/wrap", data, wrap_ttl=f"{int(wrap_ttl.total_seconds())}s"
        )
        return _wrap_info("sys/wrapping/wrap", result)

    async def lookup_wrapping(self, wrapping_token: str) -> dict[str, Any]:
        """``creation_path`` and TTL of a wrapping token, without consuming it."""
        result = await self.write("sys/wrapping/lookup", {"token": wrapping_token})
        if result is None:
            raise NotFound("wrapping token is not valid")
        data: dict[str, Any] = result["data"]
        return data

    async def unwrap(self, wrapping_token: str) -> dict[str, Any]:
        """Consume a wrapping token (once). The token itself authenticates the call."""
        client = hvac.Client(
            url=self.addr, token=wrapping_token, timeout=self._timeout, verify=self._verify
        )
        try:
            result = await self._call("sys/wrapping/unwrap", client.sys.unwrap)
        except (VaultRequestError, VaultForbidden) as exc:
            raise WrapTokenInvalid(
                "the wrapping token is not valid: already used, expired, or never issued"
            ) from exc
        finally:
            client.adapter.close()
        return dict(result)

    async def creds(self, role_path: str) -> Lease:
        """Read dynamic credentials directly (the gateway's read-only pool uses this)."""
        result = await self.read(role_path)
        if result is None:
            raise NotFound(f"Vault has no role at {role_path}")
        return Lease(
            lease_id=result["lease_id"],
            duration=int(result["lease_duration"]),
            renewable=bool(result["renewable"]),
            data=result["data"],
        )

    async def sign_ssh_key(
        self,
        path: str,
        public_key: str,
        *,
        principal: str,
        ttl: timedelta,
        critical_options: dict[str, str],
        extensions: dict[str, str] | None = None,
    ) -> tuple[str, str]:
        """Have the SSH CA at ``path`` (``<mount>/sign/<role>``) sign a user key.

        Returns ``(certificate, serial)``. No extensions unless given: no pty, no forwarding.
        """
        result = await self.write(
            path,
            {
                "public_key": public_key,
                "valid_principals": principal,
                "cert_type": "user",
                "ttl": f"{int(ttl.total_seconds())}s",
                "critical_options": critical_options,
                "extensions": extensions or {},
            },
        )
        data = (result or {}).get("data") or {}
        if not data.get("signed_key"):
            raise VaultRequestError(f"Vault returned no certificate from {path}")
        return str(data["signed_key"]), str(data.get("serial_number", ""))

    async def _fast_read(self, path: str) -> dict[str, Any]:
        """GET ``path`` over aiohttp on the event loop. A failure is mapped by its status as
        hvac maps it, then worded by :func:`_translate`, as every other Vault call's is (the
        response body is never quoted beyond Vault's own ``errors``)."""
        if self._aio is None or self._aio.closed:
            verify: ssl.SSLContext | bool = self._verify is not False
            if isinstance(self._verify, str):
                verify = ssl.create_default_context(cafile=self._verify)
            self._aio = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=verify),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                trust_env=False,
            )
        headers = {"X-Vault-Token": self.token or ""}
        try:
            async with self._aio.get(f"{self.addr}/v1/{path}", headers=headers) as resp:
                status = resp.status
                text = await resp.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            unreachable = requests.exceptions.ConnectionError()  # worded as the hvac path words it
            raise _translate(unreachable, self.addr, path) from exc
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if status == 200 and isinstance(body, dict):
            return body
        errors = body.get("errors") if isinstance(body, dict) else None
        error = hvac.exceptions.VaultError.from_status(status, errors=errors)
        raise _translate(error, self.addr, path) from None

    async def kv_secret(self, mount: str, path: str) -> dict[str, Any]:
        """A KV v2 secret's current fields, read anew each time (a rotation takes effect at
        the next call). Errors name the path, never a value."""
        result = await self._fast_read(f"{mount}/data/{path}")
        data = ((result or {}).get("data") or {}).get("data")
        if not isinstance(data, dict):
            raise NotFound(f"Vault has no KV v2 secret at {mount}/{path}")
        return data

    async def identity_token(self, role: str) -> str:
        """A short-lived JWT from Vault's identity OIDC provider, for this login's entity."""
        result = await self._fast_read(f"identity/oidc/token/{role}")
        token = ((result or {}).get("data") or {}).get("token")
        if not isinstance(token, str) or not token:
            raise VaultRequestError(f"Vault gave no token for identity/oidc/token/{role}")
        return token

    async def renew_lease(self, lease_id: str, increment: timedelta) -> int:
        """Renew by ``increment`` (always pass one: none *shortens* to the default TTL)."""
        result = await self.write(
            f"sys/leases/renew/{lease_id}", {"increment": int(increment.total_seconds())}
        )
        return int(result["lease_duration"]) if result else 0

    async def revoke_lease(self, lease_id: str) -> None:
        """Revoke now (path form, so policies can scope it to a role's prefix). Idempotent."""
        await self._call(
            f"sys/leases/revoke/{lease_id}",
            self._client.adapter.put,
            f"/v1/sys/leases/revoke/{lease_id}",
        )

    async def lease_ids(self, prefix: str) -> list[str]:
        """Every lease under ``prefix`` (e.g. ``database/creds/orders-rw/``)."""
        prefix = prefix.rstrip("/") + "/"
        return [prefix + key for key in await self.list_keys(f"sys/leases/lookup/{prefix}")]


def process_vault(settings: Settings, config: Config, process: Literal["gateway", "bot"]) -> Vault:
    """A process's own Vault client (its AppRole), or one clear line saying what is missing."""
    if process == "gateway":
        role_id, secret = settings.gateway_role_id, settings.gateway_secret_id
    else:
        role_id, secret = settings.bot_role_id, settings.bot_secret_id
    return approle_vault(
        settings.vault_addr or config.vault.addr,
        role_id,
        secret.get_secret_value() if secret else None,
        config.vault.approle_mount,
        process,
    )


def approle_vault(
    addr: str | None, role_id: str | None, secret_id: str | None, mount: str, process: str
) -> Vault:
    if not addr:
        raise ConfigError("no Vault address: set vault.addr in the config or KEYTURN_VAULT_ADDR")
    if not (role_id and secret_id):
        env = f"KEYTURN_{process.upper()}"
        raise ConfigError(
            f"the {process} needs its Vault AppRole: set {env}_ROLE_ID and {env}_SECRET_ID"
        )
    return Vault(addr, approle=AppRoleLogin(role_id, secret_id, mount))


def _wrap_info(path: str, result: dict[str, Any] | None) -> WrapInfo:
    info = (result or {}).get("wrap_info")
    if not info:
        raise VaultRequestError(f"Vault returned no wrapping token for {path}")
    return WrapInfo(
        token=info["token"],
        accessor=info["accessor"],
        ttl=int(info["ttl"]),
        creation_path=info["creation_path"],
    )
