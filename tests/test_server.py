"""The server over real loopback sockets with a real SQLite file (DESIGN.md "Guarantees")."""
from __future__ import annotations

import secrets
import socket

import pytest
import trio
import trio.testing

from chorus import proto
from chorus.proto import CloseReason, ErrorCode
from rawclient import RawClient, alice_and_bob_in_lobby

LOBBY = proto.Conversation.room("lobby")
#: Rate limits out of the way, per connection and per user, for tests that send as fast as they can.
UNLIMITED = {"rate_per_s": 100_000, "rate_burst": 100_000, "user_send_rate_per_s": 100_000, "user_send_burst": 100_000}


async def two_in_lobby(port):
    return await alice_and_bob_in_lobby(await RawClient.connect(port), await RawClient.connect(port))


async def test_direct_messages_both_ways(server):
    alice = await RawClient.connect(server.port)
    bob = await RawClient.connect(server.port)
    await alice.register("alice")
    await bob.register("bob")
    ack = await alice.request(proto.Send, proto.Conversation.direct("bob"), 1, "psst")
    assert ack.seq == 1
    got = await bob.next_of(proto.Message)
    assert (got.conv, got.sender, got.body, got.seq) == (proto.Conversation.direct("alice"), "alice", "psst", 1)
    ack = await bob.request(proto.Send, proto.Conversation.direct("alice"), 2, "hi back")
    assert ack.seq == 2  # one conversation, one sequence, whoever writes
    got = await alice.next_of(proto.Message)
    assert (got.conv, got.body, got.seq) == (proto.Conversation.direct("bob"), "hi back", 2)


async def test_send_errors_keep_connection_open(server):
    alice = await RawClient.connect(server.port)
    await alice.register("alice")
    err = await alice.request(proto.Send, proto.Conversation.direct("nobody"), 1, "x")
    assert err.code == ErrorCode.NOT_FOUND
    err = await alice.request(proto.Send, proto.Conversation.direct("alice"), 1, "x")
    assert err.code == ErrorCode.INVALID_REQUEST
    err = await alice.request(proto.Send, LOBBY, 1, "x")
    assert err.code == ErrorCode.NOT_MEMBER
    err = await alice.request(proto.Send, LOBBY, 1, "")
    assert err.code == ErrorCode.INVALID_REQUEST
    assert isinstance(await alice.request(proto.Ping, 5), proto.Pong)


async def test_history_pages_by_cursor(server):
    alice, _ = await two_in_lobby(server.port)
    for i in range(1, 26):
        await alice.request(proto.Send, LOBBY, i, f"m{i}")
    page = await alice.request(proto.History, LOBBY, proto.Direction.BEFORE, 0, 10)
    assert [m.seq for m in page.messages] == list(range(16, 26)) and page.has_more
    page = await alice.request(proto.History, LOBBY, proto.Direction.BEFORE, 16, 10)
    assert [m.seq for m in page.messages] == list(range(6, 16)) and page.has_more
    page = await alice.request(proto.History, LOBBY, proto.Direction.BEFORE, 6, 10)
    assert [m.seq for m in page.messages] == list(range(1, 6)) and not page.has_more
    page = await alice.request(proto.History, LOBBY, proto.Direction.AFTER, 20, 10)
    assert [m.body for m in page.messages] == ["m21", "m22", "m23", "m24", "m25"] and not page.has_more
    page = await alice.request(proto.History, LOBBY, proto.Direction.AFTER, 0, 1000)  # capped at max_page
    assert len(page.messages) == 25


