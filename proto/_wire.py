"""The one declaration of every frame on the wire (spec/PROTOCOL.md §2, §3, §5).

All integers are big-endian. The header is fixed (``HEADER``); each frame type
has one body ``Struct`` in ``BODIES``. The adapters below make construct strict
where it is lenient by default: unknown enum values, booleans other than 0/1,
invalid UTF-8, over-long strings, over-long arrays and trailing bytes are all
errors, raised as ``FieldError`` with the ``ErrorCode`` to send back.

Parsing always goes through these checked (interpreted) constructs: construct's
compiled mode is not meant for untrusted input (STYLE.md §5).

``LARGEST_BODY_BYTES`` is derived from the same declarations: the walk in
``largest_bytes`` adds up each field's largest encoding (a string's prefix plus
its maximum, an array's count plus its maximum items), so the receiver can refuse
a frame from its header alone when the header announces more than that frame
type can ever hold (spec/PROTOCOL.md §2.3, §10).
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from construct import (
    Adapter,
    ConstructError,
    Construct,
    FormatField,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Prefixed,
    GreedyBytes,
    Renamed,
    StreamError,
    Struct,
    Terminated,
    TerminatedError,
    stream_read,
)

from . import _events as ev
from ._const import (
    COMPRESSED_PREFIX_BYTES,
    MAX_BODY_BYTES,
    MAX_CLIENT_NAME_BYTES,
    MAX_DISPLAY_NAME_BYTES,
    MAX_INVITE_BYTES,
    MAX_LIST_ITEMS,
    MAX_NAME_BYTES,
    MAX_PASSWORD_BYTES,
    MAX_REACTION_BYTES,
    MAX_TEXT_BYTES,
    MAX_TOKEN_BYTES,
    CloseReason,
    ConvKind,
    Direction,
    ErrorCode,
    EventKind,
    FrameType,
    MembershipChange,
    ReceiptKind,
    RoomRole,
    Status,
)


class FieldError(ConstructError):
    """A body field broke a rule; ``code`` says which kind of rule, ``reason`` what it was, in a few words."""

    def __init__(self, reason: str, code: ErrorCode, path: str | None = None):
        super().__init__(reason, path=path)
        self.reason = reason
        self.code = code


def field_name(path: str | None) -> str:
    """construct's path ("(parsing) -> conv -> name") as a dotted field name ("conv.name"), "" for the body."""
    if not path:
        return ""
    return ".".join(part.strip() for part in path.split("->")[1:])


def describe(exc: ConstructError) -> tuple[str, str]:
    """(field, reason) of a failed parse or build: ("conv.name", "40 bytes > 32"); field "" for the whole body."""
    where = field_name(exc.path)
    if isinstance(exc, FieldError):
        return where, exc.reason
    if isinstance(exc, TerminatedError):
        return "", "bytes left after the last field"
    if isinstance(exc, StreamError):
        return where, "the body ends inside this field" if where else "the body is too short"
    return where, f"malformed ({type(exc).__name__})"


class _Text(Adapter):
    """UTF-8 text behind a length prefix, at most ``max_bytes`` encoded bytes."""

    def __init__(self, prefix: Construct, max_bytes: int):
        super().__init__(Prefixed(prefix, GreedyBytes))
        self.max_bytes: int = max_bytes

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        if len(obj) > self.max_bytes:
            raise FieldError(f"{len(obj)} bytes > {self.max_bytes}", ErrorCode.FIELD_TOO_LARGE, path)
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            raise FieldError("invalid UTF-8", ErrorCode.INVALID_FIELD, path) from None

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        if not isinstance(obj, str):
            raise FieldError("expected str", ErrorCode.INVALID_FIELD, path)
        try:
            data = obj.encode("utf-8")
        except UnicodeEncodeError:
            raise FieldError("not encodable as UTF-8", ErrorCode.INVALID_FIELD, path) from None
        if len(data) > self.max_bytes:
            raise FieldError(f"{len(data)} bytes > {self.max_bytes}", ErrorCode.FIELD_TOO_LARGE, path)
        return data


