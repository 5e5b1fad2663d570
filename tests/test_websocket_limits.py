"""The WebSocket bridge's budgets (issue 9): a bad peer costs only itself, an honest client beside it keeps chatting.

Over real loopback sockets: connection slots from the moment of accept (per address, HTTP phase included),
every frame charged to the rate bucket, fragments bounded in count and memory, the HTTP head capped, an
unfinished message given a deadline, the same ERROR code as TCP for an oversize header. Other loopback
addresses (all of 127/8 is loopback on Linux) stand for other clients.
"""
from __future__ import annotations

import os
import socket
import tracemalloc

import pytest
import trio
import trio.testing

from chorus import proto
from chorus.proto import CloseReason, ErrorCode
from rawclient import RawClient, alice_and_bob_in_lobby
from chorus.server._http import MAX_REQUEST_BYTES
from chorus.server._transport import SocketStream
from chorus.server._websocket import WebSocketTransport
from chorus.server._wsframe import MAX_FRAGMENTS, NEED_DATA, BinaryMessage, FrameReader, WebSocketError
from wsclient import Rejected, WsClient, client_frame

LOBBY = proto.Conversation.room("lobby")
BINARY, CONTINUATION, PING, PONG = 0x2, 0x0, 0x9, 0xA


async def raw_tcp_client(port: int, local_address: str) -> RawClient:
    client = RawClient(await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address))
    await client.send(proto.Hello(1, 1, "raw-test"))
    assert isinstance(await client.next(), proto.Welcome)
    return client


