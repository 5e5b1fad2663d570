"""WebSocket frames, server side and sans-IO (RFC 6455 §5; spec/PROTOCOL.md §1 "WebSocket").

Chorus carries one frame per binary WebSocket message, so the bridge needs only
a small, strict subset of RFC 6455: no extensions (the handshake negotiates
none, so any RSV bit is an error), masked client frames only, minimal length
encodings, control frames of at most 125 bytes and never fragmented.

``FrameReader`` is bytes in, events out, like ``proto.Connection``: feed it with
``receive_data`` and pull ``BinaryMessage``/``Ping``/``Pong``/``Close`` from
``next_event`` until it returns ``NEED_DATA``. Each frame is judged from its
header before any of its payload is kept (STYLE.md §6): its length against
``max_message_bytes`` for the whole, possibly fragmented, message, and a
continuation against ``max_fragments``. A text message is refused from its
first header too.

Memory per message is its own bytes: a data frame's payload is unmasked
straight into one ``bytearray`` for the message as it arrives (a partly received
frame is consumed too, remembering where in the 4-byte mask it stopped), so the
receive buffer never holds more than one read plus a header or a control frame,
and a fragment costs no object of its own. The finished message hands that
``bytearray`` over without a copy. ``BinaryMessage.frames`` says how many frames
it took, so the bridge can charge each one to the connection's rate budget.

Outgoing frames are built here as well (``binary_header``, ``control_frame``):
server frames are unmasked, so the WebSocket frame of a broadcast is the same
bytes for every subscriber and can be built once (DESIGN.md "Fan-out").

wsproto could parse these frames, but its frame layer hands out payload chunks
without the declared length, so a size limit could only be applied after
buffering. tests/test_wsframe_diff.py checks this reader against wsproto's
server side on generated valid and invalid input; tests/test_websocket.py against
wsproto's client-side encoder.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from chorus.proto import NEED_DATA

__all__ = [
    "MAX_FRAGMENTS", "NEED_DATA", "BinaryMessage", "Close", "CloseCode", "FrameReader", "Opcode", "Ping", "Pong",
    "WebSocketError", "binary_header", "close_frame", "control_frame", "wrap_binary",
]

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")

#: Frames one message may take. Browsers, Node's ws, Python's websockets and wsproto send a message as one frame
#: unless the application streams it; Go's gorilla client splits at its 4 KiB write buffer, so 64 frames still
#: carry 256 KiB, far above any legal client frame but a SYNC of 1000 positions (about 40 KiB). A frame costs a
#: header parse and a rate token whatever its size; without a cap, 1-byte fragments made a message cost ~57 bytes
#: of memory per byte.
MAX_FRAGMENTS = 64


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """RFC 6455 §7.4.1 status codes the bridge sends or understands."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never on the wire: "the close frame had no code"
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013


class WebSocketError(Exception):
    """The peer broke RFC 6455 or a bridge limit; ``code`` is the close code to answer with."""

    def __init__(self, message: str, code: CloseCode = CloseCode.PROTOCOL_ERROR):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    data: bytes | bytearray
    frames: int = field(default=1, compare=False)  # how many frames carried it (1 = not fragmented)


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


_XOR = [bytes(a ^ b for a in range(256)) for b in range(256)]
_SMALL = 1024  # below this one big-integer XOR is quicker than four translate() passes


def _append_unmasked(out: bytearray, data, key: bytes) -> None:
    """Append ``data`` XOR the repeated 4-byte ``key`` to ``out``, in C and without per-byte objects."""
    if len(data) < _SMALL:
        out += _unmasked(data, key)
        return
    start = len(out)
    out += data
    # Every fourth byte shares a key byte: one translate() per key byte over an extended slice, in place.
    for i in range(4):
        out[start + i::4] = out[start + i::4].translate(_XOR[key[i]])


def _unmasked(data, key: bytes) -> bytes | bytearray:
    """``data`` (bytes-like) XOR the repeated 4-byte ``key``."""
    n = len(data)
    if n >= _SMALL:
        out = bytearray()
        _append_unmasked(out, data, key)
        return out
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


