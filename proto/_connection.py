"""Sans-IO framing and state: bytes in, events out (spec/PROTOCOL.md §2, §4, §8).

A ``Connection`` never touches a socket. Feed it what the transport received
with ``receive_data`` (``b""`` for EOF), pull events with ``next_event`` until it
returns ``NEED_DATA``, and turn events into bytes with ``send``.

The header is read first and judged before the body is buffered (spec §2.3):
a declared length over ``max_frame_bytes``, an unknown type, unknown flag bits,
a frame illegal in the current state, or a length over the largest body that
frame type can legally have (``_wire.LARGEST_BODY_BYTES``, or lz4's worst case of
it for a compressed frame) raise ``RemoteProtocolError`` at once. So once
``next_event`` has returned ``NEED_DATA`` the buffer holds less than
``max_pending_bytes``: one header plus the largest frame the peer may send in the
current state. Before AUTH_OK that is a few hundred bytes, whatever
``max_frame_bytes`` says; a transport that reads at most that many bytes (or a
fixed ``read_size``) between calls therefore bounds a connection's memory.
"""
from __future__ import annotations

import struct

import lz4.block
from construct import ConstructError

from . import _events as ev
from ._const import (
    ABSOLUTE_MAX_FRAME_BYTES,
    COMPRESS_THRESHOLD_BYTES,
    COMPRESSED_PREFIX_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    KNOWN_FLAGS,
    ErrorCode,
    Flags,
    FrameType,
)
from . import _fast, _wire
from ._errors import LocalProtocolError, RemoteProtocolError
from ._state import TRANSITIONS, Role, State, next_state
from ._wire import LARGEST_BODY_BYTES, FieldError, largest_compressed_length

_HEADER = struct.Struct(">IBBI")  # same layout as _wire.HEADER; a test holds them equal
_COMPRESSED = int(Flags.COMPRESSED)

#: type byte → (frame type, largest body, largest ``length`` when compressed): one lookup per header.
_FRAMES: dict[int, tuple[FrameType, int, int]] = {
    int(t): (t, LARGEST_BODY_BYTES[t], largest_compressed_length(LARGEST_BODY_BYTES[t])) for t in FrameType
}


def _largest_length(frames) -> int:
    """The largest ``length`` any of ``frames`` may have on the wire, compressed or not (0 for none)."""
    return max((max(_FRAMES[t][1], _FRAMES[t][2]) for t in frames), default=0)


#: (state, sender) → the largest ``length`` of a frame that sender may send in that state.
_LARGEST_LENGTH_IN: dict[tuple[State, Role], int] = {
    key: _largest_length(moves) for key, moves in TRANSITIONS.items()
}
_LARGEST_LENGTH_ANY = _largest_length(FrameType)


class _Sentinel:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Returned by ``next_event`` when a whole frame is not buffered yet.
NEED_DATA = _Sentinel("NEED_DATA")


def encode(
    event: ev.Event,
    *,
    max_frame_bytes: int = ABSOLUTE_MAX_FRAME_BYTES,
    compress_threshold: int | None = COMPRESS_THRESHOLD_BYTES,
) -> bytes:
    """Encode one event as a whole frame, with no state check.

    This is what a broadcast uses to encode a frame once for every subscriber.
    Bodies of at least ``compress_threshold`` bytes are lz4-compressed when that
    makes them smaller (None turns compression off).
    Raises ``LocalProtocolError`` when a field is out of range or the frame is
    larger than ``max_frame_bytes``.
    """
    try:
        body = _fast.build_body(event)
    except (_fast.Fallback, KeyError, AttributeError):
        try:
            body = _wire.build_body(event)
        except (ConstructError, TypeError, AttributeError, ValueError, KeyError) as exc:
            raise LocalProtocolError(f"cannot encode {type(event).__name__}: {exc}") from None
    if len(body) > max_frame_bytes:  # the limit binds the uncompressed body too (spec §4)
        raise LocalProtocolError(f"{type(event).__name__} body of {len(body)} bytes > {max_frame_bytes}",
                                 ErrorCode.FRAME_TOO_LARGE)
    flags = 0
    if compress_threshold is not None and len(body) >= compress_threshold:
        packed = lz4.block.compress(body, store_size=False)
        if len(packed) + COMPRESSED_PREFIX_BYTES < len(body):
            body = len(body).to_bytes(COMPRESSED_PREFIX_BYTES, "big") + packed
            flags = Flags.COMPRESSED
    if len(body) > max_frame_bytes:
        raise LocalProtocolError(f"{type(event).__name__} frame of {len(body)} bytes > {max_frame_bytes}",
                                 ErrorCode.FRAME_TOO_LARGE)
    try:
        return _HEADER.pack(len(body), event.FRAME, flags, event.request_id) + body
    except struct.error:
        raise LocalProtocolError(f"request_id {event.request_id!r} is not a u32") from None


