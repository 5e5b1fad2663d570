"""Differential fuzz: the bridge's RFC 6455 reader (server/_wsframe.py) against wsproto's server side.

Hypothesis writes sequences of client frames, valid and not: binary messages whole and fragmented (with
control frames between fragments), pings, pongs, close frames with every kind of code and reason, text
frames, and frames with RSV bits, no mask, non-minimal lengths, reserved opcodes, oversize control frames.
The same bytes go to ``FrameReader`` (in pieces of a drawn size) and to wsproto's ``FrameProtocol`` in
server mode (one frame at a time, so that we know which frame it refused).

Invariant: the same events in the same order (binary messages, pings, pongs, the first close), and then
either both wait for more bytes or both refuse, FrameReader's close code being one wsproto would send for
that frame. Also: the reader never holds more than the message limit plus one control frame.

Where Chorus is deliberately different from wsproto, the expectation is normalised (``_stricter`` and the
1014 case below), each with its reason:
- text messages: Chorus refuses the first TEXT header (1003); wsproto decodes UTF-8.
- message size: Chorus refuses from the header a frame that takes the message past its limit (1009);
  wsproto has no limit.
- fragments: Chorus refuses the frame after ``max_fragments`` in one message (1008); wsproto has no limit.
- close code 1014 (Bad Gateway, in the IANA registry since RFC 6455): Chorus accepts it; wsproto's table
  lacks it and refuses.
Minimal length encodings need no normalisation: wsproto insists on them too.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode as WsOpcode, ParseFailed

from chorus.server._wsframe import NEED_DATA, BinaryMessage, Close, FrameReader, Ping, Pong, WebSocketError
from wsclient import client_frame

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_CONTROL_BYTES = 2 + 4 + 125  # the most the reader may hold besides the message: one unfinished control frame


@dataclass(frozen=True)
class Spec:
    """One frame as written on the wire (``client_frame``'s arguments)."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    length_bytes: int | None = None  # None: minimal
    key: bytes = b"\x37\xfa\x21\x3d"

    def encode(self) -> bytes:
        return client_frame(self.opcode, self.payload, fin=self.fin, rsv=self.rsv, masked=self.masked,
                            length_bytes=self.length_bytes, key=self.key)


# -- the frames Hypothesis writes ------------------------------------------------------------------

def _one_in(n: int) -> st.SearchStrategy[bool]:
    """True once in about ``n`` draws (Hypothesis favours the ends of a range, so not ``integers(0, n-1) == 0``)."""
    return st.integers(0, n - 1).map(lambda k: k == n // 2)


def _filler(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


_payloads = st.integers(0, 29).flatmap(
    lambda k: st.integers(65536, 66000).map(_filler) if k == 15  # 64-bit lengths
    else st.integers(126, 600).map(_filler) if k % 6 == 1  # 16-bit lengths
    else st.binary(max_size=125))

_CLOSE_CODES = [0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                1014, 1015, 1016, 2999, 3000, 3999, 4000, 4999, 5000, 65535]
_close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),  # (no room for a code)
    st.builds(lambda code, reason: code.to_bytes(2, "big") + reason, st.sampled_from(_CLOSE_CODES),
              st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=8))),
)
_keys = st.binary(min_size=4, max_size=4)


@st.composite
def _control(draw) -> Spec:
    opcode = draw(st.sampled_from([PING, PONG, CLOSE]))
    if opcode == CLOSE:
        payload = draw(_close_payloads)
    else:
        payload = draw(st.binary(min_size=126, max_size=130) if draw(_one_in(10)) else st.binary(max_size=125))
    return Spec(opcode, payload, key=draw(_keys))


@st.composite
def _message(draw) -> list[Spec]:
    """A data message: whole, in a few fragments, or in many small ones; control frames may come between."""
    if draw(_one_in(6)):
        parts = draw(st.lists(st.binary(max_size=2), min_size=2, max_size=70))
    else:
        parts = draw(st.lists(_payloads, min_size=1, max_size=4))
    first = TEXT if draw(_one_in(20)) else BINARY
    frames = []
    for i, part in enumerate(parts):
        if i and draw(_one_in(6)):
            frames.append(draw(_control()))
        frames.append(Spec(first if i == 0 else CONT, part, fin=i == len(parts) - 1, key=draw(_keys)))
    return frames


#: Any opcode (reserved ones included) with any FIN bit: mostly out of place. RSV, mask, lengths: ``_broken``.
_anything = st.builds(Spec, opcode=st.integers(0, 15), payload=st.binary(max_size=130), fin=st.booleans(), key=_keys)


