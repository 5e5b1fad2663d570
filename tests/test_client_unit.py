"""The client library against a scripted server peer over real loopback sockets.

The peer is ``proto.Connection(proto.SERVER)`` on a socket accepted from
``trio.open_tcp_listeners`` on port 0: the client's real transport, framing and
timing, with the server's side written out frame by frame in each test. Timed
behaviour (GOAWAY delay, heartbeat, timeouts) runs on ``autojump_clock``.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import trio
import trio.testing

from chorus import client
from chorus import proto
from chorus.proto import CloseReason, ErrorCode

ROOM = proto.Conversation.room("a")
PASSWORD = "password1"


def welcome(**overrides) -> proto.Welcome:
    values = dict(version=1, server="fake", max_frame_bytes=1 << 20, max_body_bytes=4096, ping_interval_ms=0,
                  rate_per_s=50, rate_burst=100, max_rooms=100, max_page=100)
    values.update(overrides)
    return proto.Welcome(**values)


def stored(seq: int, body: str = "", sender: str = "bob") -> proto.StoredMessage:
    return proto.StoredMessage(seq, 1000 + seq, sender, 10_000 + seq, body or f"m{seq}")


def msg(seq: int, conv: proto.Conversation = ROOM, body: str = "") -> proto.Message:
    return client._client._message(conv, stored(seq, body))


class Peer:
    """The server's end of one accepted connection."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.conn = proto.Connection(proto.SERVER)
        self.accepted_at = trio.current_time()
        self.done = trio.Event()
        self.hello: proto.Hello | None = None
        self.auths: list[proto.Event] = []
        self.sync: proto.Sync | None = None

    async def send(self, *events: proto.Event) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) for e in events))

    async def recv(self):
        while True:
            event = self.conn.next_event()
            if event is not proto.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.conn.receive_data(data)

    async def expect(self, cls):
        event = await self.recv()
        assert isinstance(event, cls), f"expected {cls.__name__}, got {event!r}"
        return event

    async def close(self) -> None:
        await self.stream.aclose()
        self.done.set()


class FakeServer:
    """Accepts connections; does HELLO/auth/SYNC per its settings, then hands each peer to the test."""

    def __init__(self, port: int):
        self.port = port
        self.auto_handshake = True
        self.welcome = welcome()
        self.valid_tokens = {"tok-1"}
        self.refuse = None  # an ErrorCode to answer every LOGIN/REGISTER with
        self.user = "alice"
        self.new_token = "tok-1"
        self.sync_pages = lambda sync: []  # Sync -> pages to send before SYNC_DONE
        self._send, self._peers = trio.open_memory_channel(16)

    async def handle(self, stream: trio.SocketStream) -> None:
        peer = Peer(stream)
        try:
            if self.auto_handshake:
                await self.handshake(peer)
            await self._send.send(peer)
            await peer.done.wait()
        finally:
            await stream.aclose()

    async def handshake(self, peer: Peer) -> None:
        peer.hello = await peer.expect(proto.Hello)
        await peer.send(self.welcome_for(peer.hello.request_id))
        while True:
            auth = await peer.recv()
            if isinstance(auth, proto.ConnectionClosed):
                return
            peer.auths.append(auth)
            if isinstance(auth, proto.Resume) and auth.token not in self.valid_tokens:
                await peer.send(proto.Error(ErrorCode.INVALID_TOKEN, 0, "expired", request_id=auth.request_id))
            elif not isinstance(auth, proto.Resume) and self.refuse is not None:
                await peer.send(proto.Error(self.refuse, 0, "no", request_id=auth.request_id))
            else:
                token = auth.token if isinstance(auth, proto.Resume) else self.new_token
                self.valid_tokens.add(token)
                await peer.send(proto.AuthOk(self.user, token, 0, request_id=auth.request_id))
                break
        peer.sync = await peer.expect(proto.Sync)
        pages = [dataclasses.replace(p, request_id=peer.sync.request_id) for p in self.sync_pages(peer.sync)]
        await peer.send(*pages, proto.SyncDone(request_id=peer.sync.request_id))

    def welcome_for(self, rid: int) -> proto.Welcome:
        return dataclasses.replace(self.welcome, request_id=rid)

    async def next_peer(self) -> Peer:
        return await self._peers.receive()