class _Enum(Adapter):
    """An integer that must be a member of ``enum_cls`` (construct's Enum lets unknowns through)."""

    def __init__(self, subcon: Construct, enum_cls: type[enum.IntEnum]):
        super().__init__(subcon)
        self.enum_cls: type[enum.IntEnum] = enum_cls

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        try:
            return self.enum_cls(obj)
        except ValueError:
            raise FieldError(f"{obj} is not a {self.enum_cls.__name__}", ErrorCode.INVALID_FIELD, path) from None

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        if isinstance(obj, bool) or not isinstance(obj, int) or obj not in self.enum_cls._value2member_map_:
            raise FieldError(f"{obj!r} is not a {self.enum_cls.__name__}", ErrorCode.INVALID_FIELD, path)
        return int(obj)


class _Bool(Adapter):
    """One byte, 0 or 1 exactly, so that every value has one encoding."""

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        if obj > 1:
            raise FieldError(f"boolean byte {obj}", ErrorCode.INVALID_FIELD, path)
        return obj == 1

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        if not isinstance(obj, bool):
            raise FieldError("expected bool", ErrorCode.INVALID_FIELD, path)
        return int(obj)


class _Array(Construct):
    """A u16 count, checked against ``max_items`` before any item is read, then the items."""

    def __init__(self, subcon: Construct, max_items: int = MAX_LIST_ITEMS):
        super().__init__()
        self.subcon = subcon
        self.max_items: int = max_items

    def _parse(self, stream: Any, context: Any, path: str) -> tuple[Any, ...]:
        count = int.from_bytes(stream_read(stream, 2, path), "big")
        if count > self.max_items:
            raise FieldError(f"{count} items > {self.max_items}", ErrorCode.FIELD_TOO_LARGE, path)
        return tuple(self.subcon._parsereport(stream, context, f"{path}[{i}]") for i in range(count))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if len(obj) > self.max_items:
            raise FieldError(f"{len(obj)} items > {self.max_items}", ErrorCode.FIELD_TOO_LARGE, path)
        stream.write(len(obj).to_bytes(2, "big"))
        for i, item in enumerate(obj):
            self.subcon._build(item, stream, context, f"{path}[{i}]")
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise ConstructError("variable size", path=path)


class _Record(Adapter):
    """A Struct whose parsed value is the dataclass ``cls`` (fields in declaration order)."""

    def __init__(self, cls: type, subcon: Construct):
        super().__init__(subcon)
        self.cls: type = cls
        self.names: list[str] = [f.name for f in dataclasses.fields(cls) if f.name != "request_id"]

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        return self.cls(**{name: obj[name] for name in self.names})

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        if type(obj) is not self.cls:
            raise FieldError(f"expected {self.cls.__name__}", ErrorCode.INVALID_FIELD, path)
        return {name: getattr(obj, name) for name in self.names}


# --- field types (spec §3) -------------------------------------------------
U8, U16, U32, U64 = Int8ub, Int16ub, Int32ub, Int64ub
Name = _Text(Int8ub, MAX_NAME_BYTES)
Bool = _Bool(Int8ub)

HEADER = Struct(
    "length" / U32,  # body bytes that follow the header
    "type" / U8,
    "flags" / U8,
    "request_id" / U32,
)

Conversation = _Record(ev.Conversation, Struct("kind" / _Enum(U8, ConvKind), "name" / Name))
StoredMessage = _Record(
    ev.StoredMessage,
    Struct(
        "seq" / U64,
        "ts_ms" / U64,
        "sender" / Name,
        "client_msg_id" / U64,
        "body" / _Text(Int16ub, MAX_BODY_BYTES),
    ),
)
RoomInfo = _Record(ev.RoomInfo, Struct("name" / Name, "members" / U32, "last_seq" / U64, "joined" / Bool))
MemberInfo = _Record(ev.MemberInfo, Struct("user" / Name, "status" / _Enum(U8, Status)))
Position = _Record(ev.Position, Struct("conv" / Conversation, "last_seq" / U64))
CursorInfo = _Record(ev.CursorInfo, Struct("user" / Name, "delivered_seq" / U64, "read_seq" / U64))
ConversationInfo = _Record(
    ev.ConversationInfo,
    Struct("conv" / Conversation, "last_seq" / U64, "last_ts_ms" / U64, "delivered_seq" / U64, "read_seq" / U64),
)

