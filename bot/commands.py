"""``/keyturn``: read what was typed, run one use case, answer in one ephemeral message.

Today it registers the SSH keys that on-call engineers' sessions will be signed for; access
requests arrive on the same command. Bad input raises a keyturn error that the Slack edge
words for the person (:func:`bot.app.tell`); nothing is created.
"""

from __future__ import annotations

from bot.cards import escape
from keyturn.errors import InvalidInput
from keyturn.ssh_keys import parse_public_key
from keyturn.store import ssh_keys
from keyturn.store.db import Store

HELP = "\n".join(
    [
        "*keyturn*: what you can type",
        "• `/keyturn ssh-key add <public key>`: register the key keyturn's SSH CA will sign"
        " for your own sessions (Ed25519, ECDSA, or RSA of 3072 bits or more)",
        "• `/keyturn ssh-key list`: your keys and their fingerprints",
        "• `/keyturn ssh-key remove <fingerprint>`: forget one of them",
        "• `/keyturn help`: this list",
    ]
)
SSH_KEY_USAGE = "type `/keyturn ssh-key add <public key>`, `list` or `remove <fingerprint>`"


async def run(store: Store, user: str, text: str) -> str:
    """The answer to ``/keyturn text`` typed by ``user``."""
    if any(ord(c) < 32 and c != "\t" for c in text):
        raise InvalidInput("that holds control characters: type `/keyturn help`")
    command, _, rest = text.strip().partition(" ")
    if command in ("", "help"):
        return HELP
    if command == "ssh-key":
        return await _ssh_key(store, user, rest.strip())
    raise InvalidInput(f"there is no `/keyturn {command[:40]}`: type `/keyturn help`")


async def _ssh_key(store: Store, user: str, text: str) -> str:
    action, _, argument = text.partition(" ")
    argument = argument.strip()
    if action == "add":
        key = parse_public_key(argument)
        await ssh_keys.add_key(store, user, key)
        return f"Registered your {key.algorithm} key `{key.fingerprint}`."
    if action == "list" and not argument:
        keys = await ssh_keys.keys_of(store, user)
        if not keys:
            return "You have no SSH keys yet: `/keyturn ssh-key add <public key>`."
        return "Your SSH keys:\n" + "\n".join(
            f"• `{k.fingerprint}` {k.algorithm}"
            + (f" ({k.bits} bits)" if k.bits else "")
            + f", added {k.added_at:%Y-%m-%d}"
            for k in keys
        )
    if action == "remove" and argument and " " not in argument:
        await ssh_keys.remove_key(store, user, argument)
        return f"Removed your key `{escape(argument)}`."
    raise InvalidInput(SSH_KEY_USAGE)