@pytest.fixture
async def fake(nursery):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = FakeServer(listeners[0].socket.getsockname()[1])
    nursery.start_soon(trio.serve_listeners, server.handle, listeners)
    return server


def connect(fake: FakeServer, **kwargs):
    options = dict(username="alice", password=PASSWORD, backoff_base_s=0.01)
    options.update(kwargs)
    return client.open_client("127.0.0.1", fake.port, **options)


async def next_events(c: client.Client, n: int, timeout_s: float = 10) -> list:
    events = []
    with trio.fail_after(timeout_s):
        for _ in range(n):
            events.append(await c.events().receive())
    return events


async def answer_history(peer: Peer, messages: dict[proto.Conversation, list[proto.StoredMessage]], others):
    """Answer PING and HISTORY(AFTER) like a server; anything else goes to ``others``."""
    while True:
        event = await peer.recv()
        if isinstance(event, proto.ConnectionClosed):
            return
        if isinstance(event, proto.Ping):
            await peer.send(event.response())
        elif isinstance(event, proto.History) and event.direction == proto.Direction.AFTER:
            page = [m for m in messages[event.conv] if m.seq > event.seq][:100]
            await peer.send(proto.HistoryPage(event.conv, tuple(page), False, request_id=event.request_id))
        else:
            await others.send(event)


# -- pure helpers ------------------------------------------------------------------
def test_parse_conv():
    assert client.parse_conv("#lobby") == proto.Conversation.room("lobby")
    assert client.parse_conv("@bob") == proto.Conversation.direct("bob")
    assert client.parse_conv(ROOM) is ROOM
    for bad in ("lobby", "#", "@", "", None):
        with pytest.raises(ValueError):
            client.parse_conv(bad)


def test_backoff_is_exponential_with_full_jitter_and_capped():
    import random

    rng = random.Random(1)
    for failures, bound in [(0, 0.2), (1, 0.4), (3, 1.6), (6, 10.0), (100, 10.0)]:
        samples = [client.backoff_delay(failures, 0.2, 10.0, rng) for _ in range(200)]
        assert all(0 <= s <= bound for s in samples)
        assert max(samples) > bound * 0.8 and min(samples) < bound * 0.2  # spread over the whole range


# -- handshake and requests ------------------------------------------------------------
async def test_handshake_registers_and_reports_token(fake):
    tokens = []
    async with connect(fake, register=True, on_token=tokens.append, client_name="unit") as c:
        peer = await fake.next_peer()
        assert (peer.hello.min_version, peer.hello.max_version, peer.hello.client) == (
            proto.MIN_PROTOCOL_VERSION, proto.PROTOCOL_VERSION, "unit")  # every version it speaks (spec §6.1)
        assert peer.auths == [proto.Register("alice", PASSWORD, request_id=peer.auths[0].request_id)]
        assert peer.sync.positions == ()
        assert (c.username, c.token, tokens, c.connected) == ("alice", "tok-1", ["tok-1"], True)
        assert c.welcome.max_page == 100
        # Request ids are nonzero and distinct.
        ids = [peer.hello.request_id, peer.auths[0].request_id, peer.sync.request_id]
        assert 0 not in ids and len(set(ids)) == 3


async def test_replies_matched_by_request_id_among_pushes(fake):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        results = {}

        async def run(name, coro_fn, *args):
            results[name] = await coro_fn(*args)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "join", c.join, "#a")
            nursery.start_soon(run, "rooms", c.rooms)
            requests = {type(e): e for e in [await peer.recv(), await peer.recv()]}
            assert set(requests) == {proto.Join, proto.ListRooms}
            # Replies in the opposite order, with pushes in between.
            await peer.send(
                proto.Presence("bob", proto.Status.ONLINE),
                proto.RoomList((proto.RoomInfo("a", 2, 1, True),), request_id=requests[proto.ListRooms].request_id),
                msg(1),
                proto.Joined("a", 1, 2, request_id=requests[proto.Join].request_id),
                proto.UserTyping(ROOM, "bob"),
            )
        assert results["join"] == proto.Joined("a", 1, 2, request_id=requests[proto.Join].request_id)
        assert results["rooms"] == [proto.RoomInfo("a", 2, 1, True)]
        events = await next_events(c, 3)
        assert events == [proto.Presence("bob", proto.Status.ONLINE), msg(1), proto.UserTyping(ROOM, "bob")]