NodeInfo = _Record(
    ev.NodeInfo,
    Struct("node" / Name, "host" / _Text(Int8ub, MAX_TEXT_BYTES), "port" / U16, "ws_port" / U16,
           "connections" / U32, "draining" / Bool),
)

SessionInfo = _Record(
    ev.SessionInfo, Struct("session_id" / U64, "created_ms" / U64, "last_used_ms" / U64, "current" / Bool))

ConvEvent = _Record(
    ev.ConvEvent,
    Struct("seq" / U64, "ts_ms" / U64, "kind" / _Enum(U8, EventKind), "actor" / Name, "target" / Name,
           "target_seq" / U64, "until_ms" / U64, "role" / _Enum(U8, RoomRole),
           "text" / _Text(Int16ub, MAX_BODY_BYTES)),
)
RoomMember = _Record(
    ev.RoomMember,
    Struct("user" / Name, "role" / _Enum(U8, RoomRole), "status" / _Enum(U8, Status), "muted" / Bool,
           "muted_until_ms" / U64),
)
BanInfo = _Record(ev.BanInfo, Struct("user" / Name, "until_ms" / U64))
Reason = _Text(Int8ub, MAX_TEXT_BYTES)
UserInfo = _Record(ev.UserInfo, Struct("user" / Name, "display_name" / _Text(Int8ub, MAX_DISPLAY_NAME_BYTES)))

_EMPTY: tuple[Construct, ...] = ()

