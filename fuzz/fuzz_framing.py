"""Coverage-guided fuzzing of Chorus framing and body parsing (spec/PROTOCOL.md §2-§5, §8).

INVARIANT. Any byte string, fed to a ``proto.Connection`` whole or cut into
arbitrary pieces (the cut points come from the fuzz input), followed by EOF:

1. yields valid events and then ``ConnectionClosed``, or raises
   ``RemoteProtocolError`` with an ``ErrorCode`` -- never any other exception,
   and the error sticks (every later ``next_event`` raises it again);
2. never buffers past one legal frame: whenever ``next_event`` returns ``NEED_DATA``,
   ``conn.buffered_bytes < conn.max_pending_bytes`` (the header plus the largest body the peer may send
   in the current state, spec §2.3);
3. gives the same events and the same outcome however the bytes were cut;
4. every decoded event re-encodes, ``decode(encode(event)) == event``, and an
   uncompressed frame re-encodes to exactly its own bytes (one encoding per value).

Both a SERVER-role connection (which answers HELLO with WELCOME and LOGIN,
REGISTER or RESUME with AUTH_OK, so inputs can reach every state) and a
CLIENT-role connection (which has sent HELLO) are driven, and every frame found
in the input is also decoded on its own with the stateless ``proto.decode`` and
checked against the construct declarations in ``proto._wire``.

Input layout: byte 0 chooses how the rest is cut (see ``_chunks``); bytes 1..
are what the peer sent.

    python fuzz/fuzz_framing.py -max_total_time=60 fuzz/corpus     # or: make fuzz
    python fuzz/make_corpus.py                                     # rewrite the seeds

``check`` is also imported by tests/test_fuzz_short.py, which needs no atheris.
"""
from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

if __name__ == "__main__":
    import atheris

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a bare checkout
    with atheris.instrument_imports(include=["chorus", "construct"]):  # atheris matches top-level packages
        from chorus import proto
        from chorus.proto import _wire
else:
    from chorus import proto
    from chorus.proto import _wire

from chorus.proto import (
    CLIENT,
    HEADER_BYTES,
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PROTOCOL_VERSION,
    SERVER,
    Connection,
    ConnectionClosed,
    ErrorCode,
    FrameType,
    RemoteProtocolError,
    State,
)
from chorus.proto._state import TRANSITIONS, next_state

#: Receive limit of the stateful connections: small, so that inputs of a few KB test the buffer bound,
#: yet above 512 so that a compressed frame (its body >= 512 bytes uncompressed) can get through.
MAX_FRAME_BYTES = 600
#: Receive limit of the stateless decode: larger, so big seeds (1000-item arrays) still parse.
DECODE_MAX_FRAME_BYTES = 1 << 16

_WELCOME = proto.Welcome(PROTOCOL_VERSION, "fuzz", MAX_FRAME_BYTES, 4096, 15000, 50, 100, 100, 100)
#: What AUTH_OK answers: the frames a client may send before it is authenticated and never after (spec §8).
_AUTH = set(TRANSITIONS[(State.UNAUTHENTICATED, CLIENT)]) - set(TRANSITIONS[(State.AUTHENTICATED, CLIENT)])


