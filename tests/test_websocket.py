"""The WebSocket bridge over real loopback sockets: same frames, same server logic, same limits as TCP.

The client side is wsproto, an implementation independent of the bridge's own frame reader.
"""
from __future__ import annotations

import pytest
import trio
import trio.testing
import wsproto
from hypothesis import given, settings, strategies as st
from wsproto.frame_protocol import FrameProtocol

from chorus import proto
from chorus.proto import CloseReason, ErrorCode
from rawclient import RawClient, alice_and_bob_in_lobby
from chorus.server._websocket import allowed_origins, origin_allowed, page_headers
from chorus.server._wsframe import NEED_DATA, BinaryMessage, Close, FrameReader, Ping, Pong, WebSocketError
from wsclient import Rejected, WsClient

LOBBY = proto.Conversation.room("lobby")


@pytest.fixture
async def bridge(start_server):
    return await start_server(ws_port=0)


async def ws_and_tcp_in_lobby(server):
    return await alice_and_bob_in_lobby(await WsClient.connect(server.ws_port), await RawClient.connect(server.port))


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, dict, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), fields, body


async def test_ws_and_tcp_clients_see_each_others_messages_in_the_same_order(bridge):
    alice, bob = await ws_and_tcp_in_lobby(bridge)
    # Both pipeline their sends without waiting, so the two streams interleave in the store.
    for i in range(10):
        await alice.send(proto.Send(LOBBY, 100 + i, f"ws {i}", request_id=alice.rid()))
        await bob.send(proto.Send(LOBBY, 200 + i, f"tcp {i}", request_id=bob.rid()))
    seen = {}
    for name, client in (("alice", alice), ("bob", bob)):
        messages, acks = [], 0
        while len(messages) < 20 or acks < 10:
            event = await client.next()
            if isinstance(event, proto.Message):
                messages.append((event.seq, event.sender, event.body))
            elif isinstance(event, proto.Ack):
                acks += 1
        seen[name] = messages
    assert seen["alice"] == seen["bob"]
    assert [seq for seq, _, _ in seen["alice"]] == list(range(1, 21))
    assert [body for _, sender, body in seen["alice"] if sender == "alice"] == [f"ws {i}" for i in range(10)]
    assert [body for _, sender, body in seen["alice"] if sender == "bob"] == [f"tcp {i}" for i in range(10)]
    history = await alice.request(proto.History, LOBBY, proto.Direction.BEFORE, 0, 0)
    assert [(m.seq, m.sender, m.body) for m in history.messages] == seen["bob"]


async def test_server_frames_are_one_binary_message_each_and_compressed_ones_work(bridge):
    alice, bob = await ws_and_tcp_in_lobby(bridge)
    long_body = "All work and no play makes Jack a dull boy. " * 40  # compressible, over 512 bytes
    ack = await bob.request(proto.Send, LOBBY, 1, long_body)
    message = await alice.next_of(proto.Message)  # WsClient asserts each message holds exactly one frame
    assert (message.seq, message.body) == (ack.seq, long_body)
    # ...and compressed frames from the browser side are accepted too.
    frame = proto.encode(proto.Send(LOBBY, 2, long_body, request_id=alice.rid()))
    assert frame[5] & proto.Flags.COMPRESSED
    await alice.send_raw(frame)
    assert (await bob.next_of(proto.Message)).body == long_body


@pytest.mark.parametrize("how", ["header only", "whole message"])
async def test_oversize_message_is_refused_with_1009(start_server, how):
    server = await start_server(ws_port=0, max_frame_bytes=4096)
    client = await WsClient.connect(server.ws_port)
    if how == "header only":
        # A header announcing 100 MiB and no payload at all: judged from the header, nothing buffered.
        await client.stream.send_all(b"\x82\xff" + (100 << 20).to_bytes(8, "big") + b"\0\0\0\0")
    else:
        frame = proto.encode(proto.Ping(1, request_id=1)) + b"x" * 4097  # 4107 bytes > 4096 + 10
        await client.send_raw(frame)
    events = await client.drain_until_closed()
    assert isinstance(events[0], proto.Error) and events[0].code == ErrorCode.FRAME_TOO_LARGE
    assert events[1] == proto.Bye(CloseReason.PROTOCOL_ERROR)
    assert client.close_code == 1009


