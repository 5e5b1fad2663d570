"""The receiver's side of the spec's rules, pinned against a real server (spec/PROTOCOL.md §2.3, §5.16, §5.36, §7,
§8, §9.4).

Each test is one rule a third-party client author asked about: what the server does with a client_msg_id reused
in another conversation or with another body (§9.4), which frames a client may pipeline and in what order the
replies come (§8 "Pipelining"), how a timeout closes (§7: STALE is BYE only), that nothing after a client's BYE is
read (§5.36), and what a receiver does with a sender's MUST violations (§7.3: request id 0, HELLO's range,
client_msg_id 0). Pipelined frames are written as raw bytes (``proto.encode`` has no state check) and the
server's answer is read frame by frame with ``proto.decode``, so no client state machine stands in the way.
"""
from __future__ import annotations

import struct

import trio

from chorus import proto
from chorus.proto import CloseReason, ErrorCode
from rawclient import RawClient, alice_and_bob_in_lobby

LOBBY = proto.Conversation.room("lobby")
PASSWORD = "correct horse"
_HEADER = struct.Struct(">IBBI")


class Wire:
    """A TCP connection that writes whatever bytes it is given and reads the server's frames one by one."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Wire:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def write(self, *events: proto.Event) -> None:
        """All of ``events`` in one write (one TCP segment on loopback)."""
        await self.stream.send_all(b"".join(proto.encode(e) for e in events))

    async def next(self):
        """The server's next frame as an event, or ``ConnectionClosed`` at end of stream."""
        while True:
            if len(self.buf) >= proto.HEADER_BYTES:
                end = proto.HEADER_BYTES + _HEADER.unpack_from(self.buf)[0]
                if len(self.buf) >= end:
                    frame, self.buf = bytes(self.buf[:end]), self.buf[end:]
                    return proto.decode(frame)
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                assert not self.buf, "the server closed inside a frame"
                return proto.ConnectionClosed()
            self.buf += data

    async def until_closed(self) -> list:
        events = []
        while not events or not isinstance(events[-1], proto.ConnectionClosed):
            events.append(await self.next())
        await self.stream.aclose()
        return events

    async def replies(self, n: int) -> list:
        """The next ``n`` frames that are not pushes (request_id 0 pushes such as PRESENCE are skipped)."""
        out = []
        while len(out) < n:
            event = await self.next()
            assert not isinstance(event, proto.ConnectionClosed), out
            if event.request_id or isinstance(event, (proto.Error, proto.Bye)):
                out.append(event)
        return out


def hello(request_id: int = 1) -> proto.Hello:
    return proto.Hello(proto.MIN_PROTOCOL_VERSION, proto.PROTOCOL_VERSION, "spec-rules", request_id=request_id)


async def in_lobby(port: int) -> tuple[RawClient, RawClient]:
    """alice and bob, each on a new connection, live and in #lobby."""
    return await alice_and_bob_in_lobby(await RawClient.connect(port), await RawClient.connect(port))


async def registered(port: int, name: str) -> RawClient:
    client = await RawClient.connect(port)
    await client.register(name, PASSWORD)
    await client.go_live()
    return client


# -- §9.4, §5.16: client_msg_id is the user's, across conversations ---------------------------------------------

async def test_an_id_reused_in_another_conversation_is_refused_and_nothing_is_stored(server):
    alice, bob = await in_lobby(server.port)
    await alice.request(proto.Send, LOBBY, 7, "in the lobby")
    assert (await bob.next_of(proto.Message)).client_msg_id == 7
    await alice.request(proto.Send, proto.Conversation.direct("bob"), 8, "opens the direct conversation")
    assert (await bob.next_of(proto.Message)).client_msg_id == 8

    for conv, taken in ((proto.Conversation.direct("bob"), 7), (LOBBY, 8)):  # both ways round
        refusal = await alice.request(proto.Send, conv, taken, "another message")
        assert (type(refusal), refusal.code) == (proto.Error, ErrorCode.INVALID_REQUEST), refusal
        page = await alice.request(proto.History, conv, proto.Direction.BEFORE, 0, 0)
        assert "another message" not in [m.body for m in page.messages]
    # Request-level: the connection stays open, and bob was sent nothing more.
    await alice.request(proto.Send, LOBBY, 9, "still here")
    assert (await bob.next_of(proto.Message)).client_msg_id == 9


