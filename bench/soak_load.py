"""The soak's load: agents sending a mix of commands, and an approver who clicks every card.

Every call is one :class:`Sample` (path, when it started and ended, whether it got the answer
its path should get), and every held request an agent was given an id for is kept with the
outcome the agent saw, so the soak can hold them against keyturn's database at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import zlib
from dataclasses import dataclass, field

import aiohttp

from bot.cards import APPROVE, DENY
from keyturn.agent.client import AsyncClient, ClientError, CommandBlocked
from keyturn.aio import spawn
from keyturn.harness.slack import SlackEmulator

APPROVALS = "CSOAK"
APPROVER = "U_APPROVER"
PATHS = ("allowed", "held", "blocked")
WAIT_FOR = 600.0  # seconds an agent waits on a held write before giving up on it
RECLICK = 20.0  # seconds before the approver clicks a card that still asks again
PEOPLE = 32  # approvers reading cards at once: 200 agents hold ~15 writes a second


@dataclass(frozen=True)
class Sample:
    path: str
    start: float  # monotonic
    end: float
    ok: bool

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Load:
    """What the agents did: samples, and the held writes' ids with what each agent saw."""

    samples: list[Sample] = field(default_factory=list)
    held: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (row, status seen)
    rows: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def agent(client: AsyncClient, load: Load, think: float, rng: random.Random) -> None:
    """One agent until ``load.stop``: 80 % reads, 15 % writes held for a person, 5 % blocked."""
    while not load.stop.is_set():
        await asyncio.sleep(rng.expovariate(1 / think))
        roll = rng.random()
        start = time.monotonic()
        if roll < 0.80:
            ok = await _read(client, rng)
            load.samples.append(Sample("allowed", start, time.monotonic(), ok))
        elif roll < 0.95:
            ok = await _write(client, load)
            load.samples.append(Sample("held", start, time.monotonic(), ok))
        else:
            ok = await _blocked(client)
            load.samples.append(Sample("blocked", start, time.monotonic(), ok))


async def _read(client: AsyncClient, rng: random.Random) -> bool:
    try:
        done = await client.submit(
            "shop", f"SELECT id, total FROM orders WHERE id = {rng.randint(1, 10000)}"
        )
    except ClientError:
        return False
    return done.status == "executed"


async def _write(client: AsyncClient, load: Load) -> bool:
    """Submit, then wait for the person's decision and the outcome. Each write adds one to a
    row of its own, so the end can tell how many times each ran."""
    row = next(load.rows)
    try:
        held = await client.submit("shop", f"UPDATE soak_writes SET n = n + 1 WHERE id = {row}")
    except ClientError:
        return False
    load.held[held.id] = (row, held.status)
    try:
        done = await client.wait(held.id, WAIT_FOR)
    except ClientError:
        return False
    load.held[held.id] = (row, done.status)
    return done.status in ("executed", "denied")  # both are the outcome a person chose


async def _blocked(client: AsyncClient) -> bool:
    try:
        await client.submit("shop", "DROP TABLE orders")
    except CommandBlocked:
        return True
    except ClientError:
        return False
    return False


@dataclass
class Approver:
    """Ada and colleagues (all ``APPROVER`` to Slack), clicking every card that still asks:
    Approve five times in six, otherwise Deny with a reason. A click the bot does not take
    (it is down) is clicked again later, as a person would."""

    slack: SlackEmulator
    clicked: dict[str, float] = field(default_factory=dict)  # card ts -> when last clicked
    clicks: int = 0
    refused: int = 0
    _denying: asyncio.Lock = field(default_factory=asyncio.Lock)  # a modal at a time
    _busy: set[str] = field(default_factory=set)  # cards someone is reading now

    async def run(self, stop: asyncio.Event) -> None:
        gate = asyncio.Semaphore(PEOPLE)
        deciding: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            now = time.monotonic()
            due = [
                m.ts
                for m in self.slack.messages.get(APPROVALS, [])
                if m.thread_ts is None
                and m.ts not in self._busy
                and now - self.clicked.get(m.ts, -RECLICK) >= RECLICK
                and APPROVE in json.dumps(m.blocks)
            ]
            for ts in due:
                self.clicked[ts] = now
                spawn(deciding, self._decide(ts, gate))
            await asyncio.sleep(0.5)
        await asyncio.gather(*deciding)

    async def _decide(self, ts: str, gate: asyncio.Semaphore) -> None:
        self._busy.add(ts)
        try:
            async with gate:
                await asyncio.sleep(random.uniform(1, 3))  # reading the card
                try:
                    if zlib.crc32(ts.encode()) % 6:
                        status, _ = await self.slack.click(APPROVALS, ts, APPROVE, APPROVER)
                    else:
                        status = await self._deny(ts)
                except KeyError:  # the card has no buttons any more: it was decided
                    return
                except (OSError, TimeoutError, aiohttp.ClientError):  # the bot is not there
                    status = 0
                self.clicks += 1
                self.refused += status != 200
        finally:
            self._busy.discard(ts)

    async def _deny(self, ts: str) -> int:
        async with self._denying:
            return await self._deny_one(ts)

    async def _deny_one(self, ts: str) -> int:
        opened = len(self.slack.views)
        status, _ = await self.slack.click(APPROVALS, ts, DENY, APPROVER)
        if status != 200:
            return status
        async with asyncio.timeout(10):
            while len(self.slack.views) == opened:
                await asyncio.sleep(0.05)
        view = list(self.slack.views)[-1]
        status, _ = await self.slack.submit(view, APPROVER, {"reason": "not during the soak"})
        return status
