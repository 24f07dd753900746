"""JIT credentials end to end: real OpenBao, real Postgres, real sshd, the Slack emulator.

An approval makes Vault mint credentials that only the gateway sees, for exactly the approved
command, and that die on time: when the command has run, at the grant's expiry (through the
scheduler), at a click on Revoke now, or when the orphan sweep finds a lease nobody recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

import asyncpg
import asyncssh
import pytest
import pytest_asyncio
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot import card_store
from bot.cards import APPROVE, EXTEND, REVOKE
from bot.credentials import Issuer
from bot.revocation import Revoker
from bot.service import Bot
from keyturn.config.loading import parse_config
from keyturn.harness.idp import DevIdP
from keyturn.harness.slack import SlackEmulator
from keyturn.harness.sshd import SshServer
from keyturn.store import grants, handoffs, requests
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from keyturn.vault import Vault
from tests.integration.conftest import GatewayFactory, Shop, Spy, TcpProxy, serve_bot

CHANNEL = "CJIT"
APPROVER = "U_APPROVER"
UPDATE = "UPDATE orders SET status = 'paid' WHERE id = 3"


def jit_policy(shop: Shop, sshd: SshServer | None = None, **overrides: Any) -> dict[str, Any]:
    """The shop's policy plus Slack, bot timings and (with an sshd) a real SSH target."""
    data = json.loads(json.dumps(shop.base_policy))
    data["slack"] = {"approval_channel": CHANNEL}
    data["bot"] = {"poll_interval": "500ms", **overrides.pop("bot", {})}
    if sshd is not None:
        data["targets"]["web"].update(port=sshd.port, host_key=sshd.host_public_key)
        data["rules"].insert(
            0,
            {
                "name": "whoami",
                "target": "web",
                "match": {"shell": ["id -un"]},
                "action": "hold",
                "approvers": {"users": [APPROVER]},
                "grant_ttl": overrides.pop("ssh_grant_ttl", "5m"),
            },
        )
    for rule in data["rules"]:
        if rule["name"] == "writes":
            rule.update(overrides.pop("writes", {}))
    data.update(overrides)
    return data


@dataclass
class RunningBot:
    bot: Bot
    store: Store
    slack: SlackEmulator

    async def hold(self, command: str = UPDATE, target: str = "shop", **fields: Any) -> uuid.UUID:
        rule = "whoami" if target == "web" else "writes"
        new = requests.NewRequest(
            **(
                {
                    "target": target,
                    "command": command,
                    "requester": "crew-billing",
                    "pending_ttl": timedelta(minutes=15),
                    "rule": rule,
                    "grant_ttl": timedelta(minutes=5),
                }
                | fields
            )
        )
        row, _ = await requests.create_request(self.store, new)
        return row.id

    async def approve(self, request_id: uuid.UUID) -> str:
        ts = await until(lambda: _card(self.store, request_id))
        status, _ = await self.slack.click(CHANNEL, ts, APPROVE, APPROVER)
        assert status == 200
        return ts

    async def grant(self, request_id: uuid.UUID) -> Any:
        return await until(lambda: _grant_of(self.store, request_id))

    async def approved(self, **fields: Any) -> tuple[uuid.UUID, Any]:
        """A held request, approved by click, with the grant the bot issued for it."""
        request_id = await self.hold(**fields)
        await self.approve(request_id)
        return request_id, await self.grant(request_id)

    async def status(self, request_id: uuid.UUID) -> str:
        return (await requests.get_request(self.store, request_id)).status


async def _card(store: Store, request_id: uuid.UUID) -> str | None:
    posted = await card_store.posted_at(store, request_id)
    return posted[1] if posted else None


async def _grant_of(store: Store, request_id: uuid.UUID) -> Any:
    async with store.transaction() as tx:
        return await grants.newest_grant(tx, request_id)


