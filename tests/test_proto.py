"""Tests of the sans-IO protocol (spec/PROTOCOL.md §2-§8), no event loop.

How this works: event strategies are derived from the construct declarations in
``proto._wire.FIELDS`` (the one source of truth for every body), so a new frame
type or field is covered without touching this file; a test holds FIELDS, the
dataclasses and ``EVENT_TYPES`` in step. The same walk over the declarations
produces, for every field of every frame, the wire bytes that break its rule
(too long, bad UTF-8, unknown enum value, boolean 2, too many items) and the
``ErrorCode`` the receiver must answer with. Streams are fed whole, byte at a
time and in random splits through real client/server ``Connection`` pairs that
walk the state table in ``proto._state`` legally.
"""
from __future__ import annotations

import dataclasses
import itertools
import struct
import subprocess
import sys
from pathlib import Path

import lz4.block
import pytest
from construct import FormatField
import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chorus import proto
from chorus.proto import (
    CLIENT,
    HEADER_BYTES,
    MAX_LIST_ITEMS,
    NEED_DATA,
    SERVER,
    Connection,
    ConnectionClosed,
    ErrorCode,
    FrameType,
    LocalProtocolError,
    RemoteProtocolError,
    State,
    decode,
    encode,
)
from chorus.proto import _wire
from chorus.proto._connection import _HEADER
from chorus.proto._const import MAX_TEXT_BYTES
from chorus.proto._state import next_state

REPO = Path(__file__).resolve().parent.parent
U32_MAX = 2**32 - 1


# --- strategies built from the wire declarations ---------------------------

