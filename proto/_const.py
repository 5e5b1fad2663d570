"""Numbers and enums of the Chorus wire protocol (spec/PROTOCOL.md §2, §5, §7).

Every code that crosses the wire lives here, as an IntEnum, so that the construct
declarations in ``_wire``, the spec and the server all name the same values.
Default limits are named constants in this one place (STYLE.md §14).
"""
from __future__ import annotations

import enum

#: The protocol versions this implementation speaks (spec §6): a connection uses the highest one both sides
#: speak. Every frame type records the version that introduced it (``FrameType.version``).
PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1

#: Fixed frame header: length u32, type u8, flags u8, request id u32 (spec §2).
HEADER_BYTES = 10
#: Extra bytes after the header of a compressed frame: the uncompressed length.
COMPRESSED_PREFIX_BYTES = 4

#: Largest frame body a peer may send unless the handshake says otherwise.
DEFAULT_MAX_FRAME_BYTES = 1 << 20
#: Hard ceiling for any negotiated maximum: the length field could say 4 GiB.
ABSOLUTE_MAX_FRAME_BYTES = 16 << 20
#: Bodies at least this long are worth an lz4 attempt (spec §4).
COMPRESS_THRESHOLD_BYTES = 512

# Per-field maximums, in encoded bytes (spec §3).
MAX_NAME_BYTES = 32  # user and room names
MAX_PASSWORD_BYTES = 128
MAX_TOKEN_BYTES = 64
MAX_CLIENT_NAME_BYTES = 64
MAX_TEXT_BYTES = 255  # error and goaway texts
MAX_INVITE_BYTES = 64  # an invite code (REGISTER_INVITE)
MAX_REACTION_BYTES = 32  # a reaction (REACT): one emoji, or a short word
MAX_DISPLAY_NAME_BYTES = 64  # a display name (SET_DISPLAY_NAME): Unicode, beside the ASCII login name
#: A display name's length in characters (after NFC), the rule in words for errors and prompts.
MAX_DISPLAY_NAME_CHARS = 32
DISPLAY_NAME_RULE = (f"1-{MAX_DISPLAY_NAME_CHARS} characters (at most {MAX_DISPLAY_NAME_BYTES} bytes), no control "
                     "characters, not starting or ending with a space, not looking like another user's name")
MAX_BODY_BYTES = 65535  # wire ceiling; the server's own limit is lower
MAX_LIST_ITEMS = 1000  # any array in any frame

# Rules every side applies (spec §9.1, §9.9): one definition, and every message about them built from it.
#: User and room names: 1..MAX_NAME_BYTES of these characters, the first a letter or a digit (a regex).
NAME_PATTERN = rf"[a-z0-9][a-z0-9_.-]{{0,{MAX_NAME_BYTES - 1}}}"
#: The same rule in words, for error messages and prompts.
NAME_RULE = f"1-{MAX_NAME_BYTES} of a-z 0-9 _ . - starting with a letter or digit"
MIN_PASSWORD_BYTES = 8
#: The password rule in words.
PASSWORD_RULE = f"{MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes"
#: A client sends TYPING at most this often per conversation; the server coalesces faster ones.
TYPING_INTERVAL_S = 3.0
#: How long a client shows "... is typing" after the last USER_TYPING.
TYPING_SHOW_S = 5.0
#: Ports are u16 everywhere (TCP, the WebSocket bridge, HOST:PORT arguments).
MAX_PORT = 65535


class FrameType(enum.IntEnum):
    """The ``type`` byte of the header (spec §5), each with the protocol version that introduced it (§6.2).

    A connection that negotiated an older version neither sends nor accepts the newer frame types:
    to its peer they do not exist (``UNKNOWN_FRAME_TYPE``).
    """

    version: int  # the protocol version that introduced this frame type

    def __new__(cls, code: int, version: int = MIN_PROTOCOL_VERSION) -> FrameType:
        member = int.__new__(cls, code)
        member._value_ = code
        member.version = version
        return member

    # name = type byte, version that introduced it
    HELLO = 0x01, 1
    WELCOME = 0x02, 1
    REGISTER = 0x03, 1
    LOGIN = 0x04, 1
    RESUME = 0x05, 1
    AUTH_OK = 0x06, 1
    LOGOUT = 0x07, 1
    OK = 0x08, 1
    REGISTER_INVITE = 0x09, 2
    JOIN = 0x10, 1
    JOINED = 0x11, 1
    LEAVE = 0x12, 1
    LIST_ROOMS = 0x13, 1
    ROOM_LIST = 0x14, 1
    MEMBERS = 0x15, 1
    MEMBER_LIST = 0x16, 1
    LIST_CONVERSATIONS = 0x17, 2
    CONVERSATION_LIST = 0x18, 2
    MEMBERSHIP = 0x19, 2
    NODES = 0x1A, 2
    CHANGE_PASSWORD = 0x1B, 2
    LOGOUT_ALL = 0x1C, 2
    LIST_SESSIONS = 0x1D, 2
    SESSION_LIST = 0x1E, 2
    REVOKE_SESSION = 0x1F, 2
    EVENTS = 0x50, 2
    KICK = 0x51, 2
    BAN = 0x52, 2
    UNBAN = 0x53, 2
    MUTE = 0x54, 2
    UNMUTE = 0x55, 2
    DELETE_MESSAGE = 0x56, 2
    SET_TOPIC = 0x57, 2
    SET_ROLE = 0x58, 2
    CREATE_ROOM = 0x59, 2
    INVITE = 0x5A, 2
    GET_ROOM = 0x5B, 2
    ROOM_DETAILS = 0x5C, 2
    EDIT_MESSAGE = 0x5D, 2
    REACT = 0x5E, 2
    SEND_ACTION = 0x5F, 2
    SET_DISPLAY_NAME = 0x60, 2
    GET_USERS = 0x61, 2
    USER_LIST = 0x62, 2
    SEND = 0x20, 1
    ACK = 0x21, 1
    MESSAGE = 0x22, 1
    SYNC = 0x23, 1
    SYNC_PAGE = 0x24, 1
    SYNC_DONE = 0x25, 1
    HISTORY = 0x26, 1
    HISTORY_PAGE = 0x27, 1
    DELIVERED = 0x28, 1
    READ = 0x29, 1
    RECEIPT = 0x2A, 1
    GET_CURSORS = 0x2B, 1
    CURSORS = 0x2C, 1
    PRESENCE = 0x30, 1
    TYPING = 0x31, 1
    USER_TYPING = 0x32, 1
    PING = 0x40, 1
    PONG = 0x41, 1
    ERROR = 0x42, 1
    GOAWAY = 0x43, 1
    BYE = 0x44, 1