def _decompress(body: bytes, ftype: FrameType, largest: int, max_frame_bytes: int) -> bytes:
    """The uncompressed body of a COMPRESSED ``ftype`` frame (spec §4).

    Raises ``RemoteProtocolError`` ``DECOMPRESSION_FAILED`` when the declared size
    is over ``max_frame_bytes`` or over ``largest`` (the largest ``ftype`` body),
    both checked before decompressing, or when the block is corrupt.
    """
    if len(body) < COMPRESSED_PREFIX_BYTES:
        raise RemoteProtocolError("compressed frame without its length", ErrorCode.DECOMPRESSION_FAILED)
    size = int.from_bytes(body[:COMPRESSED_PREFIX_BYTES], "big")
    if size > max_frame_bytes:
        raise RemoteProtocolError(f"compressed body would expand to {size} bytes > {max_frame_bytes}",
                                  ErrorCode.DECOMPRESSION_FAILED)
    if size > largest:
        raise RemoteProtocolError(f"compressed {ftype.name} body would expand to {size} bytes > {largest}, "
                                  f"the largest {ftype.name}", ErrorCode.DECOMPRESSION_FAILED)
    try:
        raw = lz4.block.decompress(body[COMPRESSED_PREFIX_BYTES:], uncompressed_size=size)
    except lz4.block.LZ4BlockError:
        raise RemoteProtocolError("corrupt lz4 block", ErrorCode.DECOMPRESSION_FAILED) from None
    if len(raw) != size:
        raise RemoteProtocolError("lz4 block length mismatch", ErrorCode.DECOMPRESSION_FAILED)
    return raw


def decode(data: bytes, *, max_frame_bytes: int = ABSOLUTE_MAX_FRAME_BYTES) -> ev.Event:
    """Decode exactly one whole frame with no state check (spec examples, tools, load generators).

    Raises ``RemoteProtocolError`` for anything but one valid frame.
    """
    conn = Connection(Role.SERVER, max_frame_bytes=max_frame_bytes)
    conn._stateless = True  # every frame type is accepted
    conn.receive_data(data)
    conn.receive_data(b"")
    event = conn.next_event()
    if isinstance(event, ev.ConnectionClosed) or conn.buffered_bytes:
        raise RemoteProtocolError("expected exactly one frame")
    return event


def _too_large(ftype: FrameType, length: int, compressed: int) -> RemoteProtocolError:
    name = ftype.name
    if compressed:
        return RemoteProtocolError(
            f"compressed {name} body of {length} bytes > {_FRAMES[ftype][2]}, the largest compressed {name} "
            f"(4 + lz4's worst case for {_FRAMES[ftype][1]} bytes)", ErrorCode.FRAME_TOO_LARGE)
    return RemoteProtocolError(f"{name} body of {length} bytes > {_FRAMES[ftype][1]}, the largest {name}",
                               ErrorCode.FRAME_TOO_LARGE)


def _checked_parse(ftype: FrameType, body: bytes) -> ev.Event:
    try:
        return _wire.parse_body(ftype, body)
    except FieldError as exc:
        raise RemoteProtocolError(f"{ftype.name}: {exc.args[0]}", exc.code) from None
    except ConstructError as exc:
        raise RemoteProtocolError(f"{ftype.name}: malformed body ({type(exc).__name__})") from None


