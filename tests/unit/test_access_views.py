"""What on-call engineers read of their access: news of each change, the DMs, lists, the
App Home."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bot.access.home_view import home
from bot.access.views import (
    Line,
    Waiting,
    certificate_delivery,
    delivery,
    news,
    reminder,
    waiting_listing,
)
from bot.command_view import command_blocks
from keyturn.domain import command_sha256

NOW = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
REQUEST = "1a2b3c4d-0000-4000-8000-000000000000"


def told(was: tuple[str, str | None], now_is: tuple[str, str | None], **kw: Any) -> str | None:
    fields: dict[str, Any] = {
        "request_id": REQUEST,
        "target": "orders-db",
        "approvers": ["U_ADA"],
        "denial": None,
        "error": None,
        "ended_by": None,
        "pending_ttl": timedelta(minutes=15),
    } | kw
    return news(was=was, now_is=now_is, **fields)


@pytest.mark.parametrize(
    ("was", "now_is", "extra", "expected"),
    [
        (("pending", None), ("executing", "active"), {}, "was approved by <@U_ADA>."),
        (("pending", None), ("approved", None), {}, "was approved by <@U_ADA>."),
        (
            ("pending", None),
            ("denied", None),
            {"denial": ("U_ADA", "use <!channel> the replica")},
            "was denied by <@U_ADA>: use &lt;!channel&gt; the replica",
        ),
        (("pending", None), ("expired", None), {}, "expired: nobody decided within 15m"),
        (("approved", None), ("failed", None), {"error": "Vault down"}, "nothing could be issued"),
        (
            ("executing", "active"),
            ("executed", "revoked"),
            {"ended_by": "U_OMAR"},
            "was revoked by <@U_OMAR>.",
        ),
        (("executing", "active"), ("executed", "expired"), {}, "has ended: it expired."),
        (("executing", "active"), ("executing", "active"), {}, None),  # extended: no news
    ],
)
def test_news_for_each_change(
    was: tuple[str, str | None], now_is: tuple[str, str | None], extra: Any, expected: str | None
) -> None:
    said = told(was, now_is, **extra)
    if expected is None:
        assert said is None
    else:
        assert said is not None and expected in said, said
        assert "`1a2b3c4d`" in said or "orders-db" in said


def test_the_login_dm_holds_the_token_and_the_next_step() -> None:
    text = delivery(
        request_id=REQUEST,
        target="orders-db",
        expires_at=NOW + timedelta(minutes=15),
        ttl=timedelta(minutes=15),
        vault_addr="https://vault.example.com",
        wrap_ttl=timedelta(minutes=10),
        wrapping_token="s.TOKEN",
    )
    assert "```keyturn unwrap --vault-addr https://vault.example.com s.TOKEN```" in text
    assert "within 10m" in text and "03:15:00 UTC" in text and "report it" in text


def test_the_certificate_dm_has_a_ready_ssh_line() -> None:
    text = certificate_delivery(
        request_id=REQUEST,
        target="web-1",
        principal="deploy",
        host="10.0.0.5",
        port=2222,
        algorithm="ssh-ed25519",
        fingerprint="SHA256:abc",
        expires_at=NOW,
        certificate="ssh-ed25519-cert-v01@openssh.com AAAA",
    )
    assert "```ssh -i ~/.ssh/id_ed25519 -o CertificateFile=~/.ssh/keyturn-web-1-cert.pub" in text
    assert "-p 2222 deploy@10.0.0.5```" in text and "cannot be extended" in text


def line(**fields: Any) -> Line:
    return Line(
        **{
            "request_id": REQUEST,
            "target": "orders-db",
            "kind": "postgres",
            "status": "executing",
            "ttl_seconds": 900,
            "grant_id": "g-1",
            "grant_status": "active",
            "expires_at": NOW + timedelta(minutes=4),
            "extend_choices": [900, 1800],
        }
        | fields
    )


def test_the_reminder_offers_only_the_extensions_left() -> None:
    text, blocks = reminder(line(), NOW + timedelta(minutes=4), NOW)
    assert "4m left" in text
    buttons = [e["value"] for e in blocks[-1]["elements"]]
    assert buttons == ["g-1:900", "g-1:1800"]
    text, blocks = reminder(line(extend_choices=[]), NOW + timedelta(minutes=4), NOW)
    assert "cannot be extended further" in text and len(blocks) == 1


def test_home_shows_access_and_what_waits_on_me() -> None:
    agent = Waiting("r-2", "orders-db", "crew-<b>", False, "postgres", 0, "DELETE FROM t\nWHERE 1")
    person = Waiting("r-3", "orders-db", "U_OMAR", True, "postgres", 900, "")
    view = home([line()], [agent, person], NOW)
    text = json.dumps(view)
    assert view["type"] == "home"
    assert "open until 03:04:00 UTC (4m left)" in text and "End now" in text
    assert "`crew-&lt;b&gt;` asks to run 1 statement on `orders-db`" in text
    assert "<@U_OMAR> asks for a 15m database login on `orders-db`" in text
    decided_here = [b["block_id"] for b in view["blocks"] if b["type"] == "actions"]
    assert "decide_r-3" in decided_here and "decide_r-2" not in decided_here
    assert "run_r-2" in decided_here and '"action_id": "keyturn_view_run", "value": "r-2"' in text
    empty = json.dumps(home([], [], NOW))
    assert "no pending or open access" in empty and "Nothing is waiting on you" in empty


def test_home_stays_within_slacks_100_blocks() -> None:
    """An agent may hold as many commands as it likes: past 100 blocks Slack refuses the
    whole view, and the approver's own End now / Extend would stop updating."""
    waiting = [
        Waiting(f"r-{i}", "orders-db", "crew", False, "postgres", 0, "DELETE FROM t WHERE 1")
        for i in range(100)
    ]
    lines = [line(request_id=f"{i:08d}-x") for i in range(40)]
    view = home(lines, waiting, NOW)
    assert len(view["blocks"]) <= 100
    text = json.dumps(view)
    assert "and 25 more: `/keyturn list`" in text and "and 75 more: `/keyturn pending`" in text


