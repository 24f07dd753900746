"""The Slack emulator refuses what Slack refuses, so the bot's limits are tested for real."""

from __future__ import annotations

import pytest
from slack_sdk.errors import SlackApiError

from bot.bootstrap import slack_client
from keyturn.harness.slack import SlackEmulator


def blocks(n: int) -> list[dict[str, object]]:
    return [{"type": "section", "text": {"type": "mrkdwn", "text": str(i)}} for i in range(n)]


async def test_messages_hold_50_blocks_and_views_100() -> None:
    slack = SlackEmulator()
    await slack.start()
    slack.add_user("U1")
    client = slack_client(slack.bot_token, slack.api_url)
    try:
        await client.chat_postMessage(channel="C1", text="x", blocks=blocks(50))
        with pytest.raises(SlackApiError, match="invalid_blocks"):
            await client.chat_postMessage(channel="C1", text="x", blocks=blocks(51))
        await client.views_publish(user_id="U1", view={"type": "home", "blocks": blocks(100)})
        with pytest.raises(SlackApiError, match="invalid_arguments"):
            await client.views_publish(user_id="U1", view={"type": "home", "blocks": blocks(101)})
        assert len(slack.home["U1"]["blocks"]) == 100  # the refused view changed nothing
        assert len(slack.channel("C1")) == 1
    finally:
        await slack.stop()
