"""The two ports behind ``serve()``: the ``Store`` and the ``Broker`` (DESIGN.md "Layers", "More than one machine").

How this works. Session and connection code talk to storage and to other connections only through these two
``typing.Protocol`` classes and the neutral types beside them (frozen dataclasses and exceptions); they never import
an implementation. Single-node mode plugs in the SQLite store (server/_store.py) and the in-process broker
(server/_broker.py); node mode plugs in other implementations of the same two protocols (PostgreSQL, Redis) through
``serve(config, store=..., broker=...)`` without touching session logic.

- **Store**: users, session tokens, conversations, memberships, messages, cursors. It owns the guarantees that need
  a transaction (DESIGN.md "Guarantees" 1-3, 5): ``seq`` is gapless per conversation and assigned inside the
  committing transaction; an append is reported (to its caller and to ``on_commit``) only after COMMIT; a retried
  ``(sender, client_msg_id)`` answers the stored row and takes no seq; history pages by cursor.
- **Broker**: everything that crosses connections, which in node mode means crossing processes: committed
  messages to subscribers, ephemeral frames (typing, presence, receipts) to a user's connections or to a
  conversation's subscribers, user events (membership changed, token revoked) that each connection's session
  applies to its own state, presence and per-user connection counts. Per-connection filtering (by seq), gap
  filling and corking are node-local and the same for every broker (server/_fanout.py).

Ordering across nodes needs no sequencer: a message is published only after its COMMIT and the next message of the
same conversation commits only after it, so a receiver that gets seq n+2 while it expects n+1 may read n+1 from the
store (``messages_after``) at once; server/_fanout.py does exactly that.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from chorus.proto import (
    BanInfo, CloseReason, ConversationInfo, ConvEvent, ConvKind, CursorInfo, Event, NodeInfo, ReceiptKind, RoomInfo,
    StoredMessage, UserInfo,
)

if TYPE_CHECKING:
    from ._fanout import Fanout, Subscription
    from ._invites import InviteRow
    from ._moderation import Applied, Moderation

#: One item of a conversation's seq order: a message, or an event (spec §9.15).
Entry = StoredMessage | ConvEvent

# -- rows ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserRow:
    id: int
    name: str
    password_hash: str
    disabled: bool = False  # by an operator (chorus-admin users disable, bans): LOGIN and RESUME are refused
    disabled_until_ms: int = 0  # when a disabled account's ban ends (0: when an operator enables it)


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A stored session token's owner and expiry ("Session" alone is the server's per-connection logic)."""

    user_id: int
    username: str
    expires_at_ms: int
    disabled: bool = False  # the user's account is disabled: RESUME is refused


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """One of a user's stored session tokens, for LIST_SESSIONS and REVOKE_SESSION (version 2, spec §9.1).

    ``id`` is opaque to the client; ``token_hash`` stays on the server (it tells the current session apart).
    """

    id: int
    token_hash: bytes
    created_ms: int  # 0: made before the store recorded it
    last_used_ms: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class ConvRow:
    """A conversation as one user sees it: ``name`` is the room's, or for DIRECT the other user's."""

    id: int
    kind: ConvKind
    name: str
    last_seq: int
    peer_id: int | None  # the other user of a DIRECT pair; None for rooms
    muted_until_ms: int | None = None  # the user's mute in the room (0: no expiry), if one is stored


@dataclass(frozen=True, slots=True)
class RoomStats:
    """A room as an operator sees it (chorus-admin rooms list): its members and its messages (= its last seq)."""

    id: int
    name: str
    members: int
    messages: int