def _fit(text: str, max_bytes: int) -> str:
    """Cut ``text`` to at most ``max_bytes`` UTF-8 bytes without splitting a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def _texts(max_bytes: int) -> st.SearchStrategy[str]:
    """Any Unicode text (non-ASCII included) of at most ``max_bytes`` bytes, often right at the limit.

    Repeating a short piece up to a drawn length gives long, compressible
    values, which is what makes message bodies and pages compress.
    """
    anything = st.text(max_size=min(max_bytes, 300)).map(lambda s: _fit(s, max_bytes))
    repeated = st.tuples(st.text(min_size=1, max_size=4), st.integers(0, max_bytes)).map(
        lambda t: _fit(t[0] * (t[1] // len(t[0].encode("utf-8")) + 1), t[1])
    )
    at_limit = st.sampled_from(["é", "a", "€", "😀", "日本"]).map(lambda s: _fit(s * max_bytes, max_bytes))
    return st.one_of(anything, repeated, at_limit)


def _fields(record: _wire._Record):
    """(name, construct) of each body field of a record, in wire order."""
    return [(sub.name, sub.subcon) for sub in record.subcon.subcons if sub.name is not None]


def _strategy(con, *, max_text: int, max_items: int) -> st.SearchStrategy:
    """A strategy for the values ``con`` (one of the constructs in ``_wire``) builds."""
    if isinstance(con, _wire._Text):
        return _texts(min(con.max_bytes, max_text))
    if isinstance(con, _wire._Enum):
        return st.sampled_from(list(con.enum_cls))
    if isinstance(con, _wire._Bool):
        return st.booleans()
    if isinstance(con, _wire._Array):
        item = _strategy(con.subcon, max_text=max_text, max_items=max_items)
        return st.lists(item, max_size=min(con.max_items, max_items)).map(tuple)
    if isinstance(con, _wire._Record):
        kwargs = {name: _strategy(sub, max_text=max_text, max_items=max_items) for name, sub in _fields(con)}
        if issubclass(con.cls, proto.Event):
            kwargs["request_id"] = st.integers(0, U32_MAX)
        return st.builds(con.cls, **kwargs)
    if isinstance(con, FormatField):
        return st.integers(0, 2 ** (8 * con.length) - 1)
    raise AssertionError(f"no strategy for {con!r}: teach this test the new construct")


def events_of(ftype: FrameType, *, max_text: int = 1 << 16, max_items: int = 6) -> st.SearchStrategy:
    return _strategy(_wire.BODIES[ftype], max_text=max_text, max_items=max_items)


def any_event(**limits) -> st.SearchStrategy:
    return st.sampled_from(list(FrameType)).flatmap(lambda ftype: events_of(ftype, **limits))


def _minimal(con):
    """The simplest valid value of ``con``: zeros, "x", the first enum member, no items."""
    if isinstance(con, _wire._Text):
        return "x"
    if isinstance(con, _wire._Enum):
        return list(con.enum_cls)[0]
    if isinstance(con, _wire._Bool):
        return True
    if isinstance(con, _wire._Array):
        return ()
    if isinstance(con, _wire._Record):
        return con.cls(**{name: _minimal(sub) for name, sub in _fields(con)})
    if isinstance(con, FormatField):
        return 0
    raise AssertionError(f"no minimal value for {con!r}")


def example(ftype: FrameType, **request_id) -> proto.Event:
    event = dataclasses.replace(_minimal(_wire.BODIES[ftype]), **request_id)
    if ftype is FrameType.HELLO:  # versions that negotiate (tests/test_versions.py tries the others)
        event = dataclasses.replace(event, min_version=proto.MIN_PROTOCOL_VERSION, max_version=proto.PROTOCOL_VERSION)
    elif ftype is FrameType.WELCOME:
        event = dataclasses.replace(event, version=proto.PROTOCOL_VERSION)
    return event


def frame(ftype: int, body: bytes, *, flags: int = 0, request_id: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">IBBI", len(body) if length is None else length, ftype, flags, request_id) + body


def feed(conn: Connection, chunks) -> list:
    """Feed chunks, draining events after each; checks the buffer bounds at every NEED_DATA."""
    out = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            out.append(event)
            if isinstance(event, ConnectionClosed):  # returned again on every later call
                return out
        # the state's largest legal frame bounds what waits (spec §2.3), never more than max_frame_bytes
        assert conn.buffered_bytes < conn.max_pending_bytes <= HEADER_BYTES + conn.max_frame_bytes
    return out


def split(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- declarations are complete and consistent ------------------------------

def test_event_types_cover_every_frame_type():
    assert set(proto.EVENT_TYPES) == set(FrameType)
    assert set(_wire.FIELDS) == set(FrameType)
    for ftype, cls in proto.EVENT_TYPES.items():
        assert cls.FRAME is ftype
        names = [f.name for f in dataclasses.fields(cls) if f.name != "request_id"]
        assert names == [name for name, _ in _fields(_wire.BODIES[ftype])], ftype.name


@given(st.integers(0, U32_MAX), st.integers(0, 255), st.integers(0, 255), st.integers(0, U32_MAX))
def test_struct_header_equals_construct_header(length, ftype, flags, request_id):
    fields = dict(length=length, type=ftype, flags=flags, request_id=request_id)
    packed = _HEADER.pack(length, ftype, flags, request_id)
    assert packed == _wire.HEADER.build(fields)
    assert _HEADER.size == HEADER_BYTES == _wire.HEADER.sizeof()
    parsed = _wire.HEADER.parse(packed)
    assert _HEADER.unpack(packed) == (parsed.length, parsed.type, parsed.flags, parsed.request_id)


def test_all_lists_every_public_name_once():
    """``__all__`` is written out for type checkers; it must still name everything ``chorus.proto`` offers."""
    public = {name for name in vars(proto) if not name.startswith("_")}
    assert len(proto.__all__) == len(set(proto.__all__))
    assert set(proto.__all__) == public


def test_import_proto_does_not_import_trio():
    code = "import sys; from chorus import proto; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_ping_response():
    assert proto.Ping(42, request_id=7).response() == proto.Pong(42, request_id=7)
    assert proto.Ping(2**64 - 1).response() == proto.Pong(2**64 - 1, request_id=0)


_ROOM = proto.Conversation.room("lobby")


@pytest.mark.parametrize("make, message", [
    (lambda: proto.Join("é" * 17), "Join.room: 34 bytes > 32"),  # 17 characters, 34 bytes
    (lambda: proto.Join(b"lobby"), "Join.room: expected str, not bytes"),
    (lambda: proto.Join("\udc80"), "Join.room: not encodable as UTF-8"),
    (lambda: proto.Ping(True), "Ping.nonce: expected int, not bool"),
    (lambda: proto.Ping(2**64), "Ping.nonce: 18446744073709551616 is not in 0..18446744073709551615"),
    (lambda: proto.Ping(1, request_id=2**32), "Ping.request_id: 4294967296 is not in 0..4294967295"),
    (lambda: proto.Bye(99), "Bye.reason: 99 is not a CloseReason"),
    (lambda: proto.SyncPage(_ROOM, (), 1), "SyncPage.has_more: expected bool, not int"),
    (lambda: proto.Sync([]), "Sync.positions: expected a tuple, not list"),
    (lambda: proto.Sync((proto.Position(_ROOM, 1),) * 1001), "Sync.positions: 1001 items > 1000"),
    (lambda: proto.Send(("room", "lobby"), 1, "hi"), "Send.conv: expected Conversation, not tuple"),
    (lambda: proto.Conversation.room("x" * 33), "Conversation.name: 33 bytes > 32"),
])
def test_events_check_their_fields_when_made(make, message):
    with pytest.raises(LocalProtocolError) as info:
        make()
    assert str(info.value) == message
    assert info.value.code is (ErrorCode.FIELD_TOO_LARGE if " > " in message else ErrorCode.INVALID_FIELD)


def test_what_the_wire_carries_is_accepted_when_made():
    assert proto.Join("é" * 16).room == "é" * 16  # 32 bytes: at the limit
    assert proto.Ping(proto.ErrorCode.INTERNAL).nonce == 399  # any int, an IntEnum included
    assert proto.Ping(2**64 - 1, request_id=2**32 - 1).request_id == 2**32 - 1
    assert proto.Bye(5).reason == proto.CloseReason.PROTOCOL_ERROR  # a member's value is accepted (and equals it)
    proto.validate(proto.Sync((proto.Position(_ROOM, 1),) * 1000))
    with pytest.raises(TypeError):
        proto.validate("not an event")


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(any_event(max_text=600))
def test_every_event_the_wire_can_carry_passes_its_check(event):
    proto.validate(event)  # st.builds made it, so its construction passed the check too
    assert decode(encode(event)) == event


@pytest.mark.parametrize("event", [
    proto.Login("alice", "hunter2-secret"),
    proto.Register("alice", "hunter2-secret"),
    proto.Resume("hunter2-secret"),
    proto.AuthOk("alice", "hunter2-secret", 123),
], ids=lambda e: type(e).__name__)
def test_repr_hides_secrets(event):
    for text in (repr(event), str(event), f"{event!r:>10}"):
        assert "hunter2" not in text and "***" in text
    assert type(event).__name__ in repr(event)


# --- round trips ------------------------------------------------------------

@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_round_trip_every_frame_type(ftype, data):
    event = data.draw(events_of(ftype))
    wire = encode(event)
    hypothesis.event("compressed" if wire[5] else "plain")
    assert decode(wire) == event
    assert wire[4] == ftype and int.from_bytes(wire[6:10], "big") == event.request_id
    assert encode(event, compress_threshold=None)[HEADER_BYTES:] == _wire.build_body(event)


@pytest.mark.parametrize("ftype", [t for t in FrameType if any(
    isinstance(sub, _wire._Array) for _, sub in _fields(_wire.BODIES[t]))], ids=lambda t: t.name)
def test_arrays_hold_up_to_1000_items(ftype):
    event = example(ftype)
    name, con = next((n, s) for n, s in _fields(_wire.BODIES[ftype]) if isinstance(s, _wire._Array))
    item = _minimal(con.subcon)
    full = dataclasses.replace(event, **{name: (item,) * MAX_LIST_ITEMS})
    assert decode(encode(full)) == full
    with pytest.raises(LocalProtocolError):
        encode(dataclasses.replace(event, **{name: (item,) * (MAX_LIST_ITEMS + 1)}))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(any_event(), st.one_of(st.none(), st.integers(0, 4096)))
def test_compression_only_when_it_pays(event, threshold):
    plain = encode(event, compress_threshold=None)
    if threshold is None:  # the default
        threshold, wire = proto.COMPRESS_THRESHOLD_BYTES, encode(event)
    else:
        wire = encode(event, compress_threshold=threshold)
    body = plain[HEADER_BYTES:]
    packed = lz4.block.compress(body, store_size=False)
    pays = len(body) >= threshold and len(packed) + 4 < len(body)
    assert bool(wire[5] & proto.Flags.COMPRESSED) == pays
    if pays:
        assert wire[HEADER_BYTES:] == len(body).to_bytes(4, "big") + packed
    else:
        assert wire == plain
    assert decode(wire) == decode(plain) == event


def test_compression_threshold_and_payoff():
    room = proto.Conversation.room("general")

    def message(body):
        return proto.Message(room, 1, 2, "alice", 3, body)

    small = message("a" * 400)  # compressible, but under the threshold
    assert len(_wire.build_body(small)) < proto.COMPRESS_THRESHOLD_BYTES
    assert encode(small)[5] == 0
    big = message("hello chorus " * 100)
    assert encode(big)[5] == proto.Flags.COMPRESSED
    assert len(encode(big)) < len(encode(big, compress_threshold=None))
    noise = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(400))  # 1200 bytes lz4 cannot shrink
    assert encode(message(noise))[5] == 0
    for event in (small, big, message(noise)):
        assert decode(encode(event)) == event


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(any_event(max_text=4096), st.integers(1, 8192))
def test_what_encode_accepts_the_peer_accepts(event, limit):
    """A frame built within the peer's max_frame_bytes is never one the peer refuses as too large."""
    try:
        wire = encode(event, max_frame_bytes=limit)
    except LocalProtocolError as exc:
        assert exc.code is ErrorCode.FRAME_TOO_LARGE
        return
    assert decode(wire, max_frame_bytes=limit) == event


