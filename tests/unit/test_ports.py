"""Free ports: never the same one twice in a process."""

from __future__ import annotations

from keyturn.harness.ports import free_port


def test_ports_handed_out_before_they_are_bound_are_all_different() -> None:
    """The kernel may offer a port again as soon as the probe socket closes: the dev stack
    once gave the gateway and sshd the same port, and the gateway's health check met sshd."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
