"""Roles, moderation and private rooms over real sockets (issue 12, protocol version 2, spec §9.15).

How this works. Real servers (conftest ``start_server``) and raw connections (tests/rawclient.py) that negotiate
version 2, or version 1 to check what an older client sees instead (MESSAGEs in words, gapless seqs). alice creates
#lobby, so she owns it; bob and carol join as members. The store's rules on their own, on SQLite and PostgreSQL,
are in tests/test_moderation_store.py.
"""
from __future__ import annotations

import trio

from chorus import proto
from chorus.proto import ErrorCode, EventKind, RoomRole
from rawclient import RawClient
from test_accounts import NO_DEADLINES, connect, register

LOBBY = proto.Conversation.room("lobby")


async def users_in_room(port: int, *names: str, room: str = "lobby") -> list[RawClient]:
    """Register ``names`` (version 2, live) and have each join ``room`` in order: the first creates it."""
    clients = []
    for name in names:
        raw, _ = await register(port, name)
        assert isinstance(await raw.request(proto.Join, room), proto.Joined)
        clients.append(raw)
    return clients


async def version_1_login(port: int, name: str) -> RawClient:
    """``name`` logged in again over a version 1 connection, live."""
    raw = await connect(port, version=1)
    assert isinstance(await raw.request(proto.Login, name, "correct horse"), proto.AuthOk)
    await raw.go_live()
    return raw


async def ok(raw: RawClient, event_cls, *args) -> None:
    reply = await raw.request(event_cls, *args)
    assert isinstance(reply, proto.Ok), reply


async def refused(raw: RawClient, code: ErrorCode, event_cls, *args) -> proto.Error:
    reply = await raw.request(event_cls, *args)
    assert isinstance(reply, proto.Error) and reply.code == code, reply
    return reply


async def next_event(raw: RawClient) -> proto.ConvEvent:
    """The next live EVENTS push's one event."""
    push = await raw.next_of(proto.Events)
    assert push.request_id == 0 and len(push.events) == 1, push
    return push.events[0]


async def history(raw: RawClient, conv: proto.Conversation = LOBBY) -> tuple[tuple[proto.ConvEvent, ...],
                                                                         proto.HistoryPage]:
    """HISTORY of the newest 50: (the events of the page, from the EVENTS frame before it, if any; the page)."""
    reply = await raw.request(proto.History, conv, proto.Direction.BEFORE, 0, 50)
    events: tuple[proto.ConvEvent, ...] = ()
    if isinstance(reply, proto.Events):  # same request id, right before its page
        request_id, events = reply.request_id, reply.events
        reply = await raw.next()
        assert reply.request_id == request_id, reply
    assert isinstance(reply, proto.HistoryPage), reply
    return events, reply


async def send(raw: RawClient, body: str, conv: proto.Conversation = LOBBY, msg_id: int | None = None):
    return await raw.request(proto.Send, conv, raw.rid() if msg_id is None else msg_id, body)