async def test_idempotent_retry_returns_same_seq_and_delivers_once(server):
    alice, bob = await two_in_lobby(server.port)
    first = await alice.request(proto.Send, LOBBY, 777, "once")
    again = await alice.request(proto.Send, LOBBY, 777, "once")
    assert (again.seq, again.ts_ms, again.duplicate) == (first.seq, first.ts_ms, True)
    err = await alice.request(proto.Send, proto.Conversation.direct("bob"), 777, "elsewhere")
    assert err.code == ErrorCode.INVALID_REQUEST  # the id is taken by a message in another conversation
    await alice.request(proto.Send, LOBBY, 778, "twice?")
    bodies = [(await bob.next_of(proto.Message)).body for _ in range(2)]
    assert bodies == ["once", "twice?"]


async def test_catch_up_while_another_client_keeps_sending(start_server):
    server = await start_server(**UNLIMITED)
    alice, bob = await two_in_lobby(server.port)
    token = (await RawClient.connect(server.port))  # a third device of bob, to resume later
    auth = await token.request(proto.Login, "bob", "correct horse")
    await token.send(proto.Bye(CloseReason.CLIENT_QUIT))
    total = 300
    seen: list[int] = []
    half_received = trio.Event()

    async def sender():
        for i in range(1, total + 1):
            ack = await alice.request(proto.Send, LOBBY, i, f"n{i}")
            assert ack.seq == i

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while len(seen) < 40:
            seen.append((await bob.next_of(proto.Message)).seq)
        await bob.stream.aclose()  # bob drops off mid-stream
        half_received.set()
        bob = await RawClient.connect(server.port)
        assert isinstance(await bob.request(proto.Resume, auth.token), proto.AuthOk)
        rid = bob.rid()
        await bob.send(proto.Sync((proto.Position(LOBBY, seen[-1]),), request_id=rid))
        done = False
        while not done or len(seen) < total:
            event = await bob.next()
            if isinstance(event, proto.SyncPage):
                assert event.request_id == rid
                seen.extend(m.seq for m in event.messages)
            elif isinstance(event, proto.Message):
                assert done, "live message before the sync finished"
                seen.append(event.seq)
            elif isinstance(event, proto.SyncDone):
                done = True
    assert seen == list(range(1, total + 1))  # no gap, no duplicate, in order


async def test_sync_covers_unlisted_conversations_from_delivered_cursor(server):
    alice, bob = await two_in_lobby(server.port)
    await bob.send(proto.Bye(CloseReason.CLIENT_QUIT))
    for i in range(1, 6):
        await alice.request(proto.Send, LOBBY, i, f"m{i}")
    bob = await RawClient.connect(server.port)  # a new device that knows no seq yet
    await bob.request(proto.Login, "bob", "correct horse")
    await bob.send(proto.Delivered(LOBBY, 3))  # another device had received up to 3
    rid = bob.rid()
    await bob.send(proto.Sync((), request_id=rid))
    page = await bob.next_of(proto.SyncPage)
    assert [m.seq for m in page.messages] == [4, 5] and not page.has_more
    assert isinstance(await bob.next_of(proto.SyncDone), proto.SyncDone)


async def test_cursors_receipts_presence_typing(start_server):
    server = await start_server(presence_offline_delay_s=0)  # OFFLINE at once (the debounce: test_session_limits)
    alice = await RawClient.connect(server.port)
    await alice.register("alice")
    await alice.request(proto.Join, "lobby")
    bob = await RawClient.connect(server.port)
    await bob.register("bob")
    await bob.request(proto.Join, "lobby")
    await bob.send(proto.Bye(CloseReason.CLIENT_QUIT))
    bob = await RawClient.connect(server.port)
    await bob.request(proto.Login, "bob", "correct horse")
    assert await alice.next_of(proto.Presence) == proto.Presence("bob", proto.Status.OFFLINE)
    assert await alice.next_of(proto.Presence) == proto.Presence("bob", proto.Status.ONLINE)
    members = await alice.request(proto.Members, "lobby")
    assert {(m.user, m.status) for m in members.members} == {("alice", proto.Status.ONLINE),
                                                            ("bob", proto.Status.ONLINE)}
    await alice.send(proto.Typing(LOBBY))
    assert await bob.next_of(proto.UserTyping) == proto.UserTyping(LOBBY, "alice")
    await alice.request(proto.Send, proto.Conversation.direct("bob"), 1, "read me")
    await bob.next_of(proto.Message)
    await bob.send(proto.Read(proto.Conversation.direct("alice"), 1))
    receipt = await alice.next_of(proto.Receipt)
    assert receipt == proto.Receipt(proto.Conversation.direct("bob"), "bob", proto.ReceiptKind.READ, 1)
    cursors = await alice.request(proto.GetCursors, proto.Conversation.direct("bob"))
    assert proto.CursorInfo("bob", 0, 1) in cursors.cursors
    await bob.send(proto.Bye(CloseReason.CLIENT_QUIT))
    assert await alice.next_of(proto.Presence) == proto.Presence("bob", proto.Status.OFFLINE)


