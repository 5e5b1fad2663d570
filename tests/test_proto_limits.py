"""Per-frame-type size limits, checked from the header (spec/PROTOCOL.md §2.3 step 6, §4, §10), no event loop.

How this works: ``proto.LARGEST_BODY_BYTES`` is walked from the construct
declarations in ``proto._wire``. Here an independent walk builds, for every
frame type, the event with every field at its maximum (the longest strings, the
largest numbers, full arrays of maximal items) and checks that its body is
exactly that many bytes, so the walk cannot drift from the declarations. Then
every type's bound is probed from the header alone, whole and one byte at a
time: ``length`` at the bound waits for the body, one more is ``FRAME_TOO_LARGE``
(for a compressed frame: 4 + lz4's worst case of the bound), and a compressed
body declaring an uncompressed size over the bound is ``DECOMPRESSION_FAILED``.
Before AUTH_OK only the auth frames and PING/PONG/ERROR/BYE are legal, so a
server ``Connection`` never holds more than ``max_pending_bytes`` (a few hundred
bytes), whatever the peer announces; the largest legal frames (a SEND of 65535
bytes, a SYNC of 1000 positions) still pass, compressed and not.
"""
from __future__ import annotations

import dataclasses
import random
import struct

import lz4.block
import pytest
from construct import Bytes, FormatField, GreedyBytes, Int8ub, Optional, Pass, Struct, VarInt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chorus import proto
from chorus.proto import (
    ABSOLUTE_MAX_FRAME_BYTES,
    CLIENT,
    HEADER_BYTES,
    LARGEST_BODY_BYTES,
    NEED_DATA,
    SERVER,
    Connection,
    ErrorCode,
    Flags,
    FrameType,
    RemoteProtocolError,
    State,
    decode,
    encode,
)
from chorus.proto import _fast, _wire
from chorus.proto._state import TRANSITIONS

PRE_AUTH = (State.HANDSHAKE, State.NEGOTIATING, State.UNAUTHENTICATED)
COMPRESSED = int(Flags.COMPRESSED)


def compressed_bound(n: int) -> int:
    """The largest ``length`` of a compressed frame with a body of at most n bytes (spec §4: LZ4_COMPRESSBOUND)."""
    return 4 + n + n // 255 + 16


def header(ftype: int, length: int, *, flags: int = 0, request_id: int = 1) -> bytes:
    return struct.pack(">IBBI", length, ftype, flags, request_id)


# --- the walk against a maximal build -----------------------------------------------------------

def _maximal(con):
    """The value of ``con`` whose encoding is longest: every string, number and array at its maximum."""
    if isinstance(con, _wire._Text):
        return "z" * con.max_bytes  # ASCII: one byte per character
    if isinstance(con, _wire._Enum):
        return max(con.enum_cls)
    if isinstance(con, _wire._Bool):
        return True
    if isinstance(con, _wire._Array):
        return (_maximal(con.subcon),) * con.max_items  # one item, shared: the build still writes each
    if isinstance(con, _wire._Record):
        fields = {sub.name: _maximal(sub.subcon) for sub in con.subcon.subcons if sub.name is not None}
        if issubclass(con.cls, proto.Event):
            fields["request_id"] = 2**32 - 1
        return con.cls(**fields)
    if isinstance(con, FormatField):
        return 2 ** (8 * con.length) - 1
    raise AssertionError(f"no maximal value for {con!r}: teach this test the new construct")


def maximal(ftype: FrameType) -> proto.Event:
    return _maximal(_wire.BODIES[ftype])


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_largest_body_is_what_a_maximal_event_builds_to(ftype):
    event = maximal(ftype)
    body = _fast.build_body(event)
    assert len(body) == LARGEST_BODY_BYTES[ftype]
    if len(body) <= 1 << 16:  # construct's checked path agrees (too slow for the 65 MB pages)
        assert _wire.build_body(event) == body
    if len(body) <= ABSOLUTE_MAX_FRAME_BYTES:  # and a receiver accepts it, plain and compressed
        assert decode(encode(event, compress_threshold=None)) == event
        assert decode(encode(event, compress_threshold=0)) == event


def test_largest_bodies_cover_every_frame_type_and_are_sane():
    assert set(LARGEST_BODY_BYTES) == set(FrameType)
    assert LARGEST_BODY_BYTES[FrameType.PING] == 8
    assert LARGEST_BODY_BYTES[FrameType.OK] == 0
    with pytest.raises(TypeError):  # read-only: nobody can loosen a bound at run time
        LARGEST_BODY_BYTES[FrameType.LOGIN] = 1 << 20  # type: ignore[index]


