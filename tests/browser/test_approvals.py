"""A person approving in the sandbox page while an agent waits: `keyturn dev` as a new user
runs it, the agent on the public client, Chromium clicking as the approver (or as someone
without rights)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import asyncssh
import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from keyturn.agent.api import SqlResultOut
from keyturn.agent.client import Client, Denied, Result
from tests.browser.conftest import ROOT, open_page
from tests.integration.devstack import running_dev

TARGET = "orders-db"
SCREENSHOT = ROOT / "docs" / "img" / "approved-card.png"
CARD_WAIT = 30_000  # ms: the bot posts the card within a poll interval or two


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_dev(tmp_path_factory.mktemp("dev")) as (_dev, running):
        yield running


@pytest.fixture
def page(browser: Browser, stack: dict[str, Any]) -> Iterator[Page]:
    yield from open_page(browser, stack["sandbox_url"] + "/")


def agent_runs(stack: dict[str, Any], command: str, reason: str) -> Future[Result]:
    """An agent's blocking ``Client.run``, waiting in a (daemon) thread for the click."""
    outcome: Future[Result] = Future()

    def run() -> None:
        with Client(stack["gateway_url"], stack["agent_token"]) as client:
            try:
                outcome.set_result(client.run(TARGET, command, reason=reason, timeout=120))
            except Exception as exc:  # any outcome goes to the test
                outcome.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return outcome


def card(page: Page, command: str) -> Locator:
    found = page.locator(".message", has=page.locator("pre", has_text=command))
    expect(found).to_be_visible(timeout=CARD_WAIT)
    return found


def test_a_non_approver_is_refused_then_the_approver_approves(
    page: Page, stack: dict[str, Any], tmp_path: Path
) -> None:
    command = "DELETE FROM orders WHERE id = 3"
    waiting = agent_runs(stack, command, "order 3 was a duplicate")
    held = card(page, command)
    expect(held).to_contain_text("Approvals: 0/1")
    expect(held.get_by_role("button", name="Approve")).to_be_visible()

    page.select_option("#user", "U_VISITOR")
    card(page, command).get_by_role("button", name="Approve").click()
    refusal = page.locator(".message.ephemeral")
    expect(refusal).to_contain_text("you are not an approver for this request")
    expect(refusal).to_contain_text("Only visible to you")
    expect(card(page, command)).to_contain_text("Approvals: 0/1")
    assert not waiting.done()

    page.select_option("#user", stack["approver_user"])
    expect(page.locator(".message.ephemeral")).to_have_count(0)  # the refusal was Vic's alone
    card(page, command).get_by_role("button", name="Approve").click()
    result = waiting.result(timeout=60)
    assert isinstance(result, SqlResultOut) and result.tags == ["DELETE 1"]
    approved = card(page, command)
    expect(approved).to_contain_text(
        "Approved and run by @Ada Approver: DELETE 1", timeout=CARD_WAIT
    )
    expect(approved.get_by_role("button", name="Approve")).to_have_count(0)
    approved.screenshot(path=tmp_path / "approved-card.png")
    if os.environ.get("KEYTURN_UPDATE_SCREENSHOTS"):  # the README's picture
        SCREENSHOT.parent.mkdir(exist_ok=True)
        approved.screenshot(path=SCREENSHOT)


def test_deny_asks_why_and_the_agent_reads_it(page: Page, stack: dict[str, Any]) -> None:
    command = "UPDATE orders SET total_cents = 0 WHERE id = 1"
    waiting = agent_runs(stack, command, "refund order 1")
    card(page, command).get_by_role("button", name="Deny").click()
    modal = page.get_by_role("dialog", name="Deny request")
    expect(modal).to_be_visible()
    modal.get_by_role("button", name="Deny").click()  # no reason: Slack refuses the form
    expect(modal).to_contain_text("Please fill out this field.")
    assert not waiting.done()
    modal.get_by_label("Why? The agent will see this.").fill("refunds go through billing")
    modal.get_by_role("button", name="Deny").click()
    expect(modal).to_be_hidden()
    with pytest.raises(Denied) as denied:
        waiting.result(timeout=60)
    assert denied.value.reason == "refunds go through billing"
    expect(card(page, command)).to_contain_text(
        "Denied by @Ada Approver: refunds go through billing", timeout=CARD_WAIT
    )


