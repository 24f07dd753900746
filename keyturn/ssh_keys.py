"""Which SSH public keys a person may register for their own sessions, and what is wrong
with the ones they may not.

A registered key is what Vault's SSH CA will sign for a human grant, so it must be a real
public key of a strong type: Ed25519, ECDSA, or RSA of at least 3072 bits. Everything else
gets one sentence saying what is wrong and what to paste instead. Parsing only: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncssh

from keyturn.errors import InvalidInput

MIN_RSA_BITS = 3072
MAX_KEY_CHARS = 16_384  # an RSA-16384 public key is under 3 KB: anything this long is not one
_ALLOWED = {
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
}
HOW = (
    "paste the one line of your .pub file "
    "(e.g. `ssh-keygen -t ed25519`, then ~/.ssh/id_ed25519.pub)"
)


@dataclass(frozen=True)
class PublicKey:
    algorithm: str
    bits: int | None
    fingerprint: str  # SHA256:…, as ssh-keygen -l prints it
    openssh: str  # the normalised one-line form (algorithm, key, comment)


def parse_public_key(text: str) -> PublicKey:
    """The key on ``text`` if it may be registered; :class:`InvalidInput` saying why not."""
    line = text.strip()
    if not line:
        raise InvalidInput(f"no key given: {HOW}")
    if len(line) > MAX_KEY_CHARS or "\n" in line or "\r" in line:
        raise InvalidInput(f"that is more than one public key line: {HOW}")
    if any(ord(c) < 32 and c != "\t" for c in line):
        raise InvalidInput(f"that line holds control characters: {HOW}")
    if "PRIVATE KEY" in line:
        raise InvalidInput(
            f"that is a private key: never paste it anywhere; rotate it if it was shared, and {HOW}"
        )
    algorithm = line.split(maxsplit=1)[0]
    if algorithm == "ssh-dss":
        raise InvalidInput(f"DSA keys are too weak to be signed: {HOW}")
    if "-cert-v01@openssh.com" in algorithm:
        raise InvalidInput(f"that is a certificate, not a key: {HOW}")
    if algorithm not in _ALLOWED:
        raise InvalidInput(f"not an SSH public key keyturn accepts ({algorithm[:40]!r}): {HOW}")
    try:
        key = asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError):
        raise InvalidInput(f"that key does not parse (cut or altered?): {HOW}") from None
    bits = getattr(getattr(key, "pyca_key", None), "key_size", None)
    if algorithm == "ssh-rsa" and (bits is None or bits < MIN_RSA_BITS):
        raise InvalidInput(
            f"RSA keys need at least {MIN_RSA_BITS} bits (this one has {bits}): "
            f"`ssh-keygen -t ed25519`, or `ssh-keygen -t rsa -b 4096`, then paste the .pub line"
        )
    openssh = key.export_public_key().decode().strip()
    return PublicKey(algorithm, bits, key.get_fingerprint("sha256"), openssh)
