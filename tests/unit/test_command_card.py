"""A card shows exactly what will run: every statement, nothing hidden, nothing cut."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

from bot.cards import CardState, Vote, approval_card, command_blocks
from bot.service import what_ran

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def state(command: str, ssh: bool = False) -> CardState:
    return CardState(
        id="r1",
        target="shop",
        command=command,
        requester="crew",
        status="pending",
        quorum=1,
        pending_expires_at=NOW,
        shell=ssh,
    )


def shown_text(command: str, ssh: bool = False) -> str:
    blocks, thread = command_blocks(state(command, ssh))
    return json.dumps(blocks, ensure_ascii=False) + json.dumps(thread, ensure_ascii=False)


def test_padding_in_a_comment_cannot_hide_a_statement() -> None:
    """The red team's card: a second UPDATE after 2,900 spaces inside a comment."""
    command = (
        "UPDATE orders SET status = 'x' WHERE id = -301; /*"
        + " " * 2900
        + "*/ UPDATE orders SET status = 'x' WHERE id = 1"
    )
    blocks, thread = command_blocks(state(command))
    card = json.dumps(blocks)
    assert "*2 statements*" in card and thread == []
    assert "WHERE id = -301" in card and "WHERE id = 1;" in card
    assert " " * 10 not in card  # the padding (and the comment) is gone: it never runs


def test_invisible_and_bidi_characters_are_shown_and_flagged() -> None:
    text = shown_text("UPDATE t SET note = 'a\u202ecba' WHERE id = 1 -- \u200b")
    assert "⟦U+202E⟧" in text and "RIGHT-TO-LEFT OVERRIDE" in text
    assert "ZERO WIDTH SPACE" in text  # also the one only in a dropped comment
    assert "\u202e" not in text


def test_a_command_longer_than_a_card_goes_whole_into_the_thread() -> None:
    statements = [f"UPDATE orders SET note = '{'n' * 900}' WHERE id = {i}" for i in range(40)]
    blocks, thread = command_blocks(state("; ".join(statements)))
    card = json.dumps(blocks)
    assert "Longer than a card holds" in card and "*40 statements*" in card
    whole = "".join(thread)
    for i in range(40):
        assert f"WHERE id = {i};" in whole, i
    assert all(len(message) < 3000 for message in thread)
    assert len(approval_card(state("; ".join(statements)))) < 50


def test_shell_commands_are_shown_as_their_arguments() -> None:
    text = shown_text("systemctl restart nginx && cat '/var/log/a b'", ssh=True)
    assert "*2 commands*" in text and "systemctl restart nginx" in text
    assert "cat '/var/log/a b'" in text


def test_markup_in_a_command_stays_text() -> None:
    text = shown_text("UPDATE t SET note = '<!channel> ```' WHERE id = 1")
    assert "&lt;!channel&gt;" in text and "<!channel>" not in text


def test_a_shell_card_shows_the_line_as_the_shell_gets_it() -> None:
    text = shown_text("LD_PRELOAD=/tmp/evil.so cat /var/log/syslog > /etc/cron.d/x", ssh=True)
    assert "LD_PRELOAD=/tmp/evil.so cat /var/log/syslog &gt; /etc/cron.d/x" in text


def test_a_run_card_says_what_ran_but_never_the_rows() -> None:
    done = replace(
        state("UPDATE t SET x = 1 WHERE id = 1"),
        status="executed",
        votes=[Vote("U_ADA", "approve")],
        ran=what_ran({"tags": ["UPDATE 1", "<!channel>"], "rows": [["ada@example.com"]]}),
    )
    text = json.dumps(approval_card(done))
    assert "Approved and run by <@U_ADA>: `UPDATE 1, &lt;!channel&gt;`" in text
    assert "ada@example.com" not in text
    assert what_ran({"exit_status": 0, "stdout": "secret"}) == "exit 0"
    assert what_ran(None) is None and what_ran({"rows": []}) is None