@pytest.mark.parametrize("con", [
    GreedyBytes,
    VarInt,
    Bytes(4),
    Pass,
    Optional(Int8ub),
    Struct("a" / Int8ub, "b" / VarInt),
    _wire._Text(VarInt, 10),
    _wire._Array(GreedyBytes),
], ids=lambda c: repr(c)[:40])
def test_the_walk_refuses_a_construct_it_does_not_know(con):
    with pytest.raises(TypeError, match="no size bound"):
        _wire.largest_bytes(con)


def test_the_walk_knows_each_field_type():
    assert _wire.largest_bytes(_wire.U64) == 8
    assert _wire.largest_bytes(_wire.Bool) == 1
    assert _wire.largest_bytes(_wire._Enum(_wire.U16, ErrorCode)) == 2
    assert _wire.largest_bytes(_wire.Name) == 1 + proto.MAX_NAME_BYTES
    assert _wire.largest_bytes(_wire._Text(Int8ub, 1000)) == 1 + 255  # the prefix caps what a string can hold
    assert _wire.largest_bytes(_wire._Array(_wire.U32, 3)) == 2 + 3 * 4
    assert _wire.largest_bytes(_wire.Position) == (1 + 1 + proto.MAX_NAME_BYTES) + 8


# --- every type's bound, judged from the header -------------------------------------------------

def _receiver_for(ftype: FrameType) -> Connection:
    """A Connection in a state where the peer may send ``ftype``, accepting frames up to 16 MiB."""
    for (state, sender), moves in TRANSITIONS.items():
        if ftype in moves:
            conn = Connection(SERVER if sender is CLIENT else CLIENT, max_frame_bytes=ABSOLUTE_MAX_FRAME_BYTES)
            conn.state = state
            conn.version = proto.PROTOCOL_VERSION  # as if WELCOME had chosen it: every frame type exists
            return conn
    raise AssertionError(f"nobody may send {ftype.name}")


def _judge(ftype: FrameType, length: int, *, flags: int = 0, bytewise: bool = False):
    """Feed only the header: NEED_DATA if it passes (an event for an empty body), else the RemoteProtocolError."""
    conn = _receiver_for(ftype)
    data = header(ftype, length, flags=flags)
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    try:
        for chunk in chunks[:-1]:
            conn.receive_data(chunk)
            assert conn.next_event() is NEED_DATA
        conn.receive_data(chunks[-1])
        result = conn.next_event()
    except RemoteProtocolError as exc:
        assert conn.buffered_bytes == HEADER_BYTES  # judged on the header; no body byte was needed
        return exc
    assert result is NEED_DATA or (length == 0 and result.FRAME is ftype)
    return NEED_DATA


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_each_type_is_refused_one_byte_over_its_bound_from_the_header(ftype, bytewise):
    for flags, bound in ((0, LARGEST_BODY_BYTES[ftype]), (COMPRESSED, compressed_bound(LARGEST_BODY_BYTES[ftype]))):
        if bound >= ABSOLUTE_MAX_FRAME_BYTES:
            continue  # max_frame_bytes binds first (test_proto.py)
        assert _judge(ftype, bound, flags=flags, bytewise=bytewise) is NEED_DATA
        error = _judge(ftype, bound + 1, flags=flags, bytewise=bytewise)
        assert isinstance(error, RemoteProtocolError) and error.code is ErrorCode.FRAME_TOO_LARGE
        assert f"{bound + 1} bytes > {bound}, the largest " in str(error) and ftype.name in str(error)


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_stateless_decode_applies_the_same_bound(ftype):
    bound = LARGEST_BODY_BYTES[ftype]
    if bound >= proto.DEFAULT_MAX_FRAME_BYTES:
        return
    with pytest.raises(RemoteProtocolError) as info:
        decode(header(ftype, bound + 1), max_frame_bytes=proto.DEFAULT_MAX_FRAME_BYTES)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    if bound:
        with pytest.raises(RemoteProtocolError) as info:  # at the bound it reads on and finds the stream cut short
            decode(header(ftype, bound), max_frame_bytes=proto.DEFAULT_MAX_FRAME_BYTES)
        assert info.value.code is ErrorCode.MALFORMED_FRAME
    else:
        assert decode(header(ftype, 0)).FRAME is ftype


