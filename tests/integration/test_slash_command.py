"""``/keyturn`` as Slack delivers it (signed, through Bolt): SSH key registration, each
answer shown to the person alone, bad input creating nothing."""

from __future__ import annotations

import asyncio

import asyncssh

from keyturn.harness.slack import SlackEmulator
from keyturn.store.db import Store
from tests.integration import test_bot
from tests.integration.test_bot import BotFactory

slack = test_bot.slack  # the bot tests' fixtures: a real bot on the Slack emulator
run_bot = test_bot.run_bot


def public_key(algorithm: str = "ssh-ed25519", **kw: int) -> str:
    key = asyncssh.generate_private_key(algorithm, **kw)
    return key.export_public_key().decode().strip()


async def said(slack: SlackEmulator, user: str, text: str) -> str:
    """What ``user`` reads after typing ``/keyturn text`` (an ephemeral, theirs alone)."""
    before = len(slack.ephemerals)
    status, _ = await slack.command(text, user)
    assert status == 200
    (answer,) = slack.ephemerals[before:]
    assert answer["user"] == user
    return str(answer["text"])


async def keys(store: Store) -> list[tuple[str, str]]:
    async with store.raw_connection() as conn:
        return [tuple(r) for r in await conn.fetch("SELECT owner, fingerprint FROM ssh_keys")]


async def test_register_list_and_remove_a_key(run_bot: BotFactory, slack: SlackEmulator) -> None:
    async with run_bot() as rb:
        assert "ssh-key add <public key>" in await said(slack, "U_ALICE", "help")
        assert "ssh-key add" in await said(slack, "U_ALICE", "")  # a bare /keyturn helps
        line = public_key()
        added = await said(slack, "U_ALICE", f"ssh-key add {line}")
        fingerprint = added.split("`")[1]
        assert added.startswith("Registered your ssh-ed25519 key `SHA256:")
        assert fingerprint in await said(slack, "U_ALICE", "ssh-key list")
        assert "no SSH keys" in await said(slack, "U_BOB", "ssh-key list")  # theirs alone
        assert "you have no key" in await said(slack, "U_BOB", f"ssh-key remove {fingerprint}")
        assert "already registered" in await said(slack, "U_ALICE", f"ssh-key add {line}")
        # one owner per key: a certificate must name one person (the ninth outside round
        # registered Ada's key for Omar too)
        assert "registered to someone else" in await said(slack, "U_BOB", f"ssh-key add {line}")
        assert await keys(rb.store) == [("U_ALICE", fingerprint)]
        assert "Removed" in await said(slack, "U_ALICE", f"ssh-key remove {fingerprint}")
        assert await keys(rb.store) == []
        async with rb.store.raw_connection() as conn:
            kinds = [r[0] for r in await conn.fetch("SELECT kind FROM audit_events ORDER BY seq")]
        assert kinds == ["ssh_key.added", "ssh_key.removed"]


async def test_bad_input_says_what_to_type_and_creates_nothing(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    async with run_bot() as rb:
        for text, answer in [
            ("ssh-key add " + public_key("ssh-rsa", key_size=2048), "at least 3072 bits"),
            ("ssh-key add ssh-dss AAAAB3NzaC1kc3M", "DSA keys are too weak"),
            ("ssh-key add", "no key given"),
            ("ssh-key", "type `/keyturn ssh-key add &lt;public key&gt;`"),
            ("ssh-key remove", "type `/keyturn ssh-key add &lt;public key&gt;`"),
            (
                "ssh-key add <!channel>",
                "not an SSH public key keyturn accepts ('&lt;!channel&gt;')",
            ),
            ("ssh-key remove <@U_BOSS>", "you have no key '&lt;@U_BOSS&gt;'"),
            (f"ssh-key add {public_key()} a\x00b", "control characters"),
            ("ssh-key remove SHA256:a\x00b", "control characters"),
            (f"ssh-key add {public_key()}\rssh-dss AAAA", "control characters"),
            ("approve-everything now", "there is no `/keyturn approve-everything`"),
            ("<!channel>", "there is no `/keyturn &lt;!channel&gt;`"),
        ]:
            assert answer in await said(slack, "U_MALLORY", text), text
        assert await keys(rb.store) == []
        assert "<!channel>" not in str(slack.ephemerals)  # echoed input pings nobody


async def test_concurrent_adds_cannot_pass_the_limit(
    run_bot: BotFactory, slack: SlackEmulator
) -> None:
    """Nine keys stored, eight more sent at once: the tenth is the last one taken."""
    async with run_bot() as rb:
        for _ in range(9):
            assert "Registered" in await said(slack, "U_ALICE", f"ssh-key add {public_key()}")
        await asyncio.gather(
            *(slack.command(f"ssh-key add {public_key()}", "U_ALICE") for _ in range(8))
        )
        assert len(await keys(rb.store)) == 10
