"""On-call engineers' own access, end to end: ``/keyturn`` as Slack delivers it (signed,
through Bolt), the approval card, delivery by DM, ``keyturn unwrap``, a real login on the
target, Extend from the reminder, expiry that kills the open session; an SSH certificate for a
registered key against a real sshd; every bad input refused with nothing created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import asyncssh
import pytest
import pytest_asyncio

from bot.access.views import ACCESS_EXTEND
from bot.cards import APPROVE, DENY, REVOKE
from bot.service import Bot
from keyturn.clock import Clock, ManualClock
from keyturn.config.loading import parse_config
from keyturn.domain import Deciders, IllegalTransition, Request
from keyturn.harness.idp import DevIdP
from keyturn.harness.slack import SlackEmulator
from keyturn.harness.sshd import SshServer
from keyturn.store import grants, handoffs, requests
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.integration.conftest import GatewayFactory, Shop, Spy, serve_bot
from tests.integration.test_jit import CHANNEL, jit_policy, until

APPROVER = "U_APPROVER"
ONCALL = "U_ONCALL"
PEER = "U_PEER"  # on call too: in the requesters' group
MALLORY = "U_MALLORY"
GROUP = "S_ONCALL"


def access(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "on-call",
        "targets": ["shop", "web"],
        "requesters": {"users": [ONCALL], "slack_usergroup": GROUP},
        "approvers": {"users": [APPROVER], "slack_usergroup": GROUP},
        "durations": ["15m", "30m"],
        "max_duration": "1h",
    } | overrides


def access_policy(shop: Shop, sshd: SshServer | None = None, **rule: Any) -> dict[str, Any]:
    data = jit_policy(shop, sshd, bot={"sweep_interval": "1s"})
    data["access"] = [access(**rule)]
    return data


@pytest_asyncio.fixture
async def slack() -> AsyncIterator[SlackEmulator]:
    emulator = SlackEmulator()
    await emulator.start()
    for user in (APPROVER, ONCALL, PEER, MALLORY):
        emulator.add_user(user)
    emulator.usergroups[GROUP] = [ONCALL, PEER]
    yield emulator
    await emulator.stop()


@dataclass
class OnCall:
    bot: Bot
    store: Store
    slack: SlackEmulator

    async def say(self, text: str, user: str = ONCALL) -> str:
        """What ``user`` reads after typing ``/keyturn text`` (an ephemeral, theirs alone)."""
        before = len(self.slack.ephemerals)
        status, _ = await self.slack.command(text, user, CHANNEL)
        assert status == 200
        (answer,) = self.slack.ephemerals[before:]
        assert answer["user"] == user
        return str(answer["text"])

    async def ask(self, text: str) -> uuid.UUID:
        """``/keyturn <text>`` that must create a request: its id."""
        answer = await self.say(text)
        short = re.search(r"request `([0-9a-f]{8})`", answer)
        assert short, answer
        async with self.store.raw_connection() as conn:
            found = await conn.fetchval(
                "SELECT id FROM requests WHERE id::text LIKE $1", short.group(1) + "%"
            )
        return uuid.UUID(str(found))

    async def card(self, request_id: uuid.UUID) -> str:
        async def posted() -> str | None:
            async with self.store.raw_connection() as conn:
                return await conn.fetchval(
                    "SELECT ts FROM cards WHERE request_id = $1 AND ts IS NOT NULL", request_id
                )

        return str(await until(posted))

    async def click(self, request_id: uuid.UUID, user: str, action: str = APPROVE) -> None:
        status, _ = await self.slack.click(CHANNEL, await self.card(request_id), action, user)
        assert status == 200

    async def refused(self, request_id: uuid.UUID, user: str) -> str:
        """Click Approve as ``user`` and read the ephemeral saying why nothing changed."""
        before = len(self.slack.ephemerals)
        await self.click(request_id, user)

        async def told() -> str | None:
            mine = [e["text"] for e in self.slack.ephemerals[before:] if e["user"] == user]
            return mine[0] if mine else None

        return str(await until(told))

    def dms(self, user: str = ONCALL) -> list[Any]:
        return self.slack.channel(f"D{user}")

    async def dm(self, containing: str, user: str = ONCALL, timeout: float = 20) -> Any:
        async def found() -> Any:
            return next((m for m in self.dms(user) if containing in m.text), None)

        return await until(found, timeout)

    async def grant(self, request_id: uuid.UUID) -> Any:
        async def newest() -> Any:
            async with self.store.transaction() as tx:
                return await grants.newest_grant(tx, request_id)

        return await until(newest)

    async def requests(self) -> int:
        async with self.store.raw_connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM requests"))


Factory = Callable[..., contextlib.AbstractAsyncContextManager[OnCall]]


@pytest.fixture
def oncall(slack: SlackEmulator, database: Dsn, shop: Shop, spy: Spy) -> Factory:
    @contextlib.asynccontextmanager
    async def start(data: dict[str, Any], clock: Clock | None = None) -> AsyncIterator[OnCall]:
        vault = spy.watch(shop.bot_vault())
        async with (
            serve_bot(slack, parse_config(data), database, vault, clock) as bot,
            Store(database, clock=clock) as store,
        ):
            yield OnCall(bot, store, slack)

    return start


async def unwrap(shop: Shop, token: str) -> tuple[int, str, str]:
    """``keyturn unwrap`` as the on-call engineer runs it: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyturn.cli",
        "unwrap",
        "--vault-addr",
        shop.openbao.addr,
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def wrapping_token(text: str) -> str:
    found = re.search(r"keyturn unwrap --vault-addr \S+ (\S+?)```", text)
    assert found, text
    return found.group(1)


