"""keyturn's Postgres refusing writes (a disk-full error on every new request, as a full disk
or a quota gives): an allowed read is answered 503 (record, then run: the allowed-path tests
show it never reaches the target), a held write is answered 503 and posts no card, nothing is
recorded half-way, and once writes are taken again the same read runs."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest

from keyturn.harness.idp import DevIdP
from keyturn.store.dsn import Dsn
from tests.integration.conftest import APPROVALS, DeskFactory

pytestmark = pytest.mark.slow

MARKER = "fault-refused-7f3a"
REFUSE = """
CREATE FUNCTION keyturn_fault_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'
    USING ERRCODE = 'disk_full'; END $$;
CREATE TRIGGER keyturn_fault_refuse BEFORE INSERT ON requests
    FOR EACH ROW EXECUTE FUNCTION keyturn_fault_refuse();
"""
TAKE = "DROP TRIGGER keyturn_fault_refuse ON requests; DROP FUNCTION keyturn_fault_refuse();"


async def _post(url: str, token: str, command: str) -> tuple[int, dict[str, Any]]:
    """One POST, no retries (the agent client would retry a 503 for a while)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/v1/commands",
            json={"target": "shop", "command": command},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        return resp.status, await resp.json()


async def test_writes_refused_by_keyturn_s_postgres_run_nothing_unrecorded(
    run_desk: DeskFactory, idp: DevIdP, database: Dsn
) -> None:
    read = f"SELECT id, '{MARKER}' AS marker FROM customers"
    token = idp.token("crew-billing")
    keyturn_db = await asyncpg.connect(database.url)
    try:
        async with run_desk() as desk:
            await keyturn_db.execute(REFUSE)
            status, body = await _post(desk.gateway.url, token, read)
            assert status == 503 and body["error"]["code"] == "unavailable", body
            status, body = await _post(
                desk.gateway.url, token, "UPDATE orders SET total = 0 WHERE id = 450"
            )
            assert status == 503, body
            assert await keyturn_db.fetchval("SELECT count(*) FROM requests") == 0
            await keyturn_db.execute(TAKE)
            status, body = await _post(desk.gateway.url, token, read)
            assert status == 200 and body["status"] == "executed", body
            await asyncio.sleep(1)  # the refused write left no card behind
            assert not [m for m in desk.slack.messages.get(APPROVALS, []) if m.thread_ts is None]
    finally:
        await keyturn_db.close()