class FrameReader:
    """Parses what a WebSocket client sends; raises ``WebSocketError`` on any violation.

    ``max_message_bytes`` and ``max_fragments`` may be changed between calls; each
    frame is judged against the values at the moment its header is read.
    """

    def __init__(self, max_message_bytes: int, max_fragments: int = MAX_FRAGMENTS):
        self.max_message_bytes = max_message_bytes
        self.max_fragments = max_fragments
        self._buf = bytearray()
        self._pos = 0  # start of the unparsed bytes (compacting per frame would be quadratic)
        self._message: bytearray | None = None  # the binary message in progress, unmasked
        self._frames = 0  # frames of it so far
        self._left = 0  # payload bytes of the current data frame still to come
        self._key = b""  # its mask, rotated to where the next payload byte falls
        self._fin = False
        self._error: WebSocketError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: unparsed input plus the message in progress."""
        return len(self._buf) - self._pos + (len(self._message) if self._message is not None else 0)

    @property
    def partial(self) -> bool:
        """Part of a frame or of a fragmented message is held (the bridge gives it a deadline)."""
        return self._message is not None or self._pos < len(self._buf)

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_event(self):
        """The next ``BinaryMessage``, ``Ping``, ``Pong`` or ``Close``, or ``NEED_DATA``.

        Raises ``WebSocketError`` (again on every later call) when the client broke the protocol.
        """
        if self._error is not None:
            raise self._error
        try:
            while True:
                if self._left:
                    event = self._payload()
                else:
                    event = self._next_frame()
                if event is not None:
                    return event
        except WebSocketError as exc:
            self._error = exc
            self._buf = bytearray()
            self._pos = 0
            self._message = None
            raise

    def _compact(self) -> None:
        buf, start = self._buf, self._pos
        if start == len(buf):
            buf.clear()
        else:
            del buf[:start]
        self._pos = 0

    def _need_data(self):
        # What is left is at most a header or a control frame: moving it to the front is cheap.
        if self._pos:
            self._compact()
        return NEED_DATA

    def _payload(self):
        """Consume what has arrived of the current data frame's payload: an event, NEED_DATA or None."""
        buf, start = self._buf, self._pos
        take = min(self._left, len(buf) - start)
        if take:
            with memoryview(buf) as view:
                _append_unmasked(self._message, view[start:start + take], self._key)
            self._pos = start + take
            self._left -= take
            turn = take % 4
            self._key = self._key[turn:] + self._key[:turn]
        if self._left:
            self._compact()  # everything was consumed: the buffer holds at most one read
            return NEED_DATA
        return self._frame_done()

    def _frame_done(self):
        if not self._fin:
            return None
        message, frames = self._message, self._frames
        self._message = None
        self._frames = 0
        return BinaryMessage(message, frames)

    def _next_frame(self):
        """One frame header (and a control frame's payload): an event, NEED_DATA, or None to keep going."""
        buf, start = self._buf, self._pos
        have = len(buf) - start
        if have < 2:
            return self._need_data()
        b0, b1 = buf[start], buf[start + 1]
        if b0 & 0x70:
            raise WebSocketError("RSV bits set without a negotiated extension")
        if not b1 & 0x80:
            raise WebSocketError("client frame is not masked")
        fin = bool(b0 & 0x80)
        try:
            opcode = Opcode(b0 & 0x0F)
        except ValueError:
            raise WebSocketError(f"unknown opcode 0x{b0 & 0x0F:x}") from None
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            if have < 4:
                return self._need_data()
            (length,) = _U16.unpack_from(buf, start + 2)
            if length < 126:
                raise WebSocketError("non-minimal payload length")
            pos = 4
        elif length == 127:
            if have < 10:
                return self._need_data()
            (length,) = _U64.unpack_from(buf, start + 2)
            if length <= 0xFFFF or length >> 63:
                raise WebSocketError("non-minimal or invalid payload length")
            pos = 10
        message = self._message
        if opcode >= Opcode.CLOSE:
            if not fin or length > 125:
                raise WebSocketError("control frames are single frames of at most 125 bytes")
        elif (opcode is Opcode.CONTINUATION) != (message is not None):
            # Checked first, as RFC 6455 §5.4 orders it (and wsproto does): a TEXT frame inside a binary message is
            # a broken frame sequence (1002) before it is unwanted data (1003).
            raise WebSocketError("continuation frame outside a message" if message is None
                                 else "new message before the previous one ended")
        elif opcode is Opcode.TEXT:
            raise WebSocketError("text messages are not used: one binary message = one Chorus frame",
                                 CloseCode.UNSUPPORTED_DATA)
        else:
            size = len(message) if message is not None else 0
            if size + length > self.max_message_bytes:
                raise WebSocketError(f"message of more than {self.max_message_bytes} bytes",
                                     CloseCode.MESSAGE_TOO_BIG)
            if self._frames >= self.max_fragments:
                raise WebSocketError(f"message in more than {self.max_fragments} frames",
                                     CloseCode.POLICY_VIOLATION)
        pos += start
        end = pos + 4 + length
        if opcode < Opcode.CLOSE:  # a data frame: its payload is consumed as it arrives
            if fin and message is None and len(buf) >= end:  # the usual case: a whole message in one frame
                with memoryview(buf) as view:
                    data = _unmasked(view[pos + 4:end], view[pos:pos + 4].tobytes())
                self._pos = end
                return BinaryMessage(data)
            if len(buf) < pos + 4:
                return self._need_data()
            self._key = bytes(buf[pos:pos + 4])
            self._pos = pos + 4
            if message is None:
                self._message = bytearray()
            self._frames += 1
            self._fin = fin
            self._left = length
            if length:
                return self._payload()
            return self._frame_done()
        if len(buf) < end:
            return self._need_data()
        with memoryview(buf) as view:
            payload = bytes(_unmasked(view[pos + 4:end], view[pos:pos + 4].tobytes()))
        self._pos = end
        if opcode is Opcode.PING:
            return Ping(payload)
        if opcode is Opcode.PONG:
            return Pong(payload)
        return _parse_close(payload)


_VALID_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(CloseCode.NO_STATUS, "")
    if len(payload) == 1:
        raise WebSocketError("close frame with a 1-byte payload")
    (code,) = _U16.unpack_from(payload)
    if code not in _VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        raise WebSocketError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError("close reason is not UTF-8", CloseCode.INVALID_DATA) from None
    return Close(code, reason)


def binary_header(length: int) -> bytes:
    """The header of an unmasked, final, binary frame of ``length`` payload bytes."""
    if length < 126:
        return bytes((0x82, length))
    if length <= 0xFFFF:
        return b"\x82\x7e" + _U16.pack(length)
    return b"\x82\x7f" + _U64.pack(length)


def wrap_binary(payload: bytes) -> bytes:
    """``payload`` as one unmasked binary message."""
    return binary_header(len(payload)) + payload


def control_frame(opcode: Opcode, payload: bytes = b"") -> bytes:
    if len(payload) > 125:
        raise ValueError("control frame payload over 125 bytes")
    return bytes((0x80 | opcode, len(payload))) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut (at a character boundary) to fit 125 bytes."""
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return control_frame(Opcode.CLOSE, _U16.pack(code) + text)
