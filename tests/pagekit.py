"""Driving the chat page in a real browser: headless Debian Chromium through Playwright's sync API.

The server runs in the test's Trio loop; the browser runs in one worker thread (Playwright's sync API stays on
the thread that started it) and calls back into Trio for a TCP client's steps with ``on_trio``. No browser is
downloaded: ``make test`` installs Debian's ``chromium`` when it is missing; without it these tests skip, except
under CI where they fail.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import trio

from conftest import service_required

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 780}
DESKTOP = {"width": 1100, "height": 680}
PASSWORD = "correct horse"


def sync_playwright():
    """Playwright's ``sync_playwright``; skips the test (fails under CI) when Chromium or Playwright is missing."""
    if not Path(CHROMIUM).exists():
        service_required("chromium", f"{CHROMIUM} (Debian package chromium; `make test` installs it when apt is there)")
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        service_required("playwright", "the Python package playwright (setup.cfg test extra)")
    return start


async def in_chromium(steps: Callable[[Any], Any], *, args: tuple[str, ...] = ()) -> Any:
    """Run ``steps(browser)`` in a worker thread with a fresh headless Chromium; its result."""
    start = sync_playwright()

    def run():
        with start() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(args),
                                                 headless=True)
            try:
                return steps(browser)
            finally:
                browser.close()

    return await trio.to_thread.run_sync(run)


def on_trio(fn, *args):
    """From the browser's thread: run the async ``fn(*args)`` in the test's Trio loop and return its result."""
    return trio.from_thread.run(fn, *args)


class Page:
    """One tab of the chat page, with the errors it reports (uncaught exceptions and console errors, e.g. CSP)."""

    def __init__(self, context, url: str):
        self.page = context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.goto(url)

    def __getattr__(self, name):
        return getattr(self.page, name)

    def enter(self, username: str, *, register: bool = True) -> None:
        """Register (or log in) on the login form and wait until live."""
        self.page.wait_for_selector("#login:not([disabled])")
        self.page.fill("#username", username)
        self.page.fill("#password", PASSWORD)
        self.page.click("#register" if register else "#login")
        self.wait_live()

    def wait_live(self) -> None:
        self.page.wait_for_selector('#status[data-state="live"]')

    def join(self, name: str) -> None:
        """Join (or open) ``name`` ("lobby", "#lobby" or "@user") with the sidebar's box; wait until it is open."""
        if not self.page.is_visible("#join-input"):  # a phone showing a conversation: back to the list first
            self.page.click("#back")
        self.page.fill("#join-input", name)
        self.page.click("#join-button")
        label = name if name[0] in "#@" else "#" + name
        self.page.wait_for_function("label => document.getElementById('title').textContent === label"
                                    " || document.title.includes(label + ' · ')", arg=label)

    def say(self, text: str) -> None:
        self.page.fill("#message-input", text)
        self.page.press("#message-input", "Enter")

    def room_button(self, label: str):
        """The sidebar's entry for ``label`` ("#lobby", "@bob"), waited for."""
        return self.page.wait_for_selector(f'#rooms .room:has(.room-name:text-is("{label}"))')

    def badge(self, label: str) -> int:
        """The unread count on ``label``'s sidebar entry (0 when it has no badge)."""
        text = self.room_button(label).evaluate("b => b.querySelector('.badge')?.textContent ?? '0'")
        return int(text)

    def bodies(self) -> list[str]:
        return self.page.eval_on_selector_all(".message[data-seq] .body", "ns => ns.map(n => n.textContent)")

    def assert_no_errors(self, *, but: str = "") -> None:
        """No error was reported, except those containing ``but`` (e.g. a refused connection while the server is
        down, which Chromium logs itself)."""
        errors = [e for e in self.errors if not (but and but in e)]
        assert not errors, errors