def test_max_frame_bytes_is_still_checked_first():
    conn = Connection(SERVER, max_frame_bytes=100)  # below ERROR's own bound (262)
    conn.receive_data(header(FrameType.ERROR, 101))
    with pytest.raises(RemoteProtocolError, match=r"^ERROR: length 101 > max_frame_bytes 100$"):
        conn.next_event()


def test_wrong_state_is_judged_before_the_type_bound():
    conn = Connection(SERVER)  # HANDSHAKE: SEND is illegal, and 100 KB is over its bound too
    conn.receive_data(header(FrameType.SEND, 100_000))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.WRONG_STATE


# --- the decompressed size against the type's bound ---------------------------------------------

def _compressed_frame(ftype: FrameType, raw: bytes, declared: int | None = None, request_id: int = 1) -> bytes:
    """A COMPRESSED frame of ``raw``, whether or not compressing pays (§4 lets any sender do that)."""
    packed = (len(raw) if declared is None else declared).to_bytes(4, "big") + lz4.block.compress(
        raw, store_size=False)
    return header(ftype, len(packed), flags=COMPRESSED, request_id=request_id) + packed


@pytest.mark.parametrize("ftype", [FrameType.PING, FrameType.LOGIN, FrameType.HELLO, FrameType.ERROR, FrameType.BYE],
                         ids=lambda t: t.name)
def test_a_compressed_body_that_would_expand_past_its_type_is_refused_before_decompressing(ftype):
    bound = LARGEST_BODY_BYTES[ftype]
    frame = _compressed_frame(ftype, bytes(bound + 1))  # zeros: the block is tiny, the header passes
    assert len(frame) - HEADER_BYTES <= compressed_bound(bound)
    with pytest.raises(RemoteProtocolError) as info:
        decode(frame)
    assert info.value.code is ErrorCode.DECOMPRESSION_FAILED
    assert str(info.value).endswith(f"{bound + 1} bytes > {bound}, the largest {ftype.name}")
    # declared within the bound but the block holds more: lz4 stops at the declared size
    with pytest.raises(RemoteProtocolError) as info:
        decode(_compressed_frame(ftype, bytes(bound + 1), declared=bound))
    assert info.value.code is ErrorCode.DECOMPRESSION_FAILED


@pytest.mark.parametrize("ftype", [t for t in FrameType if LARGEST_BODY_BYTES[t] <= 1 << 17], ids=lambda t: t.name)
def test_lz4s_real_worst_case_fits_the_compressed_bound(ftype):
    """A maximal body of incompressible text, compressed anyway, is accepted (another sender may do this)."""
    rng = random.Random(int(ftype))
    event = maximal(ftype)
    noise = {name: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(len(value)))
             for name, value in ((f.name, getattr(event, f.name)) for f in dataclasses.fields(event))
             if isinstance(value, str)}
    event = dataclasses.replace(event, **noise)
    if ftype is FrameType.WELCOME:  # a version the HELLO offered (the field's width, not its value, is the point)
        event = dataclasses.replace(event, version=proto.PROTOCOL_VERSION)
    raw = _fast.build_body(event)
    frame = _compressed_frame(ftype, raw, request_id=event.request_id)
    assert len(frame) - HEADER_BYTES <= compressed_bound(len(raw))
    conn = _receiver_for(ftype)
    conn.receive_data(frame)
    assert conn.next_event() == event


# --- before AUTH_OK: a few hundred bytes at most ------------------------------------------------

def _server_in(state: State) -> Connection:
    conn = Connection(SERVER)  # the default 1 MiB max_frame_bytes
    conn.state = state
    if state is State.UNAUTHENTICATED:  # WELCOME chose a version: the newest, whose frames (REGISTER_INVITE) count
        conn.version = proto.PROTOCOL_VERSION
    return conn


def _largest_length(frames) -> int:
    return max((max(LARGEST_BODY_BYTES[f], compressed_bound(LARGEST_BODY_BYTES[f])) for f in frames), default=0)


