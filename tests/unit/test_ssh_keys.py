"""Only strong, real public keys can be registered; every refusal says what to paste."""

from __future__ import annotations

import asyncssh
import pytest

from keyturn.errors import InvalidInput
from keyturn.ssh_keys import parse_public_key


def public(algorithm: str, **kw: int) -> str:
    key = asyncssh.generate_private_key(algorithm, comment="ada@laptop", **kw)
    return key.export_public_key().decode().strip()


@pytest.mark.parametrize(
    ("algorithm", "kw", "bits"),
    [
        ("ssh-ed25519", {}, None),
        ("ecdsa-sha2-nistp256", {}, 256),
        ("ssh-rsa", {"key_size": 3072}, 3072),
    ],
)
def test_strong_keys_are_accepted(algorithm: str, kw: dict[str, int], bits: int | None) -> None:
    line = public(algorithm, **kw)
    key = parse_public_key("  " + line + "\n")
    assert key.algorithm == algorithm and key.bits == bits
    assert key.fingerprint.startswith("SHA256:")
    assert key.openssh.split()[:2] == line.split()[:2]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no key given"),
        (public("ssh-rsa", key_size=2048), "at least 3072 bits (this one has 2048)"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "DSA keys are too weak"),
        ("-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAA", "that is a private key"),
        ("ssh-ed25519-cert-v01@openssh.com AAAA", "a certificate, not a key"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv", "does not parse"),
        ("hello world", "not an SSH public key"),
        (public("ssh-ed25519") + "\n" + public("ssh-ed25519"), "more than one public key line"),
        (public("ssh-ed25519") + "\rssh-dss AAAA", "more than one public key line"),
        (public("ssh-ed25519") + " a\x00b", "control characters"),
    ],
    ids=[
        "empty",
        "rsa-2048",
        "dsa",
        "private",
        "certificate",
        "truncated",
        "junk",
        "two",
        "carriage-return",
        "nul",
    ],
)
def test_refusals_say_what_to_paste(text: str, says: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_public_key(text)
    assert says in refused.value.message
    assert "ssh-keygen" in refused.value.message  # and what to do instead