async def test_messages_deduplicated_by_seq_live_and_from_sync(fake):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        await peer.send(msg(1), msg(2), msg(2), msg(1), msg(3))
        assert [e.seq for e in await next_events(c, 3)] == [1, 2, 3]
        assert c.last_seq == {ROOM: 3}

        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.sync)
            sync = await peer.expect(proto.Sync)
            assert sync.positions == (proto.Position(ROOM, 3),)
            # At-least-once from the server: the page overlaps what was already seen.
            await peer.send(
                proto.SyncPage(ROOM, (stored(2), stored(3), stored(4)), True, request_id=sync.request_id),
                proto.SyncPage(ROOM, (stored(5),), False, request_id=sync.request_id),
                msg(5),
                proto.SyncDone(request_id=sync.request_id),
            )
        assert len(c.events()) == 2  # queued before sync() returned
        assert await next_events(c, 2) == [msg(4), msg(5)]
        assert c.statistics().duplicates_dropped == 5


async def test_server_errors_raise_and_connection_stays(fake):
    async with connect(fake, retry_rate_limited=False) as c:
        peer = await fake.next_peer()
        async with trio.open_nursery() as nursery:
            async def join_bad():
                with pytest.raises(client.ServerError) as info:
                    await c.join("BAD")
                assert info.value.code == ErrorCode.INVALID_NAME and info.value.message == "lower case"
                with pytest.raises(client.ServerError) as info:
                    await c.send("#a", "x")
                assert info.value.code == ErrorCode.RATE_LIMITED and info.value.retry_after_ms == 250

            nursery.start_soon(join_bad)
            join = await peer.expect(proto.Join)
            await peer.send(proto.Error(ErrorCode.INVALID_NAME, 0, "lower case", request_id=join.request_id))
            send = await peer.expect(proto.Send)
            await peer.send(proto.Error(ErrorCode.RATE_LIMITED, 250, "slow down", request_id=send.request_id))
        # An ERROR that answers nothing is an event.
        await peer.send(proto.Error(ErrorCode.NOT_MEMBER, 0, "typing where?"))
        assert await next_events(c, 1) == [proto.Error(ErrorCode.NOT_MEMBER, 0, "typing where?")]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.rooms)
            ask = await peer.expect(proto.ListRooms)
            await peer.send(proto.RoomList((), request_id=ask.request_id))


async def test_rate_limited_request_is_retried_after_the_hint(fake, autojump_clock):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.rooms)
            first = await peer.expect(proto.ListRooms)
            refused_at = trio.current_time()
            await peer.send(proto.Error(ErrorCode.RATE_LIMITED, 700, "slow down", request_id=first.request_id))
            again = await peer.expect(proto.ListRooms)
            assert trio.current_time() - refused_at >= 0.7
            assert again.request_id == first.request_id
            await peer.send(proto.RoomList((), request_id=again.request_id))


async def test_server_ping_is_answered_and_client_ping_measures(fake):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        await peer.send(proto.Ping(42))
        assert await peer.expect(proto.Pong) == proto.Pong(42)
        async with trio.open_nursery() as nursery:
            rtts = []

            async def ping():
                rtts.append(await c.ping())

            nursery.start_soon(ping)
            ping_frame = await peer.expect(proto.Ping)
            assert ping_frame.request_id != 0
            await peer.send(ping_frame.response())
        assert 0 <= rtts[0] < 5


