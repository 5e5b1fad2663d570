"""The chat page in a real browser: headless Debian Chromium driven by Playwright, next to a TCP client.

How the browser is driven (and skipped without Chromium): tests/pagekit.py. This test keeps its
own steps in one function, the way a person's session runs; tests/test_page.py has one test per
feature of the page.

The screenshot goes to the test's temporary directory; ``make screenshot`` runs this test
with ``CHORUS_SCREENSHOT_DIR=docs`` to refresh docs/screenshot.png (phone) and
docs/screenshot-wide.png (desktop).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from chorus import proto
from chorus.proto import CloseReason
from pagekit import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE
from pagekit import sync_playwright as _playwright
from rawclient import RawClient

LOBBY = proto.Conversation.room("lobby")

pytestmark = pytest.mark.timeout(120)


async def test_browser_chats_with_a_tcp_client(start_server, tmp_path):
    sync_playwright = _playwright()
    server = await start_server(ws_port=0, rate_burst=1000, user_send_burst=1000)  # bob pipelines 130 sends
    bob = await RawClient.connect(server.port)
    await bob.register("bob")
    await bob.go_live()
    await bob.request(proto.Join, "lobby")
    for i, text in enumerate(["Welcome to the lobby!", "The page speaks the same frames as the terminal client."]):
        await bob.request(proto.Send, LOBBY, i + 1, text)
    seen = {}

    async def bob_receives_from(sender: str, body: str) -> int:
        message = await bob.next_of(proto.Message)
        while message.body != body:
            message = await bob.next_of(proto.Message)
        assert (message.sender, message.conv) == (sender, LOBBY)
        return message.seq

    async def bob_sends(client_msg_id: int, body: str) -> int:
        ack = await bob.request(proto.Send, LOBBY, client_msg_id, body)
        return ack.seq

    async def bob_sends_to_carol(body: str) -> None:
        await bob.request(proto.Send, proto.Conversation.direct("carol"), 99, body)

    async def fill_archive(count: int) -> None:
        await bob.request(proto.Join, "archive")
        for i in range(count):  # pipelined: one group commit for many
            await bob.send(proto.Send(proto.Conversation.room("archive"), 1000 + i, f"archived {i + 1}",
                                      request_id=bob.rid()))
        acks = 0
        while acks < count:
            acks += isinstance(await bob.next(), proto.Ack)

    async def drop_carols_connection() -> None:
        for conn in list(server.connections):
            if conn.session.username == "carol":
                conn.close(CloseReason.SLOW_CONSUMER)  # cut without BYE, as a network failure would

    def browser() -> None:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                context = chromium.new_context(viewport=PHONE, device_scale_factor=2)  # tabs share storage
                page = context.new_page()
                page.set_default_timeout(15_000)
                errors = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))  # e.g. CSP
                page.goto(f"http://127.0.0.1:{server.ws_port}/")
                page.wait_for_selector("#login:not([disabled])")
                page.fill("#username", "carol")
                page.fill("#password", "correct horse")
                page.click("#register")
                page.wait_for_selector('#status[data-state="live"]')
                page.fill("#join-input", "lobby")
                page.click("#join-button")
                page.wait_for_selector(".message .body >> text=Welcome to the lobby!")  # history on opening

                page.fill("#message-input", "Hi bob, from the browser ☕")
                page.press("#message-input", "Enter")
                seen["carol"] = trio.from_thread.run(bob_receives_from, "carol", "Hi bob, from the browser ☕")
                page.wait_for_selector(f'.message[data-seq="{seen["carol"]}"] .body >> text=from the browser')

                trio.from_thread.run(bob_sends, 10, "Hello carol, from the terminal")
                node = page.wait_for_selector(".message .body >> text=Hello carol, from the terminal")
                seen["bob"] = int(node.evaluate("n => n.closest('.message').dataset.seq"))

                # A dropped connection: the page reconnects, resumes and catches up by seq.
                trio.from_thread.run(drop_carols_connection)
                page.wait_for_selector('#status:not([data-state="live"])')
                trio.from_thread.run(bob_sends, 11, "Sent while you were away")
                page.wait_for_selector(".message .body >> text=Sent while you were away", timeout=20_000)
                page.wait_for_selector('#status[data-state="live"]')
                seqs = page.eval_on_selector_all(".message[data-seq]", "ns => ns.map(n => Number(n.dataset.seq))")
                assert seqs == list(range(1, len(seqs) + 1)), seqs  # in order, no gap, no duplicate
                # What caught up while the page was open at the end is read: no badge, no count in the tab's title.
                page.wait_for_function("() => document.title === '#lobby · Chorus'")
                # For the screenshots: a link, formatting, a mention, and a direct message waiting in another thread.
                trio.from_thread.run(bob_sends, 12, "Notes for @carol: *bold*, `code` and https://example.org/chorus")
                page.wait_for_selector(".message .body a >> text=https://example.org/chorus")
                trio.from_thread.run(bob_sends_to_carol, "Got a minute? The release notes are ready.")
                page.wait_for_selector('#back[data-unread="1"]')

                page.screenshot(path=str(tmp_path / "screenshot.png"))
                page.set_viewport_size(DESKTOP)
                page.click("#members-button")
                page.wait_for_selector('.member[data-user="bob"][data-status="online"] .role.owner')  # GET_ROOM's
                page.screenshot(path=str(tmp_path / "screenshot-wide.png"))
                page.click("#members-button")

                # History on scroll-up: 130 messages arrive in pages of 50 as the reader scrolls to the top.
                trio.from_thread.run(fill_archive, 130)
                page.fill("#join-input", "archive")
                page.click("#join-button")
                page.wait_for_selector(".message .body >> text=archived 130")
                assert len(page.query_selector_all(".message[data-seq]")) < 130
                for _ in range(10):
                    if page.text_content(".history-edge") == "Beginning of the conversation":
                        break
                    page.eval_on_selector("#messages", "box => { box.scrollTop = 0; }")
                    page.wait_for_function("() => !document.querySelector('.history-edge')"
                                           " || document.getElementById('messages').scrollTop > 0"
                                           " || document.querySelector('.history-edge').textContent.startsWith('Beg')")
                seqs = page.eval_on_selector_all(".message[data-seq]", "ns => ns.map(n => Number(n.dataset.seq))")
                assert seqs == list(range(1, 131)), seqs

                # A second tab with its own login slot (#dave) is another user in the same browser.
                tab = context.new_page()
                tab.goto(f"http://127.0.0.1:{server.ws_port}/#dave")
                tab.wait_for_selector("#login:not([disabled])")
                tab.fill("#username", "dave")
                tab.fill("#password", "correct horse")
                tab.click("#register")
                tab.wait_for_selector('#status[data-state="live"]')
                tab.fill("#join-input", "lobby")
                tab.click("#join-button")
                tab.fill("#message-input", "dave here, in a second tab")
                tab.press("#message-input", "Enter")
                trio.from_thread.run(bob_receives_from, "dave", "dave here, in a second tab")
                tab.close()
                assert page.text_content("#me") == "carol"

                # A reload resumes with the token from localStorage: no login form.
                page.reload()
                page.wait_for_selector('#status[data-state="live"]')
                assert page.get_attribute("#app", "data-view") != "login"

                # Logging out revokes the token and brings the login form back, connected again.
                page.click("#logout")
                page.wait_for_selector("#login:not([disabled])")
                assert page.evaluate("localStorage.getItem('chorus.token')") is None
                assert page.get_attribute("#app", "data-view") == "login"
                assert not errors, errors
            finally:
                chromium.close()

    await trio.to_thread.run_sync(browser)
    assert seen["carol"] == 3 and seen["bob"] == 4
    for name in ("screenshot.png", "screenshot-wide.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    if target := os.environ.get("CHORUS_SCREENSHOT_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        for name in ("screenshot.png", "screenshot-wide.png"):
            shutil.copy(tmp_path / name, Path(target) / name)
