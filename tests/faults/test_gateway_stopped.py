"""A gateway stopped as systemd or Kubernetes stops it (SIGTERM) drains and exits 0, and the
read-only logins it made for its agents end with it, rather than living on in the target
until their Vault leases run out."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from keyturn.agent.client import AsyncClient
from keyturn.harness.idp import DevIdP
from keyturn.store.dsn import Dsn
from tests.faults.conftest import READ_ONLY, gateway_process, leases_under
from tests.integration.conftest import Shop

pytestmark = pytest.mark.slow


async def test_a_gateway_stopped_with_sigterm_ends_its_read_only_logins(
    shop: Shop, database: Dsn, idp: DevIdP, tmp_path: Path
) -> None:
    before = await leases_under(shop, READ_ONLY)
    async with gateway_process(shop, database, tmp_path) as gateway:
        async with AsyncClient(gateway.url, idp.token("crew-stopped")) as agent:
            done = await agent.submit("shop", "SELECT count(*) FROM orders")
        assert done.status == "executed", done
        made = await leases_under(shop, READ_ONLY) - before
        assert made  # the agent's read-only login, alive while the gateway is
        started = time.monotonic()
        await asyncio.to_thread(gateway.stop)
        assert gateway.proc is not None and gateway.proc.returncode == 0
        assert time.monotonic() - started < 30  # nothing in flight: it does not linger
    assert not made & await leases_under(shop, READ_ONLY)  # ended with it