async def until(check: Callable[[], Any], timeout: float = 20) -> Any:
    """Poll ``check`` (async) until it returns something truthy."""
    async with asyncio.timeout(timeout):
        while not (value := await check()):
            await asyncio.sleep(0.05)
    return value


BotFactory = Callable[..., contextlib.AbstractAsyncContextManager[RunningBot]]


@pytest_asyncio.fixture
async def slack() -> AsyncIterator[SlackEmulator]:
    emulator = SlackEmulator()
    await emulator.start()
    for user in (APPROVER, "U_MALLORY"):
        emulator.add_user(user)
    yield emulator
    await emulator.stop()


@pytest.fixture
def run_bot(slack: SlackEmulator, database: Dsn, shop: Shop, spy: Spy) -> BotFactory:
    @contextlib.asynccontextmanager
    async def start(
        data: dict[str, Any] | None = None, vault: Vault | None = None
    ) -> AsyncIterator[RunningBot]:
        config = parse_config(data or jit_policy(shop))
        watched = spy.watch(vault or shop.bot_vault())
        async with serve_bot(slack, config, database, watched) as bot, Store(database) as store:
            yield RunningBot(bot, store, slack)

    return start


async def claim_as_gateway(shop: Shop, store: Store, request_id: uuid.UUID) -> dict[str, Any]:
    """Play the gateway: take the hand-off and unwrap it (what a real one does first)."""
    handoff = await until(lambda: handoffs.claim_handoff(store, request_id))
    vault = shop.vault()
    try:
        payload: dict[str, Any] = (await vault.unwrap(handoff.token))["data"]
    finally:
        await vault.close()
    return payload


async def lease_ttl(shop: Shop, lease_id: str) -> int | None:
    root = shop.root_vault()
    try:
        found = await root.write("sys/leases/lookup", {"lease_id": lease_id})
    except Exception:
        return None
    finally:
        await root.close()
    return int((found or {})["data"]["ttl"])


# ------------------------------------------------------------------ the whole path


async def test_an_approved_update_runs_once_and_its_role_dies(
    shop: Shop, run_bot: BotFactory, run_gateway: GatewayFactory, idp: DevIdP, scan: Scan
) -> None:
    await shop.postgres.execute("UPDATE orders SET status = 'open' WHERE id = 3", shop.database)
    before = set(await shop.dynamic_roles())
    token = idp.token("crew-billing")
    slow = f"{UPDATE} AND pg_sleep(1.5) IS NOT NULL"  # keeps the role busy for a moment
    async with run_bot(jit_policy(shop)) as rb, run_gateway() as gw:
        status, held = await gw.post(token, {"target": "shop", "command": slow})
        assert status == 202, held
        request_id = uuid.UUID(held["id"])
        await rb.approve(request_id)
        waiting = asyncio.create_task(gw.get(token, held["id"], wait=30))
        # while the command runs, its own role exists in the target
        await until(lambda: _eq(rb.status(request_id), "executing"))
        running = set(await shop.dynamic_roles()) - before
        assert len(running) == 1
        status, done = await waiting
        assert status == 200 and done["status"] == "executed", done
        assert done["result"]["tags"] == ["UPDATE 1"], done
        # one-shot: revoked as soon as the command has run, and the role is gone
        grant = await until(lambda: _ended(rb.store, request_id))
        assert grant.status == "revoked"
        await until(lambda: _gone(shop, running))
        rows = await shop.postgres.fetch("SELECT status FROM orders WHERE id = 3", shop.database)
        assert rows[0][0] == "paid"
    assert any(not s.startswith("-----") for s in scan.spy.secrets), "a password was wrapped"
    await scan.nowhere([held, done])


@dataclass
class Scan:
    spy: Spy
    database: Dsn
    slack: SlackEmulator
    caplog: pytest.LogCaptureFixture

    async def nowhere(self, responses: list[Any]) -> None:
        await assert_nowhere(self, json.dumps(responses))


