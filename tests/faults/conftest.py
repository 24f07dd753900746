"""Fault stories: real processes of keyturn killed (SIGKILL) or stopped at the worst moments,
on the integration tests' real services (their fixtures, imported here). Every test here is
marked ``slow``: ``scripts/test -m "not slow"`` leaves them out of a quick loop; CI runs them."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keyturn.harness.ports import free_port
from keyturn.harness.postgres import PostgresCluster
from keyturn.harness.pytest_plugin import (  # noqa: F401  (fixtures: on the cluster below)
    PostgresServer,
    database,
    template_database,
)
from keyturn.store.dsn import Dsn
from tests.integration.conftest import *  # noqa: F403  (the services, as the integration tests have them)
from tests.integration.conftest import Shop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A Postgres cluster of the stories' own: what they kill leaves database roles behind
    (a SIGKILLed gateway's read-only logins live until their leases end), and roles are the
    cluster's, which other tests count."""
    with PostgresCluster() as cluster:
        yield PostgresServer(cluster.dsn(), cluster.password, cluster.port)


async def order_total(shop: Shop, order: int) -> int:
    """An order's total on the target: what an approved ``total = total + 1`` changes, so a
    story can count how many times it ran."""
    rows = await shop.postgres.fetch(f"SELECT total FROM orders WHERE id = {order}", shop.database)
    return int(rows[0][0])


@dataclass
class GatewayProcess:
    """``keyturn gateway`` in a process of its own, as an operator runs a replica."""

    proc: subprocess.Popen[bytes]
    url: str

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, connections cut mid-way."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def policy_file(shop: Shop, tmp: Path, **gateway: Any) -> tuple[Path, dict[str, Any]]:
    data = copy.deepcopy(shop.base_policy)
    data["gateway"] = {**data["gateway"], "poll_interval": "500ms", **gateway}
    path = tmp / f"keyturn-{free_port()}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, data


@contextlib.asynccontextmanager
async def gateway_process(
    shop: Shop, keyturn_db: Dsn, tmp: Path, rules: list[dict[str, Any]] | None = None
) -> AsyncIterator[GatewayProcess]:
    port = free_port()
    path, data = policy_file(shop, tmp, listen=f"127.0.0.1:{port}")
    if rules is not None:
        data["rules"] = rules
        path.write_text(json.dumps(data), encoding="utf-8")
    env = os.environ | {
        "KEYTURN_DATABASE_URL": keyturn_db.url,
        "KEYTURN_GATEWAY_ROLE_ID": shop.role_id,
        "KEYTURN_GATEWAY_SECRET_ID": shop.secret_id,
    }
    log = (tmp / f"gateway-{port}.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; the test then waits on HTTP)
        [sys.executable, "-m", "keyturn.cli", "gateway", "--config", str(path)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"keyturn gateway exited: see {log.name}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield GatewayProcess(proc, url)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
