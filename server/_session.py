"""What a client's frames mean: authentication, rooms, sends, sync, history (spec §9).

A ``Session`` belongs to one connection ("session" means this per-connection
logic; a stored login token is a ``SessionRow``). It keeps, per conversation
the user is in, the view (how this user names it) and its ``Subscription``
(server/_fanout.py): the highest seq already written to this connection, and
whether a SYNC is catching it up. Live messages are withheld while a
conversation syncs (or a JOIN reads where it stands) and filtered by seq
afterwards, which is what makes "no gap, no duplicate" hold between catch-up
pages and the live stream.

Storage and other connections are reached only through the ports of
server/_ports.py (``server.store``, ``server.broker``). A change that concerns
the user's other connections (a room joined or left, a direct conversation
opened, a token revoked) is a user event handed to the broker; every
connection of the user, on any node, applies it to its own session
(``user_event``): no session reaches into another.

Budgets that span connections (login throttling, the hashing queue, SENDs per
user, rooms created, registrations) live in ``Budgets`` (server/_budgets.py).
A request the store fails (``StoreError``, answered SERVER_BUSY by the
connection) leaves no half-done state: everything a request changes in memory is
changed after its last store call, or undone when that call fails.
"""
from __future__ import annotations

import logging
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from chorus import proto
from chorus.proto import ConvKind, ErrorCode

from ._auth import Busy, new_token, token_hash, valid_name
from ._budgets import budgets_of
from ._displaynames import DisplayNameRefused, normalized
from ._fanout import Subscription
from ._invites import InviteInvalid, code_hash
from ._logs import episode, safe
from ._moderation import (
    Applied, Moderation, Refused, Unchanged, active, now_ms, until_text, v1_entries, v1_message,
)
from ._ports import (
    Appended, ConvRow, Entry, MemberJoined, MemberLeft, Muted, NameTaken, NewMessage, ReadMoved, RoomExists,
    SessionsRevoked,
    StoreError, TokenRevoked, TooManyRooms, UserEvent, UserRow,
)
from ._ratelimit import retry_ms

if TYPE_CHECKING:
    from ._app import Server
    from ._conn import ClientConnection

log = logging.getLogger("chorus.session")
#: A connection's TYPING per conversation is passed on at most this often. Clients send it at most every
#: ``proto.TYPING_INTERVAL_S``; coalescing at three quarters of that leaves room for network jitter (a TYPING may
#: arrive up to a quarter interval early relative to the one before), so an honest client's TYPING is never dropped,
#: while one that ignores the interval is held to 4/3 of the allowed rate.
_TYPING_COALESCE_S = proto.TYPING_INTERVAL_S * 3 / 4
#: From this version on a connection gets RECEIPTs of its own user's READs on other devices (spec §9.6).
_OWN_RECEIPTS_VERSION = 2
#: Events that are about messages, not moderation: not logged one by one.
_MESSAGE_EVENTS = frozenset({proto.EventKind.EDIT, proto.EventKind.REACT, proto.EventKind.UNREACT,
                             proto.EventKind.ACTION})
#: The latest BAN or MUTE end (and DELETE seq) the stores hold: their integers are signed 64-bit.
_MAX_UNTIL_MS = 2**63 - 1


def clipped(text: str) -> str:
    """``text`` cut to what the message field of ERROR holds (spec §5: 255 bytes of UTF-8)."""
    return text.encode("utf-8")[:proto.MAX_TEXT_BYTES].decode("utf-8", "ignore")


class RequestError(Exception):
    """A request the server refuses; the connection stays open (spec §7)."""

    def __init__(self, code: ErrorCode, message: str, retry_after_ms: int = 0):
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms

    def reply(self, request_id: int, version: int) -> proto.Error:
        """The ERROR frame for a connection at protocol ``version`` (a newer code becomes one it knows, §7.1)."""
        return proto.Error(proto.error_code_for(self.code, version), self.retry_after_ms, clipped(str(self)),
                           request_id=request_id)

    @classmethod
    def refused(cls, exc: Refused) -> "RequestError":
        return cls(exc.code, str(exc))


def _check_new_password(password: str) -> None:
    """REGISTER's and CHANGE_PASSWORD's rule for a new password (the wire caps the length). Raises WEAK_PASSWORD."""
    if len(password.encode("utf-8")) < proto.MIN_PASSWORD_BYTES:
        raise RequestError(ErrorCode.WEAK_PASSWORD, f"passwords are {proto.PASSWORD_RULE}")