async def test_logout_revokes_token(server):
    alice = await RawClient.connect(server.port)
    auth = await alice.register("alice")
    await alice.send(proto.Logout(request_id=alice.rid()))
    events = await alice.drain_until_closed()
    assert proto.Bye(CloseReason.LOGGED_OUT) in events
    again = await RawClient.connect(server.port)
    err = await again.request(proto.Resume, auth.token)
    assert err.code == ErrorCode.INVALID_TOKEN
    assert isinstance(await again.request(proto.Login, "alice", "correct horse"), proto.AuthOk)


async def test_auth_errors(server):
    c = await RawClient.connect(server.port)
    assert (await c.request(proto.Register, "Bad Name", "long enough")).code == ErrorCode.INVALID_NAME
    assert (await c.request(proto.Register, "carol", "short")).code == ErrorCode.WEAK_PASSWORD
    await c.register("carol")
    d = await RawClient.connect(server.port)
    assert (await d.request(proto.Register, "carol", "long enough")).code == ErrorCode.USERNAME_TAKEN
    assert (await d.request(proto.Login, "carol", "wrong password")).code == ErrorCode.AUTH_FAILED
    assert (await d.request(proto.Login, "nobody", "wrong password")).code == ErrorCode.AUTH_FAILED
    await d.send_raw(proto.encode(proto.Join("lobby", request_id=9)))  # our Connection would refuse to send it
    err = await d.next()
    assert err.code == ErrorCode.WRONG_STATE  # a protocol error: chat frames before auth
    assert (await d.drain_until_closed())[-2] == proto.Bye(CloseReason.PROTOCOL_ERROR)


# -- bad input costs nothing ----------------------------------------------------------

@pytest.mark.parametrize(
    "raw, code",
    [
        (bytes.fromhex("00000000 7f 00 00000001"), ErrorCode.UNKNOWN_FRAME_TYPE),
        (bytes.fromhex("7fffffff 20 00 00000001"), ErrorCode.FRAME_TOO_LARGE),  # refused before any body
        (bytes.fromhex("00000003 40 00 00000001 000000"), ErrorCode.MALFORMED_FRAME),
        (bytes.fromhex("00000002 12 00 00000001 01ff"), ErrorCode.INVALID_FIELD),  # LEAVE with invalid UTF-8
        (bytes.fromhex("0000000a 40 80 00000001") + bytes(10), ErrorCode.INVALID_FIELD),  # unknown flag
    ],
)
async def test_bad_frames_get_error_and_close_others_unaffected(server, raw, code):
    alice, bob = await two_in_lobby(server.port)
    mallory = await RawClient.connect(server.port)
    await mallory.register("mallory")
    await mallory.send_raw(raw)
    events = await mallory.drain_until_closed()
    assert [type(e) for e in events] == [proto.Error, proto.Bye, proto.ConnectionClosed]
    assert events[0].code == code and events[1].reason == CloseReason.PROTOCOL_ERROR
    ack = await alice.request(proto.Send, LOBBY, 1, "still fine")
    assert (await bob.next_of(proto.Message)).seq == ack.seq == 1
    assert server.close_reasons["PROTOCOL_ERROR"] == 1


