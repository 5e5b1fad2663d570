"""Sans-IO framing, state and versions: bytes in, events out (spec/PROTOCOL.md §2, §4, §6, §8).

A ``Connection`` never touches a socket. Feed it what the transport received
with ``receive_data`` (``b""`` for EOF), pull events with ``next_event`` until it
returns ``NEED_DATA``, and turn events into bytes with ``send``.

The header is read first and judged before the body is buffered (spec §2.3):
a declared length over ``max_frame_bytes``, an unknown type (or one newer than
the negotiated version), unknown flag bits, a frame illegal in the current
state, or a length over the largest body that frame type can legally have
(``_wire.LARGEST_BODY_BYTES``, or lz4's worst case of it for a compressed frame)
raise ``RemoteProtocolError`` at once. So once ``next_event`` has returned
``NEED_DATA`` the buffer holds less than ``max_pending_bytes``: one header plus
the largest frame the peer may send in the current state. Before AUTH_OK that
is a few hundred bytes, whatever ``max_frame_bytes`` says; a transport that reads
at most that many bytes (or a fixed ``read_size``) between calls therefore bounds
a connection's memory.

Versions (spec §6). HELLO offers a range, WELCOME names the version chosen; the
connection records it in ``version`` when WELCOME passes (the server when it
sends it, the client when it receives it), after checking that it is in the
range offered and one this implementation speaks. From then on a frame type
newer than ``version`` does not exist for this connection: receiving one is
``UNKNOWN_FRAME_TYPE`` (what an older peer would answer), sending one raises
``LocalProtocolError``. Until WELCOME, ``version`` is ``MIN_PROTOCOL_VERSION``.
"""
from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import Final

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
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    ErrorCode,
    Flags,
    FrameType,
)
from . import _fast, _wire
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._state import TRANSITIONS, Role, State, next_state
from ._wire import LARGEST_BODY_BYTES, FieldError, largest_compressed_length

_HEADER = struct.Struct(">IBBI")  # same layout as _wire.HEADER; a test holds them equal
_COMPRESSED = int(Flags.COMPRESSED)

_Frame = tuple[FrameType, int, int]

#: type byte → (frame type, largest body, largest ``length`` when compressed): one lookup per header.
_FRAMES: dict[int, _Frame] = {
    int(t): (t, LARGEST_BODY_BYTES[t], largest_compressed_length(LARGEST_BODY_BYTES[t])) for t in FrameType
}
#: version → ``_FRAMES`` restricted to the frame types that version has (§6.2): a connection looks its
#: peer's type bytes up in the table of its negotiated version, so a newer type costs nothing to refuse.
_FRAMES_IN: dict[int, dict[int, _Frame]] = {
    version: {code: frame for code, frame in _FRAMES.items() if frame[0].version <= version}
    for version in range(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1)
}


def negotiate(min_version: int, max_version: int) -> int | None:
    """The version a server picks for HELLO(``min_version``, ``max_version``): the highest one both sides
    speak, or None when the ranges do not meet (spec §6.1; version 0 does not exist)."""
    version = min(max_version, PROTOCOL_VERSION)
    return version if version >= max(min_version, MIN_PROTOCOL_VERSION) else None


def _largest_length(frames: Iterable[FrameType]) -> int:
    """The largest ``length`` any of ``frames`` may have on the wire, compressed or not (0 for none)."""
    return max((max(_FRAMES[t][1], _FRAMES[t][2]) for t in frames), default=0)


#: (state, sender) → the largest ``length`` of a frame that sender may send in that state.
_LARGEST_LENGTH_IN: dict[tuple[State, Role], int] = {
    key: _largest_length(moves) for key, moves in TRANSITIONS.items()
}
_LARGEST_LENGTH_ANY = _largest_length(FrameType)