async def test_join_starts_unknown_room_at_its_last_seq_and_leave_forgets_it(fake):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.join, "a")
            join = await peer.expect(proto.Join)
            await peer.send(proto.Joined("a", 7, 3, request_id=join.request_id))
        assert c.last_seq == {ROOM: 7}
        await peer.send(msg(7), msg(8))
        assert await next_events(c, 1) == [msg(8)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.leave, "#a")
            leave = await peer.expect(proto.Leave)
            await peer.send(proto.Ok(request_id=leave.request_id))
        assert c.last_seq == {}


async def test_cursor_marks_typing_and_close_frames(fake):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        await c.mark_read("#a", 3)
        await c.mark_delivered("@bob", 4)
        await c.typing("#a")
        assert await peer.recv() == proto.Read(ROOM, 3)
        assert await peer.recv() == proto.Delivered(proto.Conversation.direct("bob"), 4)
        assert await peer.recv() == proto.Typing(ROOM)
    assert await peer.recv() == proto.Bye(CloseReason.CLIENT_QUIT)
    assert isinstance(await peer.recv(), proto.ConnectionClosed)
    with pytest.raises(client.ConnectionLost):
        await c.rooms()


async def test_first_connection_errors_are_raised_as_is(fake):
    fake.refuse = ErrorCode.AUTH_FAILED
    with pytest.raises(client.ServerError) as info:
        async with connect(fake):
            pass  # pragma: no cover
    assert info.value.code == ErrorCode.AUTH_FAILED
    with pytest.raises(client.ServerError) as info:
        async with connect(fake, token="stale", username=None, password=None):
            pass  # pragma: no cover
    assert info.value.code == ErrorCode.INVALID_TOKEN

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(OSError):
        async with client.open_client("127.0.0.1", port, token="t"):
            pass  # pragma: no cover


async def test_exceptions_from_the_body_are_not_wrapped(fake):
    with pytest.raises(KeyError):
        async with connect(fake):
            raise KeyError("mine")


async def test_resume_falls_back_to_login_when_the_token_is_refused(fake):
    fake.new_token = "tok-2"
    tokens = []
    async with connect(fake, token="expired", on_token=tokens.append) as c:
        peer = await fake.next_peer()
        assert [type(a) for a in peer.auths] == [proto.Resume, proto.Login]
        assert c.token == "tok-2" and tokens == ["tok-2"]


# -- reconnecting ------------------------------------------------------------------
async def test_reconnect_resumes_syncs_and_resends_outbox_with_same_id(fake):
    async with connect(fake) as c:
        peer1 = await fake.next_peer()
        await peer1.send(msg(1))
        assert await next_events(c, 1) == [msg(1)]
        acks = []
        fake.sync_pages = lambda sync: [
            proto.SyncPage(ROOM, (stored(2), stored(3, "hello", "alice")), True),
            proto.SyncPage(ROOM, (stored(4),), False),
        ]
        async with trio.open_nursery() as nursery:
            async def send():
                acks.append(await c.send("#a", "hello"))

            nursery.start_soon(send)
            sent = await peer1.expect(proto.Send)
            await peer1.close()  # stored (as seq 3) but the ACK never left

            peer2 = await fake.next_peer()
            assert peer2.auths == [proto.Resume("tok-1", request_id=peer2.auths[0].request_id)]
            assert peer2.sync.positions == (proto.Position(ROOM, 1),)
            resent = await peer2.expect(proto.Send)
            assert (resent.conv, resent.client_msg_id, resent.body) == (sent.conv, sent.client_msg_id, "hello")
            await peer2.send(proto.Ack(ROOM, sent.client_msg_id, 3, 1003, True, request_id=resent.request_id))
        assert acks[0].seq == 3 and acks[0].duplicate
        events = await next_events(c, 5)
        assert events[0] == client.Disconnected(CloseReason.PEER_CLOSED, events[0].message, True)
        assert [e.seq for e in events[1:4]] == [2, 3, 4]
        assert events[4] == client.Reconnected()
        assert c.last_seq == {ROOM: 4} and c.connected
        assert c.statistics().reconnects == 1 and c.statistics().requests_resent == 1