@st.composite
def _broken(draw, spec: Spec) -> Spec:
    """``spec`` with one RFC 6455 violation (or none): RSV bits, no mask, a non-minimal length."""
    how = draw(st.sampled_from(["rsv", "unmasked", "long length"]))
    if how == "rsv":
        return Spec(**{**spec.__dict__, "rsv": draw(st.integers(1, 7))})
    if how == "unmasked":
        return Spec(**{**spec.__dict__, "masked": False})
    n = len(spec.payload)
    return Spec(**{**spec.__dict__, "length_bytes": 8 if n > 125 or draw(st.booleans()) else 2})


@st.composite
def frame_sequences(draw) -> list[Spec]:
    specs = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["message"] * 6 + ["control"] * 3 + ["anything"]))  # mostly what clients send
        item = draw(_message()) if kind == "message" else [draw(_control())] if kind == "control" else [draw(_anything)]
        for spec in item:
            specs.append(draw(_broken(spec)) if draw(_one_in(25)) else spec)
    return specs


# -- the two readers -------------------------------------------------------------------------------

def _ours(data: bytes, piece: int, max_message: int, max_fragments: int) -> tuple[list, int | None]:
    """FrameReader's events (up to the first close) and its close code if it refused."""
    reader = FrameReader(max_message, max_fragments)
    events = []
    try:
        for start in range(0, len(data), piece):
            reader.receive_data(data[start:start + piece])
            while (event := reader.next_event()) is not NEED_DATA:
                if type(event) is BinaryMessage:
                    events.append(("binary", bytes(event.data)))
                elif type(event) is Ping:
                    events.append(("ping", event.payload))
                elif type(event) is Pong:
                    events.append(("pong", event.payload))
                else:
                    assert type(event) is Close
                    events.append(("close", event.code, event.reason))
                    return events, None
            assert reader.buffered_bytes <= max_message + _CONTROL_BYTES
    except WebSocketError as exc:
        return events, exc.code
    return events, None


def _stricter(spec: Spec, in_message: bool, size: int, frames: int, max_message: int,
              max_fragments: int) -> int | None:
    """The close code of a rule Chorus adds to RFC 6455 that this frame breaks, if any (judged like the
    reader: after the frame's RFC checks, before its payload)."""
    if spec.opcode == TEXT and not in_message:
        return 1003  # one binary message = one Chorus frame; text is refused from its first header
    if (spec.opcode == BINARY and not in_message) or (spec.opcode == CONT and in_message):
        if size + len(spec.payload) > max_message:
            return 1009  # wsproto has no message size limit
        if frames >= max_fragments:
            return 1008  # nor a limit on fragments
    return None


def _expected(specs: list[Spec], max_message: int, max_fragments: int) -> tuple[list, set[int] | None]:
    """wsproto's events, normalised for Chorus, and the close codes FrameReader may refuse with (None: it
    must not refuse)."""
    wsproto = FrameProtocol(client=False, extensions=[])
    events: list = []
    message = bytearray()
    in_message, size, frames = False, 0, 0
    for spec in specs:
        stricter = _stricter(spec, in_message, size, frames, max_message, max_fragments)
        wsproto.receive_bytes(spec.encode())
        try:
            new = list(wsproto.received_frames())
        except ParseFailed as exc:
            if spec.opcode == CLOSE and len(spec.payload) >= 2 and int.from_bytes(spec.payload[:2], "big") == 1014 \
                    and "unknown reserved code" in str(exc):
                # Chorus accepts 1014 (IANA registry); the rest of the frame is judged as wsproto would.
                try:
                    return events + [("close", 1014, spec.payload[2:].decode("utf-8"))], None
                except UnicodeDecodeError:
                    return events, {1007}
            # Both refuse this frame; when it also breaks a Chorus rule, either check may come first.
            return events, {int(exc.code)} | ({stricter} if stricter else set())
        if stricter is not None:
            return events, {stricter}
        for frame in new:
            assert frame.frame_finished  # whole frames were fed
            if frame.opcode is WsOpcode.BINARY:
                message += frame.payload
                if frame.message_finished:
                    events.append(("binary", bytes(message)))
                    message.clear()
            elif frame.opcode is WsOpcode.PING:
                events.append(("ping", bytes(frame.payload)))
            elif frame.opcode is WsOpcode.PONG:
                events.append(("pong", bytes(frame.payload)))
            elif frame.opcode is WsOpcode.CLOSE:
                code, reason = frame.payload
                events.append(("close", int(code), reason))
                return events, None
            else:
                raise AssertionError(f"wsproto accepted {frame!r}, which Chorus's rules refuse above")
        if spec.opcode in (BINARY, CONT):
            in_message, size, frames = not spec.fin, 0 if spec.fin else size + len(spec.payload), \
                0 if spec.fin else frames + 1
    return events, None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs=frame_sequences(), piece=st.sampled_from([1, 3, 64, 1000, 1 << 20]),
       max_message=st.sampled_from([200, 1 << 17]), max_fragments=st.sampled_from([4, 64]))