@pytest.fixture
def scan(spy: Spy, database: Dsn, slack: SlackEmulator, caplog: pytest.LogCaptureFixture) -> Scan:
    """Everything the credentials must never reach, with every logger at DEBUG."""
    caplog.set_level(logging.DEBUG)
    return Scan(spy, database, slack, caplog)


async def assert_nowhere(scan: Scan, responses: str) -> None:
    """The real secrets appear in no log, database row, API response or Slack message."""
    database, slack, caplog, secrets = scan.database, scan.slack, scan.caplog, scan.spy.secrets
    conn = await asyncpg.connect(database.url, **database.connect_args)
    try:
        dump = []
        for table in ("requests", "approvals", "grants", "audit_events"):
            dump += [
                json.dumps(dict(r), default=str) for r in await conn.fetch(f"SELECT * FROM {table}")
            ]
    finally:
        await conn.close()
    places = {
        "logs": caplog.text,
        "database": "\n".join(dump),
        "api": responses,
        "slack": json.dumps([c.args for c in slack.calls], default=str),
    }
    for secret in secrets:
        for place, text in places.items():
            assert secret not in text, f"a credential leaked into {place}"
            for line in secret.splitlines()[1:-1]:  # any line of a private key
                assert line not in text, f"part of a private key leaked into {place}"


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _ended(store: Store, request_id: uuid.UUID) -> Any:
    grant = await _grant_of(store, request_id)
    return grant if grant is not None and grant.status != "active" else None


async def _gone(shop: Shop, roles: set[str]) -> bool:
    return not roles & set(await shop.dynamic_roles())


# ------------------------------------------------------------------ expiry and revocation


async def test_a_grant_expires_through_the_scheduler_and_its_sessions_die(
    shop: Shop, run_bot: BotFactory
) -> None:
    data = jit_policy(shop, bot={"sweep_interval": "1h"})  # only the date job can end it
    async with run_bot(data) as rb:
        request_id = await rb.hold(grant_ttl=timedelta(seconds=3))
        await rb.approve(request_id)
        creds = await claim_as_gateway(shop, rb.store, request_id)
        grant = await rb.grant(request_id)
        assert rb.bot.revoker.scheduled(grant.id) == grant.expires_at
        await _outlive(shop, grant.lease_id)
        session = await _login(shop, creds)
        assert await session.fetchval("SELECT 1") == 1
        ended = await until(lambda: _ended(rb.store, request_id), timeout=30)
        assert ended.status == "expired" and ended.ended_by == "keyturn"
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
            await session.fetchval("SELECT 1")
        assert creds["username"] not in await shop.dynamic_roles()
        # the command never ran: the agent hears why
        row = await requests.get_request(rb.store, request_id)
        assert row.status == "executing"  # claimed by our stand-in gateway, which never ran it


async def _outlive(shop: Shop, lease_id: str) -> None:
    """Vault's own lease TTL is the grant's (the last backstop); stretch it so that only
    keyturn's revocation can end the credentials."""
    root = shop.root_vault()
    await root.renew_lease(lease_id, timedelta(minutes=10))
    await root.close()


async def _login(shop: Shop, creds: dict[str, Any]) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=shop.postgres.port,
        database=shop.database,
        user=creds["username"],
        password=creds["password"],
    )


async def test_a_restarted_bot_revokes_what_fell_due_while_it_was_down(
    shop: Shop, run_bot: BotFactory, store: Store
) -> None:
    data = jit_policy(shop, bot={"sweep_interval": "1h"})
    async with run_bot(data) as rb:
        request_id = await rb.hold(grant_ttl=timedelta(seconds=2))
        await rb.approve(request_id)
        grant = await rb.grant(request_id)
    await _outlive(shop, grant.lease_id)
    await asyncio.sleep(2.5)  # due while no bot runs
    assert (await grants.get_grant(store, grant.id)).status == "active"
    assert await lease_ttl(shop, grant.lease_id) is not None
    async with run_bot(data) as rb:
        ended = await until(lambda: _ended(rb.store, request_id))
        assert ended.status == "expired"
        assert await lease_ttl(shop, grant.lease_id) is None
        row = await requests.get_request(rb.store, request_id)
        assert row.status == "failed" and "expired before" in (row.error or "")