def test_encode_refuses_request_id_out_of_range():
    for rid in (-1, 2**32):
        with pytest.raises(LocalProtocolError):
            encode(proto.Ping(1, request_id=rid))


# --- streams: whole, byte at a time, random splits -------------------------

_PROGRESS = {FrameType.HELLO, FrameType.WELCOME, FrameType.LOGIN, FrameType.REGISTER, FrameType.RESUME,
             FrameType.AUTH_OK}


@st.composite
def sessions(draw, max_steps: int = 14):
    """A legal exchange, as [(sender role, event)], walking proto's state table and its version."""
    state, silent, steps = State.HANDSHAKE, set(), []
    version, offered = proto.MIN_PROTOCOL_VERSION, None
    for _ in range(draw(st.integers(1, max_steps))):
        options = [(role, ftype) for role in (CLIENT, SERVER) if role not in silent
                   for ftype in FrameType if next_state(state, role, ftype) is not None and ftype.version <= version]
        if not options:
            break
        forward = [o for o in options if o[1] in _PROGRESS and o[1] not in {e.FRAME for _, e in steps[-1:]}]
        if forward and draw(st.booleans()):  # mostly move on, so walks reach AUTHENTICATED
            options = forward
        elif draw(st.integers(0, 3)):  # and say BYE rarely, since it silences its sender
            options = [o for o in options if o[1] is not FrameType.BYE] or options
        role, ftype = draw(st.sampled_from(options))
        event = draw(events_of(ftype, max_text=600, max_items=3))
        if ftype is FrameType.HELLO:  # a range with a version in common (tests/test_versions.py tries others)
            low = draw(st.integers(0, proto.PROTOCOL_VERSION))
            offered = (low, draw(st.integers(max(low, proto.MIN_PROTOCOL_VERSION), 0xFFFF)))
            event = dataclasses.replace(event, min_version=offered[0], max_version=offered[1])
        if ftype is FrameType.WELCOME:  # the client must be able to send what the strategies make
            version = proto.negotiate(*offered)
            event = dataclasses.replace(event, version=version, max_frame_bytes=proto.DEFAULT_MAX_FRAME_BYTES)
        steps.append((role, event))
        state = next_state(state, role, ftype)
        if ftype is FrameType.BYE:
            silent.add(role)
    return steps


