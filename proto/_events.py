"""Events: one frozen dataclass per frame type (spec §5).

An event carries the decoded body fields plus ``request_id`` from the header
(on the ``Event`` base: keyword-only, default 0). Clients pick request ids for
requests; the server echoes them on the reply (ACK, OK, JOINED, pages, ERROR...)
and uses 0 for pushes. Nested values (conversations, page items) are frozen
dataclasses too, and lists are tuples, so every event is hashable and comparable.

Every event and nested value checks its fields when it is made (STYLE.md §19,
like h11's events): a value the wire cannot carry (a name over 32 bytes, a
negative seq, a list instead of a tuple, an unknown enum value) raises
``LocalProtocolError`` where the event is built, not later at encode time.
The checks are derived from the wire declarations (``_fast`` registers them in
``CHECKS`` at import); the decoder builds events from bytes it has already
checked and skips them. ``validate(event)`` runs the check again on demand.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ._const import (
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

#: Class → the check of its fields, derived from the wire declarations and registered by ``_fast`` at import.
#: Each raises ``LocalProtocolError`` naming the class and field ("Join.room: 40 bytes > 32").
CHECKS: dict[type, Callable[[Any], None]] = {}


class _Checked:
    """Base of every event and nested value: fields are checked when the dataclass is made."""

    __slots__ = ()

    def __post_init__(self) -> None:
        check = CHECKS.get(self.__class__)
        if check is not None:
            check(self)


def validate(value: object) -> None:
    """Check every field of an event (or nested value), nested values included, against the wire declaration,
    without encoding.

    Events are checked when made, so this matters only for one changed behind the dataclass's back.
    Raises ``LocalProtocolError`` (code ``INVALID_FIELD`` or ``FIELD_TOO_LARGE``) naming the field, and
    ``TypeError`` for something that is not an event.
    """
    check = CHECKS.get(value.__class__)
    if check is None:
        raise TypeError(f"{type(value).__name__} is not a Chorus event")
    check(value)  # each field's type, so the nested values below are Chorus values
    for name in value.__dataclass_fields__:  # type: ignore[attr-defined]
        nested = getattr(value, name)
        if isinstance(nested, _Checked):
            validate(nested)
        elif isinstance(nested, tuple):
            for item in nested:
                if isinstance(item, _Checked):  # records; plain items (names) were checked with their field
                    validate(item)


@dataclass(frozen=True, slots=True)
class Conversation(_Checked):
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


@dataclass(frozen=True, slots=True)
class StoredMessage(_Checked):
    """One message inside a SYNC_PAGE or HISTORY_PAGE (its conversation is the page's)."""

    seq: int
    ts_ms: int
    sender: str
    client_msg_id: int
    body: str


@dataclass(frozen=True, slots=True)
class RoomInfo(_Checked):
    """One room in a ROOM_LIST: its member count, newest seq, and whether the user is a member."""

    name: str
    members: int
    last_seq: int
    joined: bool


@dataclass(frozen=True, slots=True)
class MemberInfo(_Checked):
    """One member in a MEMBER_LIST, with presence."""

    user: str
    status: Status


@dataclass(frozen=True, slots=True)
class Position(_Checked):
    """Where a client stands in one conversation: the highest seq it has (SYNC)."""

    conv: Conversation
    last_seq: int


@dataclass(frozen=True, slots=True)
class CursorInfo(_Checked):
    """One member's delivered and read cursors in a CURSORS reply."""

    user: str
    delivered_seq: int
    read_seq: int


@dataclass(frozen=True, slots=True)
class ConversationInfo(_Checked):
    """One conversation in a CONVERSATION_LIST: its newest message and the user's own cursors."""

    conv: Conversation
    last_seq: int
    last_ts_ms: int
    delivered_seq: int
    read_seq: int

    @property
    def unread(self) -> int:
        """Messages after the user's read cursor."""
        return max(0, self.last_seq - self.read_seq)


@dataclass(frozen=True, slots=True)
class NodeInfo(_Checked):
    """One live node of a cluster in a NODES push: where to reach it and how loaded it is."""

    node: str
    host: str
    port: int
    ws_port: int  # 0: no WebSocket bridge
    connections: int
    draining: bool


@dataclass(frozen=True, slots=True)
class SessionInfo(_Checked):
    """One of the user's session tokens in a SESSION_LIST: an opaque id, never the token or its hash."""

    session_id: int
    created_ms: int  # 0: unknown (a session from before the server recorded it)
    last_used_ms: int
    current: bool  # the token this connection authenticated with


@dataclass(frozen=True, slots=True)
class ConvEvent(_Checked):
    """One seq-ordered event of a conversation in an EVENTS frame (version 2, spec §3.15): it takes a seq like a
    message; fields a kind does not use are "" or 0 (``role``: MEMBER)."""

    seq: int
    ts_ms: int
    kind: EventKind
    actor: str  # "": the server's operator (chorus-admin)
    target: str  # the user acted on, or ""
    target_seq: int  # DELETE: the deleted message's seq
    until_ms: int  # BAN, MUTE: when it ends (0: no expiry)
    role: RoomRole
    text: str  # TOPIC: the topic; KICK, BAN, MUTE: the reason


@dataclass(frozen=True, slots=True)
class RoomMember(_Checked):
    """One member of a room in a ROOM_DETAILS, with role, presence and mute."""

    user: str
    role: RoomRole
    status: Status
    muted: bool
    muted_until_ms: int  # when the mute ends (0: not muted, or no expiry)


@dataclass(frozen=True, slots=True)
class BanInfo(_Checked):
    """One ban of a room in a ROOM_DETAILS (sent to moderators and the owner only)."""

    user: str
    until_ms: int  # 0: no expiry


@dataclass(frozen=True, slots=True)
class UserInfo(_Checked):
    """One user in a USER_LIST: the login name and the display name ("" when none is set)."""

    user: str
    display_name: str


@dataclass(frozen=True, slots=True)
class Event(_Checked):
    """Base of every frame event; ``FRAME`` names its frame type, ``request_id`` is the header's (§2.2)."""

    if TYPE_CHECKING:  # a class attribute of each subclass; not in ``__dataclass_fields__``
        FRAME: ClassVar[FrameType]
    request_id: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """Not a frame: the peer closed its side (``receive_data(b"")``) at a frame boundary."""


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """C→S, first frame: the protocol versions the client speaks (§6.1)."""

    FRAME = FrameType.HELLO
    min_version: int
    max_version: int
    client: str


@dataclass(frozen=True, slots=True)
class Welcome(Event):
    """S→C reply to HELLO: the version chosen and the server's limits."""

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


@dataclass(frozen=True, slots=True)
class Register(Event):
    """C→S: create an account and log in."""

    FRAME = FrameType.REGISTER
    username: str
    password: str

    def __repr__(self) -> str:  # passwords never reach logs
        return f"Register(username={self.username!r}, password='***', request_id={self.request_id})"


@dataclass(frozen=True, slots=True)
class RegisterInvite(Event):
    """C→S (version 2): REGISTER with a one-time invite code, for a server whose registration is by invite."""

    FRAME = FrameType.REGISTER_INVITE
    username: str
    password: str
    invite: str

    def __repr__(self) -> str:  # passwords and invite codes never reach logs
        return f"RegisterInvite(username={self.username!r}, password='***', invite='***')"


@dataclass(frozen=True, slots=True)
class Login(Event):
    """C→S: log in with a password."""

    FRAME = FrameType.LOGIN
    username: str
    password: str

    def __repr__(self) -> str:
        return f"Login(username={self.username!r}, password='***', request_id={self.request_id})"


@dataclass(frozen=True, slots=True)
class Resume(Event):
    """C→S: log in with a session token."""

    FRAME = FrameType.RESUME
    token: str

    def __repr__(self) -> str:
        return f"Resume(token='***', request_id={self.request_id})"


@dataclass(frozen=True, slots=True)
class AuthOk(Event):
    """S→C reply to REGISTER, LOGIN or RESUME: logged in, with the session token."""

    FRAME = FrameType.AUTH_OK
    username: str
    token: str
    expires_at_ms: int

    def __repr__(self) -> str:
        return (f"AuthOk(username={self.username!r}, token='***', "
                f"expires_at_ms={self.expires_at_ms}, request_id={self.request_id})")


@dataclass(frozen=True, slots=True)
class Logout(Event):
    """C→S: revoke the token; the server answers BYE(LOGGED_OUT)."""

    FRAME = FrameType.LOGOUT


@dataclass(frozen=True, slots=True)
class Ok(Event):
    """S→C reply to LEAVE."""

    FRAME = FrameType.OK


@dataclass(frozen=True, slots=True)
class Join(Event):
    """C→S: join (or create) a room."""

    FRAME = FrameType.JOIN
    room: str


@dataclass(frozen=True, slots=True)
class Joined(Event):
    """S→C reply to JOIN: the room's newest seq and member count."""

    FRAME = FrameType.JOINED
    room: str
    last_seq: int
    members: int


@dataclass(frozen=True, slots=True)
class Leave(Event):
    """C→S: leave a room."""

    FRAME = FrameType.LEAVE
    room: str


@dataclass(frozen=True, slots=True)
class ListRooms(Event):
    """C→S: list the rooms on the server."""

    FRAME = FrameType.LIST_ROOMS


@dataclass(frozen=True, slots=True)
class RoomList(Event):
    """S→C reply to LIST_ROOMS."""

    FRAME = FrameType.ROOM_LIST
    rooms: tuple[RoomInfo, ...]


@dataclass(frozen=True, slots=True)
class Members(Event):
    """C→S: list a room's members."""

    FRAME = FrameType.MEMBERS
    room: str


@dataclass(frozen=True, slots=True)
class MemberList(Event):
    """S→C reply to MEMBERS."""

    FRAME = FrameType.MEMBER_LIST
    room: str
    members: tuple[MemberInfo, ...]


@dataclass(frozen=True, slots=True)
class ListConversations(Event):
    """C→S (version 2): every conversation of the user, rooms and direct ones, with its cursors."""

    FRAME = FrameType.LIST_CONVERSATIONS


@dataclass(frozen=True, slots=True)
class ConversationList(Event):
    """S→C reply to LIST_CONVERSATIONS (version 2), the most recently active first."""

    FRAME = FrameType.CONVERSATION_LIST
    conversations: tuple[ConversationInfo, ...]


@dataclass(frozen=True, slots=True)
class Membership(Event):
    """S→C push (version 2): a user joined or left a room the connection follows."""

    FRAME = FrameType.MEMBERSHIP
    room: str
    user: str
    change: MembershipChange


@dataclass(frozen=True, slots=True)
class Nodes(Event):
    """S→C push (version 2): the cluster's live nodes and their load, for picking a node to (re)connect to."""

    FRAME = FrameType.NODES
    nodes: tuple[NodeInfo, ...]


@dataclass(frozen=True, slots=True)
class ChangePassword(Event):
    """C→S (version 2): replace the user's password; every other session of the user is revoked."""

    FRAME = FrameType.CHANGE_PASSWORD
    old_password: str
    new_password: str

    def __repr__(self) -> str:  # passwords never reach logs
        return f"ChangePassword(old_password='***', new_password='***', request_id={self.request_id})"


@dataclass(frozen=True, slots=True)
class LogoutAll(Event):
    """C→S (version 2): revoke every session of the user; every connection of the user gets BYE(LOGGED_OUT)."""

    FRAME = FrameType.LOGOUT_ALL


@dataclass(frozen=True, slots=True)
class ListSessions(Event):
    """C→S (version 2): the user's session tokens, by opaque id."""

    FRAME = FrameType.LIST_SESSIONS


@dataclass(frozen=True, slots=True)
class SessionList(Event):
    """S→C reply to LIST_SESSIONS (version 2), oldest first."""

    FRAME = FrameType.SESSION_LIST
    sessions: tuple[SessionInfo, ...]


@dataclass(frozen=True, slots=True)
class RevokeSession(Event):
    """C→S (version 2): revoke one of the user's sessions by id; its connections get BYE(LOGGED_OUT)."""

    FRAME = FrameType.REVOKE_SESSION
    session_id: int


@dataclass(frozen=True, slots=True)
class Events(Event):
    """S→C (version 2): seq-ordered events of a conversation, live (one) or before the page of a SYNC or HISTORY
    reply that covers their seqs (spec §5.46, §9.15)."""

    FRAME = FrameType.EVENTS
    conv: Conversation
    events: tuple[ConvEvent, ...]


@dataclass(frozen=True, slots=True)
class Kick(Event):
    """C→S (version 2): remove ``user`` from ``room`` (moderators, owner); OK."""

    FRAME = FrameType.KICK
    room: str
    user: str
    reason: str


@dataclass(frozen=True, slots=True)
class Ban(Event):
    """C→S (version 2): remove ``user`` from ``room`` and keep them out until ``until_ms`` (0: no expiry); OK."""

    FRAME = FrameType.BAN
    room: str
    user: str
    until_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class Unban(Event):
    """C→S (version 2): lift ``user``'s ban from ``room``; OK."""

    FRAME = FrameType.UNBAN
    room: str
    user: str


@dataclass(frozen=True, slots=True)
class Mute(Event):
    """C→S (version 2): refuse ``user``'s SENDs to ``room`` until ``until_ms`` (0: until UNMUTE); OK."""

    FRAME = FrameType.MUTE
    room: str
    user: str
    until_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class Unmute(Event):
    """C→S (version 2): lift ``user``'s mute in ``room``; OK."""

    FRAME = FrameType.UNMUTE
    room: str
    user: str


@dataclass(frozen=True, slots=True)
class DeleteMessage(Event):
    """C→S (version 2): replace the message at ``seq`` by a tombstone (one's own, or any as moderator); OK."""

    FRAME = FrameType.DELETE_MESSAGE
    conv: Conversation
    seq: int


@dataclass(frozen=True, slots=True)
class SetTopic(Event):
    """C→S (version 2): set ``room``'s topic (moderators, owner); OK."""

    FRAME = FrameType.SET_TOPIC
    room: str
    topic: str


@dataclass(frozen=True, slots=True)
class SetRole(Event):
    """C→S (version 2): give a member of ``room`` a role (the owner only; OWNER hands the room over); OK."""

    FRAME = FrameType.SET_ROLE
    room: str
    user: str
    role: RoomRole


@dataclass(frozen=True, slots=True)
class CreateRoom(Event):
    """C→S (version 2): create ``room`` (``private``: invite-only and unlisted), its creator its owner; JOINED."""

    FRAME = FrameType.CREATE_ROOM
    room: str
    private: bool


@dataclass(frozen=True, slots=True)
class Invite(Event):
    """C→S (version 2): add ``user`` to ``room`` (moderators, owner; the way into a private room); OK."""

    FRAME = FrameType.INVITE
    room: str
    user: str


@dataclass(frozen=True, slots=True)
class GetRoom(Event):
    """C→S (version 2): a room's topic, members with roles, and (to moderators) its bans; ROOM_DETAILS."""

    FRAME = FrameType.GET_ROOM
    room: str


@dataclass(frozen=True, slots=True)
class RoomDetails(Event):
    """S→C (version 2): reply to GET_ROOM."""

    FRAME = FrameType.ROOM_DETAILS
    room: str
    topic: str
    private: bool
    members: tuple[RoomMember, ...]
    bans: tuple[BanInfo, ...]


@dataclass(frozen=True, slots=True)
class EditMessage(Event):
    """C→S (version 2): replace the text of one's own message at ``seq``; OK (an EDIT event, spec §9.16)."""

    FRAME = FrameType.EDIT_MESSAGE
    conv: Conversation
    seq: int
    body: str


@dataclass(frozen=True, slots=True)
class React(Event):
    """C→S (version 2): add (or, ``add`` false, take back) a reaction to the message at ``seq``; OK."""

    FRAME = FrameType.REACT
    conv: Conversation
    seq: int
    reaction: str
    add: bool


@dataclass(frozen=True, slots=True)
class SendAction(Event):
    """C→S (version 2): SEND of an action ("/me waves" is ``body`` "waves"); answered by ACK like SEND."""

    FRAME = FrameType.SEND_ACTION
    conv: Conversation
    client_msg_id: int
    body: str


@dataclass(frozen=True, slots=True)
class SetDisplayName(Event):
    """C→S (version 2): set (or, "", clear) the user's display name (spec §9.17); OK."""

    FRAME = FrameType.SET_DISPLAY_NAME
    display_name: str


@dataclass(frozen=True, slots=True)
class GetUsers(Event):
    """C→S (version 2): the display names of these users; USER_LIST."""

    FRAME = FrameType.GET_USERS
    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UserList(Event):
    """S→C (version 2): reply to GET_USERS, the users that exist, in the order asked."""

    FRAME = FrameType.USER_LIST
    users: tuple[UserInfo, ...]


@dataclass(frozen=True, slots=True)
class Send(Event):
    """C→S: post a message; answered by ACK once it is stored."""

    FRAME = FrameType.SEND
    conv: Conversation
    client_msg_id: int
    body: str


@dataclass(frozen=True, slots=True)
class Ack(Event):
    """Reply to SEND once stored; ``duplicate`` is set when a retry found the original."""

    FRAME = FrameType.ACK
    conv: Conversation
    client_msg_id: int
    seq: int
    ts_ms: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Message(Event):
    """S→C push: a stored message of a conversation the connection follows."""

    FRAME = FrameType.MESSAGE
    conv: Conversation
    seq: int
    ts_ms: int
    sender: str
    client_msg_id: int
    body: str

    def stored(self) -> StoredMessage:
        return StoredMessage(self.seq, self.ts_ms, self.sender, self.client_msg_id, self.body)


@dataclass(frozen=True, slots=True)
class Sync(Event):
    """C→S: catch up from these positions (and withheld conversations from the stored cursor)."""

    FRAME = FrameType.SYNC
    positions: tuple[Position, ...]


@dataclass(frozen=True, slots=True)
class SyncPage(Event):
    """S→C reply to SYNC: one page of one conversation's messages."""

    FRAME = FrameType.SYNC_PAGE
    conv: Conversation
    messages: tuple[StoredMessage, ...]
    has_more: bool


@dataclass(frozen=True, slots=True)
class SyncDone(Event):
    """S→C reply to SYNC, last: the connection is live for every conversation."""

    FRAME = FrameType.SYNC_DONE


@dataclass(frozen=True, slots=True)
class History(Event):
    """C→S: a page of stored messages before or after a seq."""

    FRAME = FrameType.HISTORY
    conv: Conversation
    direction: Direction
    seq: int
    limit: int


@dataclass(frozen=True, slots=True)
class HistoryPage(Event):
    """S→C reply to HISTORY."""

    FRAME = FrameType.HISTORY_PAGE
    conv: Conversation
    messages: tuple[StoredMessage, ...]
    has_more: bool


@dataclass(frozen=True, slots=True)
class Delivered(Event):
    """C→S: advance the user's delivered cursor in a conversation."""

    FRAME = FrameType.DELIVERED
    conv: Conversation
    seq: int


@dataclass(frozen=True, slots=True)
class Read(Event):
    """C→S: advance the user's read cursor in a conversation."""

    FRAME = FrameType.READ
    conv: Conversation
    seq: int


@dataclass(frozen=True, slots=True)
class Receipt(Event):
    """S→C push: the other user of a direct conversation advanced a cursor."""

    FRAME = FrameType.RECEIPT
    conv: Conversation
    user: str
    kind: ReceiptKind
    seq: int


@dataclass(frozen=True, slots=True)
class GetCursors(Event):
    """C→S: every member's cursors in a conversation."""

    FRAME = FrameType.GET_CURSORS
    conv: Conversation


@dataclass(frozen=True, slots=True)
class Cursors(Event):
    """S→C reply to GET_CURSORS."""

    FRAME = FrameType.CURSORS
    conv: Conversation
    cursors: tuple[CursorInfo, ...]


@dataclass(frozen=True, slots=True)
class Presence(Event):
    """S→C push: a user in one of the connection's rooms came online or went offline."""

    FRAME = FrameType.PRESENCE
    user: str
    status: Status


@dataclass(frozen=True, slots=True)
class Typing(Event):
    """C→S: the user is typing in a conversation (ephemeral)."""

    FRAME = FrameType.TYPING
    conv: Conversation


@dataclass(frozen=True, slots=True)
class UserTyping(Event):
    """S→C push: someone is typing in a conversation."""

    FRAME = FrameType.USER_TYPING
    conv: Conversation
    user: str


@dataclass(frozen=True, slots=True)
class Ping(Event):
    """Either way: are you there? Answered by PONG with the same nonce."""

    FRAME = FrameType.PING
    nonce: int

    def response(self) -> "Pong":
        return Pong(self.nonce, request_id=self.request_id)


@dataclass(frozen=True, slots=True)
class Pong(Event):
    """Either way: the answer to a PING."""

    FRAME = FrameType.PONG
    nonce: int


@dataclass(frozen=True, slots=True)
class Error(Event):
    """Either way: a refused request, or the reason the sender is closing (§7)."""

    FRAME = FrameType.ERROR
    code: ErrorCode
    retry_after_ms: int
    message: str


@dataclass(frozen=True, slots=True)
class GoAway(Event):
    """S→C push: the server is going away; reconnect after the delay."""

    FRAME = FrameType.GOAWAY
    reason: CloseReason
    reconnect_after_ms: int
    message: str


@dataclass(frozen=True, slots=True)
class Bye(Event):
    """Either way: the last frame its sender sends."""

    FRAME = FrameType.BYE
    reason: CloseReason


#: Frame type → event class, for every frame type (a test checks it is complete).
EVENT_TYPES: dict[FrameType, type[Event]] = {
    obj.FRAME: obj
    for obj in list(globals().values())
    if isinstance(obj, type) and issubclass(obj, Event) and "FRAME" in vars(obj)
}
