"""Which frame is legal when: the protocol state machine as one table (spec §8).

Both ends run the same machine over the frames they see, so a frame that is
illegal for its sender is caught on either side: ``Connection.send`` raises
``LocalProtocolError``, ``Connection.next_event`` raises ``RemoteProtocolError``
with ``WRONG_STATE``. The conversation moves HANDSHAKE → NEGOTIATING →
UNAUTHENTICATED → AUTHENTICATED; LOGOUT (and LOGOUT_ALL) moves it to CLOSING, where only the
server may still speak. A BYE silences its sender for good; the other side may
still send until it says BYE too or closes.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable

from ._const import FrameType as F


class Role(enum.Enum):
    """Which side of a connection."""

    CLIENT = "client"
    SERVER = "server"


CLIENT = Role.CLIENT
SERVER = Role.SERVER


class State(enum.Enum):
    """Where a connection stands (spec §8)."""

    HANDSHAKE = "handshake"  # the client's HELLO comes first
    NEGOTIATING = "negotiating"  # the server answers with WELCOME (or ERROR + BYE)
    UNAUTHENTICATED = "unauthenticated"
    AUTHENTICATED = "authenticated"
    CLOSING = "closing"  # after LOGOUT: the server finishes and says BYE


_ANYTIME = {F.ERROR, F.BYE}
_LIVE = {F.PING, F.PONG}
_CLIENT_REQUESTS = {
    F.JOIN, F.LEAVE, F.LIST_ROOMS, F.MEMBERS, F.SEND, F.SYNC, F.HISTORY,
    F.DELIVERED, F.READ, F.GET_CURSORS, F.TYPING,
    F.LIST_CONVERSATIONS, F.CHANGE_PASSWORD, F.LIST_SESSIONS, F.REVOKE_SESSION,  # version 2
    F.KICK, F.BAN, F.UNBAN, F.MUTE, F.UNMUTE, F.DELETE_MESSAGE, F.SET_TOPIC, F.SET_ROLE, F.CREATE_ROOM, F.INVITE,
    F.GET_ROOM, F.EDIT_MESSAGE, F.REACT, F.SEND_ACTION, F.SET_DISPLAY_NAME, F.GET_USERS,
}
_SERVER_PUSHES = {
    F.OK, F.JOINED, F.ROOM_LIST, F.MEMBER_LIST, F.ACK, F.MESSAGE, F.SYNC_PAGE, F.SYNC_DONE,
    F.HISTORY_PAGE, F.RECEIPT, F.CURSORS, F.PRESENCE, F.USER_TYPING,
    F.CONVERSATION_LIST, F.MEMBERSHIP, F.NODES, F.SESSION_LIST, F.EVENTS, F.ROOM_DETAILS, F.USER_LIST,  # version 2
}

#: (state, sender) → {frame type: state after it}. Absent means illegal. A frame type newer than the
#: connection's negotiated version is not in the protocol at all (``Connection`` refuses it before this table).
TRANSITIONS: dict[tuple[State, Role], dict[F, State]] = {}


def _allow(state: State, sender: Role, frames: Iterable[F], after: State | None = None) -> None:
    TRANSITIONS.setdefault((state, sender), {}).update({f: after or state for f in frames})


_allow(State.HANDSHAKE, CLIENT, {F.HELLO}, State.NEGOTIATING)
_allow(State.HANDSHAKE, CLIENT, _ANYTIME)
_allow(State.HANDSHAKE, SERVER, _ANYTIME)  # e.g. refusing a connection when the server is full
_allow(State.NEGOTIATING, SERVER, {F.WELCOME}, State.UNAUTHENTICATED)
_allow(State.NEGOTIATING, SERVER, _ANYTIME)
_allow(State.NEGOTIATING, CLIENT, {F.BYE})

_allow(State.UNAUTHENTICATED, CLIENT, {F.REGISTER, F.REGISTER_INVITE, F.LOGIN, F.RESUME} | _LIVE | _ANYTIME)
_allow(State.UNAUTHENTICATED, SERVER, {F.AUTH_OK}, State.AUTHENTICATED)
_allow(State.UNAUTHENTICATED, SERVER, {F.GOAWAY, F.NODES} | _LIVE | _ANYTIME)

_allow(State.AUTHENTICATED, CLIENT, {F.LOGOUT, F.LOGOUT_ALL}, State.CLOSING)
_allow(State.AUTHENTICATED, CLIENT, _CLIENT_REQUESTS | _LIVE | _ANYTIME)
_allow(State.AUTHENTICATED, SERVER, _SERVER_PUSHES | {F.GOAWAY} | _LIVE | _ANYTIME)

_allow(State.CLOSING, CLIENT, {F.PONG} | _ANYTIME)
_allow(State.CLOSING, SERVER, _SERVER_PUSHES | {F.GOAWAY} | _LIVE | _ANYTIME)


def next_state(state: State, sender: Role, frame: F) -> State | None:
    """The state after ``sender`` sends ``frame`` in ``state``, or None when that is illegal."""
    return TRANSITIONS.get((state, sender), {}).get(frame)