async def test_an_orphan_lease_is_revoked_by_the_sweep(shop: Shop, run_bot: BotFactory) -> None:
    # the bot died between Vault and Postgres: a lease exists that no grant records
    vault = shop.bot_vault()
    await vault.login()
    orphan = await vault.creds("database/creds/shop-rw")
    await vault.close()
    data = jit_policy(shop, bot={"sweep_interval": "300ms", "orphan_grace": "1s"})
    async with run_bot(data) as rb:
        request_id = await rb.hold()
        await rb.approve(request_id)
        known = await rb.grant(request_id)
        # recorded once Vault confirmed: the lease is gone before its audit event is written
        events = await until(lambda: _audit(rb.store, "lease.orphan_revoked"))
        assert orphan.lease_id in json.dumps(events)
        assert await _lease_gone(shop, orphan.lease_id)
        assert await lease_ttl(shop, known.lease_id), "a recorded lease is not an orphan"
        assert orphan.data["username"] not in await shop.dynamic_roles()


async def _lease_gone(shop: Shop, lease_id: str) -> bool:
    return await lease_ttl(shop, lease_id) is None


async def _audit(store: Store, kind: str) -> list[dict[str, Any]]:
    async with store.raw_connection() as conn:
        rows = await conn.fetch("SELECT data FROM audit_events WHERE kind = $1", kind)
    return [json.loads(r["data"]) if isinstance(r["data"], str) else r["data"] for r in rows]


