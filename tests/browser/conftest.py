"""Browser tests: Playwright drives the system's Chromium (Debian's ``chromium``, which
scripts/test installs when it is missing). Without it these tests fail, never skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, Page, sync_playwright

ROOT = Path(__file__).parents[2]
# Headless as root on a machine with no outside network: no sandbox, nothing phoning home.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    found = os.environ.get("KEYTURN_CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail(
            "Chromium is missing: scripts/test installs it (apt-get install chromium); "
            "or set KEYTURN_CHROMIUM to a Chromium binary",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Per module: Playwright's sync API runs an event loop while it is open, which the
    # asyncio tests after these must not find running.
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), args=FLAGS)
        yield launched
        launched.close()


def open_page(browser: Browser, url: str) -> Iterator[Page]:
    """``url`` in a fresh context; fails the test on a script error or a dialog."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))

    def on_dialog(dialog: Dialog) -> None:  # alert(), confirm(): the page never opens one
        problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(url)
    try:
        yield page
    finally:
        context.close()
    assert not problems, problems
