"""Chorus wire protocol, sans-IO (spec/PROTOCOL.md).

    conn = proto.Connection(proto.CLIENT)
    sock.send(conn.send(proto.Hello(proto.MIN_PROTOCOL_VERSION, proto.PROTOCOL_VERSION, "me")))
    conn.receive_data(sock.recv(65536))
    event = conn.next_event()   # an event, proto.NEED_DATA or proto.ConnectionClosed
    conn.version                # the version WELCOME chose (spec §6)

Events check their fields when they are made (``LocalProtocolError``);
``validate(event)`` checks one again without encoding it.

``LARGEST_BODY_BYTES[frame_type]`` is the largest legal body of each frame type,
derived from the wire declarations; ``Connection.max_pending_bytes`` is the most
one frame from the peer can take in the current state (spec §2.3, §10).
"""
from . import _check  # noqa: F401  (registers every event's field check)
from ._connection import NEED_DATA, Connection, decode, encode, negotiate
from ._const import (
    ABSOLUTE_MAX_FRAME_BYTES,
    COMPRESS_THRESHOLD_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    MAX_BODY_BYTES,
    MAX_LIST_ITEMS,
    MAX_NAME_BYTES,
    MAX_PASSWORD_BYTES,
    MAX_PORT,
    MIN_PASSWORD_BYTES,
    NAME_PATTERN,
    NAME_RULE,
    PASSWORD_RULE,
    TYPING_INTERVAL_S,
    TYPING_SHOW_S,
    MAX_TEXT_BYTES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    CloseReason,
    ConvKind,
    Direction,
    ErrorCode,
    Flags,
    FrameType,
    MembershipChange,
    ReceiptKind,
    Status,
)
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    EVENT_TYPES,
    Ack,
    AuthOk,
    Bye,
    ChangePassword,
    ConnectionClosed,
    Conversation,
    ConversationInfo,
    ConversationList,
    CursorInfo,
    Cursors,
    Delivered,
    Error,
    Event,
    GetCursors,
    GoAway,
    Hello,
    History,
    HistoryPage,
    Join,
    Joined,
    Leave,
    ListConversations,
    ListRooms,
    ListSessions,
    Login,
    Logout,
    LogoutAll,
    MemberInfo,
    MemberList,
    Members,
    Membership,
    NodeInfo,
    Nodes,
    Message,
    Ok,
    Ping,
    Pong,
    Position,
    Presence,
    Read,
    Receipt,
    Register,
    Resume,
    RevokeSession,
    RoomInfo,
    RoomList,
    Send,
    SessionInfo,
    SessionList,
    StoredMessage,
    Sync,
    SyncDone,
    SyncPage,
    Typing,
    UserTyping,
    Welcome,
    validate,
)
from ._state import CLIENT, SERVER, Role, State
from ._wire import LARGEST_BODY_BYTES

# Written out, not computed, so that type checkers see what is exported (tests/test_proto.py holds it complete).
__all__ = [
    "ABSOLUTE_MAX_FRAME_BYTES", "Ack", "AuthOk", "Bye", "CLIENT", "ChangePassword", "COMPRESS_THRESHOLD_BYTES",
    "CloseReason", "Connection", "ConnectionClosed", "ConvKind", "Conversation", "ConversationInfo",
    "ConversationList", "CursorInfo", "Cursors", "DEFAULT_MAX_FRAME_BYTES", "Delivered", "Direction", "EVENT_TYPES",
    "Error", "ErrorCode", "Event", "Flags", "FrameType", "GetCursors", "GoAway", "HEADER_BYTES", "Hello", "History",
    "HistoryPage", "Join", "Joined", "LARGEST_BODY_BYTES", "Leave", "ListConversations", "ListRooms", "ListSessions",
    "LocalProtocolError", "Login", "Logout", "LogoutAll", "MAX_BODY_BYTES", "MAX_LIST_ITEMS", "MAX_NAME_BYTES",
    "MAX_PASSWORD_BYTES", "MAX_PORT", "MAX_TEXT_BYTES", "MIN_PASSWORD_BYTES", "MIN_PROTOCOL_VERSION", "MemberInfo",
    "MemberList", "Members", "Membership", "MembershipChange", "Message", "NAME_PATTERN", "NAME_RULE", "NEED_DATA",
    "NodeInfo", "Nodes", "Ok", "PASSWORD_RULE", "PROTOCOL_VERSION", "Ping", "Pong", "Position", "Presence",
    "ProtocolError", "Read", "Receipt", "ReceiptKind", "Register", "RemoteProtocolError", "Resume", "RevokeSession",
    "Role", "RoomInfo", "RoomList", "SERVER", "Send", "SessionInfo", "SessionList", "State", "Status",
    "StoredMessage", "Sync", "SyncDone", "SyncPage", "TYPING_INTERVAL_S", "TYPING_SHOW_S", "Typing", "UserTyping",
    "Welcome", "decode", "encode", "negotiate", "validate",
]