async def test_a_refused_first_send_to_a_new_direct_conversation_starts_no_conversation(server):
    alice, bob = await in_lobby(server.port)
    await alice.request(proto.Send, LOBBY, 7, "in the lobby")
    refusal = await alice.request(proto.Send, proto.Conversation.direct("bob"), 7, "reused id")
    assert refusal.code == ErrorCode.INVALID_REQUEST
    for client, other in ((alice, "bob"), (bob, "alice")):  # as before the SEND: there is no such conversation
        reply = await client.request(proto.History, proto.Conversation.direct(other), proto.Direction.BEFORE, 0, 0)
        assert (type(reply), getattr(reply, "code", None)) == (proto.Error, ErrorCode.NOT_FOUND)


async def test_an_id_reused_with_another_body_is_answered_as_the_duplicate_of_the_original(server):
    alice, bob = await in_lobby(server.port)
    first = await alice.request(proto.Send, LOBBY, 5, "the original")
    again = await alice.request(proto.Send, LOBBY, 5, "a different text")
    assert isinstance(again, proto.Ack)
    assert (again.seq, again.ts_ms, again.duplicate) == (first.seq, first.ts_ms, True)
    page = await alice.request(proto.History, LOBBY, proto.Direction.BEFORE, 0, 0)
    assert [m.body for m in page.messages] == ["the original"]  # the second body was never stored
    await alice.request(proto.Send, LOBBY, 6, "next")
    assert [(await bob.next_of(proto.Message)).body for _ in range(2)] == ["the original", "next"]


# -- §7.3: a sender's MUST violations, and the receiver ------------------------------------------------------------

async def test_client_msg_id_0_is_an_ordinary_id(server):
    alice = await registered(server.port, "alice")
    await alice.request(proto.Join, "lobby")
    first = await alice.request(proto.Send, LOBBY, 0, "zero")
    assert (type(first), first.client_msg_id, first.duplicate) == (proto.Ack, 0, False)
    again = await alice.request(proto.Send, LOBBY, 0, "zero again")
    assert (again.seq, again.duplicate) == (first.seq, True)


async def test_a_request_with_id_0_is_acted_on_and_its_reply_carries_0(server):
    wire = await Wire.connect(server.port)
    await wire.write(hello(0))
    welcome = await wire.next()
    assert isinstance(welcome, proto.Welcome) and welcome.request_id == 0
    await wire.write(proto.Ping(nonce=99, request_id=0))
    assert await wire.next() == proto.Pong(nonce=99, request_id=0)
    await wire.write(proto.Register("alice", PASSWORD, request_id=0))
    auth = await wire.next()
    assert isinstance(auth, proto.AuthOk) and auth.request_id == 0
    await wire.write(proto.Join("lobby", request_id=0), proto.Join("Not A Name", request_id=0))
    assert (await wire.next()) == proto.Joined("lobby", 0, 1)
    refusal = await wire.next()  # a request-level ERROR with id 0 still leaves the connection open
    assert (refusal.code, refusal.request_id) == (ErrorCode.INVALID_NAME, 0)
    await wire.write(proto.Ping(nonce=100, request_id=3))
    assert await wire.next() == proto.Pong(nonce=100, request_id=3)


async def test_hello_version_range_is_intersected_and_an_empty_one_is_unsupported_version(server):
    low = proto.MIN_PROTOCOL_VERSION
    wire = await Wire.connect(server.port)
    await wire.write(proto.Hello(0, low, "spec-rules", request_id=4))  # version 0 does not exist: never chosen
    welcome = await wire.next()
    assert (type(welcome), welcome.version, welcome.request_id) == (proto.Welcome, low, 4)

    for min_version, max_version in ((0, 0), (proto.PROTOCOL_VERSION + 1, proto.PROTOCOL_VERSION)):
        wire = await Wire.connect(server.port)
        await wire.write(proto.Hello(min_version, max_version, "spec-rules", request_id=5),
                         proto.Login("alice", PASSWORD, request_id=6))  # never read
        events = await wire.until_closed()
        assert [type(e) for e in events] == [proto.Error, proto.Bye, proto.ConnectionClosed], events
        assert (events[0].code, events[0].request_id) == (ErrorCode.UNSUPPORTED_VERSION, 5)
        assert events[1].reason == CloseReason.PROTOCOL_ERROR


# -- §8: pipelining --------------------------------------------------------------------------------------------