async def test_largest_allowed_message_is_accepted(start_server):
    server = await start_server(ws_port=0, max_frame_bytes=4096, max_body_bytes=4096)
    client = await WsClient.connect(server.ws_port)
    await client.register("alice")
    await client.request(proto.Join, "lobby")
    frame = proto.encode(proto.Send(LOBBY, 1, "x" * 4079, request_id=99), compress_threshold=None)
    assert len(frame) == 4096 + proto.HEADER_BYTES  # the largest frame the server accepts
    await client.send_raw(frame)
    reply = await client.next_of(proto.Ack, proto.Error)
    assert isinstance(reply, proto.Ack) and reply.request_id == 99


@pytest.mark.parametrize("data, code", [
    (proto.encode(proto.Ping(1)) * 2, 1002),  # two frames in one message
    (proto.encode(proto.Ping(1))[:-1], 1002),  # part of a frame
    (b"\x00" * 5, 1002),  # not even a header
])
async def test_message_must_be_exactly_one_frame(bridge, data, code):
    client = await WsClient.connect(bridge.ws_port)
    await client.send_raw(data)
    events = await client.drain_until_closed()
    assert isinstance(events[0], proto.Error) and events[0].code == ErrorCode.MALFORMED_FRAME
    assert events[1] == proto.Bye(CloseReason.PROTOCOL_ERROR)
    assert client.close_code == code


async def test_text_message_is_refused(bridge):
    client = await WsClient.connect(bridge.ws_port)
    await client.send_text("hello?")
    events = await client.drain_until_closed()
    assert events[0].code == ErrorCode.MALFORMED_FRAME and "text" in events[0].message
    assert events[1] == proto.Bye(CloseReason.PROTOCOL_ERROR)
    assert client.close_code == 1003


async def test_chorus_protocol_error_over_ws_closes_with_bye_then_1002(bridge):
    client = await WsClient.connect(bridge.ws_port)
    await client.send_raw(bytes.fromhex("00000000 7f 00 00000008"))
    events = await client.drain_until_closed()
    assert events[0].code == ErrorCode.UNKNOWN_FRAME_TYPE
    assert events[1] == proto.Bye(CloseReason.PROTOCOL_ERROR)
    assert client.close_code == 1002


async def test_bad_origin_is_refused_and_same_origin_accepted(bridge):
    port = bridge.ws_port
    with pytest.raises(Rejected) as info:
        await WsClient.connect(port, origin="http://evil.example")
    assert info.value.status == 403
    with pytest.raises(Rejected) as info:
        await WsClient.connect(port, origin=f"http://127.0.0.1:{port + 1}")  # same host, other port
    assert info.value.status == 403
    client = await WsClient.connect(port, origin=f"http://127.0.0.1:{port}")
    assert isinstance(await client.request(proto.Ping, 1), proto.Pong)
    client = await WsClient.connect(port, origin=f"http://localhost:{port}")  # the host is loopback
    assert isinstance(await client.request(proto.Ping, 1), proto.Pong)
    client = await WsClient.connect(port)  # no Origin: not a browser
    assert isinstance(await client.request(proto.Ping, 1), proto.Pong)


async def test_origin_matching_host_is_not_enough_dns_rebinding(bridge):
    # evil.example resolves to 127.0.0.1 after the page loaded (DNS rebinding): the browser then sends
    # Host and Origin both saying evil.example. The allow-list comes from the configuration, not from Host.
    port = bridge.ws_port
    with pytest.raises(Rejected) as info:
        await WsClient.connect(port, origin=f"http://evil.example:{port}", host=f"evil.example:{port}")
    assert info.value.status == 403
    client = await WsClient.connect(port, origin=f"http://127.0.0.1:{port}", host=f"evil.example:{port}")
    assert isinstance(await client.request(proto.Ping, 1), proto.Pong)


async def test_page_policy_comes_from_the_configuration_not_the_host_header(bridge):
    port = bridge.ws_port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    policy = next(line for line in head.split("\r\n") if line.startswith("content-security-policy:"))
    assert "evil" not in policy
    assert f"ws://127.0.0.1:{port}" in policy and f"ws://localhost:{port}" in policy


def test_default_origins_are_the_configured_address(make_config):
    local = allowed_origins(make_config(host="127.0.0.1"), 7421)
    assert {"http://127.0.0.1:7421", "https://127.0.0.1:7421", "http://localhost:7421", "http://[::1]:7421"} <= local
    assert not origin_allowed("http://127.0.0.1:7422", local) and origin_allowed("HTTP://LOCALHOST:7421", local)
    public = allowed_origins(make_config(host="chat.example.org"), 80)
    assert public == {"http://chat.example.org", "https://chat.example.org:80"}
    ipv6 = allowed_origins(make_config(host="::1"), 8080)
    assert ipv6 >= {"http://[::1]:8080", "http://127.0.0.1:8080"}
    assert "[" not in dict(page_headers(ipv6))["content-security-policy"]  # not in CSP's grammar: 'self' covers it
    every = allowed_origins(make_config(host="0.0.0.0"), 7421)  # no single address: loopback names only
    assert every and all("localhost" in o or "127.0.0.1" in o or "[::1]" in o for o in every)
    assert origin_allowed(None, public)  # not a browser
    listed = allowed_origins(make_config(ws_allowed_origins=["https://Chat.Example.org/"]), 7421)
    assert listed == {"https://chat.example.org"}
    assert "wss://chat.example.org" in dict(page_headers(listed))["content-security-policy"]