@dataclass(slots=True)
class ConvState:
    """A conversation of this session: how its user names it, and its live delivery (``sub``, the fan-out's)."""

    conv_id: int
    view: proto.Conversation
    peer_id: int | None
    sub: Subscription  # changed here only by withhold() and go_live()
    login_seq: int = 0  # last_seq when this connection logged in
    typing_at: float = -1e9
    muted_until_ms: int | None = None  # the user's mute here (0: no expiry), kept current by Muted user events
    read_seq: int = 0  # the highest READ this connection sent or was told of (ReadMoved)


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom a session authenticated as, and with which token: set once, as AUTH_OK goes out."""

    user_id: int
    username: str
    token_hash: bytes




class Session:
    __slots__ = ("server", "budgets", "conn", "identity", "convs", "by_view")

    def __init__(self, server: "Server", conn: "ClientConnection"):
        self.server = server
        self.budgets = budgets_of(server)
        self.conn = conn
        self.identity: Identity | None = None  # None until authenticated
        self.convs: dict[int, ConvState] = {}
        self.by_view: dict[proto.Conversation, ConvState] = {}

    @property
    def user_id(self) -> int | None:
        return None if self.identity is None else self.identity.user_id

    @property
    def username(self) -> str | None:
        return None if self.identity is None else self.identity.username

    @property
    def me(self) -> Identity:
        """Who this session is, for the requests that need an authenticated user.

        The state table (proto/_state.py) lets those requests through only after AUTH_OK, so this raises
        ``proto.LocalProtocolError`` (a bug) before that.
        """
        identity = self.identity
        if identity is None:
            raise proto.LocalProtocolError("a request that needs a user reached an unauthenticated session")
        return identity

    # -- dispatch -----------------------------------------------------------
    async def handle(self, event: proto.Event) -> None:
        """Act on one frame; request errors become ERROR replies."""
        handler = _HANDLERS.get(type(event))
        if handler is None:
            return  # PONG/ERROR/BYE are the connection's business
        try:
            await handler(self, event)
        except RequestError as exc:
            self.conn.send(exc.reply(event.request_id, self.conn.wire.version))
        except Refused as exc:
            self.conn.send(RequestError.refused(exc).reply(event.request_id, self.conn.wire.version))

    def send_nowait(self, ev: proto.Send) -> bool:
        """Queue a SEND for the group commit without waiting; the ACK goes out from the commit callback.

        Returns False when the send needs ``handle_send`` (a direct conversation not opened yet).
        Raises ``RequestError`` for sends refused outright, and for the user's SEND budget spent (its
        bucket is shared by all its connections, spec §9.11).
        """
        state = self._send_target(ev)
        self._spend_send()
        if state is None:
            return False
        self.server.store.append_nowait(
            self._new_message(state, ev),
            lambda appended, error: self._stored(ev, state.conv_id, appended, error))
        return True

    async def handle_send(self, ev: proto.Send) -> None:
        """The slow path of SEND: open the direct conversation first, then store and wait."""
        try:
            state = self._send_target(ev) or await self._open_new_direct(ev)
        except (RequestError, StoreError) as exc:
            self.conn.send_finished()
            if isinstance(exc, StoreError):
                exc = RequestError(ErrorCode.SERVER_BUSY, "storage unavailable; retry with the same id",
                                   self._busy_retry_ms(exc))
            self.conn.send(exc.reply(ev.request_id, self.conn.wire.version))
            return
        try:
            appended = await self.server.store.append(self._new_message(state, ev))
        except Exception as exc:
            self._stored(ev, state.conv_id, None, exc)
        else:
            self._stored(ev, state.conv_id, appended, None)

    def _new_message(self, state: ConvState, ev: proto.Send) -> NewMessage:
        me = self.me
        return NewMessage(state.conv_id, me.user_id, me.username, ev.client_msg_id, ev.body, now_ms())

    def _check_body(self, body: str) -> None:
        size = len(body.encode("utf-8"))
        if size == 0:
            raise RequestError(ErrorCode.INVALID_REQUEST, "empty message")
        if size > self.server.config.max_body_bytes:
            raise RequestError(ErrorCode.BODY_TOO_LARGE,
                               f"message body over {self.server.config.max_body_bytes} bytes")

    def _send_target(self, ev: proto.Send) -> ConvState | None:
        self._check_body(ev.body)
        state = self.by_view.get(ev.conv)
        if state is None and ev.conv.kind != ConvKind.DIRECT:
            raise RequestError(ErrorCode.NOT_MEMBER, f"not a member of #{ev.conv.name}")
        if state is not None:
            self._check_mute(state)
        return state

    @staticmethod
    def _check_mute(state: ConvState) -> None:
        muted = state.muted_until_ms
        if muted is not None and active(muted, now_ms()):  # every SEND passes here: no clock read unless muted
            until = until_text(muted)
            raise RequestError(ErrorCode.FORBIDDEN, f"you are muted in {state.view}{until}")

    def _busy_retry_ms(self, exc: BaseException) -> int:
        """SERVER_BUSY's hint: the store's, if it has one, else ``Config.busy_retry_ms``."""
        hint = getattr(exc, "retry_after_ms", None)
        return hint if hint is not None else self.server.config.busy_retry_ms

    def _stored(self, ev: proto.Send, conv_id: int, appended, error: BaseException | None) -> None:
        """Commit callback of one SEND: ACK only now that the message is durable (guarantee 2)."""
        self.conn.send_finished()
        if error is not None:
            # The store logs each episode of refusals once (server/_groupcommit.py); one line per SEND would flood.
            log.debug("store refused a message from %s: %r", self.username, error)
            self.conn.send(proto.Error(ErrorCode.SERVER_BUSY, self._busy_retry_ms(error),
                                       "not stored; retry with the same id", request_id=ev.request_id))
            return
        if appended.duplicate:  # in case whoever stored it first died before publishing it (node mode)
            self.server.broker.republish(appended)
        if appended.conv_id != conv_id:  # ids are unique per sender, not per conversation
            self.conn.send(proto.Error(ErrorCode.INVALID_REQUEST, 0,
                                       "client_msg_id already used in another conversation", request_id=ev.request_id))
        else:
            self.conn.send(proto.Ack(ev.conv, ev.client_msg_id, appended.seq, appended.ts_ms, appended.duplicate,
                                     request_id=ev.request_id))

    # -- handshake and auth ---------------------------------------------------
    async def _hello(self, ev: proto.Hello) -> None:
        version = proto.negotiate(ev.min_version, ev.max_version)  # the highest version both speak (spec §6.1)
        if version is None:
            self.conn.protocol_error(
                ErrorCode.UNSUPPORTED_VERSION,
                f"this server speaks versions {proto.MIN_PROTOCOL_VERSION}..{proto.PROTOCOL_VERSION}", ev.request_id)
            return
        welcome = self.server.config.welcome()
        fields = {f: getattr(welcome, f) for f in welcome.__dataclass_fields__ if f != "request_id"}
        # The connection's proto.Connection records the version as this WELCOME goes out (spec §6.3).
        self.conn.send(proto.Welcome(**{**fields, "version": version}, request_id=ev.request_id))
        nodes = self.server.broker.live_nodes()
        if nodes and version >= proto.FrameType.NODES.version:  # one node of a cluster (spec §9.14)
            self.conn.send(proto.Nodes(tuple(nodes)))

    def _address(self) -> str:
        """The peer's IP address: the key of per-address budgets."""
        return self.conn.transport.address

    async def _register(self, ev: proto.Register) -> None:
        if self.server.config.registration == "invite":
            raise RequestError(ErrorCode.INVALID_REQUEST, "registration is by invite on this server: REGISTER_INVITE"
                                                          " with a code from its operator")
        await self._new_account(ev.username, ev.password, None, ev.request_id)

    async def _register_invite(self, ev: proto.RegisterInvite) -> None:
        """REGISTER with a one-time code (version 2): the code is redeemed with the account, in one transaction."""
        await self._new_account(ev.username, ev.password, code_hash(ev.invite), ev.request_id)

    async def _new_account(self, username: str, password: str, invite: bytes | None, request_id: int) -> None:
        config, store = self.server.config, self.server.store
        if config.registration == "closed":
            raise RequestError(ErrorCode.INVALID_REQUEST, "registration is closed on this server")
        if not valid_name(username):
            raise RequestError(ErrorCode.INVALID_NAME, f"names are {proto.NAME_RULE}")
        _check_new_password(password)
        address = self._address()
        registrations = self.budgets.registrations
        wait = registrations.take(address, trio.current_time())
        if wait:
            self._limit_hit("registrations", address)
            await trio.sleep(min(wait, config.throttle_delay_s))  # as for logins: a refusal a second at most
            raise RequestError(ErrorCode.RATE_LIMITED,
                               f"at most {config.registrations_per_hour} registrations per hour from one address",
                               retry_ms(wait))
        try:
            if await store.get_user(username) is not None:  # no hash spent on a name that is taken
                raise NameTaken(username)
            if invite is not None and not await store.invite_usable(invite):  # nor on a code that cannot work
                raise InviteInvalid()
            hashed = await self._hashed(address, self.server.passwords.hash, password)
            user = await store.create_user(username, hashed, invite=invite)
        except (NameTaken, InviteInvalid, RequestError, StoreError) as exc:  # no account, no charge
            registrations.give_back(address)  # (cancelled: charged)
            if isinstance(exc, NameTaken):
                self.server.counters.auth["register", False] += 1
                raise RequestError(ErrorCode.USERNAME_TAKEN, f"{username} is taken") from None
            if isinstance(exc, InviteInvalid):
                self.server.counters.auth["register", False] += 1
                raise RequestError(ErrorCode.AUTH_FAILED, "invite code unknown, used or expired") from None
            raise
        self.server.counters.auth["register", True] += 1
        log.info("registered peer=%s user=%s%s", self.conn.transport.peer, user.name,
                 " (invited)" if invite is not None else "",
                 extra={"event": "register", "peer": str(self.conn.transport.peer), "user": user.name})
        await self._logged_in(user.id, user.name, None, request_id)

    async def _login(self, ev: proto.Login) -> None:
        user = await self._checked_password(ev.username, ev.password)
        if user.disabled:  # said only to whoever knows the password (chorus-admin users disable)
            self.server.counters.auth["password", False] += 1
            raise RequestError(ErrorCode.AUTH_FAILED, "account disabled")
        self.server.counters.auth["password", True] += 1
        await self._logged_in(user.id, user.name, None, ev.request_id)

    async def _checked_password(self, name: str, password: str) -> UserRow:
        """The user ``name`` if ``password`` is theirs (LOGIN, CHANGE_PASSWORD), checked under the login budgets:
        RATE_LIMITED while the address or the name is backing off (refused without hashing), AUTH_FAILED (a
        failed login, counted) when it is wrong, SERVER_BUSY when the hashing queue is full."""
        budgets = self.budgets
        address = self._address()
        now = trio.current_time()
        wait = budgets.login_wait_s(address, name, now)
        if wait:  # refused without hashing: guessing costs the guesser time, not us CPU
            self._limit_hit("logins", address)
            # ...and the refusal itself comes late (this connection reads nothing meanwhile), so a guesser
            # cannot make us answer thousands of refusals a second: a sleeping task costs nothing.
            await trio.sleep(min(wait, self.server.config.throttle_delay_s))
            wait = budgets.login_wait_s(address, name, trio.current_time())
            raise RequestError(ErrorCode.RATE_LIMITED, "too many failed logins; wait before trying again",
                               retry_ms(wait))
        failures = budgets.login_started(address, name, now)
        try:
            # A name that cannot exist costs no hash: the naming rule is public, so this tells nothing.
            user = await self.server.store.get_user(name) if valid_name(name) else None
            ok = False
            if valid_name(name):
                ok = await self._hashed(address, self.server.passwords.verify,
                                        user.password_hash if user else None, password)
        except (RequestError, StoreError):  # busy, or no user lookup: no verdict (cancelled: a failure)
            budgets.login_undone(address, name)
            raise
        if not ok or user is None:
            self.server.counters.auth["password", False] += 1
            log.warning("login failed peer=%s user=%s failures=%d,%d", self.conn.transport.peer, safe(name),
                        *failures, extra={"event": "login_failed", "peer": str(self.conn.transport.peer),
                                          "address": address, "user": safe(name)})
            raise RequestError(ErrorCode.AUTH_FAILED, "wrong user name or password")
        budgets.login_succeeded(address, name)
        return user

    async def _hashed(self, address: str, fn, *args):
        """``await fn(*args)`` (a password hash) in a slot of the hashing queue; SERVER_BUSY when it is full."""
        try:
            async with self.budgets.hashes.slot(address, self.conn):  # its auth deadline waits too
                return await fn(*args)
        except Busy as exc:
            self._limit_hit("hashes", address)
            raise RequestError(ErrorCode.SERVER_BUSY, str(exc), retry_ms(exc.retry_after_s)) from None

    async def _resume(self, ev: proto.Resume) -> None:
        hashed = token_hash(ev.token)
        row = await self.server.store.get_session(hashed, now_ms())
        self.server.counters.auth["token", row is not None and not row.disabled] += 1
        if row is None:
            raise RequestError(ErrorCode.INVALID_TOKEN, "session expired or revoked; log in again")
        if row.disabled:  # chorus-admin users disable: the token stays, refused until the account is enabled
            raise RequestError(ErrorCode.AUTH_FAILED, "account disabled")
        await self._logged_in(row.user_id, row.username, ev.token, ev.request_id)

    async def _logged_in(self, user_id: int, username: str, token: str | None, request_id: int) -> None:
        server = self.server
        if self._user_is_full(user_id, request_id):
            return
        expires = now_ms() + server.config.session_ttl_s * 1000
        if token is None:
            token = new_token()
            await server.store.add_session(token_hash(token), user_id, expires, now_ms=now_ms())
        else:
            await server.store.touch_session(token_hash(token), expires, now_ms=now_ms())
        rows = await server.store.conversations(user_id)
        if self.conn.closing:
            return
        # From here to AUTH_OK nothing awaits, so no live frame can precede it.
        limit = server.config.max_connections_per_user
        rooms = tuple(row.id for row in rows if row.kind == ConvKind.ROOM)
        if not server.broker.add_connection(self.conn, user_id, username, rooms, limit):  # others logged in meanwhile
            self._refuse_full(limit, request_id)
            return
        self.identity = Identity(user_id, username, token_hash(token))
        for row in rows:
            self._add_conv(row, withhold=True)  # live delivery starts with the client's SYNC (spec §9)
        self.conn.authenticated(username)
        self.conn.send(proto.AuthOk(username, token, expires, request_id=request_id))

    def _user_is_full(self, user_id: int, request_id: int) -> bool:
        limit = self.server.config.max_connections_per_user
        if self.server.broker.connection_count(user_id) < limit:
            return False
        self._refuse_full(limit, request_id)
        return True

    def _refuse_full(self, limit: int, request_id: int) -> None:
        self.conn.refuse(ErrorCode.TOO_MANY_CONNECTIONS, f"at most {limit} connections per user", request_id)

    def _limit_hit(self, kind: str, key: str) -> None:
        """Count a refusal by budget ``kind`` (server/_metrics.py); log the first of an episode per ``key``."""
        self.server.counters.refusals[kind] += 1
        if episode(kind, key):
            log.info("rate limited peer=%s user=%s (%s; logged once a minute per %s)", self.conn.transport.peer,
                     safe(self.username or "-"), kind, "user" if self.identity else "address",
                     extra={"event": "rate_limited", "kind": kind, "peer": str(self.conn.transport.peer)})

    def _rooms(self) -> tuple[int, ...]:
        return tuple(state.conv_id for state in self.convs.values() if state.view.kind == ConvKind.ROOM)

    def close(self) -> None:
        """Forget this connection everywhere (called once, when it closes)."""
        me = self.identity
        if me is None:
            return
        broker = self.server.broker
        for conv_id in self.convs:
            broker.unsubscribe(conv_id, self.conn)
        broker.remove_connection(self.conn, me.user_id, me.username, self._rooms())

    async def _logout(self, ev: proto.Logout) -> None:
        """Revoke the token and end every connection that uses it (spec §9.1), this one included."""
        me = self.me
        await self.server.store.delete_session(me.token_hash)
        self.server.broker.user_event(TokenRevoked(me.user_id, me.token_hash))
        self.conn.close(proto.CloseReason.LOGGED_OUT)

    # -- changes made by the user's other connections ---------------------------------------------------------
    def user_event(self, event: UserEvent) -> None:
        """Apply a change to this user made on any connection of any node (server/_ports.py); never waits."""
        me = self.identity
        if me is None:
            return
        match event:
            case MemberJoined(conv=conv):
                self._add_conv(conv)  # live after its last_seq; a conversation already here stays as it is
            case MemberLeft(conv_id=conv_id):
                self._drop_conv(conv_id)
            case TokenRevoked(token_hash=revoked):
                if revoked == me.token_hash:
                    self.conn.close(proto.CloseReason.LOGGED_OUT)
            case SessionsRevoked(keep=keep):
                if keep != me.token_hash:
                    self.conn.close(proto.CloseReason.LOGGED_OUT)
            case Muted(conv_id=conv_id, until_ms=until_ms):
                state = self.convs.get(conv_id)
                if state is not None:
                    state.muted_until_ms = until_ms
            case ReadMoved(conv_id=conv_id, seq=seq):
                state = self.convs.get(conv_id)
                # The connection that sent the READ knows; an older client has no use for its own name's receipts.
                if state is not None and seq > state.read_seq and self.conn.wire.version >= _OWN_RECEIPTS_VERSION:
                    state.read_seq = seq
                    self.conn.send(proto.Receipt(state.view, me.username, proto.ReceiptKind.READ, seq))

    # -- conversations --------------------------------------------------------
    def _add_conv(self, row: ConvRow, *, withhold: bool = False) -> ConvState | None:
        """Subscribe to ``row``'s conversation: withheld (until SYNC or JOINED), or live from ``row.last_seq + 1``.

        Returns the new state, or None if it was there already.
        """
        if row.id in self.convs:
            return None
        view = proto.Conversation(ConvKind(row.kind), row.name)
        sub = Subscription(view, sent_seq=0 if withhold else row.last_seq, withheld=withhold)
        state = ConvState(row.id, view, row.peer_id, sub, login_seq=row.last_seq, muted_until_ms=row.muted_until_ms)
        self.convs[row.id] = state
        self.by_view[view] = state
        self.server.broker.subscribe(row.id, self.conn, sub)
        return state

    def _drop_conv(self, conv_id: int) -> None:
        state = self.convs.pop(conv_id, None)
        if state is not None:
            del self.by_view[state.view]
            self.server.broker.unsubscribe(conv_id, self.conn)

    def _conv(self, conv: proto.Conversation) -> ConvState:
        state = self.by_view.get(conv)
        if state is None:
            if conv.kind == ConvKind.ROOM:
                raise RequestError(ErrorCode.NOT_MEMBER, f"not a member of #{conv.name}")
            raise RequestError(ErrorCode.NOT_FOUND, f"no conversation with {conv.name}")
        return state

    async def _open_new_direct(self, ev: proto.Send) -> ConvState:
        """The direct conversation of a first SEND to it, unless the SEND is refused anyway: a client_msg_id
        stored in another conversation would leave an empty conversation behind (spec §9.4)."""
        store = self.server.store
        conv_id = await store.sent_in(self.me.user_id, ev.client_msg_id)
        if conv_id is not None:  # a retry into this very conversation (opened by another device) is fine
            row = await store.conversation(self.me.user_id, conv_id)
            if row is None or row.kind != ConvKind.DIRECT or row.name != ev.conv.name:
                raise RequestError(ErrorCode.INVALID_REQUEST, "client_msg_id already used in another conversation")
        return await self._open_direct(ev.conv.name)

    async def _open_direct(self, peer_name: str) -> ConvState:
        store, me = self.server.store, self.me
        peer = await store.get_user(peer_name)
        if peer is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no user {peer_name}")
        if peer.id == me.user_id:
            raise RequestError(ErrorCode.INVALID_REQUEST, "cannot message yourself")
        conv_id = await store.direct(me.user_id, peer.id)
        # As for JOIN: this connection is subscribed (withheld) before last_seq is read, and every connection of
        # both users goes live after that last_seq. A store error leaves nobody subscribed (the conversation row
        # exists; the next SEND finds it).
        row = ConvRow(conv_id, ConvKind.DIRECT, peer.name, 0, peer.id)
        last_seq = await self._subscribe_at_end(row)
        broker = self.server.broker
        broker.user_event(MemberJoined(me.user_id, replace(row, last_seq=last_seq)))
        broker.user_event(MemberJoined(peer.id, ConvRow(conv_id, ConvKind.DIRECT, me.username, last_seq,
                                                        me.user_id)))
        state = self.convs.get(conv_id)
        if state is None:  # our own connection closed meanwhile
            raise RequestError(ErrorCode.NOT_FOUND, f"no conversation with {peer_name}")
        return state

    async def _join(self, ev: proto.Join) -> None:
        store, config, me = self.server.store, self.server.config, self.me
        if not valid_name(ev.room):
            raise RequestError(ErrorCode.INVALID_NAME, f"room names are {proto.NAME_RULE}")
        try:
            try:
                conv_id, joined = await store.join_room(me.user_id, ev.room, max_rooms=config.max_rooms_per_user,
                                                        create=False)
            except LookupError:
                conv_id, joined = await self._create_room(ev.room), True
        except TooManyRooms as exc:  # checked in the store's transaction: concurrent JOINs cannot overshoot
            raise RequestError(ErrorCode.TOO_MANY_ROOMS, str(exc)) from None
        await self._joined(ev.room, conv_id, joined, ev.request_id)

    async def _create_room_request(self, ev: proto.CreateRoom) -> None:
        """CREATE_ROOM (version 2): a new room only, public or private, its creator its owner; JOINED."""
        if not valid_name(ev.room):
            raise RequestError(ErrorCode.INVALID_NAME, f"room names are {proto.NAME_RULE}")
        try:
            conv_id = await self._create_room(ev.room, private=ev.private)
        except TooManyRooms as exc:
            raise RequestError(ErrorCode.TOO_MANY_ROOMS, str(exc)) from None
        except RoomExists:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"#{ev.room} exists") from None
        await self._joined(ev.room, conv_id, True, ev.request_id)

    async def _joined(self, room: str, conv_id: int, joined: bool, request_id: int) -> None:
        """After a JOIN or CREATE_ROOM stored the membership: subscribe, tell the user's connections, JOINED."""
        me = self.me
        members = await self.server.store.members(conv_id)
        row = ConvRow(conv_id, ConvKind.ROOM, room, 0, None)
        last_seq = await self._subscribe_at_end(row)  # a failure: the membership is stored; a retry subscribes
        # The user's other connections, on any node, go live after the same last_seq (spec §9.2).
        self.server.broker.user_event(MemberJoined(me.user_id, replace(row, last_seq=last_seq)))
        self.conn.send(proto.Joined(room, last_seq, len(members), request_id=request_id))
        if joined:  # a JOIN of a room the user is in changes nothing
            log.info("join peer=%s user=%s room=%s", self.conn.transport.peer, me.username, room,
                     extra={"event": "join", "user": me.username, "room": room})
            self._announce_membership(conv_id, room, proto.MembershipChange.JOINED)

    async def _subscribe_at_end(self, row: ConvRow) -> int:
        """Subscribe to ``row``'s conversation live from its end (JOIN, a new direct conversation); returns the end.

        Subscribed (withheld) before reading last_seq, so every message above it is delivered live (no gap), and
        nothing at or below it: a message committed while we read is at or below the returned seq, which JOINED
        covers (§9.2). A conversation this connection has already stays as it is (a withheld one stays withheld
        until SYNC). Raises ``StoreError`` with nothing subscribed.
        """
        state = self._add_conv(row, withhold=True)
        try:
            last_seq = await self.server.store.last_seq(row.id)
        except BaseException:
            if state is not None:
                self._drop_conv(row.id)
            raise
        if state is None:  # already subscribed: rejoining changes nothing
            state = self.convs.get(row.id)
            return last_seq if state is None else max(last_seq, state.sub.sent_seq)
        last_seq = max(last_seq, state.sub.missed_seq)
        state.sub.go_live(last_seq)
        return last_seq

    async def _create_room(self, name: str, *, private: bool | None = None) -> int:
        """Create room ``name`` and join it as its owner, charged to this user's hourly budget of new rooms.

        ``private`` not None: CREATE_ROOM, which only creates. Raises ``TooManyRooms``, ``RoomExists`` (then nothing
        is created or charged), ``RequestError`` RATE_LIMITED.
        """
        config, me = self.server.config, self.me
        rooms_created = self.budgets.rooms_created
        wait = rooms_created.take(me.user_id, trio.current_time())
        if wait:
            self._limit_hit("rooms_created", me.username)
            raise RequestError(ErrorCode.RATE_LIMITED, f"at most {config.rooms_created_per_hour} new rooms per hour",
                               retry_ms(wait))
        try:
            conv_id, _ = await self.server.store.join_room(me.user_id, name, max_rooms=config.max_rooms_per_user,
                                                           private=private)
        except (TooManyRooms, RoomExists, Refused, StoreError):  # nothing created, nothing charged
            rooms_created.give_back(me.user_id)
            raise
        return conv_id

    async def _leave(self, ev: proto.Leave) -> None:
        store, me = self.server.store, self.me
        conv_id = await store.room(ev.room, create=False)
        if conv_id is None or not await store.leave(me.user_id, conv_id):
            raise RequestError(ErrorCode.NOT_MEMBER, f"not a member of #{ev.room}")
        self._drop_conv(conv_id)
        self.server.broker.user_event(MemberLeft(me.user_id, conv_id))
        self.conn.send(proto.Ok(request_id=ev.request_id))
        log.info("leave peer=%s user=%s room=%s", self.conn.transport.peer, me.username, ev.room,
                 extra={"event": "leave", "user": me.username, "room": ev.room})
        self._announce_membership(conv_id, ev.room, proto.MembershipChange.LEFT)

    async def _list_rooms(self, ev: proto.ListRooms) -> None:
        rooms = await self.server.store.list_rooms(self.me.user_id, proto.MAX_LIST_ITEMS)
        self.conn.send(proto.RoomList(tuple(rooms), request_id=ev.request_id))

    async def _members(self, ev: proto.Members) -> None:
        state = self._conv(proto.Conversation.room(ev.room))
        members = (await self.server.store.members(state.conv_id))[: proto.MAX_LIST_ITEMS]
        online = await self.server.broker.online(uid for uid, _ in members)
        infos = tuple(
            proto.MemberInfo(name, proto.Status.ONLINE if uid in online else proto.Status.OFFLINE)
            for uid, name in members
        )
        self.conn.send(proto.MemberList(ev.room, infos, request_id=ev.request_id))

    # -- messages -------------------------------------------------------------
    async def _sync(self, ev: proto.Sync) -> None:
        listed: dict[int, tuple[ConvState, int]] = {}
        for pos in ev.positions:
            state = self._conv(pos.conv)
            listed[state.conv_id] = (state, pos.last_seq)
        # Conversations withheld since login and not listed catch up from the stored delivered cursor.
        withheld = [s for s in self.convs.values() if s.sub.syncing and s.conv_id not in listed]
        cursors: dict[int, int] = {}
        if withheld:
            cursors = {row.id: cursor for row, cursor in await self.server.store.undelivered(self.me.user_id)}
        for state, _ in listed.values():
            state.sub.withhold()
        try:
            for state, last_seq in listed.values():
                await self._sync_one(state, last_seq, ev.request_id, always=True)
            for state in withheld:
                await self._sync_one(state, cursors.get(state.conv_id, state.login_seq), ev.request_id)
        finally:  # cut short (the connection is closing): never leave a conversation withheld
            for state in [state for state, _ in listed.values()] + withheld:
                state.sub.go_live(0)
        self.conn.send(proto.SyncDone(request_id=ev.request_id))

    async def _sync_one(self, state: ConvState, after: int, request_id: int, *, always: bool = False) -> None:
        """Page ``state`` from ``after`` to its end, then switch it to live delivery."""
        limit = self.server.config.max_page
        while True:
            messages, has_more = await self.server.store.messages_after(state.conv_id, after, limit)
            if messages:
                after = messages[-1].seq
            # A message committed while we waited for the page was withheld from the live stream
            # (missed_seq); it is in the store, so one more page picks it up.
            has_more = has_more or state.sub.missed_seq > after
            if not has_more:
                state.sub.go_live(after)
            if messages or has_more or always:
                page = self._page(state.view, messages, request_id)
                self.conn.send(proto.SyncPage(state.view, page, has_more, request_id=request_id))
            if not has_more:
                return
            await self.conn.output.wait_drained()

    async def _history(self, ev: proto.History) -> None:
        state = self._conv(ev.conv)
        limit = ev.limit if 0 < ev.limit <= self.server.config.max_page else self.server.config.max_page
        store = self.server.store
        if ev.direction == proto.Direction.BEFORE:
            messages, has_more = await store.messages_before(state.conv_id, ev.seq, limit)
        else:
            messages, has_more = await store.messages_after(state.conv_id, ev.seq, limit)
        page = self._page(ev.conv, messages, ev.request_id)
        self.conn.send(proto.HistoryPage(ev.conv, page, has_more, request_id=ev.request_id))

    def _page(self, view: proto.Conversation, entries: list[Entry], request_id: int) -> tuple[proto.StoredMessage, ...]:
        """A page's messages for this connection: on version 2 its events go first in one EVENTS frame (same
        request_id), on version 1 each event is a MESSAGE in words (spec §9.15)."""
        if self.conn.wire.version < proto.FrameType.EVENTS.version:
            return v1_entries(view, entries)
        messages = tuple(e for e in entries if isinstance(e, proto.StoredMessage))
        if len(messages) < len(entries):
            events = tuple(e for e in entries if isinstance(e, proto.ConvEvent))
            self.conn.send(proto.Events(view, events, request_id=request_id))
        return messages

    # -- cursors, typing --------------------------------------------------------
    async def _cursor(self, ev: proto.Delivered | proto.Read) -> None:
        state, me = self._conv(ev.conv), self.me
        kind = proto.ReceiptKind.READ if isinstance(ev, proto.Read) else proto.ReceiptKind.DELIVERED
        if kind == proto.ReceiptKind.READ:
            state.read_seq = max(state.read_seq, ev.seq)
        seq = await self.server.store.advance_cursor(me.user_id, state.conv_id, kind, ev.seq)
        if seq is not None and kind == proto.ReceiptKind.READ:
            self.server.broker.user_event(ReadMoved(me.user_id, state.conv_id, seq))
        if seq is not None and state.peer_id is not None:
            self.server.broker.push_to_user(
                state.peer_id, proto.Receipt(proto.Conversation.direct(me.username), me.username, kind, seq))

    async def _get_cursors(self, ev: proto.GetCursors) -> None:
        state = self._conv(ev.conv)
        cursors = await self.server.store.cursors(state.conv_id)
        self.conn.send(proto.Cursors(ev.conv, tuple(cursors[: proto.MAX_LIST_ITEMS]), request_id=ev.request_id))

    async def _typing(self, ev: proto.Typing) -> None:
        state, me = self._conv(ev.conv), self.me
        now = trio.current_time()
        if now - state.typing_at < _TYPING_COALESCE_S:
            return  # coalesced: ephemeral, never stored
        state.typing_at = now
        broker = self.server.broker
        if state.peer_id is not None:
            broker.push_to_user(state.peer_id,
                                proto.UserTyping(proto.Conversation.direct(me.username), me.username))
        else:
            broker.push_to_conversation(state.conv_id, proto.UserTyping(state.view, me.username),
                                        skip_user=me.user_id)

    # -- version 2 (spec §6.3) ----------------------------------------------------------------------------------
    async def _list_conversations(self, ev: proto.ListConversations) -> None:
        """Every conversation of the user, rooms and direct ones, with its newest seq and the user's own cursors,
        so that a fresh page or a second device shows every thread and its unread count (spec §5.37)."""
        conversations = await self.server.store.conversation_list(self.me.user_id, proto.MAX_LIST_ITEMS)
        self.conn.send(proto.ConversationList(tuple(conversations), request_id=ev.request_id))

    async def _change_password(self, ev: proto.ChangePassword) -> None:
        """Check the old password as a LOGIN would (its budgets, its failure count), store the new one's hash, and
        revoke every other session of the user: their connections, on any node, end with BYE(LOGGED_OUT), and
        this one's token stays valid (spec §9.1)."""
        me, store = self.me, self.server.store
        _check_new_password(ev.new_password)  # refused before any hash is spent
        try:
            await self._checked_password(me.username, ev.old_password)
        except RequestError as exc:
            if exc.code != ErrorCode.AUTH_FAILED:
                raise
            raise RequestError(ErrorCode.AUTH_FAILED, "wrong password") from None
        hashed = await self._hashed(self._address(), self.server.passwords.hash, ev.new_password)
        await store.set_password_hash(me.user_id, hashed)
        revoked = await store.delete_user_sessions(me.user_id, keep=me.token_hash)
        self.server.broker.user_event(SessionsRevoked(me.user_id, me.token_hash))
        log.info("password changed peer=%s user=%s (%d other sessions revoked)", self.conn.transport.peer,
                 me.username, revoked, extra={"event": "password_changed", "user": me.username})
        self.conn.send(proto.Ok(request_id=ev.request_id))

    async def _logout_all(self, ev: proto.LogoutAll) -> None:
        """Revoke every session of the user and end every connection of the user, this one included (spec §9.1)."""
        me = self.me
        revoked = await self.server.store.delete_user_sessions(me.user_id)
        self.server.broker.user_event(SessionsRevoked(me.user_id, None))
        log.info("logout everywhere peer=%s user=%s (%d sessions revoked)", self.conn.transport.peer, me.username,
                 revoked, extra={"event": "logout_all", "user": me.username})
        self.conn.close(proto.CloseReason.LOGGED_OUT)

    async def _list_sessions(self, ev: proto.ListSessions) -> None:
        """The user's unexpired sessions by opaque id, oldest first (the newest 1000): never a token or its hash."""
        me = self.me
        rows = (await self.server.store.list_sessions(me.user_id, now_ms()))[-proto.MAX_LIST_ITEMS:]
        infos = tuple(proto.SessionInfo(row.id, row.created_ms, row.last_used_ms, row.token_hash == me.token_hash)
                      for row in rows)
        self.conn.send(proto.SessionList(infos, request_id=ev.request_id))

    async def _revoke_session(self, ev: proto.RevokeSession) -> None:
        """Revoke one of the user's sessions: OK, then its connections end as after LOGOUT (this one too, if it
        is the current session)."""
        me = self.me
        revoked = await self.server.store.delete_session_by_id(me.user_id, ev.session_id)
        if revoked is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no session {ev.session_id} of yours")
        self.conn.send(proto.Ok(request_id=ev.request_id))
        self.server.broker.user_event(TokenRevoked(me.user_id, revoked))

    # -- roles, moderation and private rooms (version 2, spec §9.15) -------------------------------------------------
    async def _target(self, name: str) -> UserRow:
        user = await self.server.store.get_user(name) if valid_name(name) else None
        if user is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no user {name}")
        return user

    @staticmethod
    def _until(until_ms: int) -> int:
        """A BAN's or MUTE's end as given: 0 (no expiry) or a time to come that the store can hold."""
        if until_ms and not now_ms() < until_ms <= _MAX_UNTIL_MS:
            raise RequestError(ErrorCode.INVALID_REQUEST, "until_ms must be 0 (no expiry) or a time to come")
        return until_ms

    async def _moderate(self, request_id: int, kind: proto.EventKind, conv: proto.Conversation,
                        user: str | None = None, **fields: Any) -> Applied | None:
        """Apply one request in the store (which checks the rules), deliver its event, answer OK (an action: ACK).
        None: nothing to do (a reaction already there)."""
        state, me = self._conv(conv), self.me
        if kind not in _MESSAGE_EVENTS:  # those spent it in _may_write; a moderation stores an event all the same
            self._spend_send()
        target = await self._target(user) if user is not None else None
        if kind == proto.EventKind.INVITE:
            fields["max_rooms"] = self.server.config.max_rooms_per_user
        action = Moderation(kind, state.conv_id, me.user_id, None if target is None else target.id, **fields)
        try:
            applied = await self.server.store.moderate(action)
        except TooManyRooms:
            raise RequestError(ErrorCode.FORBIDDEN, f"{user} is in too many rooms") from None
        except Unchanged:
            self.conn.send(proto.Ok(request_id=request_id))
            return None
        if not applied.duplicate:
            deliver_event(self.server, applied)
        if kind == proto.EventKind.ACTION:
            self.conn.send(proto.Ack(conv, action.client_msg_id, applied.event.seq, applied.event.ts_ms,
                                     applied.duplicate, request_id=request_id))
        else:
            self.conn.send(proto.Ok(request_id=request_id))
        if kind not in _MESSAGE_EVENTS:
            log.info("moderation peer=%s user=%s %s %s target=%s", self.conn.transport.peer, me.username,
                     kind.name.lower(), conv, user or "-",
                     extra={"event": "moderation", "action": kind.name.lower(), "user": me.username,
                            "conversation": str(conv), "target": user or ""})
        return applied

    def _may_write(self, conv: proto.Conversation, body: str | None = None) -> None:
        """What SEND checks before a message-like request (EDIT_MESSAGE, REACT, SEND_ACTION): the body's size, a
        mute, and the user's budget of SENDs, which these spend too (spec §9.11, §9.16)."""
        if body is not None:
            self._check_body(body)
        self._check_mute(self._conv(conv))
        self._spend_send()

    def _spend_send(self) -> None:
        """Take one from the user's SEND budget (shared by all its connections, spec §9.11): every request that
        stores a row in a conversation spends it. Raises ``RequestError`` RATE_LIMITED."""
        wait = self.budgets.sends.take(self.me.user_id, trio.current_time())
        if wait:
            self._limit_hit("sends", self.me.username)
            raise RequestError(ErrorCode.RATE_LIMITED, "too many messages from this user; slow down", retry_ms(wait))

    async def _edit_message(self, ev: proto.EditMessage) -> None:
        self._may_write(ev.conv, ev.body)
        await self._moderate(ev.request_id, proto.EventKind.EDIT, ev.conv, target_seq=min(ev.seq, _MAX_UNTIL_MS),
                             text=ev.body)

    async def _react(self, ev: proto.React) -> None:
        if not ev.reaction or any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") and ch != "\u200d"
                                  for ch in ev.reaction):
            raise RequestError(ErrorCode.INVALID_REQUEST, "a reaction is an emoji or a word: no spaces or controls")
        self._may_write(ev.conv)
        await self._moderate(ev.request_id, proto.EventKind.REACT if ev.add else proto.EventKind.UNREACT, ev.conv,
                             target_seq=min(ev.seq, _MAX_UNTIL_MS), text=ev.reaction)

    async def _send_action(self, ev: proto.SendAction) -> None:
        self._may_write(ev.conv, ev.body)
        await self._moderate(ev.request_id, proto.EventKind.ACTION, ev.conv, text=ev.body,
                             client_msg_id=ev.client_msg_id)

    async def _kick(self, ev: proto.Kick) -> None:
        await self._moderate(ev.request_id, proto.EventKind.KICK, proto.Conversation.room(ev.room), ev.user,
                             text=ev.reason)

    async def _ban(self, ev: proto.Ban) -> None:
        await self._moderate(ev.request_id, proto.EventKind.BAN, proto.Conversation.room(ev.room), ev.user,
                             until_ms=self._until(ev.until_ms), text=ev.reason)

    async def _unban(self, ev: proto.Unban) -> None:
        await self._moderate(ev.request_id, proto.EventKind.UNBAN, proto.Conversation.room(ev.room), ev.user)

    async def _mute(self, ev: proto.Mute) -> None:
        await self._moderate(ev.request_id, proto.EventKind.MUTE, proto.Conversation.room(ev.room), ev.user,
                             until_ms=self._until(ev.until_ms), text=ev.reason)

    async def _unmute(self, ev: proto.Unmute) -> None:
        await self._moderate(ev.request_id, proto.EventKind.UNMUTE, proto.Conversation.room(ev.room), ev.user)

    async def _delete_message(self, ev: proto.DeleteMessage) -> None:
        await self._moderate(ev.request_id, proto.EventKind.DELETE, ev.conv, target_seq=min(ev.seq, _MAX_UNTIL_MS))

    async def _set_topic(self, ev: proto.SetTopic) -> None:
        await self._moderate(ev.request_id, proto.EventKind.TOPIC, proto.Conversation.room(ev.room), text=ev.topic)

    async def _set_role(self, ev: proto.SetRole) -> None:
        await self._moderate(ev.request_id, proto.EventKind.ROLE, proto.Conversation.room(ev.room), ev.user,
                             role=ev.role)

    async def _invite(self, ev: proto.Invite) -> None:
        await self._moderate(ev.request_id, proto.EventKind.INVITE, proto.Conversation.room(ev.room), ev.user)

    async def _get_room(self, ev: proto.GetRoom) -> None:
        state = self._conv(proto.Conversation.room(ev.room))
        topic, private, members, bans = await self.server.store.room_details(state.conv_id, self.me.user_id)
        online = await self.server.broker.online(uid for uid, _, _, _ in members)
        infos = tuple(proto.RoomMember(name, role, proto.Status.ONLINE if uid in online else proto.Status.OFFLINE,
                                       until is not None, until or 0) for uid, name, role, until in members)
        self.conn.send(proto.RoomDetails(ev.room, topic, private, infos, tuple(bans), request_id=ev.request_id))

    # -- display names (version 2, spec §9.17) -------------------------------------------------------------------
    async def _set_display_name(self, ev: proto.SetDisplayName) -> None:
        try:
            name = normalized(ev.display_name)
            self._spend_send()  # a write a user controls: the same budget as the others
            await self.server.store.set_display_name(self.me.user_id, name)
        except DisplayNameRefused as exc:
            raise RequestError(ErrorCode.INVALID_NAME, str(exc)) from None
        self.conn.send(proto.Ok(request_id=ev.request_id))

    async def _get_users(self, ev: proto.GetUsers) -> None:
        users = await self.server.store.display_names(list(ev.users))
        self.conn.send(proto.UserList(tuple(users), request_id=ev.request_id))

    def _announce_membership(self, conv_id: int, room: str, change: proto.MembershipChange) -> None:
        """MEMBERSHIP (version 2, spec §5.39) to the connections of the room's other members; the broker sends it
        only to connections of version 2 or later."""
        me = self.me
        self.server.broker.push_to_conversation(conv_id, proto.Membership(room, me.username, change),
                                                skip_user=me.user_id)