async def read_to_end(stream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


# -- connection slots ------------------------------------------------------------------------------

async def test_sockets_in_the_http_phase_count_toward_the_per_address_limit(start_server):
    server = await start_server(ws_port=0, max_connections_per_address=3)
    waiting = []
    for _ in range(3):  # connected, request not complete: they hold slots all the same
        stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        waiting.append(stream)
    await trio.testing.wait_all_tasks_blocked()
    assert server.admission.held_by("127.0.0.1") == 3

    with pytest.raises(Rejected) as info:
        await WsClient.connect(server.ws_port)
    assert info.value.status == 503 and b"at most 3 connections per address" in info.value.body
    assert info.value.headers["retry-after"] == "1"
    tcp = await RawClient.connect(server.port, hello=False)  # the Chorus port shares the slots
    events = await tcp.drain_until_closed()
    assert events[0].code == ErrorCode.TOO_MANY_CONNECTIONS and events[1] == proto.Bye(CloseReason.SERVER_FULL)

    # Another address is not affected: it gets in on both ports and chats.
    carol = await raw_tcp_client(server.port, "127.0.0.2")
    dave = await WsClient.connect(server.ws_port, local_address="127.0.0.2")
    carol, dave = await alice_and_bob_in_lobby(carol, dave)
    ack = await carol.request(proto.Send, LOBBY, 1, "still here")
    message = await dave.next_of(proto.Message)
    assert (message.seq, message.sender, message.body) == (ack.seq, "alice", "still here")
    assert server.admission.held_by("127.0.0.1") == 3  # refused sockets never took one

    # The slots come back, exactly once each, when the sockets close.
    for stream in waiting:
        await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert server.admission.held_by("127.0.0.1") == 0
    client = await WsClient.connect(server.ws_port)
    assert isinstance(await client.request(proto.Ping, 1), proto.Pong)
    assert server.close_reasons["SERVER_FULL"] == 2


async def test_static_page_and_refused_requests_give_their_slot_back(start_server):
    server = await start_server(ws_port=0, max_connections_per_address=1)
    for request in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"NONSENSE\r\n\r\n", b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"):
        stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
        await stream.send_all(request)
        response = await read_to_end(stream)
        assert not response.startswith(b"HTTP/1.1 503"), response[:100]  # the previous socket released its slot
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.admission.total == 0


# -- the HTTP head ---------------------------------------------------------------------------------

def _request_head(size: int) -> bytes:
    """A GET / whose head (request line, headers, blank line) is exactly ``size`` bytes."""
    start, end = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ", b"\r\n\r\n"
    return start + b"x" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("pieces", ["one write", "small pieces"])
async def test_request_head_over_the_cap_gets_431(bridge_server, pieces):
    head = _request_head(20_000)
    stream = await trio.open_tcp_stream("127.0.0.1", bridge_server.ws_port)
    try:
        if pieces == "one write":
            await stream.send_all(head)
        else:
            for i in range(0, len(head), 100):
                await stream.send_all(head[i:i + 100])
                await trio.testing.wait_all_tasks_blocked()  # the server reads each piece on its own
    except trio.BrokenResourceError:  # (the server may have closed already)
        pass
    response = await read_to_end(stream)
    assert response.startswith(b"HTTP/1.1 431 ") and b"connection: close" in response.lower()
    assert f"over {MAX_REQUEST_BYTES} bytes".encode() in response


@pytest.mark.parametrize("size, status", [(MAX_REQUEST_BYTES, b"200"), (MAX_REQUEST_BYTES + 1, b"431")])
async def test_request_head_cap_is_exact(bridge_server, size, status):
    stream = await trio.open_tcp_stream("127.0.0.1", bridge_server.ws_port)
    await stream.send_all(_request_head(size))
    assert (await read_to_end(stream)).startswith(b"HTTP/1.1 " + status)


@pytest.fixture
async def bridge_server(start_server):
    return await start_server(ws_port=0)


# -- every frame costs budget ----------------------------------------------------------------------

def _one_frame_message_in(fragments: int, frame: bytes, *, pings_between: bool = False) -> bytes:
    """``frame`` as one binary message of ``fragments`` frames (the first carries it all, the rest are empty)."""
    out = [client_frame(BINARY, frame, fin=fragments == 1)]
    for i in range(1, fragments):
        if pings_between:
            out.append(client_frame(PING, b"p"))  # control frames may come between fragments (RFC 6455 §5.4)
        out.append(client_frame(CONTINUATION, b"", fin=i == fragments - 1))
    return b"".join(out)


FLOODS = {
    "pings": client_frame(PING, b"x") * 2000,
    "unsolicited pongs": client_frame(PONG, b"") * 2000,
    "empty continuations": _one_frame_message_in(MAX_FRAGMENTS, proto.encode(proto.Ping(1, request_id=1))) * 40,
    "continuations and pings": _one_frame_message_in(32, proto.encode(proto.Ping(1, request_id=1)),
                                                     pings_between=True) * 40,
}


async def test_control_and_continuation_floods_are_rate_limited_and_a_bystander_keeps_chatting(start_server):
    # A slow refill, so that what the flood gets is the burst: nothing here depends on timing.
    server = await start_server(ws_port=0, rate_per_s=1, rate_burst=100)
    alice, bob = await alice_and_bob_in_lobby(await WsClient.connect(server.ws_port),
                                              await RawClient.connect(server.port))
    attackers = {name: await WsClient.connect(server.ws_port) for name in FLOODS}
    outcome = {}

    async def attack(name: str) -> None:
        client = attackers[name]
        await client.stream.send_all(FLOODS[name])
        outcome[name] = await client.drain_until_closed()

    received = []
    async with trio.open_nursery() as nursery:
        for name in FLOODS:
            nursery.start_soon(attack, name)
        for i in range(20):  # the honest pair chats while the floods arrive
            await alice.send(proto.Send(LOBBY, 100 + i, f"hello {i}", request_id=alice.rid()))
            received.append((await bob.next_of(proto.Message)).body)
    assert received == [f"hello {i}" for i in range(20)]

    for name, events in outcome.items():
        assert proto.Bye(CloseReason.RATE_LIMITED) in events, (name, events)
        assert attackers[name].close_code == 1008, name
    # A refused ping is not answered: the flood got its burst's worth of pongs, not 2000.
    assert 90 <= attackers["pings"].ws_pongs < 150
    assert server.close_reasons["RATE_LIMITED"] == len(FLOODS)
    ack = await alice.request(proto.Send, LOBBY, 999, "after the storm")
    assert isinstance(ack, proto.Ack) and (await bob.next_of(proto.Message)).body == "after the storm"


class _Conn:
    """Stands in for the ClientConnection: records what the transport charges and writes."""

    def __init__(self):
        self.allow = True
        self.spent: list[int] = []
        self.written: list[bytes] = []
        self.closing = False
        self.reason = None
        self.frame_started = None
        self.failed = False
        self.buffered_bytes = 0
        self.wire = proto.Connection(proto.SERVER)
        self.output = self

    def spend(self, frames: int = 1) -> bool:
        self.spent.append(frames)
        return self.allow

    def write(self, data: bytes) -> bool:
        self.written.append(data)
        return True


async def test_what_each_frame_costs():
    ours, theirs = socket.socketpair()
    transport = WebSocketTransport(SocketStream(ours), 4096)
    conn = _Conn()
    transport.attach(conn)
    frame = proto.encode(proto.Ping(5, request_id=5))

    transport.unanswered_pings = 1  # as after our keepalive ping
    theirs.sendall(client_frame(PONG, b"chorus") + client_frame(PONG, b"") + client_frame(PING, b"hi")
                   + _fragmented(frame, 3) + client_frame(BINARY, frame))
    assert await transport.receive_some() == frame
    # The pong answering our ping is free; the unsolicited one, the ping and the two extra fragments are not.
    assert conn.spent == [1, 1, 2] and conn.written == [b"\x8a\x02hi"]
    assert await transport.receive_some() == frame and conn.spent == [1, 1, 2]  # one frame: the conn charges it

    conn.allow = False  # the bucket is empty
    theirs.sendall(client_frame(PING, b"no") + client_frame(BINARY, frame))
    assert await transport.receive_some() == frame
    assert conn.spent[-1] == 1 and conn.written == [b"\x8a\x02hi"]  # a refused ping is not answered
    theirs.close()
    await transport.aclose(linger_s=0)


# -- fragments -------------------------------------------------------------------------------------

async def test_one_byte_fragments_work_up_to_the_limit_then_close_1008(bridge_server):
    client = await WsClient.connect(bridge_server.ws_port)
    frame = proto.encode(proto.Ping(7, request_id=3))
    data = b"".join(client_frame(BINARY if i == 0 else CONTINUATION, frame[i:i + 1], fin=i == len(frame) - 1)
                    for i in range(len(frame)))  # 18 frames of one byte: odd, but legal
    await client.stream.send_all(data)
    assert await client.next_of(proto.Pong) == proto.Pong(7, request_id=3)

    frame = proto.encode(proto.Ping(8, request_id=4)) + b"x" * 60  # (not even a valid frame: never looked at)
    data = b"".join(client_frame(BINARY if i == 0 else CONTINUATION, frame[i:i + 1], fin=i == len(frame) - 1)
                    for i in range(len(frame)))  # 78 frames
    await client.stream.send_all(data)
    events = await client.drain_until_closed()
    assert events[0].code == ErrorCode.MALFORMED_FRAME and f"more than {MAX_FRAGMENTS} frames" in events[0].message
    assert events[1] == proto.Bye(CloseReason.PROTOCOL_ERROR)
    assert client.close_code == 1008


def _fragmented(message: bytes, fragments: int) -> bytes:
    size = -(-len(message) // fragments)
    parts = [message[i:i + size] for i in range(0, len(message), size)]
    return b"".join(client_frame(BINARY if i == 0 else CONTINUATION, part, fin=i == len(parts) - 1,
                                 key=b"\x12\x34\x56\x78") for i, part in enumerate(parts))


def test_one_byte_fragments_are_refused_after_the_limit():
    reader = FrameReader(1 << 20)
    reader.receive_data(_fragmented(b"x" * MAX_FRAGMENTS, MAX_FRAGMENTS))
    assert reader.next_event() == BinaryMessage(b"x" * MAX_FRAGMENTS)
    reader.receive_data(_fragmented(b"y" * (MAX_FRAGMENTS + 1), MAX_FRAGMENTS + 1))
    with pytest.raises(WebSocketError) as info:
        reader.next_event()
    assert info.value.code == 1008 and f"more than {MAX_FRAGMENTS} frames" in str(info.value)


def _peak_while_reading(data: bytes, reader: FrameReader, chunk: int) -> tuple[int, list]:
    events = []
    tracemalloc.start()
    try:
        for start in range(0, len(data), chunk):
            reader.receive_data(data[start:start + chunk])
            while (event := reader.next_event()) is not NEED_DATA:
                events.append(event)
        return tracemalloc.get_traced_memory()[1], events
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fragments, chunk, bound", [
    (MAX_FRAGMENTS, 65536, 1.5),  # read as from a socket: the message, one read, a little slack
    (1, 65536, 1.5),
    (MAX_FRAGMENTS, 1 << 22, 2.5),  # fed at once: the whole input is buffered beside the message
])
def test_memory_for_a_fragmented_message_is_its_own_size(fragments, chunk, bound):
    message = os.urandom(1 << 20)
    data = _fragmented(message, fragments)
    peak, events = _peak_while_reading(data, FrameReader(len(message)), chunk)
    assert events == [BinaryMessage(message)] and events[0].frames == fragments
    # One bytearray for the message, no list of fragments joined at the end (the old reader's 2x), no copy.
    assert peak < bound * len(message), peak / len(message)


