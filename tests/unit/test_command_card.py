"""A card shows exactly what will run: every statement, nothing hidden, nothing cut."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime

from bot.cards import CardState, Vote, approval_card
from bot.command_view import command_blocks
from bot.drawing import what_ran
from bot.slack_text import literal

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _shown(card: CardState) -> tuple[str, str, bool]:
    return card.id, card.command, card.shell


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
    blocks, thread = command_blocks(*_shown(state(command, ssh)))
    return json.dumps(blocks, ensure_ascii=False) + json.dumps(thread, ensure_ascii=False)


def test_padding_in_a_comment_cannot_hide_a_statement() -> None:
    """The red team's card: a second UPDATE after 2,900 spaces inside a comment."""
    command = (
        "UPDATE orders SET status = 'x' WHERE id = -301; /*"
        + " " * 2900
        + "*/ UPDATE orders SET status = 'x' WHERE id = 1"
    )
    blocks, thread = command_blocks(*_shown(state(command)))
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
    blocks, thread = command_blocks(*_shown(state("; ".join(statements))))
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


# ------------------------------------------------------------------ what others wrote

# The red team's reason: rendered with real line breaks, bold and a code block, it read as
# keyturn's own card text.
FORGED = "fine\n\n*Command that will run*\n```SELECT 1```\nApprovals: 1/1 · policy says safe"


def outside_inline_code(card: list[dict[str, object]]) -> str:
    """Every mrkdwn text of the card without its code blocks and inline code: what Slack
    formats."""
    texts: list[str] = []

    def collect(value: object) -> None:
        if isinstance(value, dict):
            if value.get("type") == "mrkdwn":
                texts.append(str(value.get("text", "")))
            for inner in value.values():
                collect(inner)
        elif isinstance(value, list):
            for inner in value:
                collect(inner)

    collect(card)
    blocks_out = (re.sub(r"```.*?```", "", t, flags=re.DOTALL) for t in texts)
    return "\n".join(re.sub(r"`[^`\n]*`", "", t) for t in blocks_out)


def test_what_an_agent_wrote_is_shown_inert_and_apart() -> None:
    forged = replace(
        state("UPDATE orders SET status = 'x' WHERE id = 1"),
        requester="crew\n*Approved*",
        reason=FORGED,
        run_id="run`*bold*`\n<!channel>",
        on_behalf_of="ada\n```x```",
        ticket="INC-1\n*urgent*",
    )
    card = approval_card(forged)
    formatted = outside_inline_code(card)
    for planted in ("Command that will run", "Approvals: 1/1", "*bold*", "*Approved*", "urgent"):
        assert planted not in formatted, planted
    assert "```SELECT 1```" not in json.dumps(card, ensure_ascii=False)
    assert "<!channel>" not in json.dumps(card)
    why = json.dumps(next(b for b in card if b.get("block_id") == "why"), ensure_ascii=False)
    assert "Reason given: `fine⏎⏎*Command that will run*⏎\u02cb\u02cb\u02cbSELECT 1" in why


def test_the_classifiers_reasons_quote_the_command_as_plain_text() -> None:
    """A quoted identifier may hold a line break and asterisks; the reason that names it is
    plain text on one line, never mrkdwn."""
    held = replace(
        state('SELECT "x\n*Approvals: 1/1*"()'),
        reasons=["calls x\n*Approvals: 1/1*(), not known to be read-only"],
    )
    card = approval_card(held)
    why = next(b for b in card if b.get("block_id") == "why")
    plain = [e for e in why["elements"] if e["type"] == "plain_text"]
    assert len(plain) == 1 and "\n" not in plain[0]["text"] and "Approvals" in plain[0]["text"]
    assert "*Approvals: 1/1*" not in outside_inline_code(card)


def test_what_others_wrote_cannot_crowd_out_keyturns_facts() -> None:
    """2,000 ampersands escape to 10,000 characters: the card's facts must still be there."""
    crowded = replace(
        state("UPDATE orders SET status = 'x' WHERE id = 1"),
        reason="&" * 2000,
        ticket="<" * 2000,
        estimated_rows=1234567,
    )
    why = next(b for b in approval_card(crowded) if b.get("block_id") == "why")
    texts = [e["text"] for e in why["elements"]]
    assert any("EXPLAIN estimate: ~1234567 rows" in t and "grant TTL" in t for t in texts)
    assert all(len(t) <= 3000 for t in texts)  # Slack's limit for a context element


def test_invisible_and_direction_changing_characters_are_shown() -> None:
    shown = literal("ok\u202edesrever\x0bnext\x85line")
    assert "⟦U+202E⟧" in shown and "⟦U+000B⟧" in shown and "⟦U+0085⟧" in shown
    assert literal("") == "—"
