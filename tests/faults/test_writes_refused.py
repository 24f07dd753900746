"""keyturn's Postgres refusing writes (a disk-full error on every new request, as a full disk
or a quota gives): nothing runs unrecorded. An allowed read is answered 503 and never reaches
the target; a held write is answered 503 and posts no card; once writes are taken again, both
work."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest

from keyturn.harness.idp import DevIdP
from keyturn.store.dsn import Dsn
from tests.integration.conftest import APPROVALS, DeskFactory, Shop

pytestmark = pytest.mark.slow

MARKER = "fault-refused-7f3a"  # in the read's text: found in pg_stat_activity if it was sent
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
    run_desk: DeskFactory, idp: DevIdP, shop: Shop, database: Dsn
) -> None:
    read = f"SELECT id, '{MARKER}' AS marker FROM customers"  # a literal: kept as it is run
    token = idp.token("crew-billing")
    keyturn_db = await asyncpg.connect(database.url)
    # the read, were it sent, would wait on this lock, in plain sight in pg_stat_activity
    target = await asyncpg.connect(shop.postgres.dsn(shop.database).url)
    try:
        async with run_desk() as desk:
            # the agent's read-only login made first (Vault's GRANTs would wait on the lock)
            status, body = await _post(desk.gateway.url, token, "SELECT 1 AS warm")
            assert status == 200, body
            await keyturn_db.execute(REFUSE)
            locked = target.transaction()
            await locked.start()
            await target.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
            answer = asyncio.create_task(_post(desk.gateway.url, token, read))
            seen = 0  # watched all the while: a statement sent would wait on the lock
            for _ in range(40):
                seen += await target.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1"
                    " AND pid <> pg_backend_pid()",
                    f"%{MARKER}%",
                )
                if answer.done() and _ >= 20:
                    break
                await asyncio.sleep(0.05)
            status, body = await answer
            assert status == 503 and body["error"]["code"], body
            assert seen == 0  # record, then run: without its record it never left
            status, body = await _post(
                desk.gateway.url, token, "UPDATE orders SET total = 0 WHERE id = 450"
            )
            assert status == 503, body
            await locked.rollback()
            assert (
                await keyturn_db.fetchval(  # nothing of either was kept
                    "SELECT count(*) FROM requests WHERE command LIKE $1 OR command LIKE $2",
                    f"%{MARKER}%",
                    "%WHERE id = 450%",
                )
                == 0
            )
            await keyturn_db.execute(TAKE)
            status, body = await _post(desk.gateway.url, token, read)
            assert status == 200 and body["status"] == "executed", body
            await asyncio.sleep(1)
            assert not [m for m in desk.slack.messages.get(APPROVALS, []) if m.thread_ts is None]
    finally:
        await target.close()
        await keyturn_db.close()
