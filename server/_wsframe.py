"""WebSocket frames, server side and sans-IO (RFC 6455 §5; spec/PROTOCOL.md §1 "WebSocket").

Chorus carries one frame per binary WebSocket message, so the bridge needs only
a small, strict subset of RFC 6455: no extensions (the handshake negotiates
none, so any RSV bit is an error), masked client frames only, minimal length
encodings, control frames of at most 125 bytes and never fragmented.

``FrameReader`` is bytes in, events out, like ``proto.Connection``: feed it with
``receive_data`` and pull ``BinaryMessage``/``Ping``/``Pong``/``Close`` from
``next_event`` until it returns ``NEED_DATA``. Each frame's length is judged
from its header, before its payload is buffered, against ``max_message_bytes``
for the whole (possibly fragmented) message: an oversize message costs nothing
(STYLE.md §6). A text message is refused from its first header too.

Outgoing frames are built here as well (``binary_header``, ``control_frame``):
server frames are unmasked, so the WebSocket frame of a broadcast is the same
bytes for every subscriber and can be built once (DESIGN.md "Fan-out").

wsproto could parse these frames, but its frame layer hands out payload chunks
without the declared length, so a size limit could only be applied after
buffering; this reader is also what the fuzz-style tests compare against
wsproto's client.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from proto import NEED_DATA

__all__ = [
    "NEED_DATA", "BinaryMessage", "Close", "CloseCode", "FrameReader", "Opcode", "Ping", "Pong", "WebSocketError",
    "binary_header", "close_frame", "control_frame", "wrap_binary",
]

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


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
    data: bytes


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


def _unmask(data: bytes, key: bytes) -> bytes:
    # One big-integer XOR is linear and runs in C, unlike a per-byte loop.
    n = len(data)
    if not n:
        return b""
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


class FrameReader:
    """Parses what a WebSocket client sends; raises ``WebSocketError`` on any violation."""

    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()
        self._pos = 0  # start of the unparsed bytes (compacting per frame would be quadratic)
        self._parts: list[bytes] | None = None  # fragments of the binary message in progress
        self._size = 0  # its bytes so far
        self._error: WebSocketError | None = None

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf) - self._pos + self._size

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
                event = self._next_frame()
                if event is not None:
                    return event
        except WebSocketError as exc:
            self._error = exc
            self._buf.clear()
            self._pos = 0
            self._parts = None
            raise

    def _next_frame(self):
        """One frame: an event, NEED_DATA, or None for a non-final fragment (keep going)."""
        buf, start = self._buf, self._pos
        have = len(buf) - start
        if have < 2:
            if start:
                del buf[:start]
                self._pos = 0
            return NEED_DATA
        b0, b1 = buf[start], buf[start + 1]
        if b0 & 0x70:
            raise WebSocketError("RSV bits set without a negotiated extension")
        if not b1 & 0x80:
            raise WebSocketError("client frame is not masked")
        fin = b0 & 0x80
        try:
            opcode = Opcode(b0 & 0x0F)
        except ValueError:
            raise WebSocketError(f"unknown opcode 0x{b0 & 0x0F:x}") from None
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            if have < 4:
                return NEED_DATA
            (length,) = _U16.unpack_from(buf, start + 2)
            if length < 126:
                raise WebSocketError("non-minimal payload length")
            pos = 4
        elif length == 127:
            if have < 10:
                return NEED_DATA
            (length,) = _U64.unpack_from(buf, start + 2)
            if length <= 0xFFFF or length >> 63:
                raise WebSocketError("non-minimal or invalid payload length")
            pos = 10
        if opcode >= Opcode.CLOSE:
            if not fin or length > 125:
                raise WebSocketError("control frames are single frames of at most 125 bytes")
        elif opcode is Opcode.TEXT:
            raise WebSocketError("text messages are not used: one binary message = one Chorus frame",
                                 CloseCode.UNSUPPORTED_DATA)
        elif (opcode is Opcode.CONTINUATION) != (self._parts is not None):
            raise WebSocketError("continuation frame outside a message" if self._parts is None
                                 else "new message before the previous one ended")
        elif self._size + length > self.max_message_bytes:
            raise WebSocketError(f"message of more than {self.max_message_bytes} bytes",
                                 CloseCode.MESSAGE_TOO_BIG)
        pos += start
        end = pos + 4 + length
        if len(buf) < end:
            if start > 65536:
                del buf[:start]
                self._pos = 0
            return NEED_DATA
        payload = _unmask(bytes(buf[pos + 4:end]), bytes(buf[pos:pos + 4]))
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        if opcode is Opcode.PING:
            return Ping(payload)
        if opcode is Opcode.PONG:
            return Pong(payload)
        if opcode is Opcode.CLOSE:
            return _parse_close(payload)
        if fin and self._parts is None:
            return BinaryMessage(payload)
        if self._parts is None:
            self._parts = []
        self._parts.append(payload)
        self._size += length
        if not fin:
            return None
        data = b"".join(self._parts)
        self._parts = None
        self._size = 0
        return BinaryMessage(data)


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