def _runs(session):
    """Group consecutive frames of one sender: [(sender, events)]."""
    runs = []
    for role, event in session:
        if runs and runs[-1][0] is role:
            runs[-1][1].append(event)
        else:
            runs.append((role, [event]))
    return runs


def _replay(session, chunker) -> list:
    """Replay a session through a fresh pair, each run of frames cut by ``chunker``; returns what arrived."""
    conns = {CLIENT: Connection(CLIENT), SERVER: Connection(SERVER)}
    received = []
    for role, events in _runs(session):
        data = b"".join(conns[role].send(e) for e in events)
        receiver = conns[SERVER if role is CLIENT else CLIENT]
        received.extend(feed(receiver, chunker(data)))
    for conn in conns.values():
        assert feed(conn, [b""]) == [ConnectionClosed()]
    assert conns[CLIENT].state is conns[SERVER].state
    return received


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sessions(), st.lists(st.integers(0, 1 << 20), max_size=20))
def test_stream_fed_whole_bytewise_or_split_gives_the_same_events(session, cuts):
    expected = [event for _, event in session]
    hypothesis.event(f"frames: {len(expected)}, last: {expected[-1].FRAME.name}")
    assert _replay(session, lambda data: [data]) == expected
    assert _replay(session, lambda data: [data[i:i + 1] for i in range(len(data))]) == expected
    assert _replay(session, lambda data: split(data, cuts)) == expected


