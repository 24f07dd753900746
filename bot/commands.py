"""``/keyturn``: read what was typed, run one use case, answer in one ephemeral message.

Each use case here is one or two short transactions, so the answer goes in the ack itself
(within Slack's 3 s); the card, the approval and the credentials follow on their own. Bad
input raises a keyturn error that says what is wrong and what to type, which the Slack edge
words for the person (:func:`bot.app.tell`); nothing is created.
"""

from __future__ import annotations

import asyncio

from bot.access import views
from bot.access.ask import KIND_OF_COMMAND, Ask
from bot.service import Bot
from bot.slack_text import at, escape
from keyturn.config.durations import parse_duration
from keyturn.errors import InvalidInput
from keyturn.ssh_keys import parse_public_key
from keyturn.store import ssh_keys

HELP = "\n".join(
    [
        "*keyturn*: what you can type",
        "• `/keyturn db <target> <ttl> <reason>`: a database login of your own, e.g. "
        "`/keyturn db orders-db 15m checking a refund`",
        "• `/keyturn ssh <target> <ttl> <reason>`: an SSH certificate for your registered key",
        "• `/keyturn request`: the same, from a form",
        "• `/keyturn list`: your pending and open access",
        "• `/keyturn pending`: requests waiting on you as approver",
        "• `/keyturn extend <id> <ttl>`: more time for open access, within its rule's maximum",
        "• `/keyturn revoke <id>`: end your access now",
        "• `/keyturn ssh-key add <public key>`: register the key keyturn's SSH CA will sign"
        " for your own access (Ed25519, ECDSA, or RSA of 3072 bits or more)",
        "• `/keyturn ssh-key list`: your keys and their fingerprints",
        "• `/keyturn ssh-key remove <fingerprint>`: forget one of them",
        "• `/keyturn help`: this list",
    ]
)
SSH_KEY_USAGE = "type `/keyturn ssh-key add <public key>`, `list` or `remove <fingerprint>`"
ASKS = frozenset(KIND_OF_COMMAND)  # the commands that create a request


async def run(bot: Bot, user: str, text: str) -> str:
    """The answer to ``/keyturn text`` typed by ``user`` (``request`` is the Slack edge's:
    it opens a modal)."""
    home = bot.home
    if any(ord(c) < 32 and c != "\t" for c in text):
        raise InvalidInput("that holds control characters: type `/keyturn help`")
    command, _, rest = text.strip().partition(" ")
    rest = rest.strip()
    if command in ("", "help"):
        return HELP
    if command in KIND_OF_COMMAND:
        return await _ask(bot, user, command, rest)
    if command == "list" and not rest:
        return views.listing(await home.lines(user), home.store.clock.now())
    if command == "pending" and not rest:
        waiting = await home.waiting_on(user)  # off the loop, as cards are (bot.drawing)
        return await asyncio.to_thread(views.waiting_listing, waiting)
    if command == "revoke":
        return await _revoke(bot, user, rest)
    if command == "extend":
        return await _extend(bot, user, rest)
    if command == "ssh-key":
        return await _ssh_key(bot, user, rest)
    raise InvalidInput(f"there is no `/keyturn {command[:40]}`: type `/keyturn help`")


async def _ask(bot: Bot, user: str, command: str, rest: str) -> str:
    words = rest.split(None, 2)
    if len(words) < 2:
        raise InvalidInput(
            f"say which target and for how long: `/keyturn {command} <target> <ttl> <reason>`, "
            f"e.g. `/keyturn {command} orders-db 15m checking a refund`"
        )
    target, ttl = words[0], words[1]
    reason = words[2] if len(words) > 2 else ""
    row = await bot.asking.ask(Ask(user, target, ttl, reason, kind=KIND_OF_COMMAND[command]))
    channel = bot.config.approval_channel(row.target)
    return views.confirmation(row.id, row.target, row.grant_ttl_seconds or 0, channel)


async def _revoke(bot: Bot, user: str, rest: str) -> str:
    if not rest or " " in rest:
        raise InvalidInput("type `/keyturn revoke <id>` with an id from `/keyturn list`")
    grant = await bot.home.open_grant(user, rest)
    grant = await bot.revoke(str(grant.id), user, own=True)
    if grant.lease_id:
        return f"Ended your access to `{escape(grant.target)}`: its connections were closed."
    return (
        f"Ended your access to `{escape(grant.target)}` in keyturn; the certificate already "
        f"issued works until {at(grant.expires_at)} (certificates cannot be "
        "recalled)."
    )


async def _extend(bot: Bot, user: str, rest: str) -> str:
    words = rest.split()
    if len(words) != 2:
        raise InvalidInput("type `/keyturn extend <id> <ttl>`, e.g. `/keyturn extend 1a2b3c4d 15m`")
    grant = await bot.home.open_grant(user, words[0])
    try:
        extra = parse_duration(words[1])
    except ValueError:
        raise InvalidInput(f"`{words[1][:20]}` is not a duration: type one such as 15m") from None
    grant = await bot.extend(str(grant.id), user, extra, own=True)
    return f"Your access to `{escape(grant.target)}` now ends at {at(grant.expires_at)}."


async def _ssh_key(bot: Bot, user: str, text: str) -> str:
    action, _, argument = text.partition(" ")
    argument = argument.strip()
    if action == "add":
        key = parse_public_key(argument)
        await ssh_keys.add_key(bot.store, user, key)
        return f"Registered your {key.algorithm} key `{key.fingerprint}`."
    if action == "list" and not argument:
        keys = await ssh_keys.keys_of(bot.store, user)
        if not keys:
            return "You have no SSH keys yet: `/keyturn ssh-key add <public key>`."
        return "Your SSH keys:\n" + "\n".join(
            f"• `{k.fingerprint}` {k.algorithm}"
            + (f" ({k.bits} bits)" if k.bits else "")
            + f", added {k.added_at:%Y-%m-%d}"
            for k in keys
        )
    if action == "remove" and argument and " " not in argument:
        await ssh_keys.remove_key(bot.store, user, argument)
        return f"Removed your key `{escape(argument)}`."
    raise InvalidInput(SSH_KEY_USAGE)