#: Frame type → body fields, in wire order. Every body ends exactly where its frame ends.
FIELDS: dict[FrameType, tuple[Construct, ...]] = {
    FrameType.HELLO: ("min_version" / U16, "max_version" / U16, "client" / _Text(Int8ub, MAX_CLIENT_NAME_BYTES)),
    FrameType.WELCOME: (
        "version" / U16,
        "server" / _Text(Int8ub, MAX_CLIENT_NAME_BYTES),
        "max_frame_bytes" / U32,
        "max_body_bytes" / U32,
        "ping_interval_ms" / U32,
        "rate_per_s" / U16,
        "rate_burst" / U16,
        "max_rooms" / U16,
        "max_page" / U16,
    ),
    FrameType.REGISTER: ("username" / Name, "password" / _Text(Int8ub, MAX_PASSWORD_BYTES)),
    FrameType.LOGIN: ("username" / Name, "password" / _Text(Int8ub, MAX_PASSWORD_BYTES)),
    FrameType.REGISTER_INVITE: ("username" / Name, "password" / _Text(Int8ub, MAX_PASSWORD_BYTES),
                                "invite" / _Text(Int8ub, MAX_INVITE_BYTES)),
    FrameType.RESUME: ("token" / _Text(Int8ub, MAX_TOKEN_BYTES),),
    FrameType.AUTH_OK: ("username" / Name, "token" / _Text(Int8ub, MAX_TOKEN_BYTES), "expires_at_ms" / U64),
    FrameType.LOGOUT: _EMPTY,
    FrameType.OK: _EMPTY,
    FrameType.JOIN: ("room" / Name,),
    FrameType.JOINED: ("room" / Name, "last_seq" / U64, "members" / U32),
    FrameType.LEAVE: ("room" / Name,),
    FrameType.LIST_ROOMS: _EMPTY,
    FrameType.ROOM_LIST: ("rooms" / _Array(RoomInfo),),
    FrameType.MEMBERS: ("room" / Name,),
    FrameType.MEMBER_LIST: ("room" / Name, "members" / _Array(MemberInfo)),
    FrameType.LIST_CONVERSATIONS: _EMPTY,
    FrameType.CONVERSATION_LIST: ("conversations" / _Array(ConversationInfo),),
    FrameType.MEMBERSHIP: ("room" / Name, "user" / Name, "change" / _Enum(U8, MembershipChange)),
    FrameType.NODES: ("nodes" / _Array(NodeInfo),),
    FrameType.CHANGE_PASSWORD: ("old_password" / _Text(Int8ub, MAX_PASSWORD_BYTES),
                                "new_password" / _Text(Int8ub, MAX_PASSWORD_BYTES)),
    FrameType.LOGOUT_ALL: _EMPTY,
    FrameType.LIST_SESSIONS: _EMPTY,
    FrameType.SESSION_LIST: ("sessions" / _Array(SessionInfo),),
    FrameType.REVOKE_SESSION: ("session_id" / U64,),
    FrameType.EVENTS: ("conv" / Conversation, "events" / _Array(ConvEvent)),
    FrameType.KICK: ("room" / Name, "user" / Name, "reason" / Reason),
    FrameType.BAN: ("room" / Name, "user" / Name, "until_ms" / U64, "reason" / Reason),
    FrameType.UNBAN: ("room" / Name, "user" / Name),
    FrameType.MUTE: ("room" / Name, "user" / Name, "until_ms" / U64, "reason" / Reason),
    FrameType.UNMUTE: ("room" / Name, "user" / Name),
    FrameType.DELETE_MESSAGE: ("conv" / Conversation, "seq" / U64),
    FrameType.SET_TOPIC: ("room" / Name, "topic" / Reason),
    FrameType.SET_ROLE: ("room" / Name, "user" / Name, "role" / _Enum(U8, RoomRole)),
    FrameType.CREATE_ROOM: ("room" / Name, "private" / Bool),
    FrameType.INVITE: ("room" / Name, "user" / Name),
    FrameType.GET_ROOM: ("room" / Name,),
    FrameType.ROOM_DETAILS: ("room" / Name, "topic" / Reason, "private" / Bool, "members" / _Array(RoomMember),
                             "bans" / _Array(BanInfo)),
    FrameType.EDIT_MESSAGE: ("conv" / Conversation, "seq" / U64, "body" / _Text(Int16ub, MAX_BODY_BYTES)),
    FrameType.REACT: ("conv" / Conversation, "seq" / U64, "reaction" / _Text(Int8ub, MAX_REACTION_BYTES),
                      "add" / Bool),
    FrameType.SEND_ACTION: ("conv" / Conversation, "client_msg_id" / U64, "body" / _Text(Int16ub, MAX_BODY_BYTES)),
    FrameType.SET_DISPLAY_NAME: ("display_name" / _Text(Int8ub, MAX_DISPLAY_NAME_BYTES),),
    FrameType.GET_USERS: ("users" / _Array(Name),),
    FrameType.USER_LIST: ("users" / _Array(UserInfo),),
    FrameType.SEND: ("conv" / Conversation, "client_msg_id" / U64, "body" / _Text(Int16ub, MAX_BODY_BYTES)),
    FrameType.ACK: (
        "conv" / Conversation,
        "client_msg_id" / U64,
        "seq" / U64,
        "ts_ms" / U64,
        "duplicate" / Bool,
    ),
    FrameType.MESSAGE: (
        "conv" / Conversation,
        "seq" / U64,
        "ts_ms" / U64,
        "sender" / Name,
        "client_msg_id" / U64,
        "body" / _Text(Int16ub, MAX_BODY_BYTES),
    ),
    FrameType.SYNC: ("positions" / _Array(Position),),
    FrameType.SYNC_PAGE: ("conv" / Conversation, "messages" / _Array(StoredMessage), "has_more" / Bool),
    FrameType.SYNC_DONE: _EMPTY,
    FrameType.HISTORY: (
        "conv" / Conversation,
        "direction" / _Enum(U8, Direction),
        "seq" / U64,
        "limit" / U16,
    ),
    FrameType.HISTORY_PAGE: ("conv" / Conversation, "messages" / _Array(StoredMessage), "has_more" / Bool),
    FrameType.DELIVERED: ("conv" / Conversation, "seq" / U64),
    FrameType.READ: ("conv" / Conversation, "seq" / U64),
    FrameType.RECEIPT: (
        "conv" / Conversation,
        "user" / Name,
        "kind" / _Enum(U8, ReceiptKind),
        "seq" / U64,
    ),
    FrameType.GET_CURSORS: ("conv" / Conversation,),
    FrameType.CURSORS: ("conv" / Conversation, "cursors" / _Array(CursorInfo)),
    FrameType.PRESENCE: ("user" / Name, "status" / _Enum(U8, Status)),
    FrameType.TYPING: ("conv" / Conversation,),
    FrameType.USER_TYPING: ("conv" / Conversation, "user" / Name),
    FrameType.PING: ("nonce" / U64,),
    FrameType.PONG: ("nonce" / U64,),
    FrameType.ERROR: (
        "code" / _Enum(U16, ErrorCode),
        "retry_after_ms" / U32,
        "message" / _Text(Int8ub, MAX_TEXT_BYTES),
    ),
    FrameType.GOAWAY: (
        "reason" / _Enum(U8, CloseReason),
        "reconnect_after_ms" / U32,
        "message" / _Text(Int8ub, MAX_TEXT_BYTES),
    ),
    FrameType.BYE: ("reason" / _Enum(U8, CloseReason),),
}