async def test_shutdown_is_graceful_goaway_bye_then_close_frame(start_server):
    server = await start_server(ws_port=0, reconnect_hint_ms=1234)
    alice = await WsClient.connect(server.ws_port)
    await alice.register("alice")
    await alice.go_live()
    server.shutdown()
    events = await alice.drain_until_closed()
    assert events[0] == proto.GoAway(CloseReason.SHUTDOWN, 1234, "server shutting down")
    assert events[1] == proto.Bye(CloseReason.SHUTDOWN)
    assert isinstance(events[2], proto.ConnectionClosed)
    assert alice.close_code == 1001
    await trio.testing.wait_all_tasks_blocked()
    assert server.close_reasons["SHUTDOWN"] == 1


async def test_client_bye_and_close(bridge):
    client = await WsClient.connect(bridge.ws_port)
    await client.register("alice")
    await client.send(proto.Bye(CloseReason.CLIENT_QUIT))
    events = await client.drain_until_closed()
    assert events == [proto.ConnectionClosed()]
    assert client.close_code == 1000
    await trio.testing.wait_all_tasks_blocked()
    assert bridge.close_reasons["CLIENT_QUIT"] == 1


async def test_client_close_frame_is_echoed(bridge):
    client = await WsClient.connect(bridge.ws_port)
    await client.register("alice")
    await client.stream.send_all(client.ws.send(wsproto.events.CloseConnection(code=1001)))
    events = await client.drain_until_closed()
    assert events == [proto.ConnectionClosed()] and client.close_code == 1001


async def test_ws_ping_is_sent_and_unanswered_pings_close_as_stale(start_server, autojump_clock):
    server = await start_server(ws_port=0, ping_interval_s=10, max_missed_pings=2, auth_timeout_s=10_000)
    polite = await WsClient.connect(server.ws_port)  # (no login: argon2's thread would let the clock jump)
    silent = await WsClient.connect(server.ws_port)
    silent.answer_ws_pings = False

    async def answer_chorus_pings(client, until):
        while trio.current_time() < until:
            event = await client.next()
            if isinstance(event, proto.Ping):
                if client.ws.state is wsproto.ConnectionState.OPEN:  # (the close may be read already)
                    await client.send(event.response())
            elif not isinstance(event, (proto.Pong, proto.Presence)):
                return event

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_chorus_pings, polite, start + 100)
        last = await answer_chorus_pings(silent, start + 1000)
        assert last == proto.Bye(CloseReason.STALE)
        assert trio.current_time() - start < 40 and silent.ws_pings == 2
    assert polite.ws_pings >= 9 and not polite.conn.they_said_bye


