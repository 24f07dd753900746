"""The sandbox page renders what the emulator holds as Slack would show it, to the right
person only. The bot is not involved: messages go in through the real Web API (slack_sdk's
WebClient against the emulator)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect
from slack_sdk import WebClient

from keyturn.harness.dev_slack import LoopThread
from keyturn.harness.slack import SlackEmulator
from tests.browser.conftest import open_page

APPROVER, ONCALL, VISITOR = "U_APPROVER", "U_ONCALL", "U_VISITOR"
CHANNEL = "CAPPROVALS"
GREEN, RED = "rgb(0, 122, 90)", "rgb(224, 30, 90)"


class Workspace:
    def __init__(self) -> None:
        self.loop = LoopThread()
        self.slack = SlackEmulator()
        self.url = self.loop.run(self.slack.start()).removesuffix("/api/")
        self.slack.add_user(APPROVER, "Ada Approver", title="approver")
        self.slack.add_user(ONCALL, "Omar On-call", title="on-call engineer")
        self.slack.add_user(VISITOR, "Vic Visitor", title="no rights")
        self.slack.sandbox_user = APPROVER
        self.slack.channel_names[CHANNEL] = "approvals"
        self.api = WebClient(token=self.slack.bot_token, base_url=self.slack.api_url)

    def close(self) -> None:
        self.loop.run(self.slack.stop())
        self.loop.close()


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    ws = Workspace()
    yield ws
    ws.close()


@pytest.fixture
def page(browser: Browser, workspace: Workspace) -> Iterator[Page]:
    yield from open_page(browser, workspace.url + "/")


CARD = [
    {"type": "header", "text": {"type": "plain_text", "text": "Approval needed"}},
    {
        "type": "section",
        "block_id": "who",
        "fields": [
            {"type": "mrkdwn", "text": "*Requester*\n`crew-demo`"},
            {"type": "mrkdwn", "text": "*On behalf of*\n<@U_ONCALL>"},
        ],
    },
    {
        "type": "section",
        "block_id": "command_0",
        "text": {"type": "mrkdwn", "text": "```DELETE FROM orders\nWHERE id = 3```"},
    },
    {
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": "Rule `writes` · _pending_ · ~old~ :warning:"}],
    },
    {
        "type": "actions",
        "elements": [
            {
                "type": "button",
                "action_id": "keyturn_approve",
                "style": "primary",
                "text": {"type": "plain_text", "text": "Approve"},
            },
            {
                "type": "button",
                "action_id": "keyturn_deny",
                "style": "danger",
                "text": {"type": "plain_text", "text": "Deny"},
            },
        ],
    },
]


def test_a_card_renders_as_slack_shows_it(page: Page, workspace: Workspace) -> None:
    posted = workspace.api.chat_postMessage(channel=CHANNEL, text="fallback", blocks=CARD)
    workspace.api.chat_postMessage(channel=CHANNEL, thread_ts=posted["ts"], text="in the *thread*")
    card = page.locator(f'.message[data-ts="{posted["ts"]}"]')
    expect(card).to_be_visible()  # arrived without a reload
    expect(page.locator("#heading")).to_have_text("#approvals")
    expect(card.locator(".header-block")).to_have_text("Approval needed")
    expect(card.locator("b").first).to_have_text("Requester")  # *bold*, no asterisks
    expect(card.locator("code").first).to_have_text("crew-demo")
    expect(card.locator(".mention")).to_have_text("@Omar On-call")
    expect(card.locator("pre")).to_have_text("DELETE FROM orders\nWHERE id = 3")
    expect(card.locator(".context i")).to_have_text("pending")
    expect(card.locator(".context s")).to_have_text("old")
    expect(card.locator(".context")).to_contain_text("⚠️")
    assert "*" not in card.inner_text() and "```" not in card.inner_text()
    assert "fallback" not in card.inner_text()  # blocks win over text, as in Slack
    left, right = (f.bounding_box() for f in card.locator(".fields > .text").all())
    assert left and right and left["y"] == right["y"] and right["x"] > left["x"] + 100
    approve = card.get_by_role("button", name="Approve")
    deny = card.get_by_role("button", name="Deny")
    expect(approve).to_have_css("background-color", GREEN)
    expect(deny).to_have_css("background-color", RED)
    reply = card.locator(".replies .message")
    expect(reply).to_have_count(1)
    expect(reply.locator("b")).to_have_text("thread")


def test_each_person_sees_only_what_is_theirs(page: Page, workspace: Workspace) -> None:
    dm = workspace.api.conversations_open(users=ONCALL)["channel"]["id"]
    workspace.api.chat_postMessage(channel=dm, text="your grant on *orders-db* is ready")
    workspace.api.chat_postEphemeral(channel=CHANNEL, user=VISITOR, text="you may not approve")
    workspace.api.chat_postMessage(channel=CHANNEL, text="a card for everyone")
    expect(page.locator(".message")).to_have_count(1)  # as Ada: the channel, nothing private
    expect(page.locator("#dms li")).to_have_count(0)

    page.select_option("#user", VISITOR)
    expect(page.locator(".message.ephemeral")).to_contain_text("you may not approve")
    expect(page.locator(".message.ephemeral")).to_contain_text("Only visible to you")
    expect(page.locator("#dms li")).to_have_count(0)

    page.select_option("#user", ONCALL)
    expect(page.locator(".message.ephemeral")).to_have_count(0)
    page.locator("#dms li").click()
    expect(page.locator("#stream")).to_contain_text("your grant on orders-db is ready")
    assert "as=U_ONCALL" in page.url  # a reload keeps the person


def test_the_app_home_tab(page: Page, workspace: Workspace) -> None:
    page.locator("#apps li", has_text="Home").click()  # opened before the app published one
    expect(page.locator("#stream")).to_contain_text("Opening the Home tab")
    workspace.api.views_publish(
        user_id=APPROVER,
        view={
            "type": "home",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "Your grants"}},
                {"type": "divider"},
                {"type": "section", "text": {"type": "mrkdwn", "text": "*orders-db* · 9m left"}},
            ],
        },
    )
    page.locator("#apps li", has_text="Home").click()
    expect(page.locator("#stream .header-block")).to_have_text("Your grants")
    expect(page.locator("#stream b")).to_have_text("orders-db")
    page.select_option("#user", VISITOR)  # not published for them
    expect(page.locator("#stream")).to_contain_text("Opening the Home tab")