#: A request's handler: ``Any`` is the frame type it is registered for.
_HANDLERS: dict[type[proto.Event], Callable[[Session, Any], Awaitable[None]]] = {
    proto.Hello: Session._hello,
    proto.Register: Session._register,
    proto.RegisterInvite: Session._register_invite,
    proto.Login: Session._login,
    proto.Resume: Session._resume,
    proto.Logout: Session._logout,
    proto.Join: Session._join,
    proto.Leave: Session._leave,
    proto.ListRooms: Session._list_rooms,
    proto.Members: Session._members,
    proto.Sync: Session._sync,
    proto.History: Session._history,
    proto.Delivered: Session._cursor,
    proto.Read: Session._cursor,
    proto.GetCursors: Session._get_cursors,
    proto.Typing: Session._typing,
    # version 2: the connection refuses these at version 1
    proto.ListConversations: Session._list_conversations,
    proto.ChangePassword: Session._change_password,
    proto.LogoutAll: Session._logout_all,
    proto.ListSessions: Session._list_sessions,
    proto.RevokeSession: Session._revoke_session,
    proto.Kick: Session._kick,
    proto.Ban: Session._ban,
    proto.Unban: Session._unban,
    proto.Mute: Session._mute,
    proto.Unmute: Session._unmute,
    proto.DeleteMessage: Session._delete_message,
    proto.SetTopic: Session._set_topic,
    proto.SetRole: Session._set_role,
    proto.CreateRoom: Session._create_room_request,
    proto.Invite: Session._invite,
    proto.GetRoom: Session._get_room,
    proto.EditMessage: Session._edit_message,
    proto.React: Session._react,
    proto.SendAction: Session._send_action,
    proto.SetDisplayName: Session._set_display_name,
    proto.GetUsers: Session._get_users,
}


