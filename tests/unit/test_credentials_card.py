"""What an approval card shows about its credentials, and how issuance backs off (pure code)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from bot.cards import EXTEND, REVOKE, CardState, Credentials, approval_card
from bot.drawing import credentials_of
from bot.service import retry_delay
from keyturn.store.models import GrantRow, RequestRow

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def request(**fields: object) -> RequestRow:
    return RequestRow(
        **{"id": uuid.uuid4(), "status": "approved", "issue_attempts": 0, "issue_error": None}
        | fields
    )


def grant(**fields: object) -> GrantRow:
    return GrantRow(
        **{
            "id": uuid.uuid4(),
            "status": "active",
            "lease_id": "database/creds/rw/abc",
            "expires_at": NOW + timedelta(minutes=10),
            "max_expires_at": NOW + timedelta(minutes=50),
            "ended_by": None,
        }
        | fields
    )


def card(credentials: Credentials | None) -> str:
    state = CardState(
        id="r1",
        target="shop",
        command="UPDATE t SET a = 1 WHERE id = 1",
        requester="crew",
        status="approved",
        quorum=1,
        pending_expires_at=NOW,
        credentials=credentials,
    )
    return json.dumps(approval_card(state))


def test_extend_offers_only_what_fits_under_the_max_ttl() -> None:
    creds = credentials_of(request(), grant(), NOW)
    assert creds is not None and creds.extend_choices == [15 * 60]  # 40 min of headroom
    text = card(creds)
    assert REVOKE in text and f"{EXTEND}_900" in text and f"{EXTEND}_3600" not in text


def test_no_headroom_or_no_lease_means_no_extend() -> None:
    full = credentials_of(request(), grant(max_expires_at=NOW + timedelta(minutes=10)), NOW)
    assert full is not None and full.extend_choices == []
    ssh = credentials_of(request(), grant(lease_id=None), NOW)
    assert ssh is not None and ssh.extend_choices == []  # a certificate cannot be extended


def test_pending_credentials_say_why_and_ended_ones_lose_their_buttons() -> None:
    waiting = credentials_of(request(issue_attempts=2, issue_error="Vault is sealed"), None, NOW)
    assert waiting is not None and "Vault is sealed" in card(waiting)
    assert credentials_of(request(), None, NOW) is None
    revoked = card(credentials_of(request(), grant(status="revoked", ended_by="U_ALICE"), NOW))
    assert "revoked by <@U_ALICE>" in revoked and REVOKE not in revoked


def test_retry_backoff_doubles_up_to_a_minute() -> None:
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (7, 60), (500, 60)]:
        assert ceiling / 2 <= retry_delay(attempts).total_seconds() <= ceiling
