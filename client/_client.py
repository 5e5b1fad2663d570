"""The Chorus client library on Trio (spec/PROTOCOL.md §5 frames; §9.3-§9.5 seq, sends, SYNC; §9.13 GOAWAY).

How this works. ``open_client`` gives each client one nursery with two long-lived tasks:

- the supervisor (``_run``) owns the connection. For each connection it starts a
  reader, says HELLO, authenticates (RESUME with the token when it has one,
  falling back to LOGIN on INVALID_TOKEN if it has the password), SYNCs from
  ``last_seq``, re-sends every request still waiting for an answer, and only
  then marks the client ready. When the connection ends it reconnects after a
  GOAWAY's delay, or with exponential backoff and full jitter.
- the repairer (``_repair``) fetches with HISTORY the messages the reader could
  not hand over: the event queue was full (slow consumer) or a seq gap showed
  one was missed. So the reader never waits for the consumer, and nothing is lost.

Requests. Every request is a ``_Call`` in ``_calls``, keyed by its request id,
in the order it was made. The reader completes a call when a frame with its
request id arrives (SYNC_PAGE only feeds the event stream; SYNC_DONE completes
the SYNC). When the connection drops, calls stay in ``_calls`` and the
supervisor re-sends them, in order and with the same fields, on the next
connection: for SEND that is the outbox, and since the client_msg_id is the
same the server answers a retry of a stored message with duplicate=True.

Exactly once, in order. The server delivers messages at least once (live,
SYNC pages, repeated pages after a reconnect); ``_offer_message`` drops any
seq <= ``last_seq[conv]`` and advances ``last_seq`` only for what it handed to
the event queue, so the consumer sees each message once, in seq order per
conversation.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import secrets
import ssl
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Sequence

import trio

from chorus import proto
from chorus.proto import CloseReason, ErrorCode

from ._errors import ConnectionLost, ServerError
from ._events import Disconnected, Page, Reconnected
from ._queue import EventQueue
from ._transport import Transport, TransportClosed

log = logging.getLogger("chorus.client")

#: Request type → the reply type that completes it (anything else but ERROR is a server bug).
_REPLY: dict[type, type] = {
    proto.Hello: proto.Welcome,
    proto.Register: proto.AuthOk,
    proto.RegisterInvite: proto.AuthOk,  # version 2
    proto.Login: proto.AuthOk,
    proto.Resume: proto.AuthOk,
    proto.Join: proto.Joined,
    proto.Leave: proto.Ok,
    proto.ListRooms: proto.RoomList,
    proto.Members: proto.MemberList,
    proto.Send: proto.Ack,
    proto.Sync: proto.SyncDone,
    proto.History: proto.HistoryPage,
    proto.GetCursors: proto.Cursors,
    proto.ListConversations: proto.ConversationList,  # version 2
    proto.ChangePassword: proto.Ok,  # version 2
    proto.ListSessions: proto.SessionList,  # version 2
    proto.RevokeSession: proto.Ok,  # version 2
    proto.Kick: proto.Ok,  # version 2 from here on
    proto.Ban: proto.Ok,
    proto.Unban: proto.Ok,
    proto.Mute: proto.Ok,
    proto.Unmute: proto.Ok,
    proto.DeleteMessage: proto.Ok,
    proto.SetTopic: proto.Ok,
    proto.SetRole: proto.Ok,
    proto.Invite: proto.Ok,
    proto.CreateRoom: proto.Joined,
    proto.GetRoom: proto.RoomDetails,
    proto.EditMessage: proto.Ok,
    proto.React: proto.Ok,
    proto.SendAction: proto.Ack,
    proto.SetDisplayName: proto.Ok,
    proto.GetUsers: proto.UserList,
    proto.Ping: proto.Pong,
}
#: Pushes handed to ``events()`` as they are (MEMBERSHIP only arrives on a version 2 connection).
_EPHEMERAL = (proto.Presence, proto.UserTyping, proto.Receipt, proto.Membership)
#: Refusals that no amount of retrying will change: stop reconnecting.
_FATAL = {
    ErrorCode.AUTH_FAILED, ErrorCode.INVALID_TOKEN, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.USERNAME_TAKEN,
    ErrorCode.INVALID_NAME, ErrorCode.WEAK_PASSWORD,
}
_NOT_OURS = (ErrorCode.NOT_MEMBER, ErrorCode.NOT_FOUND)
#: EVENTS frames held for the page that follows them, at most (one per page in flight).
_MAX_PAGES_PENDING = 64
#: When a refusal gives no retry hint (retry_after_ms 0), wait this long before asking again.
_DEFAULT_RETRY_S = 1.0


def client_tls_context(tls: bool | ssl.SSLContext, ca_file: str | None = None) -> ssl.SSLContext | None:
    """The context for ``Client(tls=..., ca_file=...)``: None (plain TCP) when neither is given; the given context; or
    the system's trusted CAs, or only ``ca_file``'s (a PEM file, which turns TLS on by itself). TLS 1.2 at least."""
    if isinstance(tls, ssl.SSLContext):
        if ca_file is not None:
            raise ValueError("give either an SSLContext or ca_file, not both")
        return tls
    if not tls and ca_file is None:
        return None
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _retry_delay_s(error: ServerError) -> float:
    return error.retry_after_ms / 1000 if error.retry_after_ms else _DEFAULT_RETRY_S
#: What a failed connection attempt can raise; anything else is a bug and propagates.
_ATTEMPT_ERRORS = (OSError, TransportClosed, ConnectionLost, ServerError, trio.TooSlowError, proto.ProtocolError)


def parse_conv(conv: "str | proto.Conversation") -> proto.Conversation:
    """``"#room"`` → room, ``"@user"`` → direct conversation; a Conversation passes through.

    Raises ``ValueError`` for anything else.
    """
    if isinstance(conv, proto.Conversation):
        return conv
    if isinstance(conv, str) and len(conv) > 1:
        if conv[0] == "#":
            return proto.Conversation.room(conv[1:])
        if conv[0] == "@":
            return proto.Conversation.direct(conv[1:])
    raise ValueError(f"a conversation is '#room' or '@user', not {conv!r}")


def _room_name(room: str) -> str:
    return room[1:] if room.startswith("#") else room


def backoff_delay(failures: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**failures)]."""
    return (rng or random).uniform(0.0, min(cap_s, base_s * 2 ** min(failures, 32)))