class Flags(enum.IntFlag):
    """Bits of the header's ``flags`` byte; any other bit set is an error."""

    COMPRESSED = 0x01


KNOWN_FLAGS = int(Flags.COMPRESSED)


class ErrorCode(enum.IntEnum):
    """``code`` of an ERROR frame (spec §7). 1xx: framing, 2xx: auth, 3xx: requests."""

    MALFORMED_FRAME = 100
    FRAME_TOO_LARGE = 101
    UNKNOWN_FRAME_TYPE = 102
    INVALID_FIELD = 103
    FIELD_TOO_LARGE = 104
    DECOMPRESSION_FAILED = 105
    WRONG_STATE = 106
    UNSUPPORTED_VERSION = 107
    HANDSHAKE_TIMEOUT = 108
    AUTH_FAILED = 200
    USERNAME_TAKEN = 201
    INVALID_TOKEN = 202
    INVALID_NAME = 203
    WEAK_PASSWORD = 204
    TOO_MANY_CONNECTIONS = 205
    NOT_FOUND = 300
    NOT_MEMBER = 301
    TOO_MANY_ROOMS = 302
    BODY_TOO_LARGE = 303
    RATE_LIMITED = 304
    INVALID_REQUEST = 305
    SERVER_BUSY = 306
    FORBIDDEN = 307  # version 2: a version 1 connection gets INVALID_REQUEST instead (spec §7.1)
    INTERNAL = 399


#: Error codes a version introduced after version 1 (spec §7.1): a connection of an older version is never sent
#: one; it gets ``INVALID_REQUEST`` with the same message, a code it knows.
ERROR_CODE_VERSION: dict[ErrorCode, int] = {ErrorCode.FORBIDDEN: 2}


def error_code_for(code: ErrorCode, version: int) -> ErrorCode:
    """``code`` as a connection at protocol ``version`` may receive it (spec §7.1)."""
    return code if ERROR_CODE_VERSION.get(code, MIN_PROTOCOL_VERSION) <= version else ErrorCode.INVALID_REQUEST


class CloseReason(enum.IntEnum):
    """Why a connection ends: carried by GOAWAY and BYE, logged on every close."""

    CLIENT_QUIT = 1
    SHUTDOWN = 2
    STALE = 3
    SLOW_CONSUMER = 4
    PROTOCOL_ERROR = 5
    IDLE_TIMEOUT = 6
    RATE_LIMITED = 7
    LOGGED_OUT = 8
    SERVER_FULL = 9
    AUTH_TIMEOUT = 10
    PEER_CLOSED = 11


class ConvKind(enum.IntEnum):
    """A conversation is a room or a direct-message pair (spec §3)."""

    ROOM = 1
    DIRECT = 2


class Direction(enum.IntEnum):
    """Which side of the cursor a HISTORY request pages towards."""

    BEFORE = 1
    AFTER = 2


class ReceiptKind(enum.IntEnum):
    """Which cursor a RECEIPT reports (spec §9.6)."""

    DELIVERED = 1
    READ = 2


class Status(enum.IntEnum):
    """A user's presence (spec §9.8)."""

    OFFLINE = 0
    ONLINE = 1


class MembershipChange(enum.IntEnum):
    """What a MEMBERSHIP push reports (spec §5, version 2)."""

    JOINED = 1
    LEFT = 2


class RoomRole(enum.IntEnum):
    """A member's role in a room (spec §9.15, version 2): the room's creator is its owner."""

    MEMBER = 1
    MODERATOR = 2
    OWNER = 3


class EventKind(enum.IntEnum):
    """What a seq-ordered event of a conversation records (an EVENTS item, spec §3.15, §9.15)."""

    KICK = 1  # actor removed target from the room
    BAN = 2  # actor banned target (until_ms, 0: no expiry) and removed them
    UNBAN = 3
    MUTE = 4  # actor muted target: their SENDs are refused until until_ms (0: until unmuted)
    UNMUTE = 5
    DELETE = 6  # actor deleted the message at target_seq (sent by target)
    DELETED = 7  # the tombstone in place of a deleted message: target sent it, actor deleted it
    TOPIC = 8  # actor set the room's topic to text
    ROLE = 9  # actor gave target the room role ``role``
    INVITE = 10  # actor added target to the room
    EDIT = 11  # actor (its sender) replaced the text of the message at target_seq by text
    REACT = 12  # actor reacted to the message at target_seq (sent by target) with text, an emoji
    UNREACT = 13  # actor took that reaction back
    ACTION = 14  # in place of a message: actor did text ("/me waves"); it is the message, at its own seq