@dataclass(frozen=True, slots=True)
class AdminAction:
    """An operator's change that running nodes apply to their live connections (server/_adminactions.py).

    ``kind`` is one of server/_adminactions.py's ``KINDS``; ``user_id`` or ``room_id`` names what it is about.
    """

    id: int
    kind: str
    user_id: int | None
    room_id: int | None
    at_ms: int


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append: ``client_msg_id`` is a u64, unique per sender (the retry key)."""

    conv_id: int
    sender_id: int
    sender_name: str
    client_msg_id: int
    body: str
    ts_ms: int


@dataclass(frozen=True, slots=True)
class Appended:
    """A stored message; for ``duplicate`` the fields are the original's (its conv, seq, ts and body)."""

    conv_id: int
    seq: int
    ts_ms: int
    sender_id: int
    sender_name: str
    client_msg_id: int
    body: str
    duplicate: bool
    event: ConvEvent | None = None  # an event (spec §9.15): sender and body are its v1 MESSAGE's


# -- store errors ---------------------------------------------------------------------------------------------------


class StoreError(Exception):
    """The database refused or cannot be reached (disk full, I/O error, busy, read-only, connection lost).

    The operation did not take effect, or (an error during COMMIT) took effect in a way a retry finds: appends stay
    idempotent by ``client_msg_id``. Retrying later is safe; the client is answered SERVER_BUSY with
    ``retry_after_ms``, or ``Config.busy_retry_ms`` when the store has no better idea (None).
    """

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class NameTaken(Exception):
    """``create_user`` was given a name that already exists."""


class RoomExists(Exception):
    """CREATE_ROOM of a name that is taken."""