#: Frame type → the checked body construct, producing the event (request_id added by the caller).
BODIES: dict[FrameType, _Record] = {
    ftype: _Record(ev.EVENT_TYPES[ftype], Struct(*fields, Terminated)) for ftype, fields in FIELDS.items()
}


def parse_body(ftype: FrameType, body: bytes) -> ev.Event:
    """Parse one body into its event with request_id 0.

    Raises ``ConstructError`` (``FieldError`` with a code for rule breaks) on bad bytes.
    """
    event: ev.Event = BODIES[ftype].parse(body)
    return event


def build_body(event: ev.Event) -> bytes:
    """Build the body bytes of ``event``; raises ``ConstructError`` when a field is out of range."""
    body: bytes = BODIES[event.FRAME].build(event)
    return body


# --- the largest legal body of each frame type (spec §2.3, §10) -------------

def largest_bytes(con: Construct) -> int:
    """The most bytes a value of ``con`` (one of the field constructs above) can take on the wire.

    Raises ``TypeError`` for a construct this walk does not know: a new kind of
    field must teach it its bound rather than get a guessed one.
    """
    if isinstance(con, Renamed):
        return largest_bytes(con.subcon)
    if isinstance(con, FormatField):
        length: int = con.length
        return length
    if isinstance(con, (_Bool, _Enum)):
        return largest_bytes(con.subcon)
    if isinstance(con, _Text):
        prefix = con.subcon.lengthfield
        if not isinstance(prefix, FormatField):
            raise TypeError(f"no size bound for a string prefixed by {prefix!r}")
        prefix_bytes: int = prefix.length
        max_bytes: int = con.max_bytes
        return prefix_bytes + min(max_bytes, (1 << (8 * prefix_bytes)) - 1)
    if isinstance(con, _Array):
        return 2 + min(con.max_items, 0xFFFF) * largest_bytes(con.subcon)
    if isinstance(con, _Record):
        return largest_bytes(con.subcon)
    if type(con) is Struct:
        return sum(largest_bytes(sub) for sub in con.subcons)
    if con is Terminated:
        return 0
    raise TypeError(f"no size bound for {con!r}: teach proto._wire.largest_bytes this construct")


def largest_compressed_length(body_bytes: int) -> int:
    """The largest ``length`` of a COMPRESSED frame whose body is at most ``body_bytes`` (spec §4).

    The 4-byte uncompressed length, then lz4's worst case for a block of that
    many bytes (``LZ4_COMPRESSBOUND``: n + n/255 + 16, for input lz4 cannot shrink).
    """
    return COMPRESSED_PREFIX_BYTES + body_bytes + body_bytes // 255 + 16


#: Frame type → the largest body it can legally have, in bytes (uncompressed), walked from ``FIELDS``.
LARGEST_BODY_BYTES: Mapping[FrameType, int] = MappingProxyType(
    {ftype: largest_bytes(body) for ftype, body in BODIES.items()})