async def test_static_page_and_http_errors(bridge):
    port = bridge.ws_port
    status, headers, body = await http_get(port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="chorus.js"' in body and "default-src 'self'" in headers["content-security-policy"]
    status, headers, body = await http_get(port, "/chorus.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"export" in body
    status, _, _ = await http_get(port, "/chorus.css")
    assert status == 200
    assert (await http_get(port, "/../setup.cfg"))[0] == 404
    assert (await http_get(port, "/nothing"))[0] == 404
    status, headers, _ = await http_get(port, "/ws")
    assert status == 426 and headers["upgrade"] == "websocket"
    status, _, _ = await http_get(port, "/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n")
    assert status == 400
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"NONSENSE\r\n\r\n")
    assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 400")


async def test_http_request_must_arrive_in_time(start_server, autojump_clock):
    server = await start_server(ws_port=0, handshake_timeout_s=5)
    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
    await stream.send_all(b"GET / HTTP/1.1\r\n")
    start = trio.current_time()
    assert await stream.receive_some(100) == b""
    assert 5 <= trio.current_time() - start < 6


async def test_full_server_refuses_websocket_with_503_before_the_upgrade(start_server):
    server = await start_server(ws_port=0, max_connections=1, reconnect_hint_ms=2500)
    first = await WsClient.connect(server.ws_port)
    with pytest.raises(Rejected) as info:
        await WsClient.connect(server.ws_port, hello=False)
    # The honest client learns why and when to come back, without spending a slot on an upgrade.
    assert info.value.status == 503 and b"server full" in info.value.body
    assert info.value.headers["retry-after"] == "3" and info.value.headers["connection"] == "close"
    tcp = await RawClient.connect(server.port, hello=False)  # the slots are shared with the TCP port
    events = await tcp.drain_until_closed()
    assert events[0].code == ErrorCode.TOO_MANY_CONNECTIONS and events[1] == proto.Bye(CloseReason.SERVER_FULL)
    assert isinstance(await first.request(proto.Ping, 1), proto.Pong)
    await first.send(proto.Bye(CloseReason.CLIENT_QUIT))
    await first.drain_until_closed()
    await trio.testing.wait_all_tasks_blocked()
    assert server.admission.total == 0  # the slot came back exactly once
    again = await WsClient.connect(server.ws_port)
    assert isinstance(await again.request(proto.Ping, 2), proto.Pong)
    assert server.close_reasons["SERVER_FULL"] == 2


# -- the frame reader against wsproto's client-side encoder ---------------------------------------

def _client_frames(items) -> bytes:
    client = FrameProtocol(client=True, extensions=[])
    out = bytearray()
    for kind, payload in items:
        if kind == "binary":
            out += client.send_data(payload)
        elif kind == "fragments":
            for i, part in enumerate(payload):
                out += client.send_data(part, fin=i == len(payload) - 1)
        elif kind == "ping":
            out += client.ping(payload[:125])
        else:
            out += client.pong(payload[:125])
    return bytes(out)


_items = st.lists(st.one_of(
    st.tuples(st.just("binary"), st.binary(max_size=70000)),
    st.tuples(st.just("fragments"), st.lists(st.binary(max_size=300), min_size=1, max_size=4)),
    st.tuples(st.sampled_from(["ping", "pong"]), st.binary(max_size=125)),
), max_size=6)


@settings(max_examples=60, deadline=None)
@given(items=_items, chunk=st.integers(1, 70000))
def test_frame_reader_agrees_with_wsproto(items, chunk):
    data = _client_frames(items)
    reader = FrameReader(1 << 20)
    events = []
    for start in range(0, len(data), chunk):
        reader.receive_data(data[start:start + chunk])
        while (event := reader.next_event()) is not NEED_DATA:
            events.append(event)
    expected = []
    for kind, payload in items:
        if kind == "binary":
            expected.append(BinaryMessage(payload))
        elif kind == "fragments":
            expected.append(BinaryMessage(b"".join(payload)))
        else:
            expected.append((Ping if kind == "ping" else Pong)(payload[:125]))
    assert events == expected
    assert reader.buffered_bytes == 0


@pytest.mark.parametrize("data, code", [
    (b"\x82\x05hello", 1002),  # unmasked
    (b"\xc2\x80\0\0\0\0", 1002),  # RSV1 without an extension
    (b"\x83\x80\0\0\0\0", 1002),  # reserved opcode
    (b"\x09\x80\0\0\0\0", 1002),  # fragmented ping
    (b"\x80\x80\0\0\0\0", 1002),  # continuation outside a message
    (b"\x02\x80\0\0\0\0\x82\x80\0\0\0\0", 1002),  # new message inside a fragmented one
    (b"\x82\xfe\x00\x05", 1002),  # non-minimal 16-bit length
    (b"\x81\x80\0\0\0\0", 1003),  # text
    (b"\x82\xff" + (1 << 20).to_bytes(8, "big"), 1009),  # too big, from the header alone
    (b"\x02\xfe\x02\x00" + b"\0" * 516 + b"\x80\xfe\xfe\x01", 1009),  # fragments add up past the limit
    (b"\x88\x81\0\0\0\0\x03", 1002),  # close with a 1-byte payload
])
def test_frame_reader_refuses(data, code):
    reader = FrameReader(65536)
    reader.receive_data(data)
    with pytest.raises(WebSocketError) as info:
        while reader.next_event() is not NEED_DATA:
            pass
    assert info.value.code == code
    with pytest.raises(WebSocketError):  # and stays failed
        reader.next_event()


def test_frame_reader_parses_close():
    reader = FrameReader(100)
    reader.receive_data(_masked_close(b"\x03\xe8bye"))
    assert reader.next_event() == Close(1000, "bye")


def _masked_close(payload: bytes) -> bytes:
    return bytes((0x88, 0x80 | len(payload))) + b"\0\0\0\0" + payload