def test_no_memory_per_fragment():
    # The old reader kept a bytes object per fragment: about 120 bytes of memory per byte of message here.
    message = os.urandom(4096)
    peak, events = _peak_while_reading(_fragmented(message, len(message)), FrameReader(1 << 20, 1 << 20), 4096)
    assert events == [BinaryMessage(message)] and events[0].frames == len(message)
    assert peak < 5 * len(message), peak  # the message, a 4 KiB piece of input and its copy in the buffer


# -- deadlines and sizes, as on TCP ----------------------------------------------------------------

async def test_a_message_once_begun_must_end_within_the_frame_deadline(start_server, autojump_clock):
    server = await start_server(ws_port=0, frame_timeout_s=5, auth_timeout_s=10_000, handshake_timeout_s=10_000,
                                ping_interval_s=1000)
    client = await WsClient.connect(server.ws_port)
    ping = client_frame(PING, b"hello")
    await client.stream.send_all(ping[:3])  # a frame in two pieces, then silence: no frame is unfinished
    await trio.sleep(1)
    await client.stream.send_all(ping[3:])
    await trio.sleep(20)
    assert client.ws_pongs == 0 and await client.request(proto.Ping, 9) == proto.Pong(9, request_id=1)
    assert client.ws_pongs == 1

    frame = proto.encode(proto.Ping(1, request_id=1))
    start = trio.current_time()
    await client.stream.send_all(client_frame(BINARY, frame, fin=False))
    for _ in range(3):  # a dribble of empty fragments and pings does not move the deadline
        await trio.sleep(1)
        await client.stream.send_all(client_frame(CONTINUATION, b"", fin=False) + client_frame(PING, b"."))
    events = await client.drain_until_closed()
    assert events[0].code == ErrorCode.MALFORMED_FRAME and "not finished" in events[0].message
    assert events[1] == proto.Bye(CloseReason.PROTOCOL_ERROR) and client.close_code == 1002
    assert 5 <= trio.current_time() - start < 6


