"""Free TCP ports on loopback."""

from __future__ import annotations

import socket

_GIVEN: set[int] = set()  # ports handed out in this process, bound or about to be


def free_port() -> int:
    """A port that was free a moment ago and that this process has not handed out before:
    two calls before either port is bound (the dev stack picks the gateway's and the bot's,
    then sshd its own) must not get the same one. Other processes can still race for it;
    callers retry on that rare collision."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
