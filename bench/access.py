"""On-call access benchmark: run ``python bench/access.py`` (after scripts/test has set up
.venv).

1. Slash command to DM: on-call engineers type ``/keyturn db shop 15m …`` (signed, through
   Bolt over HTTP); an approver clicks Approve the moment the card appears (emulated); the
   figure is from the command to the credentials DM arriving. The floor is Vault's own part,
   measured in the same run: the same calls (a dynamic login, its renewal to the grant's TTL,
   the wrap) made directly.
2. Revocation of human grants: session grants with real leases (real Postgres roles) all fall
   due in the same second; the figure is the lag from each grant's ``expires_at`` to its
   revocation being committed. The floor is Vault's own revocation rate: as many leases
   revoked directly, 32 at a time, in the same run.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.expiry import leftovers
from bench.stack import (
    Stack,
    expire_together,
    issue_many,
    percentile,
    real_stack,
    report,
    serve_bot,
)
from bot import card_store
from bot.cards import APPROVE
from bot.credentials import Issuer
from keyturn.config.loading import parse_config
from keyturn.harness.slack import SlackEmulator
from keyturn.store import grants, requests
from keyturn.store.db import Store
from keyturn.store.models import RequestRow
from keyturn.vault import Vault

ENGINEERS = 40
GRANTS = 300
CHANNEL = "CBENCH"
TTL = timedelta(minutes=15)


def access_policy(stack: Stack) -> dict[str, Any]:
    data = dict(stack.policy_data)
    data["slack"] = {"approval_channel": CHANNEL}
    data["bot"] = {"poll_interval": "1s"}
    data["access"] = [
        {
            "name": "on-call",
            "requesters": {"slack_usergroup": "S_ONCALL"},
            "approvers": {"users": ["U_APPROVER"]},
            "max_duration": "1h",
        }
    ]
    return data


async def vault_minting(vault: Vault, samples: int) -> list[float]:
    """Vault's own part of a session, direct: login, renewal to the TTL, wrap."""
    await vault.ensure_login()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        lease = await vault.creds("database/creds/shop-rw")
        await vault.renew_lease(lease.lease_id, TTL)
        await vault.wrap(dict(lease.data), timedelta(minutes=10))
        times.append(time.perf_counter() - start)
        await vault.revoke_lease(lease.lease_id)
    return times


async def command_to_dm(stack: Stack) -> tuple[list[float], list[float]]:
    slack = SlackEmulator()
    await slack.start()
    engineers = [f"U_ONCALL{i}" for i in range(ENGINEERS + 5)]
    for user in ["U_APPROVER", *engineers]:
        slack.add_user(user)
    slack.usergroups["S_ONCALL"] = engineers
    store = Store(stack.database)
    runner = await serve_bot(stack, parse_config(access_policy(stack)), slack, store)
    samples = []
    try:
        for i, user in enumerate(engineers):
            start = time.perf_counter()
            status, _ = await slack.command("db shop 15m bench", user, CHANNEL)
            assert status == 200
            request_id = None
            while request_id is None:
                await asyncio.sleep(0.002)
                request_id = await _request_of(store, user)
            while (posted := await card_store.posted_at(store, request_id)) is None:
                await asyncio.sleep(0.002)
            status, _ = await slack.click(CHANNEL, posted[1], APPROVE, "U_APPROVER")
            assert status == 200
            while not any("keyturn unwrap" in m.text for m in slack.channel(f"D{user}")):
                await asyncio.sleep(0.002)
            if i >= 5:  # the first warm up pools and logins
                samples.append(time.perf_counter() - start)
        async with asyncio.timeout(30):  # the last cards drawn before the bot stops
            while await card_store.stale_cards(store):
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
        await slack.stop()
    floor = await vault_minting(stack.vault("keyturn-bot"), 20)
    return samples, floor


async def _request_of(store: Store, user: str) -> Any:
    async with store.raw_connection() as conn:
        return await conn.fetchval("SELECT id FROM requests WHERE requester = $1", user)


def held_access(i: int) -> requests.NewRequest:
    return requests.NewRequest(
        "shop",
        f"postgres session for U_BENCH{i} on shop, 15m",
        f"U_BENCH{i}",
        timedelta(minutes=15),
        rule="on-call",
        grant_ttl=TTL,
        access=True,
    )


async def vault_revoking(vault: Vault, count: int) -> float:
    """Seconds Vault itself takes to revoke ``count`` leases, 32 at a time."""
    await vault.ensure_login()
    leases = await asyncio.gather(*(vault.creds("database/creds/shop-rw") for _ in range(count)))
    gate = asyncio.Semaphore(32)

    async def revoke(lease_id: str) -> None:
        async with gate:
            await vault.revoke_lease(lease_id)

    start = time.perf_counter()
    await asyncio.gather(*(revoke(lease.lease_id) for lease in leases))
    return time.perf_counter() - start


async def revocation(stack: Stack) -> tuple[list[float], float, float, tuple[int, int], int]:
    config = parse_config(access_policy(stack))
    store = Store(stack.database, pool_size=20)
    issuer = Issuer(config, stack.vault("keyturn-bot"))
    target = config.policy.postgres_targets()["shop"]

    async def mint(row: RequestRow) -> grants.Minted:
        now = datetime.now(UTC)
        return (await issuer.access_login(row, target, timedelta(hours=1), now)).minted

    await issue_many(store, GRANTS, held_access, mint, issuer.unmint)
    lags, took = await expire_together(store, issuer, config)
    async with store.raw_connection() as conn:
        open_access = await conn.fetchval(
            "SELECT count(*) FROM requests WHERE access AND status <> 'executed'"
        )
    floor = await vault_revoking(issuer.vault, GRANTS)
    await issuer.vault.close()
    await store.close()
    return lags, took, floor, await leftovers(stack), int(open_access)


async def main() -> None:
    async with real_stack() as stack:
        print("keyturn on-call access benchmark (real Postgres, real OpenBao, Bolt over HTTP)")
        samples, floor = await command_to_dm(stack)
        p50, vault = percentile(samples, 0.5) * 1000, percentile(floor, 0.5) * 1000
        print(
            f"  {len(samples)} grants of access; p95 {percentile(samples, 0.95) * 1000:.0f} ms; "
            f"Vault's own part p50 {vault:.1f} ms (the floor)"
        )
        report(
            "/keyturn db -> credentials DM (immediate approval), p50",
            p50,
            "ms",
            "<= 60 s",
            p50 <= 60_000,
        )
        report("  as a ratio to Vault's own minting", p50 / vault, "x", "(floor)", True)
        lags, took, vault_took, (leases, roles), unfinished = await revocation(stack)
        p99 = percentile(lags, 0.99)
        print(
            f"  {GRANTS} grants of access ended in {took:.2f} s after the first was due; "
            f"Vault alone revokes as many in {vault_took:.2f} s; lag p50 "
            f"{percentile(lags, 0.5):.2f} s, max {max(lags):.2f} s"
        )
        report(f"{GRANTS} human grants due in one second: lag p99", p99, "s", "<= 5 s", p99 <= 5)
        report(
            "  time to end them all / Vault's own",
            took / vault_took,
            "x",
            "<= 3x",
            took <= 3 * vault_took,
        )
        report("leases left in Vault afterwards", leases, "", "0", leases == 0)
        report("dynamic roles left in Postgres afterwards", roles, "", "0", roles == 0)
        report("access not marked over", unfinished, "", "0", unfinished == 0)


if __name__ == "__main__":
    asyncio.run(main())