def _merged(messages: Sequence[proto.StoredMessage],
            events: Sequence[proto.ConvEvent]) -> list[proto.StoredMessage | proto.ConvEvent]:
    return sorted([*messages, *events], key=lambda entry: entry.seq) if events else list(messages)


def _item(conv: proto.Conversation, entry: proto.StoredMessage | proto.ConvEvent) -> proto.Message | proto.Events:
    """A page's entry as the event stream hands it over: a MESSAGE, or an EVENTS with the one event."""
    if isinstance(entry, proto.ConvEvent):
        return proto.Events(conv, (entry,))
    return _message(conv, entry)


def _message(conv: proto.Conversation, stored: proto.StoredMessage) -> proto.Message:
    return proto.Message(conv, stored.seq, stored.ts_ms, stored.sender, stored.client_msg_id, stored.body)


@dataclasses.dataclass
class ClientStatistics:
    duplicates_dropped: int = 0  # messages with seq <= last_seq (at-least-once delivery at work)
    messages_refetched: int = 0  # messages the event queue had no room for, or missed, fetched again by seq
    events_dropped: int = 0  # ephemeral/control events dropped because the event queue was full
    reconnects: int = 0
    requests_resent: int = 0


class _Call:
    """One request waiting for its answer, possibly across several connections."""

    __slots__ = ("rid", "event", "internal", "sent_gen", "sent_at", "attempts", "done", "reply", "error")

    def __init__(self, rid: int, event: proto.Event, internal: bool):
        self.rid = rid
        self.event = event
        self.internal = internal  # part of establishing one connection: never re-sent on another
        self.sent_gen: int | None = None  # the connection it was last written to; None = never / needs it again
        self.sent_at = 0.0
        self.attempts = 0
        self.done = trio.Event()
        self.reply = None
        self.error: BaseException | None = None

    def finish(self, reply=None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()

    def rearm(self) -> None:
        self.done = trio.Event()
        self.reply = self.error = None
        self.sent_gen = None


class Client:
    """A connection to a Chorus server that survives reconnects; make one with ``open_client``.

    Options: ``token`` is preferred to ``username``/``password`` (kept to LOGIN again if the
    token is refused); ``register`` creates the account on the first connection (with ``invite``, a
    one-time code, on a server whose registration is by invite: REGISTER_INVITE, version 2); ``on_token``
    (sync or async) gets every new token. ``request_timeout_s`` bounds every request, waiting
    for a reconnect included (``trio.TooSlowError``). ``event_buffer`` is how many messages
    (and, separately, other events) ``events()`` holds. ``sync_on_connect=False`` skips the
    SYNC of the first connection; the server holds back the MESSAGEs of conversations the
    user already has until a SYNC (spec §9.1), so call ``sync()`` yourself, e.g. after
    seeding ``last_seq`` from your own store. ``backoff_base_s``/``backoff_cap_s`` shape the
    reconnect backoff; ``pace`` keeps frames within WELCOME's rate limit;
    ``retry_rate_limited`` re-sends a request refused with RATE_LIMITED after its hint; one refused
    with SERVER_BUSY (nothing was done) is always re-sent after its hint, and logging in waits out
    both. ``max_protocol_version`` is the newest protocol version HELLO offers (spec §6; the default
    is the newest this library speaks); ``version`` is the one the server chose. ``servers``: other nodes of the
    same cluster (node mode); when its node is lost or going away the client moves to the next one at once and
    resumes by seq there, and the first connection tries each before it gives up. ``tls``: True (the system's
    trusted CAs, or ``ca_file``'s), or an ``ssl.SSLContext``; every node then speaks TLS (spec §1).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        register: bool = False,
        invite: str | None = None,
        reconnect: bool = True,
        client_name: str = "chorus-py",
        on_token: Callable | None = None,
        request_timeout_s: float = 30.0,
        event_buffer: int = 1000,
        sync_on_connect: bool = True,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 10.0,
        pace: bool = True,
        retry_rate_limited: bool = True,
        max_protocol_version: int = proto.PROTOCOL_VERSION,
        servers: Sequence[tuple[str, int]] = (),
        tls: bool | ssl.SSLContext = False,
        ca_file: str | None = None,
    ):
        credentials = (username, password) if username is not None and password is not None else None
        if token is None and credentials is None:
            raise ValueError("give a token, or a username and password")
        if not proto.MIN_PROTOCOL_VERSION <= max_protocol_version <= proto.PROTOCOL_VERSION:
            raise ValueError(f"max_protocol_version must be in {proto.MIN_PROTOCOL_VERSION}..{proto.PROTOCOL_VERSION}")
        self._max_version = max_protocol_version
        #: TLS (spec §1): None for plain TCP; else the context every connection's handshake uses.
        self._tls = client_tls_context(tls, ca_file)
        #: Where to connect: (host, port) first, then ``servers`` (other nodes of the same cluster), in turn.
        self._addresses = [(host, port)] + [(h, p) for h, p in servers if (h, p) != (host, port)]
        self._address_index = 0
        #: The cluster's live nodes, from the server's last NODES push (node mode, version 2); () otherwise.
        self.nodes: tuple[proto.NodeInfo, ...] = ()
        self._credentials = credentials
        self._register = register and token is None
        self._invite = invite
        self._reconnect = reconnect
        self._client_name = client_name
        self._on_token = on_token
        self._timeout = request_timeout_s
        self._sync_on_connect = sync_on_connect
        self._backoff_base_s, self._backoff_cap_s = backoff_base_s, backoff_cap_s
        self._pace = pace
        self._retry_rate_limited = retry_rate_limited

        self.username: str | None = username
        self.token: str | None = token
        self.welcome: proto.Welcome | None = None
        #: Highest seq handed to the event stream, per conversation (from MESSAGE and SYNC pages;
        #: a JOIN starts a room we knew nothing about at the room's current last seq).
        self.last_seq: dict[proto.Conversation, int] = {}

        self._queue = EventQueue(event_buffer, event_buffer)
        self._calls: dict[int, _Call] = {}
        self._next_rid = 0
        self._transport: Transport | None = None
        self._gen = 0
        self._ready = False  # user requests may be written to self._transport now
        self._closing = False  # close() or logout() began: never reconnect
        self._closed = False
        self._close_error: ConnectionLost | None = None
        self._lag: dict[proto.Conversation, int] = {}  # conv → highest seq seen but not handed over
        # request id → the EVENTS that came right before its SYNC_PAGE or HISTORY_PAGE (version 2, spec §9.15)
        self._page_events: dict[int, tuple[proto.ConvEvent, ...]] = {}
        self._lag_wakeup = trio.Event()
        self._marks: dict[tuple[proto.Conversation, proto.ReceiptKind], int] = {}  # to re-send on reconnect
        self._first_done = trio.Event()
        self._first_error: BaseException | None = None
        self._nursery: trio.Nursery | None = None
        self._stats = ClientStatistics()

    # -- public state ----------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """The node this client connects (or is connected) to."""
        return self._addresses[self._address_index]

    @property
    def connected(self) -> bool:
        """True while a connection is up, authenticated, caught up and taking requests."""
        return self._ready

    def events(self) -> EventQueue:
        """The event stream: ``async for event in client.events()``.

        Yields ``proto.Message`` (live and caught up, each once, in seq order per
        conversation; on version 2, ``proto.Events`` with one event takes its seq in that order too: a moderation
        event, spec §9.15), ``proto.Presence``, ``proto.UserTyping``, ``proto.Receipt``,
        ``proto.GoAway``, ``proto.Error`` (an ERROR that answers no request),
        ``Disconnected`` and ``Reconnected``. Ends when the client is closed.
        """
        return self._queue

    def statistics(self) -> ClientStatistics:
        self._stats.events_dropped = self._queue.dropped
        return dataclasses.replace(self._stats)

    # -- requests ----------------------------------------------------------------
    async def join(self, room: str) -> proto.Joined:
        """Join (or create) ``room``. Raises ``ServerError`` (INVALID_NAME, TOO_MANY_ROOMS, FORBIDDEN: banned or
        invite-only...)."""
        return self._joined(await self._request(proto.Join(_room_name(room))))

    async def create_room(self, room: str, *, private: bool = False) -> proto.Joined:
        """Create ``room`` and join it as its owner; ``private``: invite-only and unlisted (version 2, spec
        §9.15). Raises ``ServerError`` (INVALID_REQUEST: the name is taken, TOO_MANY_ROOMS, RATE_LIMITED)."""
        return self._joined(await self._request(proto.CreateRoom(_room_name(room), private)))

    def _joined(self, joined: proto.Joined) -> proto.Joined:
        conv = proto.Conversation.room(joined.room)
        if conv not in self.last_seq and conv not in self._lag:
            # Messages before the join are history, not events.
            self.last_seq[conv] = joined.last_seq
        return joined

    async def leave(self, room: str) -> None:
        """Leave ``room``. Raises ``ServerError`` (NOT_MEMBER)."""
        name = _room_name(room)
        call = await self._call(proto.Leave(name))
        error = call.error
        # A LEAVE re-sent after a reconnect may find its first copy already done.
        if error is not None and not (isinstance(error, ServerError) and error.code == ErrorCode.NOT_MEMBER
                                      and call.attempts > 1):
            raise error
        self._forget([proto.Conversation.room(name)])

    async def rooms(self) -> list[proto.RoomInfo]:
        return list((await self._request(proto.ListRooms())).rooms)

    @property
    def version(self) -> int | None:
        """The protocol version of the current (or last) connection, as WELCOME chose it; None before one."""
        return self.welcome.version if self.welcome is not None else None

    async def conversations(self) -> list[proto.ConversationInfo]:
        """Every conversation of the user, rooms and direct ones, with its newest seq and the user's cursors,
        the most recently active first (version 2, spec §5.37). Raises ``proto.LocalProtocolError``
        (UNKNOWN_FRAME_TYPE) when the server speaks only version 1: use ``rooms()`` there."""
        return list((await self._request(proto.ListConversations())).conversations)

    async def members(self, room: str) -> list[proto.MemberInfo]:
        """Members of ``room`` with their status. Raises ``ServerError`` (NOT_MEMBER)."""
        return list((await self._request(proto.Members(_room_name(room)))).members)

    async def send(self, conv, body: str, *, client_msg_id: int | None = None) -> proto.Ack:
        """Send ``body`` and return the ACK once the server has stored it.

        The message stays in the outbox until then and is re-sent with the same
        ``client_msg_id`` after a reconnect, so it is stored exactly once. Raises
        ``ServerError`` (NOT_MEMBER, NOT_FOUND, BODY_TOO_LARGE...), ``ConnectionLost``,
        ``trio.TooSlowError``, ``proto.LocalProtocolError`` for a body over the wire limit.
        """
        if client_msg_id is None:
            client_msg_id = secrets.randbits(63) or 1
        return await self._request(proto.Send(parse_conv(conv), client_msg_id, body))

    async def send_action(self, conv, body: str, *, client_msg_id: int | None = None) -> proto.Ack:
        """Send an action ("/me waves" is ``send_action(conv, "waves")``), stored and retried like ``send``; the
        others get it as an ACTION event (version 2, spec §9.16; older clients see "/me waves")."""
        if client_msg_id is None:
            client_msg_id = secrets.randbits(63) or 1
        return await self._request(proto.SendAction(parse_conv(conv), client_msg_id, body))

    async def edit_message(self, conv, seq: int, body: str) -> None:
        """Replace the text of one's own message at ``seq`` (an EDIT event; version 2). Raises ``ServerError``
        (FORBIDDEN: not one's own, NOT_FOUND)."""
        await self._request(proto.EditMessage(parse_conv(conv), seq, body))

    async def react(self, conv, seq: int, reaction: str, *, add: bool = True) -> None:
        """Add (``add=False``: take back) a reaction to the message at ``seq`` (REACT/UNREACT events; version 2).
        Adding one that is there, or taking back one that is not, changes nothing."""
        await self._request(proto.React(parse_conv(conv), seq, reaction, add))

    async def set_display_name(self, name: str) -> None:
        """Set (``""``: clear) the user's display name, Unicode beside the login name (version 2, spec §9.17).
        Raises ``ServerError`` (INVALID_NAME: breaks ``proto.DISPLAY_NAME_RULE`` or looks like another user's)."""
        await self._request(proto.SetDisplayName(name))

    async def display_names(self, users: Sequence[str]) -> dict[str, str]:
        """Login name → display name ("" when none) of those of ``users`` that exist (at most 1000 per call)."""
        listed = await self._request(proto.GetUsers(tuple(users)))
        return {info.user: info.display_name for info in listed.users}

    async def history(self, conv, *, before: int | None = None, after: int | None = None,
                      limit: int = 0) -> Page:
        """A page of stored messages (and, on version 2, events: ``Page.entries``), ascending: the newest ones by
        default, those with seq < ``before``, or those with seq > ``after``. ``limit`` 0 means the server's page
        size. Raises ``ServerError``."""
        if before is not None and after is not None:
            raise ValueError("give before or after, not both")
        if after is not None:
            event = proto.History(parse_conv(conv), proto.Direction.AFTER, after, limit)
        else:
            event = proto.History(parse_conv(conv), proto.Direction.BEFORE, before or 0, limit)
        return await self._request(event)

    async def sync(self) -> None:
        """Catch up every conversation from ``last_seq`` (and the server's delivered cursor for the
        others); the messages arrive in the event stream before this returns."""
        await self._sync(self._request)

    async def mark_read(self, conv, seq: int) -> None:
        await self._mark(parse_conv(conv), proto.ReceiptKind.READ, seq)

    async def mark_delivered(self, conv, seq: int) -> None:
        await self._mark(parse_conv(conv), proto.ReceiptKind.DELIVERED, seq)

    async def typing(self, conv) -> None:
        """Tell the others we are typing; dropped silently while reconnecting (it is ephemeral)."""
        await self._push(proto.Typing(parse_conv(conv)), keep=False)

    async def cursors(self, conv) -> list[proto.CursorInfo]:
        return list((await self._request(proto.GetCursors(parse_conv(conv)))).cursors)

    async def ping(self) -> float:
        """Round trip time to the server, in seconds."""
        call = await self._call(proto.Ping(secrets.randbits(63)))
        if call.error is not None:
            raise call.error
        return trio.current_time() - call.sent_at

    async def logout(self) -> None:
        """Revoke the token (the server closes the connection) and close the client."""
        await self._end_session(proto.Logout())

    async def logout_all(self) -> None:
        """Revoke every session of the user, on every device (their connections close with BYE LOGGED_OUT), and
        close the client (version 2, spec §5.42)."""
        await self._end_session(proto.LogoutAll())

    async def _end_session(self, event: proto.Logout | proto.LogoutAll) -> None:
        t = self._transport
        if not self._ready or t is None:
            raise ConnectionLost("not connected")
        self._closing = True
        self._ready = False
        with trio.move_on_after(self._timeout):
            try:
                await t.send(dataclasses.replace(event, request_id=self._new_rid()))
            except TransportClosed:
                pass
            await t.closed.wait()
        self.token = None
        await self.close()

    async def change_password(self, old: str, new: str) -> None:
        """Replace the user's password; every other session of the user is revoked and its connections close,
        this one stays (version 2, spec §5.41). Raises ``ServerError`` (AUTH_FAILED: ``old`` is wrong,
        WEAK_PASSWORD: ``new`` breaks ``proto.PASSWORD_RULE``)."""
        await self._request(proto.ChangePassword(old, new))
        if self._credentials is not None:  # a later LOGIN (the token refused on a reconnect) needs the new one
            self._credentials = (self._credentials[0], new)

    async def sessions(self) -> list[proto.SessionInfo]:
        """The user's sessions (one per logged-in device or login), oldest first; ``current`` marks this
        connection's (version 2, spec §5.43)."""
        return list((await self._request(proto.ListSessions())).sessions)

    async def revoke_session(self, session_id: int) -> None:
        """Revoke one of the user's sessions (an id from ``sessions()``): its connections close. Revoking the
        current one ends this connection as ``logout()`` would. Raises ``ServerError`` (NOT_FOUND)."""
        await self._request(proto.RevokeSession(session_id))

    # -- moderation (version 2, spec §9.15): each raises ServerError (FORBIDDEN, NOT_MEMBER, NOT_FOUND...) ----------
    async def kick(self, room: str, user: str, reason: str = "") -> None:
        """Remove ``user`` from ``room`` (moderators, owner); they may join again."""
        await self._request(proto.Kick(_room_name(room), user, reason))

    async def ban(self, room: str, user: str, *, until_ms: int = 0, reason: str = "") -> None:
        """Remove ``user`` from ``room`` and keep them out until ``until_ms`` (0: until ``unban``)."""
        await self._request(proto.Ban(_room_name(room), user, until_ms, reason))

    async def unban(self, room: str, user: str) -> None:
        await self._request(proto.Unban(_room_name(room), user))

    async def mute(self, room: str, user: str, *, until_ms: int = 0, reason: str = "") -> None:
        """Refuse ``user``'s messages to ``room`` until ``until_ms`` (0: until ``unmute``)."""
        await self._request(proto.Mute(_room_name(room), user, until_ms, reason))

    async def unmute(self, room: str, user: str) -> None:
        await self._request(proto.Unmute(_room_name(room), user))

    async def delete_message(self, conv, seq: int) -> None:
        """Replace the message at ``seq`` by a tombstone: one's own, or any as a moderator of the room."""
        await self._request(proto.DeleteMessage(parse_conv(conv), seq))

    async def set_topic(self, room: str, topic: str) -> None:
        await self._request(proto.SetTopic(_room_name(room), topic))

    async def set_role(self, room: str, user: str, role: proto.RoomRole) -> None:
        """Give a member a role (the owner only; OWNER hands the room over)."""
        await self._request(proto.SetRole(_room_name(room), user, role))

    async def invite(self, room: str, user: str) -> None:
        """Add ``user`` to ``room`` (moderators, owner): the way into a private room."""
        await self._request(proto.Invite(_room_name(room), user))

    async def room(self, room: str) -> proto.RoomDetails:
        """``room``'s topic, whether it is private, its members with roles, presence and mutes, and (to
        moderators) its bans."""
        return await self._request(proto.GetRoom(_room_name(room)))

    async def close(self) -> None:
        """Say BYE(CLIENT_QUIT), close the connection and end the event stream. Idempotent."""
        self._closing = True
        self._ready = False
        t = self._transport
        with trio.CancelScope(shield=True):
            if t is not None and not t.closed.is_set() and not self._closed:
                with trio.move_on_after(1.0):
                    try:
                        await t.send(proto.Bye(CloseReason.CLIENT_QUIT))
                    except (TransportClosed, proto.LocalProtocolError):
                        pass
                await t.aclose()
        if not self._closed:
            self._shutdown(ConnectionLost("client closed"))
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- request machinery -----------------------------------------------------
    def _new_rid(self) -> int:
        while True:
            self._next_rid = self._next_rid % 0xFFFFFFFF + 1
            if self._next_rid not in self._calls:
                return self._next_rid

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise self._close_error or ConnectionLost("client closed")

    def _writable(self) -> Transport | None:
        """The connection user requests may be written to now (``_ready``), or None."""
        return self._transport if self._ready else None

    async def _call(self, event: proto.Event) -> _Call:
        """Make a request and wait for its answer (raising only for timeout, loss or encoding);
        the caller looks at ``call.error``."""
        self._check_open()
        # Its fields were checked when it was made (proto's events check themselves); what only the connection
        # can judge (the server's max_frame_bytes, the negotiated version) fails the call when it is written.
        rid = self._new_rid()
        call = _Call(rid, dataclasses.replace(event, request_id=rid), internal=False)
        self._calls[rid] = call
        try:
            with trio.fail_after(self._timeout):
                while True:
                    if call.sent_gen is None:
                        if (t := self._writable()) is not None:
                            await self._transmit(call, t)
                        elif not self._reconnect or self._closing or self._closed:
                            raise self._close_error or ConnectionLost("not connected")
                        # else: the supervisor sends it once a new connection is up
                    await call.done.wait()
                    error = call.error
                    if isinstance(error, ServerError) and (
                            error.code == ErrorCode.SERVER_BUSY
                            or error.code == ErrorCode.RATE_LIMITED and self._retry_rate_limited):
                        # Not acted on (spec §7.1): the same request again after the hint is safe,
                        # a SEND included (same client_msg_id).
                        call.rearm()
                        await trio.sleep(_retry_delay_s(error))
                        continue
                    break
        finally:
            self._calls.pop(rid, None)
        if isinstance(call.error, ConnectionLost):
            raise call.error
        return call

    async def _request(self, event: proto.Event):
        call = await self._call(event)
        if call.error is not None:
            raise call.error
        return call.reply

    async def _internal(self, t: Transport, event: proto.Event):
        """A request that is part of establishing ``t``; fails rather than surviving ``t``."""
        rid = self._new_rid()
        call = _Call(rid, dataclasses.replace(event, request_id=rid), internal=True)
        self._calls[rid] = call
        try:
            await self._transmit(call, t)
            await call.done.wait()
        finally:
            self._calls.pop(rid, None)
        if call.error is not None:
            raise call.error
        return call.reply

    async def _transmit(self, call: _Call, t: Transport) -> None:
        call.sent_gen = t.gen
        call.sent_at = trio.current_time()
        call.attempts += 1
        try:
            await t.send(call.event)
        except TransportClosed:
            if t.closed.is_set():  # the reader already settled this connection's calls
                self._settle_lost(call, t)
            # else the reader will, when it sees the end
        except proto.LocalProtocolError as exc:
            call.finish(error=exc)

    def _settle_lost(self, call: _Call, t: Transport) -> None:
        """``call`` was written to ``t``, which is gone: fail it, or leave it for the next connection."""
        if call.internal or not self._reconnect or self._closing:
            call.finish(error=ConnectionLost(self._lost_message(t), t.bye_reason))

    async def _push(self, event: proto.Event, *, keep: bool) -> None:
        """Write a frame that has no reply. While reconnecting it is dropped (``keep`` frames are
        re-sent by the supervisor from their own record). Raises ``ConnectionLost`` if not reconnecting."""
        self._check_open()
        if (t := self._writable()) is not None:
            try:
                await t.send(event)
            except TransportClosed:
                pass
        elif not self._reconnect:
            raise self._close_error or ConnectionLost("not connected")

    async def _mark(self, conv: proto.Conversation, kind: proto.ReceiptKind, seq: int) -> None:
        event = (proto.Read if kind == proto.ReceiptKind.READ else proto.Delivered)(conv, seq)  # checks seq
        key = (conv, kind)
        # Remembered until the next connection is established, which re-sends it: the write
        # may have been lost with the connection, and the server keeps the highest anyway.
        self._marks[key] = max(self._marks.get(key, 0), seq)
        await self._push(event, keep=True)

    async def _sync(self, call) -> None:
        """SYNC from ``last_seq`` (at most 1000 positions per SYNC, spec §9.5), with ``call`` making requests."""
        positions = [proto.Position(conv, seq) for conv, seq in self.last_seq.items()]
        chunks = [positions[i:i + proto.MAX_LIST_ITEMS] for i in range(0, len(positions), proto.MAX_LIST_ITEMS)]
        for chunk in chunks or [[]]:
            try:
                await call(proto.Sync(tuple(chunk)))
                continue
            except ServerError as exc:
                if exc.code not in _NOT_OURS:
                    raise
            # The server refuses the whole SYNC when a listed conversation is not the user's any more
            # (a room left from another device): drop what is not ours and try again.
            joined = {r.name for r in (await call(proto.ListRooms())).rooms if r.joined}
            keep = [p for p in chunk if p.conv.kind == proto.ConvKind.DIRECT or p.conv.name in joined]
            self._forget(p.conv for p in chunk if p not in keep)
            try:
                await call(proto.Sync(tuple(keep)))
                continue
            except ServerError as exc:
                if exc.code not in _NOT_OURS:
                    raise
            # Still refused (a direct conversation gone?): one position at a time.
            for position in keep:
                try:
                    await call(proto.Sync((position,)))
                except ServerError as exc:
                    if exc.code not in _NOT_OURS:
                        raise
                    self._forget([position.conv])

    def _forget(self, convs) -> None:
        for conv in list(convs):
            self.last_seq.pop(conv, None)
            self._lag.pop(conv, None)

    # -- delivery ------------------------------------------------------------------
    def _offer_message(self, msg: proto.Message | proto.Events) -> None:
        """Hand over a MESSAGE, or an EVENTS with one event (which takes a seq like a message, spec §9.15)."""
        conv = msg.conv
        seq = msg.seq if isinstance(msg, proto.Message) else msg.events[0].seq
        last = self.last_seq.get(conv)
        if last is not None and seq <= last:
            self._stats.duplicates_dropped += 1
            return
        if conv in self._lag:
            self._lag[conv] = max(self._lag[conv], seq)
            return
        # A gap means a message went missing (e.g. committed between a JOIN's snapshot and its
        # subscription); fetching from last_seq repairs it before anything later is shown.
        if (last is not None and seq > last + 1) or not self._queue.offer_message(msg):
            self._lag[conv] = seq
            self._lag_wakeup.set()
            return
        self.last_seq[conv] = seq

    async def _repair(self) -> None:
        """Hand over, in order, what ``_offer_message`` could not: fetched again by seq."""
        while True:
            if not self._lag:
                self._lag_wakeup = trio.Event()
                await self._lag_wakeup.wait()
                continue
            conv = next(iter(self._lag))
            try:
                page = await self._request(proto.History(conv, proto.Direction.AFTER, self.last_seq.get(conv, 0), 0))
            except ServerError:
                self._lag.pop(conv, None)  # e.g. left the room meanwhile
                continue
            except trio.TooSlowError:
                continue
            except ConnectionLost:
                return
            progressed = False
            for stored in page.entries:
                if stored.seq <= self.last_seq.get(conv, 0):
                    continue
                try:
                    await self._queue.put_message(_item(conv, stored))
                except trio.ClosedResourceError:
                    return
                self.last_seq[conv] = stored.seq
                self._stats.messages_refetched += 1
                progressed = True
            target = self._lag.get(conv)
            if target is not None and not page.has_more and (self.last_seq.get(conv, 0) >= target or not progressed):
                # Checked and removed with no await in between: the reader drops nothing unseen.
                del self._lag[conv]

    # -- the reader ------------------------------------------------------------------
    async def _read_loop(self, t: Transport) -> None:
        try:
            while True:
                event = await t.receive()
                if isinstance(event, proto.ConnectionClosed):
                    break
                if not await self._dispatch(t, event):
                    break
        except TransportClosed as exc:
            t.detail = t.detail or str(exc)
        except proto.RemoteProtocolError as exc:
            t.abort_reason = CloseReason.PROTOCOL_ERROR
            t.detail = f"server broke the protocol: {exc}"
            log.warning("%s", t.detail)
            with trio.move_on_after(1.0):
                try:
                    await t.send(proto.Error(exc.code, 0, str(exc)[:200]))
                    await t.send(proto.Bye(CloseReason.PROTOCOL_ERROR))
                except (TransportClosed, proto.LocalProtocolError):
                    pass
        finally:
            self._connection_lost(t)
            await t.aclose()

    async def _dispatch(self, t: Transport, event) -> bool:
        """Act on one frame from the server; False means the connection is over (BYE)."""
        kind = type(event)
        if kind is proto.Message:
            self._offer_message(event)
        elif kind is proto.SyncPage:
            events = self._page_events.pop(event.request_id, ())
            for stored in _merged(event.messages, events):
                self._offer_message(_item(event.conv, stored))
        elif kind is proto.Events:
            if event.request_id:  # the events of the page that follows (spec §9.15)
                if len(self._page_events) >= _MAX_PAGES_PENDING:  # a page never came: a server bug, not ours to hold
                    self._page_events.clear()
                self._page_events[event.request_id] = event.events
            else:
                for item in event.events:
                    self._offer_message(proto.Events(event.conv, (item,)))
        elif kind is proto.Ping:
            try:
                await t.send(event.response())
            except TransportClosed:
                return False
        elif event.request_id and kind is not proto.Bye:
            call = self._calls.get(event.request_id)
            if call is None or call.done.is_set() or call.sent_gen != t.gen:
                return True  # the answer to a request that timed out or was cancelled
            if kind is proto.Error:
                call.finish(error=ServerError.from_event(event))
            elif kind is proto.HistoryPage:
                events = self._page_events.pop(event.request_id, ())
                call.finish(reply=Page(event.conv, event.messages, events, event.has_more))
            elif kind is _REPLY[type(call.event)]:
                call.finish(reply=event)
            else:
                call.finish(error=proto.RemoteProtocolError(
                    f"server answered {type(call.event).__name__} with {kind.__name__}"))
        elif kind in _EPHEMERAL or kind is proto.Error:
            self._queue.offer(event)
        elif kind is proto.Nodes:
            self._learn_nodes(event.nodes)
        elif kind is proto.GoAway:
            t.goaway, t.goaway_at = event, trio.current_time()
            if self._reconnect and self._transport is t:
                self._ready = False  # new requests wait for the next connection
            self._queue.offer(event)
        elif kind is proto.Bye:
            t.bye_reason = event.reason
            return False
        return True

    def _connection_lost(self, t: Transport) -> None:
        """Settle everything that depended on ``t``; synchronous, so no request slips in between."""
        if t.closed.is_set():
            return
        t.closed.set()
        if self._transport is t:
            self._ready = False
        for call in list(self._calls.values()):
            if call.sent_gen == t.gen and not call.done.is_set():
                self._settle_lost(call, t)

    @staticmethod
    def _lost_message(t: Transport) -> str:
        if t.bye_reason is not None:
            return f"server closed the connection ({t.bye_reason.name})"
        return "connection lost" + (f": {t.detail}" if t.detail else "")

    # -- the supervisor ----------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        last: Transport | None = None
        first = True
        while True:
            if not first:
                await self._pause(last, failures)
                if self._closing:
                    return
            try:
                t = await self._session(first)
            except _ATTEMPT_ERRORS as exc:
                if first and not isinstance(exc, ServerError) and len(self._addresses) > 1 \
                        and failures < len(self._addresses) - 1:
                    failures += 1  # the first connection tries every node once before it gives up
                    self._next_address()
                    continue
                if first:
                    self._first_error = exc
                    self._first_done.set()
                    self._shutdown(ConnectionLost(f"could not connect: {exc}"))
                    return
                if self._closing:
                    return
                if isinstance(exc, ServerError) and exc.code in _FATAL:
                    self._queue.offer(Disconnected(CloseReason.PEER_CLOSED, f"reconnect refused: {exc}", False))
                    self._shutdown(ConnectionLost(f"reconnect refused: {exc}"))
                    return
                log.info("reconnect attempt %d failed: %s", failures + 1, exc)
                failures += 1
                self._next_address()
                continue
            if self._closing:
                return
            first, failures, last = False, 0, t
            self._next_address()  # that node is gone or going: try another first
            reason = t.bye_reason or t.abort_reason or CloseReason.PEER_CLOSED
            again = self._reconnect and reason != CloseReason.LOGGED_OUT
            self._queue.offer(Disconnected(reason, self._lost_message(t), again))
            if not again:
                self._shutdown(ConnectionLost(self._lost_message(t), t.bye_reason))
                return

    def _learn_nodes(self, nodes: Sequence[proto.NodeInfo]) -> None:
        """A NODES push: the cluster's live nodes, known from now on, and their load for the next move."""
        self.nodes = tuple(nodes)
        current = self.address
        known = set(self._addresses)
        self._addresses += [(n.host, n.port) for n in nodes if (n.host, n.port) not in known]
        self._address_index = self._addresses.index(current)

    def _next_address(self) -> None:
        """Move on: to the least loaded node of the last NODES that is not this one nor draining, if any; else to
        the next address in turn."""
        current = self.address
        # We leave it because it failed or is going away: not a candidate until a NODES lists it again.
        self.nodes = tuple(n for n in self.nodes if (n.host, n.port) != current)
        candidates = [n for n in self.nodes if not n.draining]
        if candidates:
            best = min(candidates, key=lambda n: (n.connections, random.random()))
            self._address_index = self._addresses.index((best.host, best.port))
            self.nodes = tuple(n for n in self.nodes if n is not best) + (
                dataclasses.replace(best, connections=best.connections + 1),)  # ours will count there
        else:
            self._address_index = (self._address_index + 1) % len(self._addresses)

    async def _pause(self, last: Transport | None, failures: int) -> None:
        if failures == 0 and len(self._addresses) > 1:
            # Another node is there: move at once (a little jitter, so a dead node's clients do not land together).
            await trio.sleep(random.uniform(0.0, self._backoff_base_s))
        elif failures == 0 and last is not None and last.goaway is not None:
            # The server asked for this delay (and spreads clients out itself); add a little jitter.
            await trio.sleep_until(last.goaway_at + last.goaway.reconnect_after_ms / 1000)
            await trio.sleep(random.uniform(0.0, self._backoff_base_s))
        else:
            await trio.sleep(backoff_delay(failures, self._backoff_base_s, self._backoff_cap_s))

    async def _session(self, first: bool) -> Transport:
        """Connect, establish, and serve one connection until it ends; returns it when it ends.

        Raises one of ``_ATTEMPT_ERRORS`` if it could not be established.
        """
        self._gen += 1
        with trio.fail_after(self._timeout):
            stream = await self._connect()
        t = Transport(stream, self._gen, pace=self._pace)
        self._transport = t
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop, t)
            try:
                with trio.fail_after(self._timeout):
                    await self._establish(t, first)
            except _ATTEMPT_ERRORS as exc:
                error = exc
                await t.aclose()  # the reader ends and settles this connection's calls
            else:
                if first:
                    self._first_done.set()
                else:
                    self._stats.reconnects += 1
                    self._queue.offer(Reconnected())
                interval = self.welcome.ping_interval_ms / 1000 if self.welcome else 0
                if interval:
                    nursery.start_soon(self._heartbeat, t, interval)
                await t.closed.wait()
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return t

    async def _connect(self) -> trio.abc.Stream:
        """A TCP stream to ``address``, with its TLS handshake done when TLS is on. Raises ``OSError`` (an
        ``ssl.SSLError`` such as ``SSLCertVerificationError`` among them) or ``TransportClosed``."""
        tcp = await trio.open_tcp_stream(*self.address)
        if self._tls is None:
            return tcp
        stream = trio.SSLStream(tcp, self._tls, server_hostname=self.address[0], https_compatible=True)
        try:
            await stream.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.BrokenResourceError):
                cause = exc.__cause__
                raise cause if isinstance(cause, ssl.SSLError) else TransportClosed(f"TLS handshake: {exc}") from None
            raise
        return stream

    async def _establish(self, t: Transport, first: bool) -> None:
        # The connection (proto) refuses a WELCOME outside the range offered, and from then on any frame of a
        # later version than the one WELCOME chose, both ways (spec §6.3).
        welcome = await self._internal(t, proto.Hello(proto.MIN_PROTOCOL_VERSION, self._max_version,
                                                      self._client_name))
        self.welcome = welcome
        t.set_limits(welcome)
        await self._authenticate(t)
        if self._sync_on_connect or not first:
            await self._sync(lambda event: self._internal(t, event))
        marks, self._marks = self._marks, {}
        for (conv, kind), seq in marks.items():
            await t.send((proto.Read if kind == proto.ReceiptKind.READ else proto.Delivered)(conv, seq))
        # Re-send every request still waiting, oldest first (the outbox among them), including
        # any made while we were busy here.
        while True:
            stale = [c for c in self._calls.values()
                     if not c.internal and not c.done.is_set() and c.sent_gen != t.gen]
            if not stale:
                break
            for call in stale:
                if not call.done.is_set() and call.sent_gen != t.gen:
                    if call.sent_gen is not None:
                        self._stats.requests_resent += 1
                    await self._transmit(call, t)
        if t.closed.is_set():
            raise TransportClosed("connection lost while catching up")
        if t.goaway is None or not self._reconnect:
            self._ready = True

    async def _auth_request(self, t: Transport, event: proto.Event) -> proto.AuthOk:
        """REGISTER, LOGIN or RESUME; waits out SERVER_BUSY and login back-off (RATE_LIMITED) by their hint.

        The caller's deadline (the request timeout) bounds the waiting.
        """
        while True:
            try:
                return await self._internal(t, event)
            except ServerError as exc:
                if exc.code not in (ErrorCode.SERVER_BUSY, ErrorCode.RATE_LIMITED):
                    raise
                log.info("%s refused (%s); retrying in %d ms", type(event).__name__.upper(), exc.code.name,
                         exc.retry_after_ms)
                await trio.sleep(_retry_delay_s(exc))

    async def _authenticate(self, t: Transport) -> None:
        credentials = self._credentials
        if self.token is not None:
            try:
                auth = await self._auth_request(t, proto.Resume(self.token))
            except ServerError as exc:
                if exc.code != ErrorCode.INVALID_TOKEN or credentials is None:
                    raise
                auth = await self._auth_request(t, proto.Login(*credentials))
        elif credentials is None:  # __init__ wants one or the other; only logout() forgets the token (and closes)
            raise ConnectionLost("no session token and no password to authenticate with")
        elif self._register and self._invite is not None:
            auth = await self._auth_request(t, proto.RegisterInvite(*credentials, self._invite))
        elif self._register:
            auth = await self._auth_request(t, proto.Register(*credentials))
        else:
            auth = await self._auth_request(t, proto.Login(*credentials))
        self._register = False  # the account exists now; later connections resume or log in
        self.username = auth.username
        if auth.token != self.token:
            self.token = auth.token
            if self._on_token is not None:
                try:
                    result = self._on_token(auth.token)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("on_token callback failed")

    async def _heartbeat(self, t: Transport, interval: float) -> None:
        """PING a silent server; cut the connection if it stays silent (spec §9.10)."""
        while True:
            await trio.sleep_until(t.last_heard + interval)
            heard = t.last_heard
            if trio.current_time() - heard < interval:
                continue
            try:
                await t.send(proto.Ping(secrets.randbits(63)))
            except TransportClosed:
                return
            await trio.sleep_until(heard + 2 * interval)
            if t.last_heard == heard:
                t.abort_reason = CloseReason.STALE
                t.detail = f"server silent for {2 * interval:.1f}s"
                await t.aclose()
                return

    def _shutdown(self, error: ConnectionLost) -> None:
        """The client is done: fail every waiting request and end the event stream."""
        self._closed = True
        self._closing = True
        self._ready = False
        self._close_error = error
        for call in list(self._calls.values()):
            call.finish(error=error)
        self._queue.close()