@pytest.mark.parametrize("flags", [0, COMPRESSED], ids=["plain", "compressed"])
@pytest.mark.parametrize("state", PRE_AUTH, ids=lambda s: s.name)
def test_a_100_kb_register_header_is_refused_before_auth_from_the_header_alone(state, flags):
    data = header(FrameType.REGISTER, 100_000, flags=flags)
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))]):
        conn = _server_in(state)
        for chunk in chunks[:-1]:
            conn.receive_data(chunk)
            assert conn.next_event() is NEED_DATA
        conn.receive_data(chunks[-1])
        with pytest.raises(RemoteProtocolError) as info:
            conn.next_event()
        # REGISTER is legal only in UNAUTHENTICATED; before that the state table refuses it first
        expected = ErrorCode.FRAME_TOO_LARGE if state is State.UNAUTHENTICATED else ErrorCode.WRONG_STATE
        assert info.value.code is expected, info.value
        assert conn.buffered_bytes == HEADER_BYTES


def _legal_pre_auth(state: State) -> list[proto.Event]:
    """The maximal event of each frame type a client may send in ``state``."""
    return [maximal(ftype) for ftype in sorted(TRANSITIONS[state, CLIENT])]


@pytest.mark.parametrize("compress", [None, 0], ids=["plain", "compressed"])
@pytest.mark.parametrize("state", PRE_AUTH, ids=lambda s: s.name)
def test_maximal_pre_auth_frames_are_accepted_whole_and_bytewise(state, compress):
    for event in _legal_pre_auth(state):
        data = encode(event, compress_threshold=compress)
        conn = _server_in(state)
        conn.receive_data(data)
        assert conn.next_event() == event
        conn = _server_in(state)
        pending = conn.max_pending_bytes
        for i in range(len(data) - 1):
            conn.receive_data(data[i:i + 1])
            assert conn.next_event() is NEED_DATA
            assert conn.buffered_bytes < pending
        conn.receive_data(data[-1:])
        assert conn.next_event() == event


def test_hello_and_login_of_the_largest_size():
    # versions 1..65535: the widest range, which negotiates our newest version
    hello = dataclasses.replace(maximal(FrameType.HELLO), min_version=proto.MIN_PROTOCOL_VERSION)
    login = maximal(FrameType.LOGIN)
    assert len(encode(hello, compress_threshold=None)) == HEADER_BYTES + LARGEST_BODY_BYTES[FrameType.HELLO]
    assert len(encode(login, compress_threshold=None)) == HEADER_BYTES + LARGEST_BODY_BYTES[FrameType.LOGIN]
    client, server = Connection(CLIENT), Connection(SERVER)
    for sender, receiver, event in [
        (client, server, hello),
        (server, client, proto.Welcome(proto.negotiate(hello.min_version, hello.max_version), "chorus", 1 << 20,
                                       4096, 15000, 50, 100, 100, 100)),
        (client, server, login),
    ]:
        data = sender.send(event)
        for i in range(len(data)):
            receiver.receive_data(data[i:i + 1])
            got = receiver.next_event()
        assert got == event
    assert server.state is State.UNAUTHENTICATED


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_max_pending_bytes_is_the_largest_frame_the_peer_may_send_now(state, role):
    conn = Connection(role, max_frame_bytes=ABSOLUTE_MAX_FRAME_BYTES)
    conn.state = state
    peer = SERVER if role is CLIENT else CLIENT
    largest = _largest_length(TRANSITIONS.get((state, peer), {}))
    assert conn.max_pending_bytes == HEADER_BYTES + min(largest, ABSOLUTE_MAX_FRAME_BYTES)
    small = Connection(role, max_frame_bytes=50)  # never more than max_frame_bytes allows
    small.state = state
    assert small.max_pending_bytes == HEADER_BYTES + min(largest, 50)


def test_max_pending_bytes_before_auth_is_a_few_hundred_bytes():
    for state in PRE_AUTH:
        assert _server_in(state).max_pending_bytes < 512
    authenticated = _server_in(State.AUTHENTICATED)  # the largest client frame is a compressed SEND
    assert authenticated.max_pending_bytes == HEADER_BYTES + compressed_bound(LARGEST_BODY_BYTES[FrameType.SEND])


def test_max_pending_bytes_after_the_peers_bye_is_one_header():
    conns = {CLIENT: Connection(CLIENT), SERVER: Connection(SERVER)}
    conns[SERVER].receive_data(conns[CLIENT].send(proto.Bye(proto.CloseReason.CLIENT_QUIT)))
    assert conns[SERVER].next_event() == proto.Bye(proto.CloseReason.CLIENT_QUIT)
    assert conns[SERVER].max_pending_bytes == HEADER_BYTES