def _chunks(payload: bytes, control: int) -> list[bytes]:
    """Cut ``payload`` into non-empty pieces as ``control`` says (b"" would mean EOF)."""
    mode, arg = control & 3, control >> 2
    if mode == 0:
        sizes = None
    elif mode == 1:
        sizes = [1]
    elif mode == 2:
        sizes = [arg + 1]  # fixed pieces of 1..64 bytes
    else:
        rng = random.Random(control)
        sizes = [rng.randint(1, 2 * HEADER_BYTES + arg) for _ in range(16)]
    if not payload:
        return []
    if sizes is None:
        return [payload]
    out, pos, i = [], 0, 0
    while pos < len(payload):
        out.append(payload[pos:pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return out


def _server() -> Connection:
    return Connection(SERVER, max_frame_bytes=MAX_FRAME_BYTES)


def _client() -> Connection:
    conn = Connection(CLIENT, max_frame_bytes=MAX_FRAME_BYTES)
    conn.send(proto.Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, "fuzz"))
    return conn


def _answer(conn: Connection, event) -> None:
    """What a real server says back, so that the input can walk the whole state machine."""
    if conn.our_role is not SERVER:
        return
    if event.FRAME is FrameType.HELLO:
        version = min(event.max_version, PROTOCOL_VERSION)  # the newest both speak (spec §6)
        if version < max(event.min_version, MIN_PROTOCOL_VERSION):
            return  # none: a real server refuses; this one leaves the input to walk into WRONG_STATE
        reply = dataclasses.replace(_WELCOME, version=version, request_id=event.request_id)
    elif event.FRAME in _AUTH:
        reply = proto.AuthOk("fuzz", "t" * 43, 0, request_id=event.request_id)
    elif event.FRAME is FrameType.PING:
        reply = event.response()
    else:
        return
    if next_state(conn.state, SERVER, reply.FRAME) is not None:
        conn.send(reply)


def _check_event(event) -> None:
    """Invariant 4 for one decoded event."""
    assert isinstance(event, proto.Event) and type(event) is proto.EVENT_TYPES[event.FRAME], event
    try:
        again = proto.decode(proto.encode(event))
        plain = proto.decode(proto.encode(event, compress_threshold=None))
    except proto.ProtocolError as exc:  # not the peer's fault: ours
        raise AssertionError(f"{event!r} does not survive re-encoding: {exc!r}") from exc
    assert again == event and plain == event, (event, again, plain)


def _run(conn: Connection, chunks: list[bytes]):
    """Feed ``chunks`` then EOF; return (events, outcome) where outcome is "closed" or an ErrorCode."""
    events = []
    try:
        for chunk in chunks + [b""]:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    assert chunk, "NEED_DATA after EOF"
                    # At most one frame's worth of the largest frame legal now (293 bytes before AUTH_OK).
                    assert conn.buffered_bytes < conn.max_pending_bytes, f"buffered {conn.buffered_bytes}"
                    break
                if isinstance(event, ConnectionClosed):
                    assert chunk == b"" and conn.buffered_bytes == 0
                    return events, "closed"
                _check_event(event)
                events.append(event)
                _answer(conn, event)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode), exc.code
        try:
            conn.next_event()
        except RemoteProtocolError as again:
            assert again is exc, (again, exc)
        else:
            raise AssertionError("a protocol error did not stick")
        return events, exc.code
    raise AssertionError("EOF was fed but next_event never said ConnectionClosed")


def _frames(payload: bytes):
    """Cut ``payload`` at the header lengths it claims (the last piece may be short)."""
    pos = 0
    while pos < len(payload):
        end = pos + HEADER_BYTES + (int.from_bytes(payload[pos:pos + 4], "big") if len(payload) - pos >= 4 else 0)
        yield payload[pos:end]
        pos = end


def _check_frame(frame: bytes) -> None:
    """Stateless decode of one candidate frame: an event that agrees with ``_wire``, or RemoteProtocolError."""
    try:
        event = proto.decode(frame, max_frame_bytes=DECODE_MAX_FRAME_BYTES)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode), exc.code
        return
    _check_event(event)
    assert frame[4] == event.FRAME and int.from_bytes(frame[6:10], "big") == event.request_id
    if frame[5] == 0:  # uncompressed: there is exactly one encoding of each event
        assert proto.encode(event, compress_threshold=None) == frame, (event, frame)
        checked = _wire.parse_body(event.FRAME, frame[HEADER_BYTES:])  # construct's path, not a fast one
        assert checked == dataclasses.replace(event, request_id=0), (checked, event)


def check(data: bytes) -> None:
    """Assert the invariant above for one input; raises AssertionError (or the stray exception) if broken."""
    if not data:
        return
    control, payload = data[0], data[1:]
    chunks = _chunks(payload, control)
    assert b"".join(chunks) == payload and all(chunks)
    for make in (_server, _client):
        whole = _run(make(), [payload] if payload else [])
        cut = _run(make(), chunks)
        assert whole == cut, (make.__name__, whole, cut)
    for frame in _frames(payload):
        _check_frame(frame)
    _check_frame(payload)


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    check(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