def deliver_event(server: "Server", applied: Applied) -> None:
    """Deliver a stored moderation event (spec §9.15) and what it changes for the users it names, on every node:
    an INVITE's user subscribes first (so it receives its own INVITE), a KICK's or BAN's after it (so it receives
    it, then MEMBERSHIP LEFT); a MUTE's connections learn it at once. Also for chorus-admin's actions."""
    broker, ev = server.broker, applied.event
    conv_id, room = applied.conv_id, applied.conv.name
    if applied.added_id is not None:
        broker.user_event(MemberJoined(applied.added_id, ConvRow(conv_id, ConvKind.ROOM, room, ev.seq - 1, None)))
    shown = v1_message(applied.conv, ev)
    broker.publish([Appended(conv_id, ev.seq, ev.ts_ms, 0, shown.sender, 0, shown.body, False, event=ev)])
    broker.flush()
    if applied.added_id is not None:
        broker.push_to_conversation(conv_id, proto.Membership(room, ev.target, proto.MembershipChange.JOINED),
                                    skip_user=-1)
    if applied.removed_id is not None:
        broker.push_to_conversation(conv_id, proto.Membership(room, ev.target, proto.MembershipChange.LEFT),
                                    skip_user=-1)
        broker.user_event(MemberLeft(applied.removed_id, conv_id))
    if ev.kind in (proto.EventKind.MUTE, proto.EventKind.UNMUTE) and applied.target_id is not None:
        broker.user_event(Muted(applied.target_id, conv_id, ev.until_ms if ev.kind == proto.EventKind.MUTE else None))