async def test_requests_made_while_disconnected_wait_for_the_next_connection(fake):
    fake.auto_handshake = False
    async with trio.open_nursery() as nursery:
        async def script():
            peer1 = await fake.next_peer()
            await fake.handshake(peer1)
            await peer1.expect(proto.Read)
            await peer1.close()
            peer2 = await fake.next_peer()
            await fake.handshake(peer2)
            # The mark made on the lost connection is sent again (the server keeps the highest).
            assert await peer2.recv() == proto.Read(ROOM, 2)
            join = await peer2.expect(proto.Join)
            await peer2.send(proto.Joined("a", 0, 1, request_id=join.request_id))

        nursery.start_soon(script)
        async with connect(fake) as c:
            await c.mark_read("#a", 2)
            assert isinstance((await next_events(c, 1))[0], client.Disconnected)
            await c.typing("#a")  # ephemeral: dropped while disconnected, no error
            assert (await c.join("a")).room == "a"


async def test_goaway_delay_is_honoured(fake, autojump_clock):
    async with connect(fake) as c:
        peer1 = await fake.next_peer()
        await peer1.send(proto.GoAway(CloseReason.SHUTDOWN, 5000, "restarting"))
        goaway_at = trio.current_time()
        assert await next_events(c, 1) == [proto.GoAway(CloseReason.SHUTDOWN, 5000, "restarting")]
        assert not c.connected
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.rooms)  # waits for the next connection
            await peer1.send(proto.Bye(CloseReason.SHUTDOWN))
            await peer1.close()
            peer2 = await fake.next_peer()
            assert 5.0 <= peer2.accepted_at - goaway_at < 5.0 + 0.01 + 0.5
            ask = await peer2.expect(proto.ListRooms)
            await peer2.send(proto.RoomList((), request_id=ask.request_id))
        events = await next_events(c, 2)
        assert events == [client.Disconnected(CloseReason.SHUTDOWN, events[0].message, True), client.Reconnected()]


async def test_backoff_grows_while_the_server_is_away(fake, autojump_clock):
    fake.auto_handshake = False
    async with trio.open_nursery() as nursery:
        attempts = []
        entered = trio.Event()

        async def script():
            peer = await fake.next_peer()
            await fake.handshake(peer)
            await entered.wait()
            await peer.close()
            for _ in range(4):  # refuse four reconnects at once
                peer = await fake.next_peer()
                attempts.append(peer.accepted_at)
                await peer.close()
            peer = await fake.next_peer()
            await fake.handshake(peer)

        nursery.start_soon(script)
        async with connect(fake, backoff_base_s=1.0, backoff_cap_s=3.0) as c:
            entered.set()
            events = await next_events(c, 2, timeout_s=1 + 2 + 3 + 3 + 3 + 1)
            assert isinstance(events[0], client.Disconnected) and events[1] == client.Reconnected()
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert all(0 <= gap <= cap + 0.1 for gap, cap in zip(gaps, [2.0, 3.0, 3.0], strict=True))


async def test_reconnect_off_fails_requests_and_ends_events(fake):
    async with connect(fake, reconnect=False) as c:
        peer = await fake.next_peer()
        async with trio.open_nursery() as nursery:
            async def send():
                with pytest.raises(client.ConnectionLost):
                    await c.send("#a", "lost")

            nursery.start_soon(send)
            await peer.expect(proto.Send)
            await peer.send(proto.Bye(CloseReason.STALE))
            await peer.close()
        events = [e async for e in c.events()]
        assert events == [client.Disconnected(CloseReason.STALE, events[0].message, False)]
        with pytest.raises(client.ConnectionLost):
            await c.rooms()
        assert not c.connected


async def test_heartbeat_pings_a_silent_server_then_reconnects(fake, autojump_clock):
    fake.welcome = welcome(ping_interval_ms=1000)
    async with connect(fake) as c:
        peer1 = await fake.next_peer()
        start = trio.current_time()
        ping = await peer1.expect(proto.Ping)
        assert ping.request_id == 0 and 1.0 <= trio.current_time() - start < 1.1
        peer2 = await fake.next_peer()  # no PONG: the client gives up on peer1
        assert 2.0 <= peer2.accepted_at - start < 2.5
        events = await next_events(c, 2)
        assert events[0].reason == CloseReason.STALE and events[1] == client.Reconnected()