async def test_extend_and_revoke_now_by_click(
    shop: Shop, run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold(grant_ttl=timedelta(minutes=5))
        ts = await rb.approve(request_id)
        grant = await rb.grant(request_id)
        extend = f"{EXTEND}_{15 * 60}"
        await until(lambda: _has_button(slack, ts, extend))
        card = json.dumps(slack.message(CHANNEL, ts).blocks)
        assert REVOKE in card and f"{EXTEND}_{60 * 60}" not in card  # 1 h is past the max TTL

        await slack.click(CHANNEL, ts, extend, "U_MALLORY")
        await slack.wait_for("chat.postEphemeral")
        assert (await grants.get_grant(rb.store, grant.id)).expires_at == grant.expires_at

        await slack.click(CHANNEL, ts, extend, APPROVER)
        longer = await until(lambda: _moved(rb.store, grant))
        assert longer.expires_at - grant.expires_at >= timedelta(minutes=14)
        assert (await lease_ttl(shop, grant.lease_id) or 0) > 18 * 60  # Vault's lease too
        assert rb.bot.revoker.scheduled(grant.id) == longer.expires_at  # and the job

        await slack.click(CHANNEL, ts, REVOKE, APPROVER)
        ended = await until(lambda: _ended(rb.store, request_id))
        assert ended.status == "revoked" and ended.ended_by == APPROVER
        assert await lease_ttl(shop, grant.lease_id) is None
        assert rb.bot.revoker.scheduled(grant.id) is None
        row = await requests.get_request(rb.store, request_id)
        assert row.status == "failed" and APPROVER in (row.error or "")
        await until(
            lambda: _true(
                f"revoked by <@{APPROVER}>" in json.dumps(slack.message(CHANNEL, ts).blocks)
            )
        )
        assert REVOKE not in json.dumps(slack.message(CHANNEL, ts).blocks)


async def _has_button(slack: SlackEmulator, ts: str, action_id: str) -> bool:
    return action_id in json.dumps(slack.message(CHANNEL, ts).blocks)


async def _moved(store: Store, grant: Any) -> Any:
    now = await grants.get_grant(store, grant.id)
    return now if now.expires_at != grant.expires_at else None


async def _true(value: bool) -> bool:
    return value


# ------------------------------------------------------------------ Vault trouble


async def test_vault_down_at_approval_issues_later_exactly_once(
    shop: Shop, run_bot: BotFactory, slack: SlackEmulator
) -> None:
    proxy = TcpProxy(shop.openbao.port)  # not up yet: Vault is unreachable
    vault = Vault(proxy.addr, approle=shop.bot_vault()._approle, timeout=2)
    async with run_bot(vault=vault) as rb:
        request_id = await rb.hold()
        ts = await rb.approve(request_id)
        await until(
            lambda: _true("Credentials pending" in json.dumps(slack.message(CHANNEL, ts).blocks))
        )
        row = await requests.get_request(rb.store, request_id)
        assert row.status == "approved" and row.issue_attempts >= 1
        await proxy.up()
        grant = await rb.grant(request_id)
        await until(
            lambda: _true("Credentials active" in json.dumps(slack.message(CHANNEL, ts).blocks))
        )
        await asyncio.sleep(1)  # more passes: still one grant, one lease
        async with rb.store.raw_connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM grants") == 1
        assert await lease_ttl(shop, grant.lease_id)
    await proxy.down()


async def test_a_gateway_waits_out_a_vault_blip_while_the_handoff_lives(
    shop: Shop, run_bot: BotFactory, run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    proxy = TcpProxy(shop.openbao.port)  # the gateway's view of Vault: down for now
    vault = Vault(proxy.addr, approle=shop.vault()._approle, timeout=2)
    async with run_bot() as rb, run_gateway(vault=vault) as gw:
        status, held = await gw.post(token, {"target": "shop", "command": UPDATE})
        assert status == 202, held
        request_id = uuid.UUID(held["id"])
        await rb.approve(request_id)
        await until(lambda: _eq(rb.status(request_id), "executing"))  # claimed, cannot unwrap
        await asyncio.sleep(1)
        await proxy.up()
        status, done = await gw.get(token, held["id"], wait=30)
        assert status == 200 and done["status"] == "executed", done
    await proxy.down()


# ------------------------------------------------------------------ the hand-off


async def test_a_stolen_handoff_runs_nothing(
    shop: Shop, run_bot: BotFactory, run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    async with run_bot() as rb:
        request_id, grant = await rb.approved()
        async with (
            rb.store.raw_connection() as conn
        ):  # someone reads the wrapping token and uses it
            stolen = await conn.fetchval("SELECT handoff_token FROM grants WHERE id = $1", grant.id)
        thief = shop.vault()
        await thief.unwrap(stolen)
        await thief.close()
        async with run_gateway() as gw:
            _status, body = await gw.get(token, str(request_id), wait=20)
        assert body["status"] == "failed" and "wrapping token is not valid" in body["error"]
        ended = await until(lambda: _ended(rb.store, request_id))
        assert ended.status == "revoked"  # and the lease the thief saw is dead
        assert await lease_ttl(shop, grant.lease_id) is None


async def test_a_handoff_not_wrapped_by_keyturn_is_refused(
    shop: Shop, run_bot: BotFactory, run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    token = idp.token("crew-billing")
    async with run_bot() as rb:
        request_id, grant = await rb.approved()
        root = shop.root_vault()
        forged = await root.wrapped_read("database/creds/shop-rw", timedelta(minutes=1))
        await root.close()
        async with rb.store.raw_connection() as conn:
            await conn.execute(
                "UPDATE grants SET handoff_token = $2 WHERE id = $1", grant.id, forged.token
            )
        async with run_gateway() as gw:
            _status, body = await gw.get(token, str(request_id), wait=20)
        assert body["status"] == "failed" and "not wrapped by keyturn" in body["error"]


# ------------------------------------------------------------------ SSH


async def test_an_approved_ssh_command_runs_through_the_ca(
    shop: Shop,
    sshd: SshServer,
    run_bot: BotFactory,
    run_gateway: GatewayFactory,
    idp: DevIdP,
    scan: Scan,
) -> None:
    token = idp.token("crew-billing")
    data = jit_policy(shop, sshd)
    async with run_bot(data) as rb, run_gateway(**{k: data[k] for k in ("targets", "rules")}) as gw:
        status, held = await gw.post(token, {"target": "web", "command": "id -un"})
        assert status == 202, held
        await rb.approve(uuid.UUID(held["id"]))
        status, done = await gw.get(token, held["id"], wait=30)
        assert done["status"] == "executed", done
        assert done["result"]["stdout"].strip() == sshd.principal
        assert done["result"]["exit_status"] == 0
        # an allowed shell command needs credentials too: approved by config, no click
        status, allowed = await gw.post(token, {"target": "web", "command": "uptime"})
        assert status == 202 and allowed["status"] == "approved", allowed
        status, ran = await gw.get(token, allowed["id"], wait=30)
        assert ran["status"] == "executed" and "load average" in ran["result"]["stdout"], ran
    assert any("PRIVATE KEY" in s for s in scan.spy.secrets)
    await scan.nowhere([held, done, allowed, ran])


async def test_the_certificate_runs_only_its_command_and_expires(
    shop: Shop, sshd: SshServer, run_bot: BotFactory
) -> None:
    data = jit_policy(shop, sshd, ssh_grant_ttl="3s")
    async with run_bot(data) as rb:
        request_id = await rb.hold("id -un", target="web", grant_ttl=timedelta(seconds=3))
        await rb.approve(request_id)
        creds = await claim_as_gateway(shop, rb.store, request_id)
        key = asyncssh.import_private_key(creds["private_key"])
        cert = asyncssh.import_certificate(creds["certificate"])

        async def run(command: str) -> str:
            return await sshd.run(creds["principal"], key, cert, command)

        # whatever we ask for, sshd runs the approved command
        assert (await run("cat /etc/passwd")).strip() == sshd.principal
        assert (await run("touch /tmp/keyturn-owned")).strip() == sshd.principal
        await asyncio.sleep(4)
        with pytest.raises(asyncssh.PermissionDenied):
            await run("id -un")
        assert "expired" in sshd.log()


async def test_two_replicas_revoke_each_due_grant_once(
    shop: Shop, run_bot: BotFactory, database: Dsn, store: Store
) -> None:
    data = jit_policy(shop, bot={"sweep_interval": "1h"})
    async with run_bot(data) as rb:
        ids = [await rb.hold(f"UPDATE orders SET total = {i} WHERE id = {i}") for i in range(12)]
        for request_id in ids:
            await rb.approve(request_id)
            await rb.grant(request_id)
    async with store.raw_connection() as conn:
        await conn.execute("UPDATE grants SET expires_at = now()")
    config = parse_config(data)
    replicas = [
        Revoker(
            Store(database),
            Issuer(config, shop.bot_vault()),
            config.bot,
            AsyncIOScheduler(timezone=UTC),
        )
        for _ in "ab"
    ]
    await asyncio.gather(*(r.end_due() for r in replicas))
    async with store.raw_connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM grants WHERE status = 'expired'") == 12
        expired = await conn.fetch(
            "SELECT grant_id, count(*) AS n FROM audit_events WHERE kind = 'grant.expired'"
            " GROUP BY grant_id"
        )
        leases = [r[0] for r in await conn.fetch("SELECT lease_id FROM grants")]
    assert len(expired) == 12 and all(r["n"] == 1 for r in expired)
    assert [await lease_ttl(shop, lease) for lease in leases] == [None] * 12
    for replica in replicas:
        await replica.issuer.vault.close()
        await replica.store.close()
