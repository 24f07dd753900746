"""The bot's card bookkeeping under races between replicas: one card per request, ever."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from bot import card_store
from keyturn.store import requests
from keyturn.store.db import Store


async def test_a_stale_takeover_never_overwrites_a_card_just_posted(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A posts its card while B is between choosing the request (A's claim looked
    stale) and taking the claim: B must come away empty, not post a second card."""
    new = requests.NewRequest("shop", "DELETE FROM t WHERE id = 1", "crew", timedelta(minutes=5))
    row, _ = await requests.create_request(store, new)
    a = await card_store.claim_card(store, "A", timedelta(0))
    assert a is not None
    scalar = AsyncSession.scalar

    async def a_posts_meanwhile(self: AsyncSession, statement: Any, *args: Any, **kw: Any) -> Any:
        if "INSERT INTO cards" in str(statement):
            assert await card_store.card_posted(store, a, "A", "CAPPROVALS", "111.000001")
        return await scalar(self, statement, *args, **kw)

    monkeypatch.setattr(AsyncSession, "scalar", a_posts_meanwhile)
    b = await card_store.claim_card(store, "B", timedelta(0))
    monkeypatch.setattr(AsyncSession, "scalar", scalar)
    assert b is None
    assert await card_store.posted_at(store, row.id) == ("CAPPROVALS", "111.000001")
    async with store.raw_connection() as conn:
        assert await conn.fetchval("SELECT claimed_by FROM cards") == "A"


async def test_an_adopted_card_is_redrawn(store: Store) -> None:
    """A card a dead replica posted was drawn from an older state: once adopted it counts
    as showing nothing, so the next refresh draws it again."""
    new = requests.NewRequest("shop", "DELETE FROM t WHERE id = 2", "crew", timedelta(minutes=5))
    row, _ = await requests.create_request(store, new)
    claimed = await card_store.claim_card(store, "B", timedelta(0))
    assert claimed is not None
    assert await card_store.card_posted(store, claimed, "B", "C1", "1.000001", adopted=True)
    card = await card_store.card_of(store, row.id)
    assert card is not None and card.shown is None and card.stale
    assert row.id in await card_store.stale_cards(store)