class TooManyRooms(Exception):
    """``join_room``: the user is in ``limit`` rooms already."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} rooms per user")
        self.limit = limit


class SchemaTooNew(RuntimeError):
    """Opening a store: its schema was written by a newer Chorus."""


AppendCallback = Callable[[Appended | None, BaseException | None], None]


class Store(Protocol):
    """Users, sessions, conversations, messages and cursors (DESIGN.md "Guarantees").

    Every method may raise ``StoreError`` (the database refused or is unreachable: the caller answers SERVER_BUSY)
    and ``trio.ClosedResourceError`` once the store is closed. Values from the wire are u64 (seqs, limits,
    client_msg_id) and every method accepts any u64 without overflowing its database's integers. Reads see every
    write committed before they started.
    """

    #: Called in the Trio thread after each group commit, before any waiter of the batch is told, with the batch's
    #: new messages (no duplicates) in commit order, which is seq order per conversation. Set by whoever opened the
    #: store (the server publishes from here, so nothing is seen live before it is durable); must not block.
    on_commit: Callable[[list[Appended]], None] | None
    #: Called in the Trio thread once every waiter of a committed batch got its result (the server sends what one
    #: batch produced for a connection, messages and ACKs, in one write).
    after_batch: Callable[[], None] | None

    # -- users and session tokens --
    async def create_user(self, name: str, password_hash: str, *, invite: bytes | None = None) -> UserRow:
        """Raises ``NameTaken`` if ``name`` exists; with ``invite`` (a code's SHA-256), redeems it in the same
        transaction or raises ``InviteInvalid`` (server/_invites.py) and makes no account."""
        ...

    async def set_display_name(self, user_id: int, name: str) -> None:
        """Set (``name`` "": clear) the user's display name, ``normalized`` by server/_displaynames.py. Raises
        ``DisplayNameRefused`` when it looks like another user's login or display name."""
        ...

    async def display_names(self, names: list[str]) -> list[UserInfo]:
        """The users among ``names`` that exist, in the order asked, with their display names."""
        ...

    async def invite_usable(self, invite: bytes) -> bool:
        """Whether the invite code with this hash exists, is unused and unexpired."""
        ...

    async def add_invites(self, hashes: list[bytes], expires_ms: int) -> None:
        """Store one-time invite codes by their hashes (``expires_ms`` 0: never)."""
        ...

    async def list_invites(self) -> list[InviteRow]:
        ...

    async def revoke_invite(self, invite_id: int) -> bool:
        """Delete an unused invite; False if there is no such unused one."""
        ...

    async def get_user(self, name: str) -> UserRow | None: ...

    async def get_user_by_id(self, user_id: int) -> UserRow | None:
        """The user with this id, or None."""
        ...

    async def add_session(self, token_hash: bytes, user_id: int, expires_at_ms: int, *, now_ms: int = 0) -> None:
        """A new session token, created and last used at ``now_ms``."""
        ...

    async def get_session(self, token_hash: bytes, now_ms: int) -> SessionRow | None:
        """The token's session, or None if there is none or it expired at or before ``now_ms``."""
        ...

    async def touch_session(self, token_hash: bytes, expires_at_ms: int, *, now_ms: int = 0) -> None:
        """Slide the token's expiry; its last use becomes ``now_ms`` (if later)."""
        ...

    async def list_sessions(self, user_id: int, now_ms: int) -> list[SessionEntry]:
        """The user's unexpired session tokens, by id (oldest first)."""
        ...

    async def delete_session_by_id(self, user_id: int, session_id: int) -> bytes | None:
        """Delete the user's session ``session_id``; its token hash, or None if the user has no such session."""
        ...

    async def delete_session(self, token_hash: bytes) -> None: ...

    async def purge_sessions(self, now_ms: int) -> int:
        """Delete expired session tokens; returns how many went."""
        ...

    # -- administration (chorus-admin, server/_admin_cli.py; applied live by server/_adminactions.py) --
    async def list_users(self) -> list[UserRow]:
        """Every user, by name."""
        ...

    async def set_disabled(self, user_id: int, disabled: bool, *, until_ms: int = 0) -> bool:
        """Disable (until ``until_ms``; 0: until enabled) or enable the user's account; False if there is no such
        user. A disabled account reads as ``disabled`` only while that lasts."""
        ...

    async def set_password_hash(self, user_id: int, password_hash: str) -> bool:
        """Replace the user's password hash; False if there is no such user."""
        ...

    async def delete_user_sessions(self, user_id: int, *, keep: bytes | None = None) -> int:
        """Delete every session token of the user (RESUME then fails) but ``keep`` (a token hash, if given);
        returns how many went."""
        ...

    async def room_stats(self) -> list[RoomStats]:
        """Every room (empty ones too) with its member and message counts, by name."""
        ...

    async def delete_room(self, name: str) -> int | None:
        """Delete room ``name`` with its messages, memberships and cursors; its former id, or None if none."""
        ...

    async def append_admin_action(self, kind: str, user_id: int | None, room_id: int | None, at_ms: int) -> int:
        """Record an action for running nodes to apply; returns its id, greater than every earlier action's
        (ids become visible in id order, so a reader that saw id n has seen every id below n)."""
        ...

    async def admin_actions_after(self, after_id: int, limit: int) -> list[AdminAction]:
        """Up to ``limit`` actions with id > ``after_id``, by id (one indexed range read)."""
        ...

    async def last_admin_action_id(self) -> int:
        """The newest action's id; 0 if there is none."""
        ...

    # -- conversations and membership --
    async def room(self, name: str, *, create: bool) -> int | None:
        """The room's conversation id; None if it does not exist and not ``create``."""
        ...

    async def join_room(self, user_id: int, name: str, *, max_rooms: int, create: bool = True,
                        private: bool | None = None) -> tuple[int, bool]:
        """Join room ``name`` (created if absent and ``create``, its creator its OWNER); returns (conv_id,
        newly_joined). ``private`` not None: create only (CREATE_ROOM), private or not.

        The room limit is checked in the transaction that inserts the membership, so concurrent joins on any node
        cannot overshoot it. Raises ``TooManyRooms`` (nothing written), ``LookupError`` (no such room and not
        ``create``), ``RoomExists`` (``private`` given, the name taken), ``Refused`` (FORBIDDEN: banned from the
        room, or it is private).
        """
        ...

    async def join(self, user_id: int, conv_id: int) -> bool:
        """Add the user to room ``conv_id`` (no room limit); True if newly joined. Raises ``ValueError`` if no room."""
        ...

    async def leave(self, user_id: int, conv_id: int) -> bool:
        """True if the user was a member; cursors are kept."""
        ...

    async def is_member(self, user_id: int, conv_id: int) -> bool:
        """Whether the user is in room ``conv_id`` or is one of its DIRECT pair."""
        ...

    async def room_count(self, user_id: int) -> int:
        """How many rooms the user is in."""
        ...

    async def members(self, conv_id: int) -> list[tuple[int, str]]:
        """(user_id, name) of a room's members or of both users of a DIRECT pair, by name; [] if unknown."""
        ...

    async def direct(self, user_a_id: int, user_b_id: int) -> int:
        """The pair's conversation id, created if absent; the same for either order. Raises ``ValueError`` for
        one user twice."""
        ...

    async def conversations(self, user_id: int) -> list[ConvRow]:
        """The user's rooms and DIRECT pairs, by kind then name, each with its ``last_seq``."""
        ...

    async def conversation(self, user_id: int, conv_id: int) -> ConvRow | None:
        """``conv_id`` as the user sees it: any room, or a DIRECT pair the user is in; else None."""
        ...

    async def list_rooms(self, user_id: int, limit: int) -> list[RoomInfo]:
        """Up to ``limit`` rooms with members: the user's first, then the others, each group by name."""
        ...

    async def conversation_list(self, user_id: int, limit: int) -> list[ConversationInfo]:
        """Up to ``limit`` of the user's rooms and direct conversations with a message, each with its newest seq,
        that message's time and the user's cursors; the most recently active first (LIST_CONVERSATIONS)."""
        ...

    # -- messages --
    async def sent_in(self, sender_id: int, client_msg_id: int) -> int | None:
        """The conversation holding the sender's message ``client_msg_id`` (any u64), or None if there is none."""
        ...

    async def last_seq(self, conv_id: int) -> int:
        """The conversation's newest seq; 0 if none or no such conversation."""
        ...

    async def append(self, msg: NewMessage) -> Appended:
        """Store ``msg`` (group-committed) and return it with its seq, or the original if it is a retry.

        The seq is ``last_seq + 1`` of its conversation, assigned in the committing transaction (gapless).
        Returns only after COMMIT and after ``on_commit`` saw the message; once called, the message is committed
        even if the call is cancelled. Raises ``ValueError`` for a ``client_msg_id`` outside u64, ``LookupError``
        for an unknown conversation, ``StoreError``; then nothing of the batch is stored.
        """
        ...

    def append_nowait(self, msg: NewMessage, callback: AppendCallback) -> None:
        """Queue ``msg``; ``callback(appended, error)`` runs in the Trio thread after COMMIT and ``on_commit``.

        The same guarantees as ``append``. Raises ``ValueError`` and ``trio.ClosedResourceError`` before queueing.
        """
        ...

    async def messages_after(self, conv_id: int, after_seq: int, limit: int) -> tuple[list[Entry], bool]:
        """Up to ``limit`` entries (messages, and events: spec §9.15) with seq > ``after_seq``, ascending; has_more =
        newer ones exist.
        Raises ``ValueError`` if ``limit`` < 1."""
        ...

    async def messages_before(self, conv_id: int, before_seq: int, limit: int) -> tuple[list[Entry], bool]:
        """Up to ``limit`` entries with seq < ``before_seq`` (0: from the newest), ascending; has_more = older
        ones exist. Raises ``ValueError`` if ``limit`` < 1."""
        ...

    # -- moderation (spec §9.15; the rules are server/_moderation.py's, run inside the store's transaction) --
    async def moderate(self, action: Moderation) -> Applied:
        """Apply a moderation action and store its event (the conversation's next seq) in one transaction.
        Raises ``Refused`` (nothing stored), ``TooManyRooms`` (INVITE), ``StoreError``."""
        ...

    async def room_details(self, conv_id: int, viewer_id: int) -> tuple[str, bool, list[Any], list[Any]]:
        """(topic, private, members as (user_id, name, role, mute until_ms or None), bans: moderators only)."""
        ...

    async def room_bans(self, conv_id: int) -> list[BanInfo]:
        """The room's active bans, by user name (chorus-admin)."""
        ...

    # -- cursors --
    async def advance_cursor(self, user_id: int, conv_id: int, kind: ReceiptKind, seq: int) -> int | None:
        """Store max(old, min(seq, last_seq)) as the DELIVERED or READ cursor; the new value if it moved, else None."""
        ...

    async def cursors(self, conv_id: int) -> list[CursorInfo]:
        """(user, delivered_seq, read_seq) of every member, 0 where unset, by user name."""
        ...

    async def undelivered(self, user_id: int) -> list[tuple[ConvRow, int]]:
        """The user's conversations with messages after its DELIVERED cursor, with that cursor."""
        ...

    def statistics(self) -> dict[str, Any]: ...


# -- broker ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """User ``user_id`` is now in ``conv`` (a room joined, a direct conversation opened by either side).

    ``conv`` is the user's view; its ``last_seq`` is where live delivery starts for the user's connections that do
    not have the conversation yet (JOINED's ``last_seq``, spec §9.2).
    """

    user_id: int
    conv: ConvRow


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """User ``user_id`` left room ``conv_id``: its connections stop receiving it."""

    user_id: int
    conv_id: int


@dataclass(frozen=True, slots=True)
class TokenRevoked:
    """LOGOUT: every connection of ``user_id`` that authenticated with this token closes (spec §9.1)."""

    user_id: int
    token_hash: bytes


@dataclass(frozen=True, slots=True)
class SessionsRevoked:
    """LOGOUT_ALL, CHANGE_PASSWORD: every connection of ``user_id`` closes, but those that authenticated with
    ``keep`` (a token hash; None: none is kept) (spec §9.1)."""

    user_id: int
    keep: bytes | None


@dataclass(frozen=True, slots=True)
class Muted:
    """MUTE, UNMUTE: ``user_id``'s SENDs to ``conv_id`` are refused until ``until_ms`` (0: no expiry; None: not
    muted any more) (spec §9.15)."""

    user_id: int
    conv_id: int
    until_ms: int | None


@dataclass(frozen=True, slots=True)
class ReadMoved:
    """READ moved ``user_id``'s read cursor of ``conv_id`` to ``seq``: the user's other version 2 connections get
    RECEIPT (spec §9.6), so read state follows the person across devices."""

    user_id: int
    conv_id: int
    seq: int


UserEvent = MemberJoined | MemberLeft | TokenRevoked | SessionsRevoked | Muted | ReadMoved


class Subscriber(Protocol):
    """A connection as the broker sees it (server/_conn.py ``ClientConnection``)."""

    user_id: int | None
    reason: CloseReason | None  # not None once closing: deliver nothing more
    inflight_sends: int  # its SENDs waiting for their commit (their ACKs follow in the same batch)
    output: Any  # server/_output.py Output: write-through, cork()/uncork()
    wrap: Callable[[bytes], bytes] | None  # None, or the framing of a message-based transport (WebSocket)
    wire: Any  # its proto.Connection: ``version`` is the negotiated protocol version

    def output_failed(self) -> None: ...
    def push(self, frame: bytes) -> None: ...
    def close(self, reason: CloseReason) -> None: ...
    def user_event(self, event: UserEvent) -> None: ...


class Broker(Protocol):
    """Everything that crosses connections (DESIGN.md "More than one machine").

    The delivery methods are synchronous and never wait: a networked broker queues what must leave the process
    and delivers to this node's connections at once. Methods that may need a round trip are async.
    """

    #: This node's delivery (server/_fanout.py): the same for every broker.
    fanout: Fanout

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (OFFLINE timers, gap fills; a networked broker's links and heartbeats), until cancelled.

        ``serve`` starts it (``nursery.start``) before accepting connections and cancels it after the last one closed.
        """
        ...

    # -- messages --
    def publish(self, batch: list[Appended]) -> None:
        """Committed messages (the store's ``on_commit``: new, in commit order) to every subscriber on every node.

        Each subscriber gets each seq once and in order: duplicates (seq at or below what it got) are dropped, and a
        gap is held and filled from the store. Frames may be corked until ``flush``.
        """
        ...

    def flush(self) -> None:
        """Send what ``publish`` corked (the store's ``after_batch``, once the batch's ACKs are queued too)."""
        ...

    def republish(self, msg: Appended) -> None:
        """A retry the store answered with the stored message (``duplicate``).

        A networked broker publishes it again, which covers a node that died between COMMIT and publish (receivers
        drop it by seq if they have it). In one process nothing can die between the two, so the local broker does
        nothing.
        """
        ...

    def subscribe(self, conv_id: int, conn: Subscriber, sub: Subscription) -> None:
        """Deliver ``conv_id``'s messages to ``conn`` through ``sub``, its node-local filter (server/_fanout.py)."""
        ...

    def unsubscribe(self, conv_id: int, conn: Subscriber) -> None: ...

    # -- ephemeral frames: never stored, dropped for a connection that is behind --
    def push_to_user(self, user_id: int, event: Event) -> None:
        """``event`` (RECEIPT, USER_TYPING in a direct conversation...) to each connection of the user, on any node."""
        ...

    def push_to_conversation(self, conv_id: int, event: Event, *, skip_user: int) -> None:
        """``event`` to the conversation's subscribers on any node, except the connections of ``skip_user``."""
        ...

    # -- users: connections, presence, events --
    def connection_count(self, user_id: int) -> int:
        """The user's authenticated connections on all nodes (a networked broker may answer from its view of the
        other nodes, at most a heartbeat old)."""
        ...

    def add_connection(self, conn: Subscriber, user_id: int, username: str, rooms: Sequence[int],
                       limit: int) -> bool:
        """Register an authenticated connection, unless the user has ``limit`` connections already (False).

        Announces PRESENCE ONLINE to the members of ``rooms`` if the user came online (its first connection, and no
        OFFLINE pending: the others never learnt it was gone).
        """
        ...

    def remove_connection(self, conn: Subscriber, user_id: int, username: str, rooms: Sequence[int]) -> None:
        """Forget a connection; after the user's last one, OFFLINE to ``rooms`` once the configured delay passed
        without the user coming back."""
        ...

    def user_event(self, event: UserEvent) -> None:
        """``event`` to ``conn.user_event`` of every connection of ``event.user_id`` on every node; this node's
        connections get it before this returns."""
        ...

    # -- nodes (spec §9.14) --
    def live_nodes(self) -> list[NodeInfo]:
        """The cluster's live nodes and their load, as last heard (none in single-node mode): for NODES."""
        ...

    def set_address(self, port: int, ws_port: int | None) -> None:
        """The ports this node's listeners got (the real ones when the config says 0)."""
        ...

    def set_draining(self, draining: bool) -> None:
        """This node is shutting down: the others and NODES say so."""
        ...

    async def online(self, user_ids: Iterable[int]) -> set[int]:
        """Those of ``user_ids`` online as announced (a user whose OFFLINE is still pending counts as online)."""
        ...

    def statistics(self) -> dict[str, Any]:
        """Counters; ``delivered`` (messages written to connections) at least."""
        ...


#: What ``serve(broker=...)`` takes: given the config and the open store, the broker.
BrokerFactory = Callable[[Any, Store], Broker]