@asynccontextmanager
async def open_client(host: str, port: int, **kwargs) -> AsyncIterator[Client]:
    """Connect, authenticate and catch up; yields a ``Client``; closes it (BYE) on exit.

    Keyword arguments are those of ``Client``: ``username``, ``password``, ``token``,
    ``register``, ``reconnect``, ``client_name``, ``on_token``, ``request_timeout_s``,
    ``event_buffer``, ``sync_on_connect``, ``backoff_base_s``, ``backoff_cap_s``,
    ``pace``, ``retry_rate_limited``, ``max_protocol_version``, ``servers``, ``tls`` (True, or an
    ``ssl.SSLContext``), ``ca_file`` (a PEM CA to trust instead of the system's; turns TLS on). Raises what the
    first connection attempt raised: ``OSError`` (unreachable), ``ServerError`` (AUTH_FAILED, USERNAME_TAKEN...),
    ``ConnectionLost``, ``trio.TooSlowError``.
    """
    client = Client(host, port, **kwargs)
    pending: BaseException | None = None
    async with trio.open_nursery() as nursery:
        # Exceptions are caught here and re-raised outside the nursery, so that callers see
        # them as they are rather than wrapped in an ExceptionGroup.
        try:
            await nursery.start(_client_tasks, client)
            await client._first_done.wait()
            if client._first_error is not None:
                raise client._first_error
            try:
                yield client
            finally:
                await client.close()
        except BaseException as exc:
            pending = exc
            nursery.cancel_scope.cancel()
    if pending is not None:
        raise pending


async def _client_tasks(client: Client, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The client's own tasks, in a nursery of their own that ``close()`` cancels: ``close()``, ``logout()`` or
    ``logout_all()`` called inside ``open_client``'s block ends the client, not the caller's code with it."""
    async with trio.open_nursery() as tasks:
        client._nursery = tasks
        tasks.start_soon(client._run)
        tasks.start_soon(client._repair)
        task_status.started()