# What the red team saw: App Home showed "asks to run UPDATE … WHERE id = 2" beside Approve,
# and approving ran UPDATE 3 (the rest was on a later line). Each command hides its risky part
# from a first-line, 80-character rendition in another way.
RISKY_LATER = {
    "on a later line": "UPDATE orders SET status = 'refunded' WHERE id = 2\n   OR id > 0",
    "after a comment": "UPDATE orders SET status = 'refunded' WHERE id = 2 -- one row\n; DELETE FROM orders",
    "after 80 characters": "UPDATE orders SET status = 'refunded' WHERE id = 2"
    + " " * 40
    + "OR id > 0",
}


@pytest.mark.parametrize("command", RISKY_LATER.values(), ids=RISKY_LATER.keys())
def test_only_the_card_offers_approve_for_a_command(command: str) -> None:
    """App Home and /keyturn pending show no rendition of a command (no first line, no cut),
    only how much it is, its sha256 and where its card is; and they offer no Approve for it."""
    waiting = Waiting("r-9", "orders-db", "crew", False, "postgres", 0, command, "C0APPROVALS")
    digest = command_sha256(command)[:16]
    for surface in (json.dumps(home([], [waiting], NOW)), waiting_listing([waiting])):
        assert "keyturn_approve" not in surface and "keyturn_deny" not in surface
        assert "UPDATE" not in surface and "refunded" not in surface
        assert digest in surface and "its card in <#C0APPROVALS>" in surface
    card = json.dumps(command_blocks(REQUEST, command, False)[0])  # where Approve is offered
    assert "OR id &gt; 0" in card or "DELETE FROM orders" in card  # escaped for mrkdwn
    assert digest in card


def test_the_count_matches_the_card() -> None:
    command = RISKY_LATER["after a comment"]
    waiting = Waiting("r-9", "orders-db", "crew", False, "postgres", 0, command)
    assert "asks to run 2 statements" in waiting_listing([waiting])
    assert "*2 statements*" in json.dumps(command_blocks(REQUEST, command, False)[0])
    shell = Waiting("r-8", "web", "crew", False, "ssh", 0, "uptime; rm -rf /tmp/x")
    assert "asks to run 2 commands on `web`" in waiting_listing([shell])