async def test_max_frame_bytes_is_enforced(start_server):
    server = await start_server(max_frame_bytes=256)
    c = await RawClient.connect(server.port)
    await c.register("alice")
    await c.request(proto.Join, "lobby")
    await c.send_raw(proto.encode(proto.Send(LOBBY, 1, "x" * 300), compress_threshold=None))
    events = await c.drain_until_closed()
    assert events[0].code == ErrorCode.FRAME_TOO_LARGE


async def test_max_body_bytes(start_server):
    server = await start_server(max_body_bytes=10)
    c = await RawClient.connect(server.port)
    await c.register("alice")
    await c.request(proto.Join, "lobby")
    assert (await c.request(proto.Send, LOBBY, 1, "é" * 6)).code == ErrorCode.BODY_TOO_LARGE
    assert (await c.request(proto.Send, LOBBY, 2, "é" * 5)).seq == 1


async def test_rate_limit_then_close(start_server):
    server = await start_server(rate_per_s=1, rate_burst=5, max_rate_violations=3)
    c = await RawClient.connect(server.port)  # HELLO took one token
    replies = [await c.request(proto.Ping, i) for i in range(5)]
    assert [type(r) for r in replies] == [proto.Pong] * 4 + [proto.Error]
    assert replies[-1].code == ErrorCode.RATE_LIMITED and replies[-1].retry_after_ms > 0
    for i in range(3):
        await c.send(proto.Ping(i))
    events = await c.drain_until_closed()
    assert events[-2] == proto.Bye(CloseReason.RATE_LIMITED)


async def test_max_rooms_per_user(start_server):
    server = await start_server(max_rooms_per_user=2)
    c = await RawClient.connect(server.port)
    await c.register("alice")
    assert isinstance(await c.request(proto.Join, "a"), proto.Joined)
    assert isinstance(await c.request(proto.Join, "b"), proto.Joined)
    assert isinstance(await c.request(proto.Join, "b"), proto.Joined)  # rejoining is free
    assert (await c.request(proto.Join, "c")).code == ErrorCode.TOO_MANY_ROOMS
    assert isinstance(await c.request(proto.Leave, "a"), proto.Ok)
    assert isinstance(await c.request(proto.Join, "c"), proto.Joined)
    rooms = await c.request(proto.ListRooms)
    assert {(r.name, r.joined) for r in rooms.rooms} == {("b", True), ("c", True)}  # "a" is empty: hidden


async def test_max_connections_per_user(start_server):
    server = await start_server(max_connections_per_user=1)
    first = await RawClient.connect(server.port)
    await first.register("alice")
    second = await RawClient.connect(server.port)
    err = await second.request(proto.Login, "alice", "correct horse")
    assert err.code == ErrorCode.TOO_MANY_CONNECTIONS
    assert (await second.drain_until_closed())[-2] == proto.Bye(CloseReason.SERVER_FULL)
    assert isinstance(await first.request(proto.Ping, 1), proto.Pong)


async def test_max_total_connections(start_server):
    server = await start_server(max_connections=2)
    a = await RawClient.connect(server.port)
    b = await RawClient.connect(server.port)
    c = await RawClient.connect(server.port, hello=False)
    events = await c.drain_until_closed()
    assert events[0].code == ErrorCode.TOO_MANY_CONNECTIONS
    assert events[1] == proto.Bye(CloseReason.SERVER_FULL)
    assert isinstance(await a.request(proto.Ping, 1), proto.Pong)
    assert isinstance(await b.request(proto.Ping, 1), proto.Pong)