class _Sentinel(enum.Enum):
    """A one-member enum (PEP 484's sentinel), so that ``event is NEED_DATA`` narrows ``event`` to an ``Event``."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.name


#: Returned by ``next_event`` when a whole frame is not buffered yet.
NEED_DATA: Final = _Sentinel.NEED_DATA


def _field_error(name: str, exc: ConstructError) -> tuple[str, ErrorCode]:
    """One short line naming the frame (or value) and its field, and the code, for a construct failure."""
    where, reason = _wire.describe(exc)
    code = exc.code if isinstance(exc, FieldError) else ErrorCode.MALFORMED_FRAME
    return (f"{name}.{where}: {reason}" if where else f"{name}: {reason}"), code


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
        # Events are checked when made: only one changed behind the dataclass's back, or not an event, gets here.
        name = type(event).__name__
        try:
            body = _wire.build_body(event)
        except ConstructError as exc:
            message, code = _field_error(name, exc)
            raise LocalProtocolError(message, code) from None
        except (TypeError, AttributeError, ValueError, KeyError) as exc:
            raise LocalProtocolError(f"cannot encode {name}: {exc}") from None
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
        raise LocalProtocolError(f"{type(event).__name__}.request_id: {event.request_id!r} is not a u32",
                                 ErrorCode.INVALID_FIELD) from None


def _decompress(body: bytes, ftype: FrameType, largest: int, max_frame_bytes: int) -> bytes:
    """The uncompressed body of a COMPRESSED ``ftype`` frame (spec §4).

    Raises ``RemoteProtocolError`` ``DECOMPRESSION_FAILED`` when the declared size
    is over ``max_frame_bytes`` or over ``largest`` (the largest ``ftype`` body),
    both checked before decompressing, or when the block is corrupt.
    """
    name = ftype.name
    if len(body) < COMPRESSED_PREFIX_BYTES:
        raise RemoteProtocolError(f"{name}: compressed body without its length", ErrorCode.DECOMPRESSION_FAILED)
    size = int.from_bytes(body[:COMPRESSED_PREFIX_BYTES], "big")
    if size > max_frame_bytes:
        raise RemoteProtocolError(f"{name}: compressed body would expand to {size} bytes > {max_frame_bytes}",
                                  ErrorCode.DECOMPRESSION_FAILED)
    if size > largest:
        raise RemoteProtocolError(f"{name}: compressed body would expand to {size} bytes > {largest}, "
                                  f"the largest {name}", ErrorCode.DECOMPRESSION_FAILED)
    try:
        raw: bytes = lz4.block.decompress(body[COMPRESSED_PREFIX_BYTES:], uncompressed_size=size)
    except lz4.block.LZ4BlockError:
        raise RemoteProtocolError(f"{name}: corrupt lz4 block", ErrorCode.DECOMPRESSION_FAILED) from None
    if len(raw) != size:
        raise RemoteProtocolError(f"{name}: lz4 block length mismatch", ErrorCode.DECOMPRESSION_FAILED)
    return raw


def decode(data: bytes, *, max_frame_bytes: int = ABSOLUTE_MAX_FRAME_BYTES) -> ev.Event:
    """Decode exactly one whole frame with no state check, of any version (spec examples, tools, load generators).

    Raises ``RemoteProtocolError`` for anything but one valid frame.
    """
    conn = Connection(Role.SERVER, max_frame_bytes=max_frame_bytes)
    conn._stateless = True  # every frame type is accepted
    conn._frames = _FRAMES
    conn.version = PROTOCOL_VERSION
    conn.receive_data(data)
    conn.receive_data(b"")
    event = conn.next_event()
    if isinstance(event, ev.ConnectionClosed) or conn.buffered_bytes:
        raise RemoteProtocolError("expected exactly one frame")
    assert isinstance(event, ev.Event)
    return event


def _type_name(type_byte: int) -> str:
    """A header's type for an error message: its name if there is one."""
    frame = _FRAMES.get(type_byte)
    return frame[0].name if frame is not None else f"frame type 0x{type_byte:02x}"


def _too_large(ftype: FrameType, length: int, compressed: int) -> RemoteProtocolError:
    name = ftype.name
    if compressed:
        return RemoteProtocolError(
            f"{name}: compressed body of {length} bytes > {_FRAMES[ftype][2]}, the largest compressed {name} "
            f"(4 + lz4's worst case for {_FRAMES[ftype][1]} bytes)", ErrorCode.FRAME_TOO_LARGE)
    return RemoteProtocolError(f"{name}: body of {length} bytes > {_FRAMES[ftype][1]}, the largest {name}",
                               ErrorCode.FRAME_TOO_LARGE)


def _checked_parse(ftype: FrameType, body: bytes, request_id: int) -> ev.Event:
    """The event in ``body`` by construct's checked path; ``RemoteProtocolError`` naming the field if bad."""
    try:
        event = _wire.parse_body(ftype, body)
    except ConstructError as exc:
        message, code = _field_error(ftype.name, exc)
        raise RemoteProtocolError(message, code) from None
    object.__setattr__(event, "request_id", request_id)
    return event