async def test_hello_and_an_auth_request_may_share_one_write(server):
    wire = await Wire.connect(server.port)
    await wire.write(hello(1), proto.Register("alice", PASSWORD, request_id=2))
    welcome, auth = await wire.replies(2)
    assert (type(welcome), type(auth), auth.request_id) == (proto.Welcome, proto.AuthOk, 2)


async def test_requests_pipelined_after_login_are_answered_in_order(server):
    await (await registered(server.port, "alice")).stream.aclose()
    wire = await Wire.connect(server.port)
    await wire.write(hello(1), proto.Login("alice", PASSWORD, request_id=2), proto.Sync((), request_id=3),
                     proto.Join("lobby", request_id=4), proto.Ping(1, request_id=5), proto.ListRooms(request_id=6),
                     proto.History(LOBBY, proto.Direction.BEFORE, 0, 0, request_id=7), proto.Ping(2, request_id=8))
    replies = await wire.replies(8)
    assert [(type(r), r.request_id) for r in replies] == [
        (proto.Welcome, 1), (proto.AuthOk, 2), (proto.SyncDone, 3), (proto.Joined, 4), (proto.Pong, 5),
        (proto.RoomList, 6), (proto.HistoryPage, 7), (proto.Pong, 8)]


async def test_a_frame_pipelined_after_a_refused_login_is_wrong_state(server):
    wire = await Wire.connect(server.port)
    await wire.write(hello(1), proto.Login("nobody", PASSWORD, request_id=2), proto.Join("lobby", request_id=3))
    events = await wire.until_closed()
    assert [type(e) for e in events] == [proto.Welcome, proto.Error, proto.Error, proto.Bye, proto.ConnectionClosed]
    assert (events[1].code, events[1].request_id) == (ErrorCode.AUTH_FAILED, 2)
    assert (events[2].code, events[2].request_id) == (ErrorCode.WRONG_STATE, 0)
    assert events[3].reason == CloseReason.PROTOCOL_ERROR


async def pipelined_seqs(client: RawClient, conv: proto.Conversation, n: int) -> list[int]:
    """Send ``n`` SENDs into ``conv`` in one write; the seqs their ACKs gave, in the order sent."""
    await client.send_raw(b"".join(proto.encode(proto.Send(conv, 100 + i, f"m{i}", request_id=100 + i))
                                   for i in range(n)))
    acks: dict[int, int] = {}
    while len(acks) < n:
        event = await client.next()
        if isinstance(event, proto.Ack):
            acks[event.client_msg_id] = event.seq
    return [acks[100 + i] for i in range(n)]


async def test_pipelined_sends_into_one_conversation_take_seqs_in_order(server):
    alice, bob = await in_lobby(server.port)
    assert await pipelined_seqs(alice, LOBBY, 20) == list(range(1, 21))
    assert [(await bob.next_of(proto.Message)).body for _ in range(20)] == [f"m{i}" for i in range(20)]


async def test_pipelined_sends_starting_a_direct_conversation_take_seqs_in_order(server):
    alice = await registered(server.port, "alice")
    await registered(server.port, "bob")
    assert await pipelined_seqs(alice, proto.Conversation.direct("bob"), 20) == list(range(1, 21))


# -- §7, §9.10: a stale connection gets BYE STALE and no ERROR -------------------------------------------------

async def test_stale_is_bye_only(start_server, autojump_clock):
    server = await start_server(ping_interval_s=10, max_missed_pings=2, auth_timeout_s=10_000)
    silent = await RawClient.connect(server.port)
    events = await silent.drain_until_closed()
    assert [type(e) for e in events] == [proto.Ping, proto.Ping, proto.Bye, proto.ConnectionClosed]
    assert events[2].reason == CloseReason.STALE


# -- §5.36, §2.3: nothing after a BYE is read ------------------------------------------------------------------

async def test_frames_after_the_clients_bye_are_not_read_or_answered(server):
    alice = await registered(server.port, "alice")
    await alice.send_raw(proto.encode(proto.Bye(CloseReason.CLIENT_QUIT)) + proto.encode(proto.Ping(1, request_id=9))
                         + b"\x00\x00\x00\x00\x7f\x00\x00\x00\x00\x01")  # then a frame of an unknown type
    assert await alice.drain_until_closed() == [proto.ConnectionClosed()]  # no PONG, no ERROR, no BYE