async def test_handshake_timeout(start_server, autojump_clock):
    server = await start_server(handshake_timeout_s=10)
    c = await RawClient.connect(server.port, hello=False)
    start = trio.current_time()
    events = await c.drain_until_closed()
    assert events[0].code == ErrorCode.HANDSHAKE_TIMEOUT and events[1] == proto.Bye(CloseReason.AUTH_TIMEOUT)
    assert 10 <= trio.current_time() - start < 11


async def test_auth_timeout(start_server, autojump_clock):
    server = await start_server(auth_timeout_s=30, ping_interval_s=1000)
    c = await RawClient.connect(server.port)
    start = trio.current_time()
    events = await c.drain_until_closed()
    assert events[-2] == proto.Bye(CloseReason.AUTH_TIMEOUT)
    assert 29 <= trio.current_time() - start < 31


async def test_ping_pong_detects_dead_peer(start_server, autojump_clock):
    server = await start_server(ping_interval_s=10, max_missed_pings=2, auth_timeout_s=10_000)
    live = await RawClient.connect(server.port)
    dead = await RawClient.connect(server.port)
    start = trio.current_time()
    pongs = 0

    async def answer_pings():
        nonlocal pongs
        while True:
            event = await live.next_of(proto.Ping)
            await live.send(event.response())
            pongs += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_pings)
        events = await dead.drain_until_closed()  # dead never answers
        nursery.cancel_scope.cancel()
    assert [type(e) for e in events] == [proto.Ping, proto.Ping, proto.Bye, proto.ConnectionClosed]
    assert events[2].reason == CloseReason.STALE
    assert 30 <= trio.current_time() - start < 32  # three steps, each within one timer period
    assert pongs >= 2 and isinstance(await live.request(proto.Ping, 1), proto.Pong)


async def test_slow_consumer_is_cut_off_and_others_keep_up(start_server):
    server = await start_server(outbound_buffer_bytes=64 * 1024, **UNLIMITED)
    alice, bob = await two_in_lobby(server.port)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", server.port))
    slow = RawClient(trio.SocketStream(sock))
    await slow.send(proto.Hello(1, 1, "slow"))
    await slow.next_of(proto.Welcome)
    await slow.register("slow")
    await slow.request(proto.Join, "lobby")
    await slow.go_live()  # ...and never reads again
    total = 1500  # 6 MB of incompressible text: more than the kernel's socket buffers hold
    bodies = [secrets.token_urlsafe(3000) for _ in range(total)]

    async def read_all(client):
        for i in range(1, total + 1):
            assert (await client.next_of(proto.Message)).seq == i

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, bob)
        nursery.start_soon(read_all, alice)  # alice gets her own messages too, and her ACKs
        for i in range(1, total + 1):
            await alice.send(proto.Send(LOBBY, i, bodies[i - 1], request_id=i))
    assert server.close_reasons["SLOW_CONSUMER"] == 1
    assert len(server.connections) == 2


async def test_pipelined_sends_share_commits_and_all_get_acked(start_server):
    server = await start_server(max_inflight_sends=64, **UNLIMITED)
    alice, bob = await two_in_lobby(server.port)
    for i in range(1, 501):
        await alice.send(proto.Send(LOBBY, i, f"p{i}", request_id=i))
    acks = {}
    while len(acks) < 500:
        event = await alice.next()
        if isinstance(event, proto.Ack):
            acks[event.request_id] = event.seq
    assert sorted(acks.values()) == list(range(1, 501))
    assert [(await bob.next_of(proto.Message)).body for _ in range(500)] == [f"p{i}" for i in range(1, 501)]
    stats = server.store.statistics()
    assert stats["batch_max"] > 1  # several sends of one connection went into one transaction


def test_error_texts_are_clipped_to_the_field_on_a_character_boundary():
    from chorus.server._session import RequestError

    reply = RequestError(ErrorCode.NOT_FOUND, "no user " + "é" * 300).reply(7, proto.PROTOCOL_VERSION)
    assert len(reply.message.encode()) <= proto.MAX_TEXT_BYTES and reply.message.startswith("no user é")
    assert proto.decode(proto.encode(reply)) == reply  # encodable: a long text never loses the ERROR


