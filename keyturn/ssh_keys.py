"""Which SSH public keys a person may register for their own access, and what is wrong
with the ones they may not.

A registered key is what Vault's SSH CA will sign for a human grant, so it must be a real
public key of a strong type: Ed25519, ECDSA, or RSA of at least 3072 bits. "Real" is checked,
not assumed: an Ed25519 key must be a canonical point of the curve's prime-order subgroup (an
all-zero key or a small-order point verifies signatures nobody made); cryptography itself
refuses an ECDSA point off its curve and an RSA exponent that is even or below 3 when asyncssh
imports the key (tests hold it to that). Everything else gets one sentence saying what is
wrong and what to paste instead. Parsing only: no I/O.
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


# Ed25519 (RFC 8032): the field prime, the curve constant d, and the prime order L of the
# subgroup keys must lie in.
_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_L = 2**252 + 27742317777372353535851937790883648493
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T)
_IDENTITY: _Point = (0, 1, 1, 0)


def _decoded(raw: bytes) -> _Point | None:
    """The point ``raw`` encodes (RFC 8032 5.1.3), or None when it is not one canonically."""
    if len(raw) != 32:
        return None
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if (v * x * x - u) % _P:
        x = x * _SQRT_M1 % _P
        if (v * x * x - u) % _P:
            return None  # x² has no root: not on the curve
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def _add(a: _Point, b: _Point) -> _Point:
    (x1, y1, z1, t1), (x2, y2, z2, t2) = a, b
    aa, bb = (y1 - x1) * (y2 - x2) % _P, (y1 + x1) * (y2 + x2) % _P
    cc, dd = 2 * _D * t1 * t2 % _P, 2 * z1 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _times(n: int, point: _Point) -> _Point:
    out = _IDENTITY
    while n:
        if n & 1:
            out = _add(out, point)
        point, n = _add(point, point), n >> 1
    return out


def _is_identity(point: _Point) -> bool:
    x, y, z, _ = point
    return x % _P == 0 and (y - z) % _P == 0


def ed25519_key_is_sound(raw: bytes) -> bool:
    """Whether ``raw`` is a canonical Ed25519 point of prime order L: not the identity, not of
    small order (1, 2, 4, 8) and without a small-order part, all of which let a signature
    verify that no private key made."""
    point = _decoded(raw)
    if point is None or _is_identity(point):
        return False
    return _is_identity(_times(_L, point))


def _last_string(wire: bytes) -> bytes:
    """The last length-prefixed string of an SSH wire-format blob (an Ed25519 key's point)."""
    at, last = 0, b""
    while at + 4 <= len(wire):
        size = int.from_bytes(wire[at : at + 4], "big")
        last, at = wire[at + 4 : at + 4 + size], at + 4 + size
    return last


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
    if algorithm == "ssh-ed25519" and not ed25519_key_is_sound(_last_string(key.public_data)):
        raise InvalidInput(f"that is not a usable Ed25519 key (a degenerate point): {HOW}")
    bits = getattr(getattr(key, "pyca_key", None), "key_size", None)
    if algorithm == "ssh-rsa" and (bits is None or bits < MIN_RSA_BITS):
        raise InvalidInput(
            f"RSA keys need at least {MIN_RSA_BITS} bits (this one has {bits}): "
            f"`ssh-keygen -t ed25519`, or `ssh-keygen -t rsa -b 4096`, then paste the .pub line"
        )
    openssh = key.export_public_key().decode().strip()
    return PublicKey(algorithm, bits, key.get_fingerprint("sha256"), openssh)
