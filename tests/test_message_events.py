"""Edits, reactions and actions (issue 13, protocol version 2, spec §9.16) over real sockets.

Each is an event that takes the conversation's next seq, like moderation's (tests/test_moderation.py): a client that
was away replays it on catch-up; a version 1 client sees it as a MESSAGE in words. An action is the message itself:
its row keeps the retry key, so SEND_ACTION is idempotent like SEND.
"""
from __future__ import annotations

from chorus import proto
from chorus.proto import ErrorCode, EventKind
from test_moderation import LOBBY, next_event, ok, refused, send, users_in_room, version_1_login
from test_accounts import NO_DEADLINES


async def test_an_edit_replaces_the_text_everywhere_and_only_the_sender_edits(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await users_in_room(server.port, "alice", "bob")
    said = await send(bob, "helo")
    await refused(alice, ErrorCode.FORBIDDEN, proto.EditMessage, LOBBY, said.seq, "hijacked")
    await refused(bob, ErrorCode.INVALID_REQUEST, proto.EditMessage, LOBBY, said.seq, "")
    await refused(bob, ErrorCode.NOT_FOUND, proto.EditMessage, LOBBY, 999, "hello")
    await ok(bob, proto.EditMessage, LOBBY, said.seq, "hello")
    edit = await next_event(alice)
    assert (edit.kind, edit.actor, edit.target_seq, edit.text) == (EventKind.EDIT, "bob", said.seq, "hello")
    await alice.send(proto.History(LOBBY, proto.Direction.BEFORE, 0, 50, request_id=77))
    events = await alice.next_of(proto.Events)
    page = await alice.next_of(proto.HistoryPage)
    assert [m.body for m in page.messages] == ["hello"]  # the latest text, never the old one
    assert [e.kind for e in events.events] == [EventKind.EDIT]
    old = await version_1_login(server.port, "alice")
    page = await old.request(proto.History, LOBBY, proto.Direction.BEFORE, 0, 50)
    assert [(m.sender, m.body) for m in page.messages] == [("bob", "hello"), ("bob", "edited a message: hello")]


async def test_reactions_are_events_stored_once_per_user_and_reaction(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await users_in_room(server.port, "alice", "bob")
    said = await send(bob, "ship it?")
    await ok(alice, proto.React, LOBBY, said.seq, "👍", True)
    react = await next_event(bob)
    assert (react.kind, react.actor, react.target, react.target_seq, react.text) == (
        EventKind.REACT, "alice", "bob", said.seq, "👍")
    await ok(alice, proto.React, LOBBY, said.seq, "👍", True)  # already there: OK, no event, no seq
    await ok(alice, proto.React, LOBBY, said.seq, "👍", False)
    assert (await next_event(bob)).kind == EventKind.UNREACT
    await ok(alice, proto.React, LOBBY, said.seq, "👍", False)  # not there: OK, nothing
    after = await send(bob, "next")
    assert after.seq == said.seq + 3  # the message, REACT, UNREACT: the repeats took no seq
    await refused(alice, ErrorCode.INVALID_REQUEST, proto.React, LOBBY, said.seq, "two words", True)
    await refused(alice, ErrorCode.INVALID_REQUEST, proto.React, LOBBY, said.seq, "\x07", True)
    await refused(alice, ErrorCode.NOT_FOUND, proto.React, LOBBY, 12345, "👍", True)
    for i in range(20):
        await ok(alice, proto.React, LOBBY, said.seq, f"r{i}", True)
    limit = await refused(alice, ErrorCode.INVALID_REQUEST, proto.React, LOBBY, said.seq, "one-more", True)
    assert "at most 20" in limit.message


async def test_an_action_is_a_message_of_its_own_kind_and_retries_are_duplicates(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await users_in_room(server.port, "alice", "bob")
    old = await version_1_login(server.port, "bob")
    ack = await alice.request(proto.SendAction, LOBBY, 42, "waves")
    assert isinstance(ack, proto.Ack) and not ack.duplicate
    action = await next_event(bob)
    assert (action.kind, action.actor, action.text, action.seq) == (EventKind.ACTION, "alice", "waves", ack.seq)
    shown = await old.next_of(proto.Message)  # the convention version 1 clients render as "* alice waves"
    assert (shown.seq, shown.sender, shown.body) == (ack.seq, "alice", "/me waves")
    again = await alice.request(proto.SendAction, LOBBY, 42, "waves")
    assert (again.seq, again.duplicate) == (ack.seq, True)
    plain = await send(alice, "/me is not an action when sent as text")
    assert plain.seq == ack.seq + 1
    await ok(alice, proto.EditMessage, LOBBY, ack.seq, "waves twice")
    await alice.send(proto.History(LOBBY, proto.Direction.BEFORE, 0, 50, request_id=78))
    events = await alice.next_of(proto.Events)
    page = await alice.next_of(proto.HistoryPage)
    kinds = {e.seq: (e.kind, e.text) for e in events.events}
    assert kinds[ack.seq] == (EventKind.ACTION, "waves twice")
    assert [m.body for m in page.messages] == ["/me is not an action when sent as text"]
    await ok(alice, proto.DeleteMessage, LOBBY, ack.seq)  # an action can be deleted like any message


async def test_the_client_library_edits_reacts_and_acts(start_server):
    from chorus import client

    server = await start_server(**NO_DEADLINES)
    options = dict(password="correct horse", register=True, backoff_base_s=0.05)
    async with client.open_client("127.0.0.1", server.port, username="ann", **options) as ann, \
            client.open_client("127.0.0.1", server.port, username="ben", **options) as ben:
        await ann.join("lobby")
        await ben.join("lobby")
        first = await ann.send("#lobby", "hi")
        await ann.edit_message("#lobby", first.seq, "hi all")
        await ben.react("#lobby", first.seq, "🎉")
        act = await ann.send_action("#lobby", "dances")
        page = await ben.history("#lobby")
        assert [(type(e).__name__, getattr(e, "kind", None)) for e in page.entries] == [
            ("StoredMessage", None), ("ConvEvent", EventKind.EDIT), ("ConvEvent", EventKind.REACT),
            ("ConvEvent", EventKind.ACTION)]
        assert page.messages[0].body == "hi all" and page.events[-1].seq == act.seq