def test_max_pending_bytes_follows_the_handshake():
    client, server = Connection(CLIENT), Connection(SERVER)
    seen = [server.max_pending_bytes]
    for sender, receiver, event in [
        (client, server, proto.Hello(1, 1, "me")),
        (server, client, proto.Welcome(1, "chorus", 1 << 20, 4096, 15000, 50, 100, 100, 100)),
        (client, server, proto.Login("alice", "password1", request_id=1)),
        (server, client, proto.AuthOk("alice", "t" * 43, 0, request_id=1)),
    ]:
        receiver.receive_data(sender.send(event))
        assert receiver.next_event() == event
        seen.append(server.max_pending_bytes)
    assert seen[:-1] == [_server_in(s).max_pending_bytes for s in (State.HANDSHAKE, State.NEGOTIATING,
                                                                    State.UNAUTHENTICATED, State.UNAUTHENTICATED)]
    assert seen[-1] == _server_in(State.AUTHENTICATED).max_pending_bytes > 65536


_HEADERS = st.builds(
    lambda length, ftype, flags, rid: struct.pack(">IBBI", length, ftype, flags, rid),
    st.one_of(st.integers(0, 400), st.integers(0, 2**32 - 1)),
    st.sampled_from([int(t) for t in FrameType]),
    st.sampled_from([0, 0, COMPRESSED]),
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PRE_AUTH), st.lists(st.one_of(_HEADERS, st.binary(max_size=300)), max_size=6),
       st.integers(1, 97))
def test_before_auth_nothing_buffers_past_max_pending_bytes(state, pieces, step):
    """Any bytes, in any pieces: a pre-auth server holds less than max_pending_bytes, or refuses."""
    data = b"".join(pieces)
    conn = _server_in(state)
    ceiling = max(_server_in(s).max_pending_bytes for s in PRE_AUTH)
    try:
        for i in range(0, len(data), step):
            conn.receive_data(data[i:i + step])
            while (event := conn.next_event()) is not NEED_DATA:
                assert isinstance(event, proto.Event)
            assert conn.state in PRE_AUTH  # only the server's AUTH_OK moves on
            assert conn.buffered_bytes < conn.max_pending_bytes <= ceiling < 512
    except RemoteProtocolError:
        pass


# --- the largest legal frames after AUTH_OK still pass ------------------------------------------

def _authenticated_pair() -> dict:
    conns = {CLIENT: Connection(CLIENT), SERVER: Connection(SERVER)}
    for role, event in [
        (CLIENT, proto.Hello(1, 1, "test")),
        (SERVER, proto.Welcome(1, "chorus", 1 << 20, 4096, 15000, 50, 100, 100, 100)),
        (CLIENT, proto.Login("alice", "password1", request_id=1)),
        (SERVER, proto.AuthOk("alice", "t" * 43, 0, request_id=1)),
    ]:
        other = conns[SERVER if role is CLIENT else CLIENT]
        other.receive_data(conns[role].send(event))
        assert other.next_event() == event
    return conns


def _incompressible(n: int) -> str:
    rng = random.Random(n)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(n))


@pytest.mark.parametrize("event", [
    proto.Send(proto.Conversation.room("z" * 32), 2**64 - 1, "a" * 65535, request_id=7),
    proto.Send(proto.Conversation.room("z" * 32), 2**64 - 1, _incompressible(65535), request_id=7),
    proto.Sync(tuple(proto.Position(proto.Conversation.direct(f"{i:032d}"), 2**63 - 1) for i in range(1000)),
               request_id=8),
    maximal(FrameType.SYNC),
], ids=["SEND-65535-compressible", "SEND-65535-incompressible", "SYNC-1000-positions", "SYNC-maximal"])
@pytest.mark.parametrize("compress", [None, proto.COMPRESS_THRESHOLD_BYTES], ids=["plain", "default-compression"])
def test_the_largest_legal_client_frames_pass(event, compress):
    conns = _authenticated_pair()
    conns[CLIENT].compress_threshold = compress
    data = conns[CLIENT].send(event)
    server = conns[SERVER]
    for i in range(0, len(data), 4096):
        server.receive_data(data[i:i + 4096])
        got = server.next_event()
        if got is NEED_DATA:
            assert server.buffered_bytes < server.max_pending_bytes
    assert got == event
