"""Only strong, real public keys can be registered; every refusal says what to paste."""

from __future__ import annotations

import base64
import struct

import asyncssh
import pytest

from keyturn import ssh_keys
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


# ------------------------------------------------------------------ degenerate keys

P = 2**255 - 19


def wire_line(algorithm: str, *fields: bytes) -> str:
    """A one-line public key of ``algorithm`` carrying ``fields`` as SSH strings."""

    def string(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    blob = string(algorithm.encode()) + b"".join(string(f) for f in fields)
    return f"{algorithm} {base64.b64encode(blob).decode()} mallory@box"


def mpint(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 8) // 8, "big")


def with_small_order_part(line: str) -> bytes:
    """A valid key's point plus the point of order 2: signatures can be forged for it."""
    raw = base64.b64decode(line.split()[1])[-32:]
    point = ssh_keys._decoded(raw)
    order_two = ssh_keys._decoded((P - 1).to_bytes(32, "little"))
    assert point is not None and order_two is not None
    x, y, z, _ = ssh_keys._add(point, order_two)
    x, y = x * pow(z, -1, P) % P, y * pow(z, -1, P) % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


# The red team's all-zero key was signed by OpenBao's CA; the others are the same class.
DEGENERATE_ED25519 = {
    "all zero (order 4)": bytes(32),
    "the identity": (1).to_bytes(32, "little"),
    "order 2": (P - 1).to_bytes(32, "little"),
    "order 8": bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    "not canonical (y = p + 1)": (P + 1).to_bytes(32, "little"),
    "not on the curve": (2).to_bytes(32, "little"),
}


@pytest.mark.parametrize("raw", DEGENERATE_ED25519.values(), ids=DEGENERATE_ED25519.keys())
def test_degenerate_ed25519_points_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidInput, match="not a usable Ed25519 key"):
        parse_public_key(wire_line("ssh-ed25519", raw))


def test_a_key_with_a_small_order_part_is_refused() -> None:
    mixed = with_small_order_part(public("ssh-ed25519"))
    with pytest.raises(InvalidInput, match="not a usable Ed25519 key"):
        parse_public_key(wire_line("ssh-ed25519", mixed))


def test_real_ed25519_keys_pass_the_point_check() -> None:
    for _ in range(20):
        assert parse_public_key(public("ssh-ed25519")).algorithm == "ssh-ed25519"


@pytest.mark.parametrize(
    "line",
    [
        # an ECDSA point off its curve, and the point at infinity
        wire_line("ecdsa-sha2-nistp256", b"nistp256", b"\x04" + (1).to_bytes(32, "big") * 2),
        wire_line("ecdsa-sha2-nistp256", b"nistp256", b"\x00"),
        # RSA with e = 1 (a signature is the message) and an even exponent
        wire_line("ssh-rsa", mpint(1), mpint((1 << 3071) | 12345)),
        wire_line("ssh-rsa", mpint(65536), mpint((1 << 3071) | 12345)),
    ],
    ids=["ecdsa-off-curve", "ecdsa-infinity", "rsa-e-1", "rsa-e-even"],
)
def test_degenerate_ecdsa_and_rsa_keys_are_refused(line: str) -> None:
    """cryptography refuses these when asyncssh imports them; held to it here."""
    with pytest.raises(InvalidInput, match="does not parse"):
        parse_public_key(line)