async def test_concurrent_logins_respect_the_per_user_limit(start_server):
    server = await start_server(max_connections_per_user=2)
    first = await RawClient.connect(server.port)
    await first.register("alice")
    await first.send(proto.Bye(CloseReason.CLIENT_QUIT))
    assert (await first.drain_until_closed())[-1] == proto.ConnectionClosed()
    clients = [await RawClient.connect(server.port) for _ in range(5)]
    replies = {}

    async def login(c):
        replies[c] = await c.request(proto.Login, "alice", "correct horse")

    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(login, c)
    assert sorted(type(r).__name__ for r in replies.values()) == ["AuthOk", "AuthOk", "Error", "Error", "Error"]
    for c, reply in replies.items():
        if isinstance(reply, proto.Error):
            assert reply.code == ErrorCode.TOO_MANY_CONNECTIONS
            assert (await c.drain_until_closed())[-2] == proto.Bye(CloseReason.SERVER_FULL)
        else:
            assert isinstance(await c.request(proto.Ping, 1), proto.Pong)


async def test_random_bytes_never_hurt_the_server_or_other_clients(start_server):
    """Garbage after a valid login: an ERROR and a close at worst; the server and a bystander carry on."""
    import random

    server = await start_server(registrations_per_hour=100)  # 42 accounts from one address
    rng = random.Random(1234)
    alice, bob = await two_in_lobby(server.port)
    valid = proto.encode(proto.Send(LOBBY, 1, "x"))
    for i in range(40):
        junk = bytearray(valid * rng.randint(0, 3))
        junk += rng.randbytes(rng.randint(1, 64))
        if rng.random() < 0.5 and junk:  # flip bytes inside otherwise valid frames too
            junk[rng.randrange(len(junk))] ^= 1 << rng.randrange(8)
        mallory = await RawClient.connect(server.port)
        await mallory.register(f"m{i}")
        await mallory.send_raw(bytes(junk))
        await mallory.stream.send_eof()
        events = await mallory.drain_until_closed()
        assert isinstance(events[-1], proto.ConnectionClosed)
        errors = [e for e in events if isinstance(e, proto.Error)]
        assert all(e.code in ErrorCode for e in errors)
    ack = await alice.request(proto.Send, LOBBY, 99, "still here")
    assert (await bob.next_of(proto.Message)).seq == ack.seq


async def test_join_at_the_room_limit_creates_no_room(start_server):
    server = await start_server(max_rooms_per_user=1)
    c = await RawClient.connect(server.port)
    await c.register("alice")
    await c.request(proto.Join, "mine")
    for i in range(5):
        assert (await c.request(proto.Join, f"spam{i}")).code == ErrorCode.TOO_MANY_ROOMS
    rooms = await c.request(proto.ListRooms)
    assert [r.name for r in rooms.rooms] == ["mine"]


async def test_join_while_others_send_leaves_no_gap(start_server):
    server = await start_server(**UNLIMITED)
    alice = await RawClient.connect(server.port)
    await alice.register("alice")
    await alice.request(proto.Join, "lobby")
    bob = await RawClient.connect(server.port)
    await bob.register("bob")
    done = trio.Event()

    async def sender():
        for i in range(1, 201):
            await alice.request(proto.Send, LOBBY, i, f"n{i}")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        rid = bob.rid()
        await bob.send(proto.Join("lobby", request_id=rid))
        early = []  # live messages that beat JOINED
        while True:
            event = await bob.next()
            if isinstance(event, proto.Joined):
                break
            early.append(event.seq)
        last = event.last_seq
        assert all(seq <= last for seq in early)
        while last < 200:
            msg = await bob.next_of(proto.Message)
            assert msg.seq == last + 1  # the next one, every time: no gap after JOINED
            last = msg.seq