class Connection:
    """One side of a Chorus connection.

    ``max_frame_bytes`` caps frames we accept; frames we send are capped by the
    peer's limit, which a client learns from WELCOME. ``version`` is the
    protocol version negotiated by HELLO and WELCOME (``MIN_PROTOCOL_VERSION``
    until WELCOME).
    """

    __slots__ = ("our_role", "their_role", "state", "_version", "max_frame_bytes", "peer_max_frame_bytes",
                 "compress_threshold", "we_said_bye", "they_said_bye", "_buf", "_pos", "_eof", "_error",
                 "_stateless", "_frames", "_offered")

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
        self._frames = _FRAMES_IN[MIN_PROTOCOL_VERSION]
        self._offered = (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)  # what HELLO offered, once it passed
        self.version = MIN_PROTOCOL_VERSION

    @property
    def version(self) -> int:
        """The negotiated protocol version (spec §6): ``MIN_PROTOCOL_VERSION`` until WELCOME."""
        return self._version

    @version.setter
    def version(self, version: int) -> None:
        if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
            raise ValueError(f"version must be in {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}")
        self._version = version
        if not self._stateless:
            self._frames = _FRAMES_IN[version]

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

    def next_event(self) -> ev.Event | _Sentinel:
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

    def _next_event(self) -> ev.Event | _Sentinel:
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
            raise RemoteProtocolError(
                f"{_type_name(type_byte)}: length {length} > max_frame_bytes {self.max_frame_bytes}",
                ErrorCode.FRAME_TOO_LARGE)
        frame = self._frames.get(type_byte)
        if frame is None:
            raise RemoteProtocolError(self._unknown_type(type_byte), ErrorCode.UNKNOWN_FRAME_TYPE)
        ftype, largest, largest_compressed = frame
        if flags & ~KNOWN_FLAGS:
            raise RemoteProtocolError(f"{ftype.name}: unknown flag bits 0x{flags:02x}", ErrorCode.INVALID_FIELD)
        after = self._check(self.their_role, ftype, RemoteProtocolError)
        compressed = flags & _COMPRESSED
        if length > (largest_compressed if compressed else largest):
            raise _too_large(ftype, length, compressed)
        end = pos + HEADER_BYTES + length
        if len(buf) < end:
            if self._eof:
                raise RemoteProtocolError(f"{ftype.name}: connection closed inside the body")
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
            event = _fast.parse_body(ftype, body, request_id)
        except _fast.Fallback:
            event = _checked_parse(ftype, body, request_id)
        if ftype is FrameType.HELLO or ftype is FrameType.WELCOME:
            self._negotiating(event, RemoteProtocolError)
            self._advance(self.their_role, ftype, after)
            self._negotiated(event)
        else:
            self._advance(self.their_role, ftype, after)
        return event

    def _unknown_type(self, type_byte: int) -> str:
        newer = _FRAMES.get(type_byte)
        if newer is None:
            return f"unknown frame type 0x{type_byte:02x}"
        ftype = newer[0]
        return (f"unknown frame type 0x{type_byte:02x} ({ftype.name} is version {ftype.version}; "
                f"this connection speaks version {self._version})")

    def send(self, event: ev.Event) -> bytes:
        """The bytes of ``event`` as a frame.

        Raises ``LocalProtocolError`` if it is illegal now (``WRONG_STATE``), newer
        than the negotiated version (``UNKNOWN_FRAME_TYPE``), a WELCOME outside the
        range HELLO offered (``UNSUPPORTED_VERSION``), or cannot be encoded.
        """
        ftype = event.FRAME
        if ftype.version > self._version and not self._stateless:
            raise LocalProtocolError(f"{ftype.name} is version {ftype.version}; this connection speaks version "
                                     f"{self._version}", ErrorCode.UNKNOWN_FRAME_TYPE)
        after = self._check(self.our_role, ftype, LocalProtocolError)
        if ftype is FrameType.HELLO or ftype is FrameType.WELCOME:
            self._negotiating(event, LocalProtocolError)
        data = encode(event, max_frame_bytes=self.peer_max_frame_bytes, compress_threshold=self.compress_threshold)
        self._advance(self.our_role, ftype, after)
        if ftype is FrameType.HELLO or ftype is FrameType.WELCOME:
            self._negotiated(event)
        return data

    def _check(self, sender: Role, ftype: FrameType, error: type[ProtocolError]) -> State:
        if self._stateless:
            return self.state
        said_bye = self.we_said_bye if sender is self.our_role else self.they_said_bye
        after = None if said_bye else next_state(self.state, sender, ftype)
        if after is None:
            raise error(f"{sender.value} may not send {ftype.name} in state {self.state.name}"
                        + (" after BYE" if said_bye else ""), ErrorCode.WRONG_STATE)
        return after

    def _negotiating(self, event: ev.Event, error: type[ProtocolError]) -> None:
        """Check a WELCOME's version against what HELLO offered and what we speak (spec §6.1)."""
        if self._stateless or not isinstance(event, ev.Welcome):
            return
        low, high = self._offered
        if not max(low, MIN_PROTOCOL_VERSION) <= event.version <= min(high, PROTOCOL_VERSION):
            raise error(f"WELCOME chose version {event.version}; the range is "
                        f"{max(low, MIN_PROTOCOL_VERSION)}..{min(high, PROTOCOL_VERSION)}",
                        ErrorCode.UNSUPPORTED_VERSION)

    def _negotiated(self, event: ev.Event) -> None:
        """Record what HELLO offered, or the version WELCOME chose (both already passed ``_check``)."""
        if self._stateless:
            return
        if isinstance(event, ev.Hello):
            self._offered = (event.min_version, event.max_version)
        elif isinstance(event, ev.Welcome):
            self.version = event.version
            if self.our_role is Role.CLIENT:
                self.peer_max_frame_bytes = min(event.max_frame_bytes, ABSOLUTE_MAX_FRAME_BYTES)

    def _advance(self, sender: Role, ftype: FrameType, after: State) -> None:
        self.state = after
        if ftype is FrameType.BYE:
            if sender is self.our_role:
                self.we_said_bye = True
            else:
                self.they_said_bye = True