@settings(max_examples=100)
@given(st.lists(st.tuples(events_of(FrameType.ERROR), st.booleans()), min_size=1, max_size=12),
       st.lists(st.integers(1, 700), min_size=1, max_size=30))
def test_receive_buffer_stays_under_header_plus_max_frame(errors, sizes):
    # ERROR is legal from the client in any state, so a fresh server accepts a stream of them.
    limit = 2 + 4 + 1 + MAX_TEXT_BYTES  # the largest ERROR body
    conn = Connection(SERVER, max_frame_bytes=limit)
    data = b"".join(encode(e, compress_threshold=16 if squeeze else None) for e, squeeze in errors)
    chunks, pos = [], 0
    while pos < len(data):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(data[pos:pos + size])
        pos += size
    assert feed(conn, chunks + [b""]) == [e for e, _ in errors] + [ConnectionClosed()]


# --- limits: each broken rule gives its ErrorCode ---------------------------

def _bad_values(con):
    """Yield (label, wire bytes, code) for each way a value of ``con`` can break a rule on the wire."""
    if isinstance(con, _wire._Text):
        prefix = con.subcon.lengthfield
        if con.max_bytes < 2 ** (8 * prefix.length) - 1:
            n = con.max_bytes + 1
            yield "too_long", prefix.build(n) + b"a" * n, ErrorCode.FIELD_TOO_LARGE
        yield "bad_utf8", prefix.build(2) + b"\xc3\x28", ErrorCode.INVALID_FIELD
        yield "surrogate", prefix.build(3) + b"\xed\xa0\x80", ErrorCode.INVALID_FIELD
        yield "overlong_nul", prefix.build(2) + b"\xc0\x80", ErrorCode.INVALID_FIELD
    elif isinstance(con, _wire._Enum):
        values = {int(v) for v in con.enum_cls}
        for value in sorted({0, max(values) + 1, 2 ** (8 * con.subcon.length) - 1} - values):
            yield f"enum_{value}", con.subcon.build(value), ErrorCode.INVALID_FIELD
    elif isinstance(con, _wire._Bool):
        yield "bool_2", b"\x02", ErrorCode.INVALID_FIELD
        yield "bool_255", b"\xff", ErrorCode.INVALID_FIELD
    elif isinstance(con, _wire._Array):
        yield "1001_items", (con.max_items + 1).to_bytes(2, "big"), ErrorCode.FIELD_TOO_LARGE
        yield "65535_items", b"\xff\xff", ErrorCode.FIELD_TOO_LARGE
        for label, data, code in _bad_values(con.subcon):
            yield f"item.{label}", b"\x00\x01" + data, code
    elif isinstance(con, _wire._Record):
        fields = _fields(con)
        good = [sub.build(_minimal(sub)) for _, sub in fields]
        for i, (name, sub) in enumerate(fields):
            for label, data, code in _bad_values(sub):
                yield f"{name}.{label}", b"".join(good[:i]) + data + b"".join(good[i + 1:]), code


BAD_BODIES = [(f"{ftype.name}.{label}", ftype, body, code)
              for ftype in FrameType for label, body, code in _bad_values(_wire.BODIES[ftype])]


def test_bad_bodies_cover_every_kind_of_rule():
    labels = " ".join(label for label, *_ in BAD_BODIES)
    for kind in ("too_long", "bad_utf8", "enum_", "bool_2", "1001_items", "item.", "conv.name.too_long"):
        assert kind in labels


def _field_of(label: str) -> str:
    """The field a BAD_BODIES label breaks, as an ERROR message names it: "conv.name", "rooms[0].joined"."""
    parts = label.split(".")[1:-1]  # the frame first, how it is broken last
    return ".".join(part if part != "item" else "[0]" for part in parts).replace(".[0]", "[0]")


