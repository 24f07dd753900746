"""The Slack bot against the Slack emulator and a real Postgres: signed clicks, real Bolt."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from bot import card_store
from bot.bootstrap import build, slack_client, web_application
from bot.cards import APPROVE, DENY
from bot.service import Bot
from keyturn.checkpoint import Anchor, Checkpoint
from keyturn.clock import Clock, ManualClock
from keyturn.config.loading import parse_config
from keyturn.harness.slack import SlackEmulator
from keyturn.store import requests
from keyturn.store.db import Store
from keyturn.store.dsn import Dsn
from tests.integration.conftest import Shop, TcpProxy, crashing, serve_bot

CHANNEL = "CAPPROVALS"
APPROVERS = ["U_ALICE", "U_BOB", "U_CAROL"]


def policy_data(shop: Shop, **overrides: Any) -> dict[str, Any]:
    writes = {
        "name": "writes",
        "match": {"sql": ["insert", "update", "delete"]},
        "action": "hold",
        "approvers": {"users": APPROVERS, "slack_usergroup": "S_ONCALL"},
        "grant_ttl": "10m",
    }
    writes.update(overrides.pop("writes", {}))
    data: dict[str, Any] = {
        "targets": {"shop": shop.base_policy["targets"]["shop"]},
        "vault": shop.base_policy["vault"],
        "rules": [writes],
        "slack": {"approval_channel": CHANNEL},
        "bot": {"poll_interval": "500ms", "card_claim_timeout": "2s"},
    }
    data.update(overrides)
    return data


@pytest_asyncio.fixture
async def slack() -> AsyncIterator[SlackEmulator]:
    emulator = SlackEmulator()
    await emulator.start()
    for user in [*APPROVERS, "U_MALLORY", "U_HUMAN", *(f"U_G{i}" for i in range(20))]:
        emulator.add_user(user)
    emulator.usergroups["S_ONCALL"] = [f"U_G{i}" for i in range(20)]
    yield emulator
    await emulator.stop()


@dataclass
class RunningBot:
    bot: Bot
    store: Store
    slack: SlackEmulator

    async def hold(
        self, command: str = "UPDATE orders SET paid = true WHERE id = 1", **fields: Any
    ) -> uuid.UUID:
        new = requests.NewRequest(
            **(
                {
                    "target": "shop",
                    "command": command,
                    "requester": "crew-billing",
                    "on_behalf_of": "U_HUMAN",
                    "pending_ttl": timedelta(minutes=15),
                    "rule": "writes",
                    "grant_ttl": timedelta(minutes=10),
                    "classification": {"reasons": ["UPDATE statement"], "estimated_rows": 1},
                }
                | fields
            )
        )
        row, _ = await requests.create_request(self.store, new)
        return row.id

    async def card(self, request_id: uuid.UUID, timeout: float = 15) -> str:
        """The ts of the request's card once it is posted."""
        async with asyncio.timeout(timeout):
            while not (posted := await card_store.posted_at(self.store, request_id)):
                await asyncio.sleep(0.05)
        return posted[1]

    async def status(self, request_id: uuid.UUID) -> str:
        return (await requests.get_request(self.store, request_id)).status

    async def passes(self, count: int = 3) -> None:
        """``count`` whole passes of the bot's loop, run here: whatever they would do is done
        when this returns (no waiting on the loop's timing)."""
        for _ in range(count):
            await self.bot.sync()
            await self.bot.sync_cards()

    async def until(self, check: Callable[[], Any], timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)


BotFactory = Callable[..., contextlib.AbstractAsyncContextManager[RunningBot]]


@pytest.fixture
def run_bot(slack: SlackEmulator, database: Dsn, shop: Shop) -> BotFactory:
    @contextlib.asynccontextmanager
    async def start(clock: Clock | None = None, **overrides: Any) -> AsyncIterator[RunningBot]:
        config = parse_config(policy_data(shop, **overrides))
        async with (
            serve_bot(slack, config, database, shop.bot_vault(), clock) as bot,
            Store(database) as store,
        ):
            yield RunningBot(bot, store, slack)

    return start