def test_frame_reader_agrees_with_wsproto(specs, piece, max_message, max_fragments):
    if piece == 1:
        specs = _whole_frames(specs, 20_000)  # one byte at a time is slow: only the frames in the first 20 kB
    data = b"".join(spec.encode() for spec in specs)
    got_events, got_code = _ours(data, piece, max_message, max_fragments)
    want_events, want_codes = _expected(specs, max_message, max_fragments)
    event(f"refused with {got_code}" if got_code else "accepted")
    event(f"{min(len(got_events), 3)}+ events")
    assert got_events == want_events
    if want_codes is None:
        assert got_code is None, (got_code, got_events)
    else:
        assert got_code in want_codes, (got_code, want_codes)


def _whole_frames(specs: list[Spec], limit: int) -> list[Spec]:
    """The first specs whose frames together take at most ``limit`` bytes."""
    out, total = [], 0
    for spec in specs:
        total += len(spec.encode())
        if total > limit:
            break
        out.append(spec)
    return out


def test_differences_are_the_documented_ones():
    """The normalisations above, each seen once, so that they cannot quietly stop being exercised."""
    ping = Spec(PING, b"x")
    cases = [
        ([Spec(TEXT, b"hi")], 200, 64, 1003),
        ([Spec(BINARY, b"x" * 201)], 200, 64, 1009),
        ([Spec(BINARY, b"a", fin=False), ping, Spec(CONT, b"b", fin=False), Spec(CONT, b"c")], 200, 2, 1008),
        ([Spec(CLOSE, (1014).to_bytes(2, "big") + b"bad gateway")], 200, 64, None),
        ([Spec(BINARY, b"x" * 130, length_bytes=8)], 1 << 17, 64, 1002),  # non-minimal: both refuse
    ]
    for specs, max_message, max_fragments, code in cases:
        data = b"".join(spec.encode() for spec in specs)
        events, got = _ours(data, len(data), max_message, max_fragments)
        want_events, want_codes = _expected(specs, max_message, max_fragments)
        assert got == code and events == want_events
        assert (want_codes is None) if code is None else (code in want_codes)


@pytest.mark.parametrize("size, length_bytes", [
    (125, 0), (125, 2), (126, 2), (126, 8), (0xFFFF, 2), (0xFFFF, 8), (0x10000, 8),
])
def test_length_encodings_at_their_boundaries(size, length_bytes):
    """Each length at the edge of its encoding, minimal or one size too long: the same verdict from both."""
    specs = [Spec(BINARY, _filler(size), length_bytes=length_bytes)]
    data = specs[0].encode()
    for piece in (1 << 20, 7):
        events, got = _ours(data, piece, 1 << 17, 64)
        want_events, want_codes = _expected(specs, 1 << 17, 64)
        assert events == want_events and (got is None if want_codes is None else got in want_codes)
    assert (got is None) == (length_bytes == (0 if size < 126 else 2 if size <= 0xFFFF else 8))


def test_a_text_frame_inside_a_binary_message_is_a_protocol_error_first():
    """Found by the comparison above: a TEXT frame while a fragmented binary message waits for its continuation is a
    broken frame sequence (1002, as wsproto says), not unsupported data (1003)."""
    from chorus.server._wsframe import CloseCode, FrameReader, WebSocketError

    def frame(opcode: int, fin: bool) -> bytes:
        return bytes([(0x80 if fin else 0) | opcode, 0x80]) + b"\0\0\0\0"  # masked, empty payload

    reader = FrameReader(max_message_bytes=200, max_fragments=4)
    reader.receive_data(frame(2, False) + frame(1, False))
    with pytest.raises(WebSocketError) as info:
        for _ in range(3):  # the first frame starts the message (or is NEED_DATA); the second breaks it
            reader.next_event()
    assert info.value.code == CloseCode.PROTOCOL_ERROR