class Connection:
    """One side of a Chorus connection.

    ``max_frame_bytes`` caps frames we accept; frames we send are capped by the
    peer's limit, which a client learns from WELCOME.
    """

    __slots__ = ("our_role", "their_role", "state", "max_frame_bytes", "peer_max_frame_bytes", "compress_threshold",
                 "we_said_bye", "they_said_bye", "_buf", "_pos", "_eof", "_error", "_stateless")

    def __init__(
        self,
        our_role: Role,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        compress_threshold: int | None = COMPRESS_THRESHOLD_BYTES,
    ):
        if not 0 < max_frame_bytes <= ABSOLUTE_MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be in 1..{ABSOLUTE_MAX_FRAME_BYTES}")
        self.our_role = our_role
        self.their_role = Role.SERVER if our_role is Role.CLIENT else Role.CLIENT
        self.state = State.HANDSHAKE
        self.max_frame_bytes = max_frame_bytes
        self.peer_max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        self.compress_threshold = compress_threshold
        self.we_said_bye = False
        self.they_said_bye = False
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._stateless = False

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet turned into events."""
        return len(self._buf) - self._pos

    @property
    def max_pending_bytes(self) -> int:
        """The most bytes one frame from the peer can take now, header included (spec §2.3, §10).

        ``HEADER_BYTES`` plus the largest ``length`` (compressed or not) of any
        frame type the peer may send in the current state, capped by
        ``max_frame_bytes``; just ``HEADER_BYTES`` once the peer has said BYE.
        Whenever ``next_event`` returns ``NEED_DATA``, ``buffered_bytes`` is below
        this, so a transport can size its reads by it: before AUTH_OK it is a
        few hundred bytes.
        """
        if self._stateless:
            largest = _LARGEST_LENGTH_ANY
        elif self.they_said_bye:
            largest = 0
        else:
            largest = _LARGEST_LENGTH_IN.get((self.state, self.their_role), 0)
        return HEADER_BYTES + min(largest, self.max_frame_bytes)

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the peer closed its side.

        Raises ``LocalProtocolError`` for data after EOF.
        """
        if data:
            if self._eof:
                raise LocalProtocolError("received data after EOF")
            self._buf += data
        else:
            self._eof = True

    def next_event(self):
        """The next event, ``NEED_DATA``, or ``ConnectionClosed`` once EOF is reached.

        Raises ``RemoteProtocolError`` (with the ``ErrorCode`` to send back) when
        the peer broke the protocol; every later call raises it again.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self):
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < HEADER_BYTES:
            if not self._eof:
                return NEED_DATA
            if available:
                raise RemoteProtocolError("connection closed inside a frame header")
            return ev.ConnectionClosed()
        length, type_byte, flags, request_id = _HEADER.unpack_from(buf, pos)
        if length > self.max_frame_bytes:
            raise RemoteProtocolError(f"frame length {length} > {self.max_frame_bytes}", ErrorCode.FRAME_TOO_LARGE)
        frame = _FRAMES.get(type_byte)
        if frame is None:
            raise RemoteProtocolError(f"unknown frame type 0x{type_byte:02x}", ErrorCode.UNKNOWN_FRAME_TYPE)
        if flags & ~KNOWN_FLAGS:
            raise RemoteProtocolError(f"unknown flag bits 0x{flags:02x}", ErrorCode.INVALID_FIELD)
        ftype, largest, largest_compressed = frame
        after = self._check(self.their_role, ftype, RemoteProtocolError)
        compressed = flags & _COMPRESSED
        if length > (largest_compressed if compressed else largest):
            raise _too_large(ftype, length, compressed)
        end = pos + HEADER_BYTES + length
        if len(buf) < end:
            if self._eof:
                raise RemoteProtocolError("connection closed inside a frame body")
            return NEED_DATA
        body = bytes(buf[pos + HEADER_BYTES:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > 65536 and end * 2 > len(buf):
            del buf[:end]  # compact rarely, so that a stream of small frames stays O(n)
            self._pos = 0
        else:
            self._pos = end
        if compressed:
            body = _decompress(body, ftype, largest, self.max_frame_bytes)
        try:
            event = _fast.parse_body(ftype, body)
        except _fast.Fallback:
            event = _checked_parse(ftype, body)
        if request_id:
            object.__setattr__(event, "request_id", request_id)
        self._advance(self.their_role, ftype, after)
        if ftype is FrameType.WELCOME and self.our_role is Role.CLIENT:
            self.peer_max_frame_bytes = min(event.max_frame_bytes, ABSOLUTE_MAX_FRAME_BYTES)
        return event

    def send(self, event: ev.Event) -> bytes:
        """The bytes of ``event`` as a frame; raises ``LocalProtocolError`` if illegal now."""
        after = self._check(self.our_role, event.FRAME, LocalProtocolError)
        data = encode(event, max_frame_bytes=self.peer_max_frame_bytes, compress_threshold=self.compress_threshold)
        self._advance(self.our_role, event.FRAME, after)
        return data

    def _check(self, sender: Role, ftype: FrameType, error: type) -> State:
        if self._stateless:
            return self.state
        said_bye = self.we_said_bye if sender is self.our_role else self.they_said_bye
        after = None if said_bye else next_state(self.state, sender, ftype)
        if after is None:
            raise error(f"{sender.value} may not send {ftype.name} in state {self.state.name}"
                        + (" after BYE" if said_bye else ""), ErrorCode.WRONG_STATE)
        return after

    def _advance(self, sender: Role, ftype: FrameType, after: State) -> None:
        self.state = after
        if ftype is FrameType.BYE:
            if sender is self.our_role:
                self.we_said_bye = True
            else:
                self.they_said_bye = True