async def assert_only_in_dms(
    secrets: list[str], slack: SlackEmulator, database: Dsn, caplog: pytest.LogCaptureFixture
) -> None:
    """The real secrets appear in no channel message, log line or database row."""
    channels = [
        m.text + json.dumps(m.blocks)
        for channel, messages in slack.messages.items()
        if not channel.startswith("D")
        for m in messages
    ] + [json.dumps(e) for e in slack.ephemerals]
    conn = await asyncpg.connect(database.url, **database.connect_args)
    try:
        rows = []
        for table in ("requests", "approvals", "grants", "cards", "audit_events", "ssh_keys"):
            rows += [json.dumps(dict(r), default=str) for r in await conn.fetch(f"TABLE {table}")]
    finally:
        await conn.close()
    places = {"channels": "\n".join(channels), "database": "\n".join(rows), "logs": caplog.text}
    assert secrets
    for secret in secrets:
        for place, text in places.items():
            assert secret not in text, f"a credential leaked into {place}"


# ------------------------------------------------------------------ a database session


async def test_database_access_from_slash_command_to_expiry(
    shop: Shop, oncall: Factory, spy: Spy, database: Dsn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = ManualClock()
    async with oncall(access_policy(shop), clock) as oc:
        request_id = await oc.ask("db shop 1m checking a refund")
        ts = await oc.card(request_id)
        card = json.dumps(oc.slack.message(CHANNEL, ts).blocks)
        assert "Human request for access" in card and "checking a refund" in card
        # the same rules as an agent's request: nobody approves their own, nor their group
        assert "their own request" in await oc.refused(request_id, ONCALL)
        assert "requester's own group" in await oc.refused(request_id, PEER)
        await oc.click(request_id, APPROVER)

        delivered = await oc.dm("keyturn unwrap")
        token = wrapping_token(delivered.text)
        assert "report it" in delivered.text
        status, psql, note = await unwrap(shop, token)
        assert status == 0, note
        assert psql.startswith("postgresql://") and "expires at" in note and "killed" in note
        session = await asyncpg.connect(psql.strip())
        assert await session.fetchval("SELECT count(*) FROM orders") >= 1
        assert await session.execute("UPDATE orders SET status = status WHERE id = 1")
        # a second unwrap is refused, and says to report it
        again, _, why = await unwrap(shop, token)
        assert again == 2 and "already unwrapped" in why and "report it" in why

        # the requester was told, and /keyturn list shows the open session
        await oc.dm("was approved by <@U_APPROVER>")
        assert "open until" in await oc.say("list")
        grant = await oc.grant(request_id)
        assert grant.status == "active" and grant.one_shot is False
        assert (await oc.requests()) == 1

        # 1 minute left: the reminder offers Extend within the rule's maximum (1h)
        reminder = await oc.dm(":alarm_clock:")
        status, _ = await oc.slack.click(f"D{ONCALL}", reminder.ts, f"{ACCESS_EXTEND}_900", ONCALL)
        assert status == 200
        extended = await until(lambda: _expires_after(oc, request_id, grant.expires_at))
        # Vault renews in whole seconds: the grant ends with the lease, a moment earlier
        assert abs(extended - grant.expires_at - timedelta(minutes=15)) < timedelta(seconds=2)

        # expiry: the sweep ends the grant, Vault drops the role, the open session dies
        clock.advance(timedelta(minutes=17))
        await oc.dm("has ended: it expired", timeout=30)
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
            await session.fetchval("SELECT 1")
        with pytest.raises(asyncpg.PostgresError):
            await (await asyncpg.connect(psql.strip())).close()
        async with oc.store.raw_connection() as conn:
            assert await conn.fetchval("SELECT status FROM requests") == "executed"
    await assert_only_in_dms([*spy.secrets, token], oc.slack, database, caplog)


async def _expires_after(oc: OnCall, request_id: uuid.UUID, before: Any) -> Any:
    grant = await oc.grant(request_id)
    return grant.expires_at if grant.expires_at > before else None


async def test_the_request_modal_offers_only_what_the_rule_allows(
    shop: Shop, oncall: Factory
) -> None:
    async with oncall(access_policy(shop)) as oc:
        assert await oc.say("request", user=MALLORY) == (
            "no access rule lets you ask for any target: ask your keyturn admins"
        )
        status, _ = await oc.slack.command("request", ONCALL, CHANNEL)
        assert status == 200
        (view_id,) = oc.slack.modals[ONCALL]
        view = oc.slack.views[view_id]
        targets = [o["value"] for o in view["blocks"][0]["element"]["options"]]
        durations = [o["value"] for o in view["blocks"][1]["element"]["options"]]
        assert targets == ["shop", "web"] and durations == ["15m", "30m"]
        # Slack checks required fields; keyturn checks everything again, field by field
        status, answer = await oc.slack.submit(
            view_id, ONCALL, {"target": "shop", "duration": "5h", "why": "x"}
        )
        assert "duration" in json.loads(answer)["errors"], answer
        status, answer = await oc.slack.submit(
            view_id, ONCALL, {"target": "shop", "duration": "15m", "why": "  "}
        )
        assert "a reason is required" in json.loads(answer)["errors"]["why"]
        assert await oc.requests() == 0
        status, answer = await oc.slack.submit(
            view_id,
            ONCALL,
            {"target": "shop", "duration": "30m", "why": "refund", "ticket": "INC-42"},
        )
        assert status == 200 and not answer

        async def confirmed() -> Any:
            return next((e for e in oc.slack.ephemerals if e["user"] == ONCALL), None)

        confirmation = await until(confirmed)
        assert "waiting for approval" in confirmation["text"]
        async with oc.store.raw_connection() as conn:
            row = await conn.fetchrow("SELECT access, grant_ttl_seconds, reason FROM requests")
        assert tuple(row) == (True, 1800, "refund")
        card = await until(lambda: _card_text(oc, "INC-42"))
        assert "30m" in card


async def _card_text(oc: OnCall, containing: str) -> str | None:
    cards = [json.dumps(m.blocks) for m in oc.slack.channel(CHANNEL)]
    return next((c for c in cards if containing in c), None)


BAD_INPUT = [
    ("db", "say which target and for how long"),
    ("db shop", "say which target and for how long"),
    ("db nowhere 15m fixing", "there is no target `nowhere`: you may ask for `shop` (db)"),
    ("db private 15m fixing", "no access rule lets you ask for `private`"),
    ("db web 15m fixing", "`web` is an ssh target: type `/keyturn ssh web"),
    ("ssh shop 15m fixing", "`shop` is a db target"),
    ("db shop 2h fixing", "`2h` is longer than access rule `on-call` allows: ask for 1h or less"),
    ("db shop soon fixing", "`soon` is not a duration"),
    ("db shop 1s fixing", "ask for at least 5s"),
    ("db shop 15m", "a reason is required: `/keyturn db shop 15m &lt;why you need it&gt;`"),
    ("db shop 15m   ", "a reason is required"),
    ("ssh web 15m fixing", "register an SSH key first"),
    ("revoke", "type `/keyturn revoke &lt;id&gt;`"),
    ("revoke 12345678", "you have no request `12345678`"),
    ("revoke zz", "is not a request id"),
    ("extend 12345678", "type `/keyturn extend &lt;id&gt; &lt;ttl&gt;`"),
    ("list everything", "there is no `/keyturn list`"),
    ("db shop 15m <!channel> ping", None),  # fine: created, and the reason is inert text
]


async def test_bad_input_says_what_to_type_and_creates_nothing(shop: Shop, oncall: Factory) -> None:
    async with oncall(access_policy(shop)) as oc:
        for text, expected in BAD_INPUT[:-1]:
            answer = await oc.say(text)
            assert expected in answer, (text, answer)
        assert "no access rule lets you ask for `shop`" in await oc.say("db shop 15m x", MALLORY)
        assert await oc.requests() == 0
        # someone else's access is as unknown as a missing one
        request_id = await oc.ask(BAD_INPUT[-1][0])
        short = str(request_id)[:8]
        assert f"you have no request `{short}`" in await oc.say(f"revoke {short}", PEER)
        assert f"you have no request `{short}`" in await oc.say(f"extend {short} 15m", PEER)
        assert "has no open access (it is pending)" in await oc.say(f"revoke {short}")
        assert "you already have request" in await oc.say("db shop 15m again")
        card = await until(lambda: _card_text(oc, short))
        assert "&lt;!channel&gt;" in card and "<!channel>" not in card
        assert await oc.requests() == 1


async def test_denied_access_is_told_with_the_reason(shop: Shop, oncall: Factory) -> None:
    async with oncall(access_policy(shop)) as oc:
        request_id = await oc.ask("db shop 15m looking around")
        await oc.click(request_id, APPROVER, DENY)
        view_id = await until(lambda: _modal(oc, APPROVER))
        status, _ = await oc.slack.submit(view_id, APPROVER, {"reason": "use the replica"})
        assert status == 200
        told = await oc.dm("was denied by <@U_APPROVER>: use the replica")
        assert "keyturn unwrap" not in told.text
        assert "Nothing is waiting on you" in await oc.say("pending", APPROVER)


async def _modal(oc: OnCall, user: str) -> str | None:
    return oc.slack.open_modal(user)


async def test_the_requesters_own_group_may_approve_only_when_the_rule_says_so(
    shop: Shop, oncall: Factory
) -> None:
    async with oncall(access_policy(shop, own_group_may_approve=True)) as oc:
        request_id = await oc.ask("db shop 15m peer review")
        assert str(request_id)[:8] not in await oc.say("pending", ONCALL)  # not their own
        assert f"`{str(request_id)[:8]}`" in await oc.say("pending", PEER)
        await oc.click(request_id, PEER)
        await oc.dm("keyturn unwrap")


async def test_a_quorum_of_two_needs_two_people(shop: Shop, oncall: Factory) -> None:
    rule = {"approvers": {"users": [APPROVER, MALLORY]}, "quorum": 2}
    async with oncall(access_policy(shop, **rule)) as oc:
        request_id = await oc.ask("db shop 15m two keys")
        await oc.click(request_id, APPROVER)
        assert "already approved" in await oc.refused(request_id, APPROVER)
        assert not [m for m in oc.dms() if "keyturn unwrap" in m.text]
        await oc.click(request_id, MALLORY)
        await oc.dm("keyturn unwrap")


async def test_the_app_home_follows_every_change(shop: Shop, oncall: Factory) -> None:
    async with oncall(access_policy(shop)) as oc:
        await oc.slack.open_home(APPROVER)
        home = await until(lambda: _home(oc, APPROVER, "Nothing is waiting on you"))
        request_id = await oc.ask("db shop 15m home check")
        short = str(request_id)[:8]
        mine = await until(lambda: _home(oc, ONCALL, "waiting for approval"))
        assert short in mine
        home = await until(lambda: _home(oc, APPROVER, short))
        assert APPROVE in home and DENY in home
        # Approve from the App Home: the same checks and the same path as the card
        status, _ = await oc.slack.click_view(f"VHOME{APPROVER}", APPROVE, APPROVER)
        assert status == 200
        mine = await until(lambda: _home(oc, ONCALL, "open until"))
        assert "End now" in mine and "Extend +15m" in mine
        await until(lambda: _home(oc, APPROVER, "Nothing is waiting on you"))
        status, _ = await oc.slack.click_view(f"VHOME{ONCALL}", "keyturn_session_revoke", ONCALL)
        assert status == 200
        await oc.dm("was revoked by <@U_ONCALL>")
        await until(lambda: _home(oc, ONCALL, "You have no pending or open access"))
        grant = await oc.grant(request_id)
        assert grant.status == "revoked" and grant.ended_by == ONCALL


async def _home(oc: OnCall, user: str, containing: str) -> str | None:
    view = oc.slack.home.get(user)
    text = json.dumps(view) if view else ""
    return text if containing in text else None


async def test_approvers_are_reminded_at_half_the_pending_ttl(shop: Shop, oncall: Factory) -> None:
    clock = ManualClock()
    async with oncall(access_policy(shop, pending_ttl="10m"), clock) as oc:
        request_id = await oc.ask("db shop 15m slow approvers")
        ts = await oc.card(request_id)
        clock.advance(timedelta(minutes=5, seconds=1))

        async def reminded() -> list[Any]:
            return [m for m in oc.slack.thread(CHANNEL, ts) if ":bell:" in m.text]

        (nudge,) = await until(reminded)
        assert "<@U_APPROVER>" in nudge.text and f"<!subteam^{GROUP}>" in nudge.text
        for _ in range(3):  # more passes: still one reminder
            await oc.bot.sync_cards()
        assert len(await reminded()) == 1
        clock.advance(timedelta(minutes=5))
        await oc.dm("expired: nobody decided within 10m")


async def test_a_gateway_never_takes_a_persons_access(shop: Shop, oncall: Factory) -> None:
    """The attacker's story: a person's grant that (by a bug, or a hand in the database)
    carries a hand-off token is still never run by a gateway as a command."""
    async with oncall(access_policy(shop)) as oc:
        request_id = await oc.ask("db shop 15m careful")
        await oc.click(request_id, APPROVER)
        grant = await oc.grant(request_id)
        async with oc.store.raw_connection() as conn:
            await conn.execute(
                "UPDATE grants SET handoff_token = 'planted', handoff_expires_at = now() + "
                "interval '1 minute' WHERE id = $1",
                grant.id,
            )
            await conn.execute("UPDATE requests SET status = 'approved' WHERE id = $1", request_id)
        assert await handoffs.claim_handoff(oc.store, request_id) is None
        assert await handoffs.claim_handoff(oc.store) is None
    request = Request(
        id=request_id,
        target="shop",
        command="x",
        requester=ONCALL,
        created_at=grant.created_at,
        pending_expires_at=grant.created_at + timedelta(minutes=5),
        access=True,
    )
    request.approve(APPROVER, Deciders.only(APPROVER), grant.created_at)
    with pytest.raises(IllegalTransition):
        request.start_execution(request.command_sha256)


# ------------------------------------------------------------------ SSH access


async def test_ssh_access_signs_the_registered_key_until_expiry(
    shop: Shop,
    sshd: SshServer,
    oncall: Factory,
    spy: Spy,
    database: Dsn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = asyncssh.generate_private_key("ssh-ed25519")
    async with oncall(access_policy(shop, sshd)) as oc:
        line = key.export_public_key().decode().strip()
        assert "Registered" in await oc.say(f"ssh-key add {line}")
        request_id = await oc.ask("ssh web 6s restarting the worker")
        await oc.click(request_id, APPROVER)
        delivered = await oc.dm("Your SSH certificate")
        certificate = re.search(r"```(ssh-ed25519-cert-v01@openssh.com \S+)", delivered.text)
        assert certificate, delivered.text
        assert f"-p {sshd.port} {sshd.principal}@127.0.0.1" in delivered.text
        cert = asyncssh.import_certificate(certificate.group(1))
        assert "force-command" not in cert.options  # a person's own shell
        fingerprint = key.get_fingerprint()
        assert fingerprint in json.dumps(oc.slack.channel(CHANNEL)[-1].blocks)  # approved key

        async def run(command: str) -> str:
            return await sshd.run(sshd.principal, key, cert, command)

        assert (await run("echo any command")).strip() == "any command"
        grant = await oc.grant(request_id)
        assert grant.lease_id is None and grant.expires_at - grant.created_at == timedelta(
            seconds=6
        )
        assert "cannot be extended" in await oc.say(f"extend {str(request_id)[:8]} 15m")
        await asyncio.sleep(7)
        with pytest.raises(asyncssh.PermissionDenied):
            await run("id -un")
        await oc.dm("has ended: it expired")
    await assert_only_in_dms([certificate.group(1)], oc.slack, database, caplog)


async def test_the_certificate_is_for_the_key_the_approvers_saw(
    shop: Shop, oncall: Factory
) -> None:
    """The attacker's story: with the engineer's Slack open, someone adds their own key after
    the request is made. The approved access still certifies the key named on the card, and
    access whose key was removed is not issued at all."""
    first, later = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    async with oncall(access_policy(shop)) as oc:
        await oc.say(f"ssh-key add {first.export_public_key().decode().strip()}")
        request_id = await oc.ask("ssh web 15m checking a worker")
        await oc.say(f"ssh-key add {later.export_public_key().decode().strip()}")
        await oc.click(request_id, APPROVER)
        delivered = await oc.dm("Your SSH certificate")
        found = re.search(r"```(ssh-ed25519-cert-v01@openssh.com \S+)", delivered.text)
        assert found, delivered.text
        cert = asyncssh.import_certificate(found.group(1))
        assert cert.key.get_fingerprint() == first.get_fingerprint()
        assert first.get_fingerprint() in delivered.text

        await oc.say(f"revoke {str(request_id)[:8]}")
        again = await oc.ask("ssh web 15m once more")  # for `later`, the newest key now
        await oc.say(f"ssh-key remove {later.get_fingerprint()}")
        await oc.click(again, APPROVER)
        failed = await oc.dm("nothing could be issued")
        assert "no longer registered" in failed.text
        assert len([m for m in oc.dms() if "Your SSH certificate" in m.text]) == 1


async def test_what_the_login_created_does_not_keep_it_alive(shop: Shop, oncall: Factory) -> None:
    """The attacker's story: in their session the engineer creates a large object (any login
    may), so that DROP ROLE would fail and Vault would roll the whole revocation back,
    NOLOGIN included. Revoking still ends the login; the object passes to Vault's login."""
    async with oncall(access_policy(shop)) as oc:
        request_id = await oc.ask("db shop 30m keeping a foothold")
        await oc.click(request_id, APPROVER)
        delivered = await oc.dm("keyturn unwrap")
        status, psql, _ = await unwrap(shop, wrapping_token(delivered.text))
        assert status == 0
        session = await asyncpg.connect(psql.strip())
        oid = await session.fetchval("SELECT lo_create(0)")
        await session.execute("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC")
        assert "its connections were closed" in await oc.say(f"revoke {str(request_id)[:8]}")
        with pytest.raises(asyncpg.PostgresError):
            await (await asyncpg.connect(psql.strip())).close()
        owner = await shop.postgres.fetch(
            f"SELECT pg_get_userbyid(lomowner) FROM pg_largeobject_metadata WHERE oid = {oid}",
            shop.database,
        )
        assert owner[0][0] == "postgres"


async def test_the_form_refuses_what_the_command_refuses(shop: Shop, oncall: Factory) -> None:
    """Modal fields reach keyturn without the slash command's checks: a NUL in the reason (a
    500 from Postgres) and a TTL past any timedelta each get an answer under their field."""
    async with oncall(access_policy(shop)) as oc:
        status, _ = await oc.slack.command("request", ONCALL, CHANNEL)
        (view_id,) = oc.slack.modals[ONCALL]
        for values, block, fragment in [
            ({"target": "shop", "duration": "15m", "why": "fix\x00it"}, "why", "control"),
            ({"target": "shop", "duration": "15m", "why": "x", "ticket": "\x1b[2J"}, "ticket", ""),
        ]:
            status, answer = await oc.slack.submit(view_id, ONCALL, values)
            assert status == 200 and fragment in json.loads(answer)["errors"][block], answer
        assert "is longer than access rule" in await oc.say("db shop 99999999999d a typo")
        assert await oc.requests() == 0


async def test_racing_requests_for_one_target_make_one(shop: Shop, oncall: Factory) -> None:
    """Ten `/keyturn db` at once for the same target: the database keeps one pending
    request for access per person and target, whoever wins the check before it."""
    async with oncall(access_policy(shop)) as oc:
        await asyncio.gather(
            *(oc.slack.command(f"db shop 15m try {i}", ONCALL, CHANNEL) for i in range(10))
        )
        answers = [e["text"] for e in oc.slack.ephemerals if e["user"] == ONCALL]
        assert len(answers) == 10 and sum("waiting for approval" in a for a in answers) == 1
        assert all("already" in a for a in answers if "waiting for approval" not in a)
        assert await oc.requests() == 1


async def test_an_agent_never_sees_a_persons_access(
    shop: Shop, oncall: Factory, run_gateway: GatewayFactory, idp: DevIdP
) -> None:
    """An agent token whose sub happens to spell the engineer's Slack id reads nothing of
    their access through the agent API (as if it did not exist)."""
    async with oncall(access_policy(shop)) as oc, run_gateway() as gw:
        request_id = await oc.ask("db shop 15m private business")
        status, body = await gw.get(idp.token(ONCALL), str(request_id))
        assert status == 404 and body["error"]["code"] == "not_found", body


# ------------------------------------------------------------------ who may decide, every path
# Each story is an attacker with a real Slack identity and a signed payload aimed at a request
# they may not decide: the one check (keyturn.domain.Deciders, under the request's lock) must
# refuse it whichever surface it came through.


async def test_a_forged_app_home_approve_by_someone_who_is_no_approver_changes_nothing(
    shop: Shop, oncall: Factory
) -> None:
    async with oncall(access_policy(shop)) as oc:
        request_id = await _on_approvers_home(oc, "db shop 15m forged home click")
        before = len(oc.slack.ephemerals) + len(oc.dms(MALLORY))
        # Mallory replays the approver's App Home button as herself
        status, _ = await oc.slack.click_view(f"VHOME{APPROVER}", APPROVE, MALLORY)
        assert status == 200

        async def told() -> bool:
            return len(oc.slack.ephemerals) + len(oc.dms(MALLORY)) > before

        await until(told)
        await _undecided(oc, request_id)


async def test_the_requesters_own_group_cannot_approve_from_the_app_home_either(
    shop: Shop, oncall: Factory
) -> None:
    async with oncall(access_policy(shop)) as oc:
        request_id = await _on_approvers_home(oc, "db shop 15m own group from home")
        status, _ = await oc.slack.click_view(f"VHOME{APPROVER}", APPROVE, PEER)
        assert status == 200
        await until(lambda: _refusal_for(oc, PEER, "own group"))
        await _undecided(oc, request_id)


async def test_a_deny_modal_submitted_by_someone_else_denies_nothing(
    shop: Shop, oncall: Factory
) -> None:
    """The approver opened the deny modal; Mallory submits that view as herself."""
    async with oncall(access_policy(shop)) as oc:
        request_id = await oc.ask("db shop 15m forged deny")
        opened = len(oc.slack.views)
        await oc.click(request_id, APPROVER, DENY)
        view_id = await until(lambda: _newest_view(oc, opened))
        status, body = await oc.slack.submit(view_id, MALLORY, {"reason": "no"})
        assert status == 200 and "not an approver" in body  # said in the modal itself
        await _undecided(oc, request_id)


async def test_nobody_revokes_or_extends_anothers_access_by_card_or_command(
    shop: Shop, oncall: Factory
) -> None:
    async with oncall(access_policy(shop)) as oc:
        request_id = await oc.ask("db shop 15m keep mine")
        await oc.click(request_id, APPROVER)
        grant = await oc.grant(request_id)
        short = str(request_id)[:8]
        assert "you" in (await oc.say(f"revoke {short}", MALLORY)).lower()
        assert "you" in (await oc.say(f"extend {short} 15m", MALLORY)).lower()
        ts = await oc.card(request_id)
        await until(lambda: _has_button(oc, ts, REVOKE))
        await oc.slack.click(CHANNEL, ts, REVOKE, MALLORY)
        await until(lambda: _refusal_for(oc, MALLORY, "not an approver"))
        after = await grants.get_grant(oc.store, grant.id)
        assert after.status == "active" and after.expires_at == grant.expires_at


async def _on_approvers_home(oc: OnCall, asked: str) -> uuid.UUID:
    """``/keyturn <asked>``, once the request shows, with its buttons, on the approver's Home."""
    await oc.slack.open_home(APPROVER)
    request_id = await oc.ask(asked)
    await until(lambda: _home(oc, APPROVER, str(request_id)[:8]))
    return request_id


async def _undecided(oc: OnCall, request_id: uuid.UUID) -> None:
    row = await requests.get_request(oc.store, request_id)
    assert row.status == "pending" and not row.approvals


async def _refusal_for(oc: OnCall, user: str, containing: str) -> bool:
    texts = [e["text"] for e in oc.slack.ephemerals if e["user"] == user]
    texts += [m.text for m in oc.dms(user)]
    return any(containing in text for text in texts)


async def _newest_view(oc: OnCall, opened: int) -> str | None:
    return list(oc.slack.views)[-1] if len(oc.slack.views) > opened else None


async def _has_button(oc: OnCall, ts: str, action: str) -> bool:
    return action in json.dumps(oc.slack.message(CHANNEL, ts).blocks)


async def test_the_own_group_bar_is_settled_when_the_requester_asks(
    shop: Shop, oncall: Factory
) -> None:
    """The attacker's story: once the request is made, the requester leaves their group, or
    a peer takes themself out of it (Slack lets members edit groups), and the peer then
    approves. Who is barred was settled when they asked: neither move lifts the bar."""
    approvers = {"users": [APPROVER, PEER]}  # an approver by name, on call in the group too
    async with oncall(access_policy(shop, approvers=approvers)) as oc:
        request_id = await oc.ask("db shop 15m leave the group")
        assert "own group" in await oc.refused(request_id, PEER)
        oc.slack.usergroups[GROUP] = [PEER]  # the requester leaves
        oc.bot.directory._groups.clear()  # as once bot.usergroup_cache has run out
        assert "own group" in await oc.refused(request_id, PEER)
        oc.slack.usergroups[GROUP] = [ONCALL]  # the peer takes themself out instead
        oc.bot.directory._groups.clear()
        assert "own group" in await oc.refused(request_id, PEER)
        await _undecided(oc, request_id)


async def test_a_group_slack_cannot_list_refuses_with_a_reason_and_hides_only_its_request(
    shop: Shop, oncall: Factory
) -> None:
    """Slack failing to list the approvers' group (an outage, a missing scope): its member's
    click is refused and told why, and `/keyturn pending` still answers."""
    rule = {"approvers": {"users": [APPROVER], "slack_usergroup": "S_APPROVERS"}}
    async with oncall(access_policy(shop, own_group_may_approve=True, **rule)) as oc:
        oc.slack.usergroups["S_APPROVERS"] = [MALLORY]
        oc.slack.fail("usergroups.users.list", 500, times=1000)  # before anything is cached
        request_id = await oc.ask("db shop 15m group unreadable")
        assert "cannot read Slack user group" in await oc.refused(request_id, MALLORY)
        await _undecided(oc, request_id)
        assert "Nothing is waiting on you" in await oc.say("pending", MALLORY)