async def test_roles_the_creator_owns_the_room_and_only_moderators_kick(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob, carol = await users_in_room(server.port, "alice", "bob", "carol")
    details = await alice.request(proto.GetRoom, "lobby")
    assert [(m.user, m.role) for m in details.members] == [
        ("alice", RoomRole.OWNER), ("bob", RoomRole.MEMBER), ("carol", RoomRole.MEMBER)]
    await refused(bob, ErrorCode.FORBIDDEN, proto.Kick, "lobby", "carol", "")  # a member moderates nobody
    await refused(bob, ErrorCode.FORBIDDEN, proto.SetRole, "lobby", "bob", RoomRole.MODERATOR)  # the owner only
    await ok(alice, proto.SetRole, "lobby", "bob", RoomRole.MODERATOR)
    role = await next_event(carol)
    assert (role.kind, role.actor, role.target, role.role) == (EventKind.ROLE, "alice", "bob", RoomRole.MODERATOR)
    await refused(bob, ErrorCode.FORBIDDEN, proto.Kick, "lobby", "alice", "")  # never above one's own rank
    await ok(bob, proto.Kick, "lobby", "carol", "spam")
    kick = await next_event(carol)  # the kicked user sees why, then that it left
    assert (kick.kind, kick.actor, kick.target, kick.text) == (EventKind.KICK, "bob", "carol", "spam")
    left = await carol.next_of(proto.Membership)
    assert (left.room, left.user, left.change) == ("lobby", "carol", proto.MembershipChange.LEFT)
    await refused(carol, ErrorCode.NOT_MEMBER, proto.Send, LOBBY, 1, "still here?")
    assert isinstance(await carol.request(proto.Join, "lobby"), proto.Joined)  # a kick is not a ban
    # The owner hands the room over and becomes a moderator.
    await ok(alice, proto.SetRole, "lobby", "bob", RoomRole.OWNER)
    roles = {m.user: m.role for m in (await carol.request(proto.GetRoom, "lobby")).members}
    assert roles == {"alice": RoomRole.MODERATOR, "bob": RoomRole.OWNER, "carol": RoomRole.MEMBER}


async def test_a_banned_user_cannot_rejoin_or_read_until_unbanned(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await users_in_room(server.port, "alice", "bob")
    await send(alice, "before the ban")
    await ok(alice, proto.Ban, "lobby", "bob", 0, "flooding")
    ban = await bob.next_of(proto.Events)
    assert ban.events[0].kind == EventKind.BAN
    assert (await bob.next_of(proto.Membership)).change == proto.MembershipChange.LEFT
    denied = await refused(bob, ErrorCode.FORBIDDEN, proto.Join, "lobby")
    assert "banned" in denied.message
    await refused(bob, ErrorCode.NOT_MEMBER, proto.History, LOBBY, proto.Direction.BEFORE, 0, 50)
    await refused(bob, ErrorCode.NOT_MEMBER, proto.Sync, (proto.Position(LOBBY, 0),))
    await refused(alice, ErrorCode.FORBIDDEN, proto.Invite, "lobby", "bob")  # no way back in while banned
    details = await alice.request(proto.GetRoom, "lobby")
    assert [(b.user, b.until_ms) for b in details.bans] == [("bob", 0)]
    await ok(alice, proto.Unban, "lobby", "bob")
    assert isinstance(await bob.request(proto.Join, "lobby"), proto.Joined)
    events, page = await history(bob)
    assert [m.body for m in page.messages] == ["before the ban"]
    assert [e.kind for e in events] == [EventKind.BAN, EventKind.UNBAN]


async def test_a_ban_in_the_past_or_beyond_the_store_is_refused(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, _ = await users_in_room(server.port, "alice", "bob")
    await refused(alice, ErrorCode.INVALID_REQUEST, proto.Ban, "lobby", "bob", 1, "")
    await refused(alice, ErrorCode.INVALID_REQUEST, proto.Mute, "lobby", "bob", 2**64 - 1, "")
    await refused(alice, ErrorCode.NOT_FOUND, proto.Kick, "lobby", "nobody", "")


async def test_a_muted_user_is_refused_clearly_and_reads_on_until_unmuted(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await users_in_room(server.port, "alice", "bob")
    bob_v1 = await version_1_login(server.port, "bob")
    await ok(alice, proto.Mute, "lobby", "bob", 0, "")
    assert (await next_event(bob)).kind == EventKind.MUTE
    muted = await refused(bob, ErrorCode.FORBIDDEN, proto.Send, LOBBY, 7, "let me speak")
    assert "muted in #lobby" in muted.message
    # A version 1 connection of the same user: refused with a code it knows, the same words.
    old = await refused(bob_v1, ErrorCode.INVALID_REQUEST, proto.Send, LOBBY, 8, "let me speak")
    assert old.message == muted.message
    await send(alice, "still reading?")
    assert (await bob.next_of(proto.Message)).body == "still reading?"
    await ok(alice, proto.Unmute, "lobby", "bob")
    assert (await next_event(bob)).kind == EventKind.UNMUTE
    assert isinstance(await send(bob, "thanks"), proto.Ack)


async def test_a_deleted_message_is_gone_from_history_and_from_catch_up(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await users_in_room(server.port, "alice", "bob")
    away, auth = await register(server.port, "carol")
    assert isinstance(await away.request(proto.Join, "lobby"), proto.Joined)
    await away.stream.aclose()
    await send(bob, "hello")
    secret = await send(bob, "my password is hunter2", msg_id=99)
    await refused(bob, ErrorCode.NOT_FOUND, proto.DeleteMessage, LOBBY, 12345)
    await ok(bob, proto.DeleteMessage, LOBBY, secret.seq)  # one's own
    deleted = await next_event(alice)
    assert (deleted.kind, deleted.target_seq, deleted.target) == (EventKind.DELETE, secret.seq, "bob")
    await refused(bob, ErrorCode.NOT_FOUND, proto.DeleteMessage, LOBBY, secret.seq)  # only once
    # A retry of the deleted message's SEND is still answered as a duplicate: nothing comes back.
    again = await send(bob, "my password is hunter2", msg_id=99)
    assert (again.seq, again.duplicate) == (secret.seq, True)

    _, page = await history(alice)
    assert [m.body for m in page.messages] == ["hello"]
    # Catching up from before both: the events of the page come first, then the page, all seqs covered.
    carol = await connect(server.port)
    assert isinstance(await carol.request(proto.Resume, auth.token), proto.AuthOk)
    await carol.send(proto.Sync((proto.Position(LOBBY, 0),), request_id=5))
    events = await carol.next_of(proto.Events)
    sync_page = await carol.next_of(proto.SyncPage)
    assert events.request_id == sync_page.request_id == 5
    kinds = {e.seq: e.kind for e in events.events}
    assert kinds == {secret.seq: EventKind.DELETED, deleted.seq: EventKind.DELETE}
    assert [m.body for m in sync_page.messages] == ["hello"]
    seqs = sorted([m.seq for m in sync_page.messages] + list(kinds))
    assert seqs == list(range(1, deleted.seq + 1))
    text = b"hunter2"
    assert all(text not in proto.encode(e) for e in (events, sync_page))

    # A version 1 client sees the same seqs, the events in words and a tombstone in place of the text.
    old = await connect(server.port, version=1)
    assert isinstance(await old.request(proto.Resume, auth.token), proto.AuthOk)
    page = await old.request(proto.History, LOBBY, proto.Direction.BEFORE, 0, 50)
    assert [(m.seq, m.sender, m.body) for m in page.messages][-2:] == [
        (secret.seq, "bob", "(message deleted)"), (deleted.seq, "bob", "deleted a message")]
    assert [m.seq for m in page.messages] == list(range(1, deleted.seq + 1))


async def test_moderators_delete_any_message_members_only_their_own(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob, carol = await users_in_room(server.port, "alice", "bob", "carol")
    said = await send(carol, "rude words")
    await refused(bob, ErrorCode.FORBIDDEN, proto.DeleteMessage, LOBBY, said.seq)
    await ok(alice, proto.DeleteMessage, LOBBY, said.seq)
    # Direct conversations: one's own messages only, and no moderation.
    dm = await send(alice, "psst", proto.Conversation.direct("bob"))
    await refused(bob, ErrorCode.FORBIDDEN, proto.DeleteMessage, proto.Conversation.direct("alice"), dm.seq)
    await ok(alice, proto.DeleteMessage, proto.Conversation.direct("bob"), dm.seq)


async def test_private_rooms_are_unlisted_invite_only_and_invitees_go_live(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, _ = await register(server.port, "alice")
    bob, _ = await register(server.port, "bob")
    joined = await alice.request(proto.CreateRoom, "staff", True)
    assert isinstance(joined, proto.Joined) and joined.members == 1
    await refused(bob, ErrorCode.INVALID_REQUEST, proto.CreateRoom, "staff", False)  # taken
    listed = await bob.request(proto.ListRooms)
    assert "staff" not in [r.name for r in listed.rooms]
    assert "staff" in [r.name for r in (await alice.request(proto.ListRooms)).rooms]
    denied = await refused(bob, ErrorCode.FORBIDDEN, proto.Join, "staff")
    assert "invite-only" in denied.message
    await ok(alice, proto.Invite, "staff", "bob")
    invite = await next_event(bob)  # bob's connection follows the room from its INVITE on
    assert (invite.kind, invite.target) == (EventKind.INVITE, "bob")
    assert (await bob.next_of(proto.Membership)).change == proto.MembershipChange.JOINED
    await send(alice, "welcome", proto.Conversation.room("staff"))
    assert (await bob.next_of(proto.Message)).body == "welcome"
    details = await bob.request(proto.GetRoom, "staff")
    assert (details.private, details.bans) == (True, ())


async def test_topic_is_an_event_and_version_1_sees_gapless_words(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await users_in_room(server.port, "alice", "bob")
    old = await version_1_login(server.port, "bob")
    first = await send(alice, "one")
    assert (await old.next_of(proto.Message)).seq == first.seq
    await refused(bob, ErrorCode.FORBIDDEN, proto.SetTopic, "lobby", "mine now")
    await ok(alice, proto.SetTopic, "lobby", "Welcome, be kind")
    topic = await next_event(bob)
    assert (topic.kind, topic.text, topic.seq) == (EventKind.TOPIC, "Welcome, be kind", first.seq + 1)
    shown = await old.next_of(proto.Message)
    assert (shown.seq, shown.sender, shown.client_msg_id, shown.body) == (
        first.seq + 1, "alice", 0, "set the topic: Welcome, be kind")
    after = await send(alice, "two")
    assert (await old.next_of(proto.Message)).seq == after.seq == first.seq + 2
    assert (await bob.request(proto.GetRoom, "lobby")).topic == "Welcome, be kind"


async def test_version_1_connections_never_see_version_2_moderation_frames(start_server):
    server = await start_server(**NO_DEADLINES)
    old = await connect(server.port, version=1)
    await old.register("dave")
    await old.go_live()
    # A version 1 peer that sends a version 2 frame (GET_ROOM) is answered as an older server would: unknown, closed.
    with trio.fail_after(10):
        await old.send_raw(bytes.fromhex("00000006" "5b" "00" "00000004") + b"\x05lobby")
        events = await old.drain_until_closed()
    errors = [e for e in events if isinstance(e, proto.Error)]
    assert [e.code for e in errors] == [ErrorCode.UNKNOWN_FRAME_TYPE]


async def test_the_client_library_moderates_and_hands_events_over_in_seq_order(start_server):
    from chorus import client

    server = await start_server(**NO_DEADLINES)
    options = dict(password="correct horse", register=True, backoff_base_s=0.05)
    async with client.open_client("127.0.0.1", server.port, username="alice", **options) as alice, \
            client.open_client("127.0.0.1", server.port, username="bob", **options) as bob:
        await alice.create_room("crew", private=True)
        with trio.fail_after(10):
            await alice.invite("crew", "bob")
            first = await alice.send("#crew", "hi bob")
            await alice.set_role("crew", "bob", RoomRole.MODERATOR)
            await bob.set_topic("crew", "plans")
            await alice.delete_message("#crew", first.seq)
            await alice.mute("crew", "bob", until_ms=0)
            with_error = None
            try:
                await bob.send("#crew", "muted?")
            except client.ServerError as exc:
                with_error = exc
            assert with_error is not None and with_error.code == ErrorCode.FORBIDDEN
            await alice.unmute("crew", "bob")
            # bob's stream: every seq from his INVITE on, messages and events in order.
            seen = []
            async for item in bob.events():
                if isinstance(item, proto.Events):
                    seen.append((item.events[0].seq, item.events[0].kind))
                elif isinstance(item, proto.Message):
                    seen.append((item.seq, item.body))
                if seen and seen[-1][1] == EventKind.UNMUTE:
                    break
        assert seen == [(1, EventKind.INVITE), (2, "hi bob"), (3, EventKind.ROLE), (4, EventKind.TOPIC),
                        (5, EventKind.DELETE), (6, EventKind.MUTE), (7, EventKind.UNMUTE)]
        page = await bob.history("#crew")
        assert [(e.seq, type(e).__name__) for e in page.entries] == [
            (1, "ConvEvent"), (2, "ConvEvent"), (3, "ConvEvent"), (4, "ConvEvent"), (5, "ConvEvent"),
            (6, "ConvEvent"), (7, "ConvEvent")]
        assert page.messages == () and page.events[1].kind == EventKind.DELETED
        details = await alice.room("crew")
        assert (details.topic, details.private) == ("plans", True)
        await alice.ban("crew", "bob", reason="enough")
        assert [b.user for b in (await alice.room("crew")).bans] == ["bob"]
        await alice.unban("crew", "bob")
        assert (await alice.room("crew")).bans == ()
        try:
            await alice.kick("crew", "bob")
        except client.ServerError as exc:
            assert exc.code == ErrorCode.NOT_FOUND  # banned, so not in the room any more
        else:
            raise AssertionError("kicked someone who is not in the room")


async def test_read_state_follows_the_person_to_their_other_version_2_devices(start_server):
    server = await start_server(**NO_DEADLINES)
    phone, bob = await users_in_room(server.port, "alice", "bob")
    laptop = await connect(server.port)
    assert isinstance(await laptop.request(proto.Login, "alice", "correct horse"), proto.AuthOk)
    await laptop.go_live()
    old = await version_1_login(server.port, "alice")
    said = await send(bob, "are you there?")
    await phone.send(proto.Read(LOBBY, said.seq))  # read on the phone...
    receipt = await laptop.next_of(proto.Receipt)  # ...so the laptop's badge clears
    assert (receipt.conv, receipt.user, receipt.kind, receipt.seq) == (LOBBY, "alice", proto.ReceiptKind.READ,
                                                                       said.seq)
    await phone.send(proto.Read(LOBBY, said.seq))  # not moved: nothing new to tell
    again = await send(bob, "hello?")
    await laptop.send(proto.Read(LOBBY, again.seq))
    back = await phone.next_of(proto.Receipt)
    assert (back.user, back.seq) == ("alice", again.seq)
    # The version 1 connection got the messages and no receipt of its own user's reads.
    await old.send(proto.Ping(9))
    seen = []
    while not isinstance(event := await old.next(), proto.Pong):
        seen.append(event)
    assert [type(e) for e in seen] == [proto.Message, proto.Message], seen


async def test_moderation_requests_spend_the_send_budget(start_server):
    # Each stores an event like a message: a moderator cannot grow the store faster than a sender could.
    server = await start_server(user_send_burst=3, user_send_rate_per_s=0.01, **NO_DEADLINES)
    alice, _ = await users_in_room(server.port, "alice", "bob")
    for topic in ("one", "two", "three"):
        await ok(alice, proto.SetTopic, "lobby", topic)
    limited = await refused(alice, ErrorCode.RATE_LIMITED, proto.SetTopic, "lobby", "four")
    assert limited.retry_after_ms > 0
    await refused(alice, ErrorCode.RATE_LIMITED, proto.Send, LOBBY, 1, "and no message either")