def blocks_text(blocks: list[dict[str, Any]]) -> str:
    return json.dumps(blocks)


async def test_a_held_request_gets_exactly_one_card(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold(run_id="run-42")
        ts = await rb.card(request_id)
        await rb.passes()  # a few more passes: still one card
        cards = slack.channel(CHANNEL)
        assert len(cards) == 1 and cards[0].ts == ts
        text = blocks_text(cards[0].blocks)
        for fragment in (
            "crew-billing",
            "run-42",
            "<@U_HUMAN>",
            "UPDATE orders SET paid = TRUE",  # as it will run: printed back from its parse
            "Rule `writes`",
            "EXPLAIN estimate: ~1 rows",
            "grant TTL 10m",
            APPROVE,
            DENY,
            "Approvals: 0/1",
        ):
            assert fragment in text, fragment
        assert cards[0].metadata == {
            "event_type": "keyturn_request",
            "event_payload": {"id": str(request_id)},
        }


async def test_a_command_longer_than_a_card_is_posted_whole_in_its_thread(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    statements = [f"UPDATE orders SET note = '{'n' * 900}' WHERE id = {i}" for i in range(40)]
    async with run_bot() as rb:
        request_id = await rb.hold("; ".join(statements))
        ts = await rb.card(request_id)
        assert "Longer than a card holds" in blocks_text(slack.message(CHANNEL, ts).blocks)
        thread = " ".join(m.text for m in slack.thread(CHANNEL, ts))
        for i in range(40):
            assert f"WHERE id = {i};" in thread, i


async def test_command_text_never_pings(run_bot: BotFactory, slack: SlackEmulator) -> None:
    evil = "UPDATE t SET note = '<!channel> <!here> <@U_ALICE> <http://evil.example|click>' WHERE id = 1"
    async with run_bot() as rb:
        request_id = await rb.hold(evil, reason="<!everyone> please", run_id="<@U_BOB>")
        await rb.card(request_id)
        text = blocks_text(slack.channel(CHANNEL)[0].blocks) + slack.channel(CHANNEL)[0].text
        for control in (
            "<!channel>",
            "<!here>",
            "<@U_ALICE>",
            "<http://evil",
            "<!everyone>",
            "<@U_BOB>",
        ):
            assert control not in text, control
        assert "&lt;!channel&gt;" in text and "&lt;@U_ALICE&gt;" in text


async def test_approve_click(run_bot: BotFactory, slack: SlackEmulator) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        status, _ = await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")
        assert status == 200
        await rb.until(lambda: _eq(rb.status(request_id), "approved"))
        await slack.wait_for("chat.update")
        card = slack.message(CHANNEL, ts)
        assert APPROVE not in blocks_text(card.blocks)  # buttons gone
        assert "Approved" in blocks_text(card.blocks) and "<@U_ALICE>" in blocks_text(card.blocks)
        await rb.until(lambda: _true(len(slack.thread(CHANNEL, ts)) == 1))
        assert "Approved" in slack.thread(CHANNEL, ts)[0].text
        await rb.until(
            lambda: _true(
                any(m.channel == "DU_HUMAN" for ms in slack.messages.values() for m in ms)
            )
        )


async def test_a_command_is_approved_on_its_card_only(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    """An App Home drawn by an older release showed a command cut to its first line beside
    Approve: a click there must not approve what the approver was not shown."""
    async with run_bot() as rb:
        request_id = await rb.hold()
        await rb.card(request_id)
        approve = {"type": "button", "action_id": APPROVE, "value": str(request_id)}
        slack.home["U_ALICE"] = {
            "id": "VSTALE",
            "type": "home",
            "blocks": [{"type": "actions", "block_id": "decide", "elements": [approve]}],
        }
        status, _ = await slack.click_view("VSTALE", APPROVE, "U_ALICE")
        assert status == 200
        await rb.until(
            lambda: _true(
                any(
                    "on its card" in m.text
                    for ms in slack.messages.values()
                    for m in ms
                    if m.channel.startswith("D")
                )
            )
        )
        assert await rb.status(request_id) == "pending"


async def test_deny_with_a_reason_reaches_the_request(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        await slack.click(CHANNEL, ts, DENY, "U_BOB")
        await slack.wait_for("views.open")
        view_id = next(iter(slack.views))
        for refused in ("   ", "no\x00pe", "x" * 2001):  # a NUL once failed the listener
            status, body = await slack.submit(view_id, "U_BOB", {"reason": refused})
            assert status == 200 and json.loads(body)["response_action"] == "errors"
        assert await rb.status(request_id) == "pending"
        status, body = await slack.submit(view_id, "U_BOB", {"reason": "freeze week"})
        assert status == 200 and "errors" not in body
        row = await requests.get_request(rb.store, request_id)
        assert row.status == "denied" and row.approvals[0].reason == "freeze week"
        await slack.wait_for("chat.update")
        assert "freeze week" in blocks_text(slack.message(CHANNEL, ts).blocks)


async def test_non_approver_and_self_approval_change_nothing(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold(on_behalf_of="U_ALICE")
        ts = await rb.card(request_id)
        await slack.click(CHANNEL, ts, APPROVE, "U_MALLORY")
        await slack.click(CHANNEL, ts, DENY, "U_MALLORY")
        await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")  # the human the agent acts for
        await rb.until(lambda: _true(len(slack.ephemerals) == 3))
        texts = [e["text"] for e in slack.ephemerals]
        assert sum("not an approver" in t for t in texts) == 2
        assert any("own request" in t for t in texts)
        assert {e["user"] for e in slack.ephemerals} == {"U_MALLORY", "U_ALICE"}
        assert await rb.status(request_id) == "pending"
        assert not slack.views and not slack.calls_to("chat.update")


async def test_quorum_counts_distinct_approvers(run_bot: BotFactory, slack: SlackEmulator) -> None:
    async with run_bot(writes={"quorum": 2}) as rb:
        request_id = await rb.hold(quorum=2)
        ts = await rb.card(request_id)
        await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")
        await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")
        await rb.until(lambda: _true(len(slack.ephemerals) == 1))
        assert "you already approved" in slack.ephemerals[0]["text"]
        await rb.until(
            lambda: _true("Approvals: 1/2" in blocks_text(slack.message(CHANNEL, ts).blocks))
        )
        assert await rb.status(request_id) == "pending"
        await slack.click(CHANNEL, ts, APPROVE, "U_G3")  # a member of the on-call user group
        await rb.until(lambda: _eq(rb.status(request_id), "approved"))


async def test_twenty_concurrent_clicks_make_one_outcome(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        for i in range(10):  # ten deny modals open, waiting to be submitted
            await slack.click(CHANNEL, ts, DENY, f"U_G{i}")
        await slack.wait_for("views.open", 10)
        views = list(slack.views)
        results = await asyncio.gather(
            *(slack.click(CHANNEL, ts, APPROVE, f"U_G{i}") for i in range(10, 20)),
            *(slack.submit(v, f"U_G{i}", {"reason": "no"}) for i, v in enumerate(views)),
        )
        assert all(status == 200 for status, _ in results)
        row = await requests.get_request(rb.store, request_id)
        assert row.status in ("approved", "denied")
        assert len(row.approvals) == 1
        await rb.until(lambda: _true(len(slack.thread(CHANNEL, ts)) == 1))
        await rb.passes()
        assert len(slack.thread(CHANNEL, ts)) == 1  # one outcome announced


async def test_bad_signatures_are_refused(run_bot: BotFactory, slack: SlackEmulator) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        body = slack.block_actions(CHANNEL, ts, APPROVE, "U_ALICE")
        form = "application/x-www-form-urlencoded"
        status, _ = await slack.deliver(body, form, signature="v0=" + "0" * 64)
        assert status == 401
        status, _ = await slack.deliver(body, form, timestamp=int(time.time()) - 6 * 60)
        assert status == 401
        tampered = body.replace("U_ALICE", "U_BOB__")
        headers = slack.signed_headers(body)
        status, _ = await slack.deliver(
            tampered,
            form,
            timestamp=int(headers["X-Slack-Request-Timestamp"]),
            signature=headers["X-Slack-Signature"],
        )
        assert status == 401
        await rb.passes()
        assert await rb.status(request_id) == "pending"


async def test_rate_limit_is_honoured(run_bot: BotFactory, slack: SlackEmulator) -> None:
    slack.fail("chat.postMessage", 429, retry_after=1)
    async with run_bot() as rb:
        request_id = await rb.hold()
        await rb.card(request_id)
        assert len(slack.channel(CHANNEL)) == 1
        (limited,) = slack.faulted
        posted = slack.calls_to("chat.postMessage")[0]
        assert posted.at - limited.at >= 1.0  # Retry-After was waited out, not retried at once


async def test_a_slack_outage_loses_nothing(run_bot: BotFactory, slack: SlackEmulator) -> None:
    """Slack answers 503 to everything while the bot keeps trying (backing off); once Slack is
    back, the next wake-up (a new request's notification) posts every card, each once."""
    async with run_bot() as rb:
        slack.down()
        request_id = await rb.hold()
        await rb.until(lambda: _true(slack.refused >= 4), 30)  # a few passes, backing off
        assert await card_store.posted_at(rb.store, request_id) is None
        slack.up()
        second = await rb.hold("DELETE FROM t WHERE id = 2")
        await rb.card(request_id)
        await rb.card(second)
        assert len(slack.channel(CHANNEL)) == 2


async def test_a_restarted_bot_adopts_the_card_it_posted(
    run_bot: BotFactory, slack: SlackEmulator, database: Dsn, shop: Shop
) -> None:
    # A first replica claimed the request and posted its card, then died before recording it.
    clock = ManualClock()
    store = Store(database, clock=clock)
    config = parse_config(policy_data(shop))
    client = slack_client(slack.bot_token, slack.api_url)
    dying = build(config, store, client, slack.signing_secret, shop.bot_vault()).bot
    new = requests.NewRequest(
        "shop", "DELETE FROM t WHERE id = 3", "crew", timedelta(minutes=5), rule="writes"
    )
    row, _ = await requests.create_request(store, new)
    claimed = await card_store.claim_card(store, dying.cards.replica, timedelta(seconds=2))
    assert claimed is not None
    await dying.cards._post_card(CHANNEL, claimed.request)
    assert len(slack.channel(CHANNEL)) == 1
    clock.advance(timedelta(seconds=2.1))  # the dead replica's claim goes stale
    async with run_bot(clock) as rb:
        ts = await rb.card(row.id)
        await rb.passes()
        assert [m.ts for m in slack.channel(CHANNEL)] == [ts]  # adopted, not posted again
    await store.close()


async def test_two_replicas_post_each_card_once(run_bot: BotFactory, slack: SlackEmulator) -> None:
    async with run_bot() as first, run_bot() as second:
        ids = [await first.hold(f"DELETE FROM t WHERE id = {i}") for i in range(10)]
        for ident in ids:
            await second.card(ident)
        await asyncio.gather(first.passes(), second.passes())
        posted = slack.channel(CHANNEL)
        assert len(posted) == 10
        assert {m.metadata["event_payload"]["id"] for m in posted} == {str(i) for i in ids}  # type: ignore[index]


async def test_expired_request_card_loses_its_buttons(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold(pending_ttl=timedelta(seconds=1))
        ts = await rb.card(request_id)
        await rb.until(lambda: _eq(rb.status(request_id), "expired"))
        await rb.until(lambda: _true("Expired" in blocks_text(slack.message(CHANNEL, ts).blocks)))
        assert APPROVE not in blocks_text(slack.message(CHANNEL, ts).blocks)
        await rb.until(lambda: _true(len(slack.thread(CHANNEL, ts)) == 1))
        assert "Expired" in slack.thread(CHANNEL, ts)[0].text


async def test_approvers_are_reminded_once_halfway_through_the_pending_ttl(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    clock = ManualClock()
    async with run_bot(clock) as first, run_bot(clock) as second:  # still one reminder
        request_id = await first.hold(pending_ttl=timedelta(minutes=10))
        ts = await first.card(request_id)
        await first.passes()
        assert not slack.thread(CHANNEL, ts)  # not yet halfway
        clock.advance(timedelta(minutes=5, seconds=1))
        await first.until(lambda: _true(len(slack.thread(CHANNEL, ts)) == 1))
        await asyncio.gather(first.passes(), second.passes())
        (nudge,) = slack.thread(CHANNEL, ts)
        assert ":bell:" in nudge.text and "<@U_ALICE>" in nudge.text
        assert "<!subteam^S_ONCALL>" in nudge.text


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _true(value: bool) -> bool:
    return value


async def test_socket_mode(slack: SlackEmulator, database: Dsn, shop: Shop) -> None:
    from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler

    store = Store(database)
    client = slack_client(slack.bot_token, slack.api_url)
    process = build(parse_config(policy_data(shop)), store, client, None, shop.bot_vault())
    bot = process.bot
    server = TestServer(web_application(process, http_mode=False))
    await server.start_server()
    handler = AsyncSocketModeHandler(process.bolt, slack.app_token, web_client=client)
    await handler.connect_async()
    slack.bot_url = None
    try:
        rb = RunningBot(bot, store, slack)
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        async with asyncio.timeout(10):
            while not slack.socket_connected:
                await asyncio.sleep(0.05)
        status, _ = await slack.click(CHANNEL, ts, APPROVE, "U_MALLORY")
        assert status == 200
        await slack.wait_for("chat.postEphemeral")
        await slack.click(CHANNEL, ts, DENY, "U_BOB")
        await slack.wait_for("views.open")
        status, body = await slack.submit(next(iter(slack.views)), "U_BOB", {"reason": ""})
        assert json.loads(body).get("response_action") == "errors"
        await slack.submit(next(iter(slack.views)), "U_BOB", {"reason": "not today"})
        await rb.until(lambda: _eq(rb.status(request_id), "denied"))
        async with (
            aiohttp.ClientSession() as http,
            http.post(str(server.make_url("/slack/events")), data="x") as resp,
        ):
            assert resp.status == 404  # Socket Mode: no HTTP route to forge requests against
    finally:
        await handler.close_async()
        await server.close()


def test_the_manifest_asks_for_exactly_the_scopes_used() -> None:
    import pathlib

    import yaml

    manifest = yaml.safe_load(
        (pathlib.Path(__file__).parents[2] / "bot" / "manifest.yml").read_text()
    )
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == {
        "chat:write",
        "im:write",
        "usergroups:read",
        "channels:history",
        "groups:history",
        "commands",  # /keyturn
    }
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == ["/keyturn"]
    assert manifest["features"]["slash_commands"][0]["url"].endswith("/slack/events")
    assert manifest["settings"]["interactivity"]["is_enabled"] is True
    assert manifest["settings"]["interactivity"]["request_url"].endswith("/slack/events")


async def test_a_decision_survives_a_failing_card_update(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        slack.fail("chat.update", 500, times=6)  # more than the client's own retries
        await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")
        await rb.until(lambda: _eq(rb.status(request_id), "approved"))  # committed first
        await rb.until(  # and the card catches up on a later pass
            lambda: _true("Approved" in blocks_text(slack.message(CHANNEL, ts).blocks)), 30
        )
        await rb.until(lambda: _true(len(slack.thread(CHANNEL, ts)) == 1))  # posted after it
        await rb.passes()
        assert len(slack.thread(CHANNEL, ts)) == 1  # and only once


async def test_the_sandbox_drives_the_bot(run_bot: BotFactory, slack: SlackEmulator) -> None:
    async with run_bot() as rb, aiohttp.ClientSession(base_url=slack.url) as http:
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        async with http.get("/") as resp:
            assert resp.status == 200 and "Slack sandbox" in await resp.text()
        async with http.get("/sandbox/page/sandbox.js") as resp:
            assert resp.status == 200 and "createElement" in await resp.text()
        async with http.get("/sandbox/messages") as resp:
            assert ts in json.dumps(await resp.json())
        async with http.post(
            "/sandbox/click", json={"ts": "1.000000", "action_id": APPROVE, "user": "U_ALICE"}
        ) as resp:
            assert resp.status == 404
        async with http.post("/sandbox/click", data="nope") as resp:
            assert resp.status == 400
        async with http.post(
            "/sandbox/click", json={"ts": ts, "action_id": DENY, "user": "U_ALICE"}
        ) as resp:
            assert (await resp.json())["status"] == 200
        await slack.wait_for("views.open")
        async with http.post(
            "/sandbox/submit", json={"user": "U_ALICE", "values": {"reason": "sandboxed"}}
        ) as resp:
            assert (await resp.json())["status"] == 200
        await rb.until(lambda: _eq(rb.status(request_id), "denied"))


async def test_a_failing_dm_does_not_repeat_the_thread_message(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        slack.fail("conversations.open", 500, times=8)
        await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")
        await rb.until(lambda: _true(len(slack.thread(CHANNEL, ts)) == 1))
        await rb.passes()
        assert len(slack.thread(CHANNEL, ts)) == 1
        assert not any(m.channel.startswith("D") for ms in slack.messages.values() for m in ms)


async def test_postgres_down_at_click_time_tells_the_clicker(
    slack: SlackEmulator, database: Dsn, shop: Shop
) -> None:
    """The bot reaches its database through a proxy that goes down between the card and
    the click: the clicker is told nothing was decided, and nothing was; once it is back,
    the same click works."""
    proxy = TcpProxy(int(database.url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.up()
    config = parse_config(policy_data(shop))
    async with (
        serve_bot(slack, config, proxy.dsn(database), shop.bot_vault()) as bot,
        Store(database) as store,
    ):
        rb = RunningBot(bot, store, slack)
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        await proxy.down()
        status, _ = await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")
        assert status == 200  # acked in time, as Slack requires
        told = await slack.wait_for("chat.postEphemeral")
        assert told[0].args["user"] == "U_ALICE"
        assert told[0].args["text"] == (
            "keyturn cannot reach its database right now; nothing was decided — "
            "try again in a minute"
        )
        assert await rb.status(request_id) == "pending"
        await proxy.up()
        await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")
        await rb.until(lambda: _eq(rb.status(request_id), "approved"), 30)
        assert len(slack.calls_to("chat.postEphemeral")) == 1
        await rb.store.close()
    await proxy.down()


async def test_the_bot_anchors_the_audit_chain_in_vault(
    run_bot: BotFactory, shop: Shop, database: Dsn
) -> None:
    """Every bot.audit_checkpoint the bot HMACs the chain's head with Vault's transit key and
    keeps it in Vault's KV (keyturn.checkpoint): a database superuser cannot move it."""
    name = database.url.rsplit("/", 1)[1]
    vault = {**shop.base_policy["vault"], "audit_anchor": name}
    bot = {"poll_interval": "500ms", "card_claim_timeout": "2s", "audit_checkpoint": "300ms"}
    reader = shop.bot_vault()
    anchor = Anchor(reader, name=name)
    try:
        async with run_bot(vault=vault, bot=bot) as rb:
            await rb.hold()

            async def anchored() -> Checkpoint | None:
                checkpoint, _ = await anchor.latest()
                async with rb.store.raw_connection() as conn:
                    head = await conn.fetchval("SELECT seq FROM audit_head")
                return checkpoint if checkpoint is not None and checkpoint.seq == head else None

            await rb.until(anchored)
            checkpoint = await anchored()
            assert checkpoint is not None and checkpoint.hmac.startswith("vault:v1:")
    finally:
        await reader.close()


async def test_commands_are_printed_back_off_the_event_loop(
    run_bot: BotFactory, slack: SlackEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Printing a 64 KiB command back from its parse tree takes a few hundred ms; an agent
    that sends many would stall every click if the bot drew cards on its event loop."""
    from bot import command_view
    from bot.access import views

    on_loop: list[str] = []

    def recording(real: Any) -> Any:
        def shown(command: str, shell: bool) -> Any:
            if threading.current_thread() is threading.main_thread():
                on_loop.append(command)
            return real(command, shell)

        return shown

    monkeypatch.setattr(command_view, "shown", recording(command_view.shown))
    monkeypatch.setattr(views, "shown", recording(views.shown))
    async with run_bot() as rb:
        request_id = await rb.hold("DELETE FROM t WHERE id IN (" + ", ".join(["1"] * 8000) + ")")
        await rb.card(request_id)
        status, _ = await slack.command("pending", "U_ALICE", CHANNEL)
        assert status == 200 and "asks to run 1 statement" in slack.ephemerals[-1]["text"]
    assert on_loop == []


async def test_each_bot_loop_crashing_turns_its_healthz_503_and_its_work_follows_once_back(
    slack: SlackEmulator, database: Dsn, shop: Shop, quick_retries: None
) -> None:
    store = Store(database)
    client = slack_client(slack.bot_token, slack.api_url)
    bot = {"poll_interval": "500ms", "card_claim_timeout": "2s", "audit_checkpoint": "300ms"}
    config = parse_config(policy_data(shop, bot=bot, record={"purge_every": "300ms"}))
    process = build(config, store, client, slack.signing_secret, shop.bot_vault())
    server = TestServer(web_application(process))
    await server.start_server()
    slack.bot_url = str(server.make_url("/slack/events"))

    async def answer(path: str = "/healthz") -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.get(str(server.make_url(path))) as resp:
            return resp.status, await (resp.json() if path == "/healthz" else resp.text())

    try:
        async with Store(database) as reader:
            rb = RunningBot(process.bot, reader, slack)
            loops = {loop.name: loop for loop in process.supervisor.loops}
            assert set(loops) == {"bot", "cards", "audit-anchor", "recording-retention"}
            for name, loop in loops.items():
                with crashing(loop):
                    await rb.until(lambda: _eq(_status(answer()), 503))
                    _, body = await answer()
                    assert body["error"]["loops"] == [name]
                    if name == "cards":
                        request_id = await rb.hold()
                        assert await card_store.posted_at(reader, request_id) is None
                await rb.until(lambda: _eq(_status(answer()), 200))
            await rb.card(request_id)  # the held work is done once the loop is back
            _, metrics = await answer("/metrics")
            for name in loops:
                assert f'keyturn_loop_crashes_total{{loop="{name}"}} 0.0' not in metrics
    finally:
        await server.close()


async def _status(answer: Any) -> int:
    return int((await answer)[0])


async def test_a_listed_approver_decides_while_slack_cannot_list_the_approvers_group(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    """Someone the policy names needs no call to Slack to be an approver: a user group Slack
    cannot list now (an outage, a missing scope) stops only its members' votes."""
    slack.fail("usergroups.users.list", 500, times=1000)  # before anything is cached
    async with run_bot() as rb:
        request_id = await rb.hold()
        ts = await rb.card(request_id)
        await slack.click(CHANNEL, ts, APPROVE, "U_ALICE")  # listed by name in the rule
        await rb.until(lambda: _eq(rb.status(request_id), "approved"))