@pytest.mark.parametrize("label, ftype, body, code", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_field_raises_its_code(label, ftype, body, code):
    # A body longer than its type can ever be is refused from the header (spec §2.3) before any field is read.
    largest = proto.LARGEST_BODY_BYTES[ftype]
    with pytest.raises(RemoteProtocolError) as info:
        decode(frame(ftype, body))
    assert info.value.code is (code if len(body) <= largest else ErrorCode.FRAME_TOO_LARGE)
    # The ERROR text is one short line naming the frame and the field (no parser internals): "JOIN.room: ..."
    message = str(info.value)
    assert "\n" not in message and len(message) <= 120 and "parsing" not in message, message
    if len(body) <= largest:
        assert message.startswith(f"{ftype.name}.{_field_of(label)}: "), (label, message)
    # the same bytes compressed are judged the same way after decompression
    packed = len(body).to_bytes(4, "big") + lz4.block.compress(body, store_size=False)
    with pytest.raises(RemoteProtocolError) as info:
        decode(frame(ftype, packed, flags=proto.Flags.COMPRESSED))
    if len(body) <= largest:
        assert info.value.code is code
    else:  # the header's length may still be within lz4's worst case: then the declared size is refused
        assert info.value.code in (ErrorCode.FRAME_TOO_LARGE, ErrorCode.DECOMPRESSION_FAILED)


def _expect(data: bytes, code: ErrorCode, *, max_frame_bytes: int = proto.DEFAULT_MAX_FRAME_BYTES):
    with pytest.raises(RemoteProtocolError) as info:
        decode(data, max_frame_bytes=max_frame_bytes)
    assert info.value.code is code, info.value


def test_oversize_length_is_refused_from_the_header_alone():
    # ERROR is legal from the client at once, and its largest body (262) is over this max_frame_bytes
    conn = Connection(SERVER, max_frame_bytes=100)
    header = frame(FrameType.ERROR, b"", length=101)
    assert feed(conn, [header[:9]]) == []
    conn.receive_data(header[9:])
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(RemoteProtocolError):  # the error sticks
        conn.next_event()
    at_limit = Connection(SERVER, max_frame_bytes=100)
    assert feed(at_limit, [frame(FrameType.ERROR, b"", length=100)]) == []  # exactly the max: wait for the body
    _expect(frame(FrameType.PING, b"", length=U32_MAX), ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize("type_byte", sorted(set(range(256)) - {int(t) for t in FrameType}))
def test_unknown_frame_type(type_byte):
    _expect(frame(type_byte, b""), ErrorCode.UNKNOWN_FRAME_TYPE)
    conn = Connection(SERVER)  # judged from the header, before any body arrives
    conn.receive_data(frame(type_byte, b"", length=50))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.UNKNOWN_FRAME_TYPE


@pytest.mark.parametrize("flags", [1 << bit for bit in range(1, 8)] + [0xFF, 0x03])
def test_unknown_flag_bits(flags):
    # proto answers INVALID_FIELD here (the flags byte is a header field with a bad value).
    _expect(frame(FrameType.PING, bytes(8), flags=flags), ErrorCode.INVALID_FIELD)


def test_trailing_and_truncated_bodies_are_malformed():
    good = _wire.build_body(proto.Send(proto.Conversation.room("r"), 1, "hi"))
    _expect(frame(FrameType.SEND, good + b"\x00"), ErrorCode.MALFORMED_FRAME)
    _expect(frame(FrameType.SEND, good[:-1]), ErrorCode.MALFORMED_FRAME)
    _expect(frame(FrameType.PING, bytes(7)), ErrorCode.MALFORMED_FRAME)
    _expect(frame(FrameType.JOIN, b"\x01a\x00"), ErrorCode.MALFORMED_FRAME)
    for ftype in FrameType:  # every body must end exactly at the frame end
        body = _wire.build_body(example(ftype))
        # one byte more than a fixed-size body can ever be is refused from the header (spec §2.3)
        longer = ErrorCode.MALFORMED_FRAME if len(body) < proto.LARGEST_BODY_BYTES[ftype] else ErrorCode.FRAME_TOO_LARGE
        _expect(frame(ftype, body + b"\x00"), longer)
        if body:
            _expect(frame(ftype, body[:-1]), ErrorCode.MALFORMED_FRAME)


def test_eof_inside_a_frame():
    whole = encode(proto.Hello(1, 1, "me"))
    for cut in range(1, len(whole)):
        conn = Connection(SERVER)
        assert feed(conn, [whole[:cut]]) == []
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as info:
            conn.next_event()
        assert info.value.code is ErrorCode.MALFORMED_FRAME
    conn = Connection(SERVER)
    assert feed(conn, [whole, b""]) == [proto.Hello(1, 1, "me"), ConnectionClosed()]
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


def test_decompression_bombs_and_corrupt_lz4():
    limit = 1 << 16
    bomb = bytes(4 * limit)  # a run of zeros lz4 packs into a few hundred bytes
    packed = lz4.block.compress(bomb, store_size=False)
    assert len(packed) < limit
    compressed = proto.Flags.COMPRESSED
    big = FrameType.SYNC  # a type whose largest body (42002) leaves room for the packed bomb
    _expect(frame(big, len(bomb).to_bytes(4, "big") + packed, flags=compressed),
            ErrorCode.DECOMPRESSION_FAILED, max_frame_bytes=limit)
    # declared size within the limit, real size beyond it: lz4 stops at the declared size
    _expect(frame(big, (100).to_bytes(4, "big") + packed, flags=compressed),
            ErrorCode.DECOMPRESSION_FAILED, max_frame_bytes=limit)
    # a declared size over the max is refused without decompressing (the block here is junk)
    _expect(frame(big, (limit + 1).to_bytes(4, "big") + b"\xff" * 8, flags=compressed),
            ErrorCode.DECOMPRESSION_FAILED, max_frame_bytes=limit)
    # a PING cannot even carry the packed bomb: refused from its header (tests/test_proto_limits.py)
    _expect(frame(FrameType.PING, len(bomb).to_bytes(4, "big") + packed, flags=compressed),
            ErrorCode.FRAME_TOO_LARGE, max_frame_bytes=limit)
    body = _wire.build_body(proto.Ping(5))
    good = lz4.block.compress(body, store_size=False)
    assert decode(frame(FrameType.PING, len(body).to_bytes(4, "big") + good, flags=compressed)) == proto.Ping(5)
    for corrupt in (b"\xff" * len(good), good[:-1], good + b"\x00", b""):
        _expect(frame(FrameType.PING, len(body).to_bytes(4, "big") + corrupt, flags=compressed),
                ErrorCode.DECOMPRESSION_FAILED)
    _expect(frame(FrameType.PING, (len(body) + 3).to_bytes(4, "big") + good, flags=compressed),
            ErrorCode.DECOMPRESSION_FAILED)  # declared size larger than what the block holds
    _expect(frame(FrameType.PING, b"\x00\x00", flags=compressed), ErrorCode.DECOMPRESSION_FAILED)


def test_decode_wants_exactly_one_frame():
    one = encode(proto.Ping(1))
    for data in (b"", one + one, one + b"\x00"):
        with pytest.raises(RemoteProtocolError):
            decode(data)


# --- state: what may be sent when ------------------------------------------

_SETUP = [  # at the newest version, so that every frame type exists (tests/test_versions.py: older ones)
    (CLIENT, proto.Hello(proto.MIN_PROTOCOL_VERSION, proto.PROTOCOL_VERSION, "test")),
    (SERVER, proto.Welcome(proto.PROTOCOL_VERSION, "chorus", 1 << 20, 4096, 15000, 50, 100, 100, 100)),
    (CLIENT, proto.Login("alice", "password1", request_id=1)),
    (SERVER, proto.AuthOk("alice", "t" * 43, 0, request_id=1)),
    (CLIENT, proto.Logout(request_id=2)),
]
_STEPS_TO = {State.HANDSHAKE: 0, State.NEGOTIATING: 1, State.UNAUTHENTICATED: 2, State.AUTHENTICATED: 4,
             State.CLOSING: 5}


def pair_in(state: State) -> dict:
    conns = {CLIENT: Connection(CLIENT), SERVER: Connection(SERVER)}
    for role, event in _SETUP[:_STEPS_TO[state]]:
        other = conns[SERVER if role is CLIENT else CLIENT]
        assert feed(other, [conns[role].send(event)]) == [event]
    assert conns[CLIENT].state is conns[SERVER].state is state
    return conns


@pytest.mark.parametrize("sender", [CLIENT, SERVER], ids=lambda r: r.value)
@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
def test_every_frame_is_checked_against_the_state_table_both_ways(state, sender):
    receiver = SERVER if sender is CLIENT else CLIENT
    for ftype in FrameType:
        conns = pair_in(state)
        event = example(ftype, request_id=9)
        after = next_state(state, sender, ftype)
        if after is None or ftype.version > conns[sender].version:
            # Before WELCOME a connection speaks the first version: newer frame types do not exist yet (§6).
            code = ErrorCode.WRONG_STATE if ftype.version <= conns[sender].version else ErrorCode.UNKNOWN_FRAME_TYPE
            with pytest.raises(LocalProtocolError) as info:
                conns[sender].send(event)
            assert info.value.code is code
            assert conns[sender].state is state
            conns[receiver].receive_data(encode(event)[:HEADER_BYTES])  # refused before the body arrives
            with pytest.raises(RemoteProtocolError) as info:
                conns[receiver].next_event()
            assert info.value.code is code, ftype
        else:
            assert feed(conns[receiver], [conns[sender].send(event)]) == [event]
            assert conns[sender].state is conns[receiver].state is after


def test_state_table_matches_the_semantics():
    assert next_state(State.HANDSHAKE, CLIENT, FrameType.HELLO) is State.NEGOTIATING
    assert next_state(State.HANDSHAKE, CLIENT, FrameType.JOIN) is None
    assert next_state(State.UNAUTHENTICATED, CLIENT, FrameType.SEND) is None
    assert next_state(State.UNAUTHENTICATED, SERVER, FrameType.MESSAGE) is None
    assert next_state(State.AUTHENTICATED, SERVER, FrameType.WELCOME) is None
    assert next_state(State.AUTHENTICATED, CLIENT, FrameType.LOGOUT) is State.CLOSING
    assert next_state(State.CLOSING, CLIENT, FrameType.SEND) is None
    for state in State:  # either side may always end the conversation
        for role in (CLIENT, SERVER):
            assert next_state(state, role, FrameType.BYE) is state


@pytest.mark.parametrize("bye_sender", [CLIENT, SERVER], ids=lambda r: r.value)
@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
def test_nothing_after_bye(state, bye_sender):
    conns = pair_in(state)
    other = SERVER if bye_sender is CLIENT else CLIENT
    bye = proto.Bye(proto.CloseReason.CLIENT_QUIT)
    assert feed(conns[other], [conns[bye_sender].send(bye)]) == [bye]
    for ftype in FrameType:
        event = example(ftype)
        with pytest.raises(LocalProtocolError):
            conns[bye_sender].send(event)
        late = pair_in(state)
        feed(late[other], [late[bye_sender].send(bye)])
        late[other].receive_data(encode(event))
        with pytest.raises(RemoteProtocolError) as info:
            late[other].next_event()
        newer = ftype.version > late[other].version  # before WELCOME: a type of a later version does not exist
        assert info.value.code is (ErrorCode.UNKNOWN_FRAME_TYPE if newer else ErrorCode.WRONG_STATE)
    # the other side may still speak: whatever the state allows it, and its own BYE
    maybe = (proto.Error(ErrorCode.INTERNAL, 0, "bye"), proto.Ping(1))
    replies = [e for e in maybe if next_state(state, other, e.FRAME)] + [bye]
    assert feed(conns[bye_sender], [conns[other].send(e) for e in replies]) == replies
    with pytest.raises(LocalProtocolError):
        conns[other].send(bye)


def test_client_respects_the_servers_max_frame_bytes():
    conns = pair_in(State.NEGOTIATING)
    welcome = proto.Welcome(proto.PROTOCOL_VERSION, "chorus", 100, 4096, 15000, 50, 100, 100, 100)
    feed(conns[CLIENT], [conns[SERVER].send(welcome)])
    conns[CLIENT].send(proto.Ping(1))
    with pytest.raises(LocalProtocolError) as info:
        conns[CLIENT].send(proto.Login("alice", "x" * 120))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert conns[CLIENT].state is State.UNAUTHENTICATED
