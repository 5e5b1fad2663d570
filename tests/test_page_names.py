"""Display names on the chat page (issue 13, protocol version 2, spec §9.17), in headless Chromium (tests/pagekit.py)
next to a TCP client on a real server: "Display Name @login" in message headers and the member list, /nick."""
from __future__ import annotations

import pytest

from chorus import proto
from pagekit import DESKTOP, Page, in_chromium
from test_moderation import ok
from test_page import UNLIMITED, Peer, url

pytestmark = pytest.mark.timeout(90)

HOSTILE = "<b>x</b> Bob"
# Every GET_USERS the page sends, its users, in window.asked (the page's own request, wrapped).
RECORD_ASKS = """() => {
  const client = window.chorus.client;
  const request = client.request.bind(client);
  window.asked = [];
  client.request = (event) => {
    if (event.type === "GET_USERS") window.asked.push(...event.users);
    return request(event);
  };
}"""
SENDER = "seq => document.querySelector(`.message[data-sender=\"${seq}\"] .meta .sender`)?.textContent"


async def test_display_names_shown_beside_login_names_set_with_nick_and_refused_when_alike(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", "lobby", version=2)
    await ok(bob.raw, proto.SetDisplayName, HOSTILE)
    await bob.say("#lobby", "hello from bob")

    def steps(browser):
        page = Page(browser.new_context(viewport=DESKTOP), url(server))
        page.enter("carol")
        page.evaluate(RECORD_ASKS)
        page.join("lobby")
        page.say("first from carol")
        page.wait_for_selector('.message[data-sender="carol"] .body >> text=first from carol')
        # bob's display name beside his login name, as text (no <b> element made of it); carol has none yet.
        page.wait_for_function(f"() => ({SENDER})('bob') === '{HOSTILE} @bob'")
        assert page.text_content('.message[data-sender="bob"] .sender .display-name') == HOSTILE
        assert page.text_content('.message[data-sender="bob"] .sender .login') == "@bob"
        assert page.query_selector(".message .sender b") is None
        assert page.evaluate(f"() => ({SENDER})('carol')") == "carol"
        page.click("#members-button")
        page.wait_for_selector('#members-panel .member[data-user="bob"] .display-name')
        assert page.text_content('.member[data-user="bob"] .link-button') == f"{HOSTILE} @bob"
        assert page.text_content('.member[data-user="carol"] .link-button') == "carol (you)"
        assert page.query_selector(".member b") is None
        page.keyboard.press("Escape")
        asked = page.evaluate("() => window.asked")
        assert sorted(asked) == ["bob", "carol"]  # each asked once, then kept (re-rendering asks nothing)

        # A display name like another user's (bob's login name) is refused, with the server's reason.
        page.say("/nick B0B")
        page.wait_for_selector("#notice >> text=looks like bob")
        assert page.input_value("#message-input") == "/nick B0B"  # kept, to correct
        assert page.evaluate(f"() => ({SENDER})('carol')") == "carol"

        page.fill("#message-input", "")
        page.say("/nick Carol ✨")
        page.wait_for_selector("#notice >> text=Your display name is Carol ✨.")
        # Asked again for carol after her own change: her earlier message's header follows.
        page.wait_for_function(f"() => ({SENDER})('carol') === 'Carol ✨ @carol'")
        assert page.evaluate("() => window.asked") == ["bob", "carol", "carol"]
        assert page.input_value("#message-input") == ""
        page.assert_no_errors()

    await in_chromium(steps)
    # The server keeps it: a TCP client reads it back.
    listed = await bob.raw.request(proto.GetUsers, ("carol",))
    assert listed.users == (proto.UserInfo("carol", "Carol ✨"),)
    await bob.close()
