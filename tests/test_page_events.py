"""The page and the conversation's events (spec §9.15, §9.16) in headless Chromium (tests/pagekit.py): an edit
replaces the text and is marked, reactions are counted, "/me" is an action in the frame (SEND_ACTION), moderation
shows in words, a deleted message becomes a tombstone. The other side is a version 2 TCP connection."""
from __future__ import annotations

import pytest

from chorus import proto
from chorus.proto import EventKind
from pagekit import DESKTOP, Page, in_chromium, on_trio
from test_accounts import NO_DEADLINES, register
from test_page import UNLIMITED, url

pytestmark = pytest.mark.timeout(90)

LOBBY = proto.Conversation.room("lobby")


async def test_edits_reactions_actions_and_moderation_on_the_page(start_server):
    server = await start_server(ws_port=0, **UNLIMITED, **NO_DEADLINES)
    bob, _ = await register(server.port, "bob")
    assert isinstance(await bob.request(proto.Join, "lobby"), proto.Joined)  # bob owns #lobby
    said = await bob.request(proto.Send, LOBBY, 1, "helo")

    async def bob_does(event_cls, *args):
        reply = await bob.request(event_cls, *args)
        assert isinstance(reply, proto.Ok), reply

    async def bob_sees_action():
        push = await bob.next_of(proto.Events)
        while push.events[0].kind != EventKind.ACTION:
            push = await bob.next_of(proto.Events)
        return push.events[0]

    def steps(browser):
        page = Page(browser.new_context(viewport=DESKTOP), url(server))
        page.enter("carol")
        page.join("lobby")
        page.wait_for_selector(".message .body >> text=helo")
        on_trio(bob_does, proto.EditMessage, LOBBY, said.seq, "hello")
        page.wait_for_selector(".message .body:has(.edited) >> text=hello")
        assert "helo" not in " ".join(page.bodies())
        on_trio(bob_does, proto.React, LOBBY, said.seq, "👍", True)
        page.wait_for_selector(".message .reaction >> text=👍 1")
        page.say("/me waves")
        action = on_trio(bob_sees_action)  # the kind is in the frame, not "/me" in the text
        assert (action.actor, action.text) == ("carol", "waves")
        page.wait_for_selector(".message.action .body >> text=* carol waves")
        on_trio(bob_does, proto.SetTopic, "lobby", "Be kind")
        page.wait_for_selector(".message .body >> text=set the topic: Be kind")
        on_trio(bob_does, proto.DeleteMessage, LOBBY, said.seq)
        page.wait_for_selector(".message .body >> text=(message deleted)")
        assert "hello" not in " ".join(page.bodies())
        page.assert_no_errors()

    await in_chromium(steps)