async def test_request_times_out(fake, autojump_clock):
    async with connect(fake, request_timeout_s=3) as c:
        peer = await fake.next_peer()
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await c.rooms()
        assert trio.current_time() - start == pytest.approx(3)
        late = await peer.expect(proto.ListRooms)
        await peer.send(proto.RoomList((), request_id=late.request_id))  # ignored: nobody waits for it
        await peer.send(proto.Ping(1))
        assert await peer.expect(proto.Pong) == proto.Pong(1)


# -- exactly-once delivery when the consumer is slow or a message is missed ---------
async def test_slow_consumer_never_blocks_replies_and_misses_nothing(fake):
    async with connect(fake, event_buffer=2) as c:
        peer = await fake.next_peer()
        store = {ROOM: [stored(i) for i in range(1, 6)]}
        others_send, others = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_history, peer, store, others_send)
            await peer.send(*[msg(i) for i in range(1, 6)])
            await c.ping()  # answered although nobody reads events
            assert [e.seq for e in await next_events(c, 5)] == [1, 2, 3, 4, 5]
            store[ROOM].append(stored(6))
            await peer.send(msg(6))
            assert await next_events(c, 1) == [msg(6)]
            nursery.cancel_scope.cancel()
        assert c.last_seq == {ROOM: 6}
        assert c.statistics().messages_refetched in (3, 4)  # 4 if seq 6 came while 5 was being handed over


async def test_gap_in_seq_is_fetched_before_later_messages(fake):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        store = {ROOM: [stored(i) for i in range(1, 5)]}
        others_send, others = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_history, peer, store, others_send)
            await peer.send(msg(1), msg(3), msg(4))
            assert [e.seq for e in await next_events(c, 4)] == [1, 2, 3, 4]
            nursery.cancel_scope.cancel()


async def test_sync_forgets_rooms_the_server_no_longer_lists(fake):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        gone = proto.Conversation.room("gone")
        c.last_seq.update({ROOM: 2, gone: 5})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.sync)
            sync = await peer.expect(proto.Sync)
            assert set(sync.positions) == {proto.Position(ROOM, 2), proto.Position(gone, 5)}
            await peer.send(proto.Error(ErrorCode.NOT_MEMBER, 0, "not a member of #gone", request_id=sync.request_id))
            ask = await peer.expect(proto.ListRooms)
            await peer.send(proto.RoomList((proto.RoomInfo("a", 2, 2, True), proto.RoomInfo("gone", 1, 5, False)),
                                           request_id=ask.request_id))
            again = await peer.expect(proto.Sync)
            assert again.positions == (proto.Position(ROOM, 2),)
            await peer.send(proto.SyncDone(request_id=again.request_id))
        assert c.last_seq == {ROOM: 2}


async def test_sync_drops_a_refused_direct_conversation_one_position_at_a_time(fake):
    async with connect(fake) as c:
        peer = await fake.next_peer()
        gone, bob = proto.Conversation.direct("gone"), proto.Conversation.direct("bob")
        c.last_seq.update({bob: 1, gone: 3})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.sync)
            for attempt in range(2):  # all positions, then all but the rooms we are not in (none here)
                sync = await peer.expect(proto.Sync)
                await peer.send(proto.Error(ErrorCode.NOT_FOUND, 0, "no user gone", request_id=sync.request_id))
                if attempt == 0:
                    ask = await peer.expect(proto.ListRooms)
                    await peer.send(proto.RoomList((), request_id=ask.request_id))
            for position, answer in [(proto.Position(bob, 1), None), (proto.Position(gone, 3), ErrorCode.NOT_FOUND)]:
                sync = await peer.expect(proto.Sync)
                assert sync.positions == (position,)
                await peer.send(proto.Error(answer, 0, "", request_id=sync.request_id) if answer
                                else proto.SyncDone(request_id=sync.request_id))
        assert c.last_seq == {bob: 1}
