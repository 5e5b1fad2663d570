"""Events: one frozen dataclass per frame type (spec §5).

An event carries the decoded body fields plus ``request_id`` from the header
(keyword-only, default 0). Clients pick request ids for requests; the server
echoes them on the reply (ACK, OK, JOINED, pages, ERROR...) and uses 0 for
pushes. Nested values (conversations, page items) are frozen dataclasses too,
and lists are tuples, so every event is hashable and comparable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._const import (
    CloseReason,
    ConvKind,
    Direction,
    ErrorCode,
    FrameType,
    ReceiptKind,
    Status,
)

_event = dataclass(frozen=True, slots=True)


def _rid() -> int:
    return field(default=0, kw_only=True)


@_event
class Conversation:
    """A room (by name) or a direct conversation (by the other user's name)."""

    kind: ConvKind
    name: str

    @classmethod
    def room(cls, name: str) -> "Conversation":
        return cls(ConvKind.ROOM, name)

    @classmethod
    def direct(cls, user: str) -> "Conversation":
        return cls(ConvKind.DIRECT, user)

    def __str__(self) -> str:
        return f"#{self.name}" if self.kind == ConvKind.ROOM else f"@{self.name}"


@_event
class StoredMessage:
    """One message inside a SYNC_PAGE or HISTORY_PAGE (its conversation is the page's)."""

    seq: int
    ts_ms: int
    sender: str
    client_msg_id: int
    body: str


@_event
class RoomInfo:
    name: str
    members: int
    last_seq: int
    joined: bool


@_event
class MemberInfo:
    user: str
    status: Status


@_event
class Position:
    conv: Conversation
    last_seq: int


@_event
class CursorInfo:
    user: str
    delivered_seq: int
    read_seq: int


class Event:
    """Base of every frame event; ``FRAME`` names its frame type."""

    FRAME: ClassVar[FrameType]
    __slots__ = ()


@_event
class ConnectionClosed(Event):
    """Not a frame: the peer closed its side (``receive_data(b"")``) at a frame boundary."""


@_event
class Hello(Event):
    FRAME = FrameType.HELLO
    min_version: int
    max_version: int
    client: str
    request_id: int = _rid()


@_event
class Welcome(Event):
    FRAME = FrameType.WELCOME
    version: int
    server: str
    max_frame_bytes: int
    max_body_bytes: int
    ping_interval_ms: int
    rate_per_s: int
    rate_burst: int
    max_rooms: int
    max_page: int
    request_id: int = _rid()


@_event
class Register(Event):
    FRAME = FrameType.REGISTER
    username: str
    password: str
    request_id: int = _rid()

    def __repr__(self) -> str:  # passwords never reach logs
        return f"Register(username={self.username!r}, password='***', request_id={self.request_id})"


@_event
class Login(Event):
    FRAME = FrameType.LOGIN
    username: str
    password: str
    request_id: int = _rid()

    def __repr__(self) -> str:
        return f"Login(username={self.username!r}, password='***', request_id={self.request_id})"


@_event
class Resume(Event):
    FRAME = FrameType.RESUME
    token: str
    request_id: int = _rid()

    def __repr__(self) -> str:
        return f"Resume(token='***', request_id={self.request_id})"


@_event
class AuthOk(Event):
    FRAME = FrameType.AUTH_OK
    username: str
    token: str
    expires_at_ms: int
    request_id: int = _rid()

    def __repr__(self) -> str:
        return (f"AuthOk(username={self.username!r}, token='***', "
                f"expires_at_ms={self.expires_at_ms}, request_id={self.request_id})")


@_event
class Logout(Event):
    FRAME = FrameType.LOGOUT
    request_id: int = _rid()


@_event
class Ok(Event):
    FRAME = FrameType.OK
    request_id: int = _rid()


@_event
class Join(Event):
    FRAME = FrameType.JOIN
    room: str
    request_id: int = _rid()


@_event
class Joined(Event):
    FRAME = FrameType.JOINED
    room: str
    last_seq: int
    members: int
    request_id: int = _rid()


@_event
class Leave(Event):
    FRAME = FrameType.LEAVE
    room: str
    request_id: int = _rid()


@_event
class ListRooms(Event):
    FRAME = FrameType.LIST_ROOMS
    request_id: int = _rid()


@_event
class RoomList(Event):
    FRAME = FrameType.ROOM_LIST
    rooms: tuple[RoomInfo, ...]
    request_id: int = _rid()


@_event
class Members(Event):
    FRAME = FrameType.MEMBERS
    room: str
    request_id: int = _rid()


@_event
class MemberList(Event):
    FRAME = FrameType.MEMBER_LIST
    room: str
    members: tuple[MemberInfo, ...]
    request_id: int = _rid()


@_event
class Send(Event):
    FRAME = FrameType.SEND
    conv: Conversation
    client_msg_id: int
    body: str
    request_id: int = _rid()


@_event
class Ack(Event):
    """Reply to SEND once stored; ``duplicate`` is set when a retry found the original."""

    FRAME = FrameType.ACK
    conv: Conversation
    client_msg_id: int
    seq: int
    ts_ms: int
    duplicate: bool
    request_id: int = _rid()


@_event
class Message(Event):
    FRAME = FrameType.MESSAGE
    conv: Conversation
    seq: int
    ts_ms: int
    sender: str
    client_msg_id: int
    body: str
    request_id: int = _rid()

    def stored(self) -> StoredMessage:
        return StoredMessage(self.seq, self.ts_ms, self.sender, self.client_msg_id, self.body)


@_event
class Sync(Event):
    FRAME = FrameType.SYNC
    positions: tuple[Position, ...]
    request_id: int = _rid()


@_event
class SyncPage(Event):
    FRAME = FrameType.SYNC_PAGE
    conv: Conversation
    messages: tuple[StoredMessage, ...]
    has_more: bool
    request_id: int = _rid()


@_event
class SyncDone(Event):
    FRAME = FrameType.SYNC_DONE
    request_id: int = _rid()


@_event
class History(Event):
    FRAME = FrameType.HISTORY
    conv: Conversation
    direction: Direction
    seq: int
    limit: int
    request_id: int = _rid()


@_event
class HistoryPage(Event):
    FRAME = FrameType.HISTORY_PAGE
    conv: Conversation
    messages: tuple[StoredMessage, ...]
    has_more: bool
    request_id: int = _rid()


@_event
class Delivered(Event):
    FRAME = FrameType.DELIVERED
    conv: Conversation
    seq: int
    request_id: int = _rid()


@_event
class Read(Event):
    FRAME = FrameType.READ
    conv: Conversation
    seq: int
    request_id: int = _rid()


@_event
class Receipt(Event):
    FRAME = FrameType.RECEIPT
    conv: Conversation
    user: str
    kind: ReceiptKind
    seq: int
    request_id: int = _rid()


@_event
class GetCursors(Event):
    FRAME = FrameType.GET_CURSORS
    conv: Conversation
    request_id: int = _rid()


@_event
class Cursors(Event):
    FRAME = FrameType.CURSORS
    conv: Conversation
    cursors: tuple[CursorInfo, ...]
    request_id: int = _rid()


@_event
class Presence(Event):
    FRAME = FrameType.PRESENCE
    user: str
    status: Status
    request_id: int = _rid()


@_event
class Typing(Event):
    FRAME = FrameType.TYPING
    conv: Conversation
    request_id: int = _rid()


@_event
class UserTyping(Event):
    FRAME = FrameType.USER_TYPING
    conv: Conversation
    user: str
    request_id: int = _rid()


@_event
class Ping(Event):
    FRAME = FrameType.PING
    nonce: int
    request_id: int = _rid()

    def response(self) -> "Pong":
        return Pong(self.nonce, request_id=self.request_id)


@_event
class Pong(Event):
    FRAME = FrameType.PONG
    nonce: int
    request_id: int = _rid()


@_event
class Error(Event):
    FRAME = FrameType.ERROR
    code: ErrorCode
    retry_after_ms: int
    message: str
    request_id: int = _rid()


@_event
class GoAway(Event):
    FRAME = FrameType.GOAWAY
    reason: CloseReason
    reconnect_after_ms: int
    message: str
    request_id: int = _rid()


@_event
class Bye(Event):
    FRAME = FrameType.BYE
    reason: CloseReason
    request_id: int = _rid()


#: Frame type → event class, for every frame type (a test checks it is complete).
EVENT_TYPES: dict[FrameType, type[Event]] = {
    obj.FRAME: obj
    for obj in list(globals().values())
    if isinstance(obj, type) and issubclass(obj, Event) and "FRAME" in vars(obj)
}