def test_a_command_carrying_markup_renders_as_text(page: Page, stack: dict[str, Any]) -> None:
    markup = (  # were any of it markup, alert() would open a dialog and fail the test
        "<img src=x onerror=alert(1)><script>alert(2)</script>"
        " *not bold* <@U_APPROVER> <!channel> <https://evil.example|click me>"
    )
    command = f"UPDATE customers SET name = '{markup}' WHERE id = 2"
    agent_runs(stack, command, "<b>urgent</b> <!here>")
    held = card(page, command)
    expect(held.locator("pre")).to_have_text(command)  # every character, as text
    assert held.locator("img, script, a, b:text('not bold')").count() == 0
    assert held.locator(".mention").count() == 0  # <@…>, <!channel> ping nobody
    expect(held.locator(".context")).to_contain_text("Reason given: <b>urgent</b> <!here>")
    card(page, command).get_by_role("button", name="Deny").click()  # leave nothing pending
    modal = page.get_by_role("dialog", name="Deny request")
    modal.get_by_label("Why? The agent will see this.").fill("test markup")
    modal.get_by_role("button", name="Deny").click()
    expect(held).to_contain_text("Denied by", timeout=CARD_WAIT)


def test_the_on_call_engineer_registers_a_key_by_slash_command(page: Page) -> None:
    """Typed in the sandbox's composer as Omar: signed like Slack's, answered to Omar alone."""
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    page.select_option("#user", "U_ONCALL")
    page.locator("#command").fill(f"/keyturn ssh-key add {key}")
    page.locator("#command").press("Enter")
    answer = page.locator(".message.ephemeral", has_text="Registered your ssh-ed25519 key")
    expect(answer).to_be_visible()
    expect(answer).to_contain_text("Only visible to you")
    page.select_option("#user", "U_APPROVER")
    expect(page.locator(".message.ephemeral", has_text="Registered your")).to_have_count(0)


def test_on_call_database_access_from_the_sandbox(page: Page, stack: dict[str, Any]) -> None:
    """The on-call engineer's whole path in `keyturn dev`: typed in the composer as Omar,
    approved by Ada on the card, the DM's token unwrapped by `keyturn unwrap` into a working
    connection string, and the session killed when the grant ends."""
    page.select_option("#user", "U_ONCALL")
    page.locator("#command").fill("/keyturn db orders-db 15m checking a refund")
    page.locator("#command").press("Enter")
    asked = page.locator(".message.ephemeral", has_text="waiting for approval")
    expect(asked).to_be_visible()
    short = re.search(r"request (\w{8})", asked.inner_text())
    assert short, asked.inner_text()

    page.select_option("#user", "U_APPROVER")
    session_card = page.locator(".message", has_text="checking a refund")
    expect(session_card).to_be_visible(timeout=CARD_WAIT)
    expect(session_card).to_contain_text("Human request for access")
    session_card.get_by_role("button", name="Approve").click()
    expect(session_card).to_contain_text("Approved: access open", timeout=CARD_WAIT)

    page.select_option("#user", "U_ONCALL")
    page.locator("#dms li").click()
    delivered = page.locator(".message", has_text="Your database login for orders-db is ready")
    expect(delivered).to_be_visible()
    unwrap = re.search(r"keyturn unwrap --vault-addr (\S+) (\S+)", delivered.inner_text())
    assert unwrap, delivered.inner_text()
    ran = subprocess.run(
        [sys.executable, "-m", "keyturn.cli", "unwrap", "--vault-addr", *unwrap.groups()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    dsn = ran.stdout.strip()
    assert "killed" in ran.stderr
    if psql := shutil.which("psql"):
        counted = subprocess.run(
            [psql, dsn, "-Atc", "SELECT count(*) FROM orders"], capture_output=True, text=True
        )
        assert counted.returncode == 0 and int(counted.stdout) >= 1, counted.stderr
    with ThreadPoolExecutor(1) as pool:  # Playwright's own loop runs in this thread
        pool.submit(asyncio.run, _held_then_ended(stack, dsn, short.group(1))).result(120)
    expect(page.locator(".message", has_text="was revoked by")).to_be_visible(timeout=CARD_WAIT)


async def _held_then_ended(stack: dict[str, Any], dsn: str, short: str) -> None:
    """An open session works until its grant ends; then it is killed and logins fail."""
    session = await asyncpg.connect(dsn)
    assert await session.fetchval("SELECT count(*) FROM orders") >= 1
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.post(
            f"{stack['sandbox_url']}/sandbox/command",
            json={"text": f"revoke {short}", "user": stack["oncall_user"]},
        )
    assert "its connections were closed" in answer.json()["response"]
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
        await session.fetchval("SELECT 1")
    with pytest.raises(asyncpg.PostgresError):
        await asyncpg.connect(dsn)
