"""Chorus wire protocol, sans-IO (spec/PROTOCOL.md).

    conn = proto.Connection(proto.CLIENT)
    sock.send(conn.send(proto.Hello(1, 1, "me")))
    conn.receive_data(sock.recv(65536))
    event = conn.next_event()   # an event, proto.NEED_DATA or proto.ConnectionClosed

``LARGEST_BODY_BYTES[frame_type]`` is the largest legal body of each frame type,
derived from the wire declarations; ``Connection.max_pending_bytes`` is the most
one frame from the peer can take in the current state (spec §2.3, §10).
"""
from ._connection import NEED_DATA, Connection, decode, encode
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
    ReceiptKind,
    Status,
)
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    EVENT_TYPES,
    Ack,
    AuthOk,
    Bye,
    ConnectionClosed,
    Conversation,
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
    ListRooms,
    Login,
    Logout,
    MemberInfo,
    MemberList,
    Members,
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
    RoomInfo,
    RoomList,
    Send,
    StoredMessage,
    Sync,
    SyncDone,
    SyncPage,
    Typing,
    UserTyping,
    Welcome,
)
from ._state import CLIENT, SERVER, Role, State
from ._wire import LARGEST_BODY_BYTES

__all__ = [name for name in dir() if not name.startswith("_")]