@pytest.mark.parametrize("transport", ["tcp", "ws"])
@pytest.mark.parametrize("header, code", [
    ((1 << 20).to_bytes(4, "big") + b"\x40\x00\x00\x00\x00\x01", ErrorCode.FRAME_TOO_LARGE),  # > max_frame_bytes
    (bytes.fromhex("00000020 7f 00 00000001"), ErrorCode.UNKNOWN_FRAME_TYPE),  # judged before the length
])
async def test_a_bad_chorus_header_gets_the_same_error_on_both_transports(start_server, transport, header, code):
    server = await start_server(ws_port=0, max_frame_bytes=4096)
    client = await (RawClient.connect(server.port) if transport == "tcp" else WsClient.connect(server.ws_port))
    await client.send_raw(header + b"\0" * 8)  # a short body: over WebSocket, not one whole frame either
    events = await client.drain_until_closed()
    assert events[0].code == code and events[1] == proto.Bye(CloseReason.PROTOCOL_ERROR), events
    if transport == "ws":
        assert client.close_code == (1009 if code == ErrorCode.FRAME_TOO_LARGE else 1002)


async def test_before_auth_a_message_larger_than_any_legal_frame_is_refused_from_its_header(bridge_server):
    client = await WsClient.connect(bridge_server.ws_port)
    # A 512 KiB message announced by its WebSocket header alone: no login frame is that large.
    await client.stream.send_all(b"\x82\xff" + (512 << 10).to_bytes(8, "big") + b"\0\0\0\0")
    events = await client.drain_until_closed()
    assert events[0].code == ErrorCode.FRAME_TOO_LARGE and client.close_code == 1009
