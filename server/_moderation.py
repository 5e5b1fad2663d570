"""Roles, moderation and private rooms (spec/PROTOCOL.md §9.15): the rules, and the transaction each action is.

How this works. A moderation request (KICK, BAN, ..., DELETE_MESSAGE, INVITE) or an operator's action (chorus-admin)
is one ``Moderation``, applied by ``apply`` in one store transaction: it reads the actor's and the target's roles,
refuses what the rules forbid (``Refused``, which the session answers with an ERROR), makes the change (a membership
removed, a ban stored, a message's text replaced by a tombstone...) and stores the event, which takes the
conversation's next seq like a message does. Both stores run the same code: each hands ``apply`` its connection
wrapped as a ``Db``, which runs SQL written with ``:name`` parameters (the one dialect difference, translated for
PostgreSQL), so the rules are written once.

Events live in their own table beside the messages and share their seq: ``entries_after`` and ``entries_before``
merge the two into one page (what SYNC, HISTORY and gap fills read). A deleted message keeps its row, so a retry of
its SEND is still answered as a duplicate (spec §9.4), but its text is replaced and a DELETED event at the same seq
takes its place in every page.

A version 1 connection has no EVENTS frame: ``v1_message`` turns an event into the MESSAGE it sees instead, with a
body in words, so its seqs stay gapless.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chorus import proto
from chorus.proto import ConvKind, ErrorCode, EventKind, RoomRole

from ._ports import TooManyRooms

#: The stored text of a deleted message: its row stays (retries of its SEND are still duplicates), its words go.
TOMBSTONE_BODY = "(message deleted)"
#: A sanction's ``until_ms`` that never ends (the wire's 0).
NO_EXPIRY = 0

_ROOM = int(ConvKind.ROOM)

# The events of conversation :c from seq :lo to :hi (inclusive), with the names of their actor and target.
_EVENT_COLUMNS = (
    "SELECT e.seq, e.ts_ms, e.kind, coalesce(a.name, ''), coalesce(t.name, ''), e.target_seq, e.until_ms, e.role,"
    " e.text FROM events e LEFT JOIN users a ON a.id = e.actor_id LEFT JOIN users t ON t.id = e.target_id"
)
_MESSAGE_COLUMNS = (
    "SELECT m.seq, m.ts_ms, u.name, m.client_msg_id, m.body FROM messages m JOIN users u ON u.id = m.sender_id"
)


class Db(Protocol):
    """A store's connection, inside its transaction, for SQL with ``:name`` parameters."""

    def one(self, sql: str, **params: Any) -> tuple[Any, ...] | None: ...

    def all(self, sql: str, **params: Any) -> list[tuple[Any, ...]]: ...

    def run(self, sql: str, **params: Any) -> int:
        """Execute; the number of rows changed."""
        ...

    def body(self, text: str) -> Any:
        """``text`` as the store keeps a message body (PostgreSQL: UTF-8 bytes)."""
        ...


class Unchanged(Exception):
    """A REACT that is there already, or the UNREACT of one that is not: nothing to store, nothing to tell."""


class Refused(Exception):
    """A moderation request the rules refuse: ``code`` (FORBIDDEN, NOT_MEMBER, NOT_FOUND, ...) and why, in words."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Moderation:
    """One moderation action to apply: ``actor_id`` None is the server's operator (chorus-admin)."""

    kind: EventKind
    conv_id: int
    actor_id: int | None
    target_id: int | None = None
    target_seq: int = 0  # DELETE: the message's seq
    until_ms: int = NO_EXPIRY  # BAN, MUTE
    role: RoomRole = RoomRole.MEMBER  # ROLE
    text: str = ""  # TOPIC: the topic; KICK, BAN, MUTE: the reason; EDIT, ACTION: the text; REACT: the reaction
    max_rooms: int = 0  # INVITE: the target's room limit (0: none)
    client_msg_id: int = 0  # ACTION: the sender's u64 id (the retry key of a SEND)


@dataclass(frozen=True, slots=True)
class Applied:
    """What ``apply`` stored: the event (with its seq), the tombstone of a DELETE, and who left or came in."""

    conv_id: int
    conv: proto.Conversation  # as the actor names it (rooms: the room)
    event: proto.ConvEvent
    tombstone: proto.ConvEvent | None = None
    removed_id: int | None = None  # KICK, BAN of a member: the user who is no longer in the room
    added_id: int | None = None  # INVITE
    target_id: int | None = None
    duplicate: bool = False  # ACTION: a retry, answered with the stored action (nothing new was stored)


def to_db_id(client_msg_id: int) -> int:
    """A wire u64 client_msg_id as both stores keep it: the same 64 bits, as a signed integer."""
    return client_msg_id - (1 << 64) if client_msg_id >= 1 << 63 else client_msg_id


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def active(until_ms: int | None, now: int) -> bool:
    """Whether a sanction stored with ``until_ms`` (None: none stored) holds at ``now``."""
    return until_ms is not None and (until_ms == NO_EXPIRY or until_ms > now)


def _role(db: Db, conv_id: int, user_id: int) -> RoomRole | None:
    row = db.one("SELECT role FROM memberships WHERE conv_id = :c AND user_id = :u", c=conv_id, u=user_id)
    return None if row is None else RoomRole(row[0])


def _sanction(db: Db, conv_id: int, user_id: int, kind: EventKind, now: int) -> int | None:
    """The ``until_ms`` of the user's active ban or mute in the room; None if there is none."""
    row = db.one("SELECT until_ms FROM sanctions WHERE conv_id = :c AND user_id = :u AND kind = :k",
                 c=conv_id, u=user_id, k=int(kind))
    return row[0] if row is not None and active(row[0], now) else None


def _name(db: Db, user_id: int | None) -> str:
    if user_id is None:
        return ""
    row = db.one("SELECT name FROM users WHERE id = :u", u=user_id)
    return "" if row is None else row[0]


def _next_seq(db: Db, conv_id: int) -> int:
    """Take the conversation's next seq (the row lock orders it with every other write of the conversation)."""
    row = db.one("UPDATE conversations SET last_seq = last_seq + 1 WHERE id = :c RETURNING last_seq", c=conv_id)
    if row is None:
        raise Refused(ErrorCode.NOT_FOUND, "no such conversation")
    return row[0]


def _insert_event(db: Db, conv_id: int, seq: int, ts_ms: int, m: Moderation, kind: EventKind,
                  target_id: int | None) -> None:
    db.run("INSERT INTO events(conv_id, seq, ts_ms, kind, actor_id, target_id, target_seq, until_ms, role, text)"
           " VALUES (:c, :s, :t, :k, :a, :g, :q, :u, :r, :x)", c=conv_id, s=seq, t=ts_ms, k=int(kind), a=m.actor_id,
           g=target_id, q=m.target_seq, u=m.until_ms, r=int(m.role), x=m.text)


_RANK = {RoomRole.MEMBER: 1, RoomRole.MODERATOR: 2, RoomRole.OWNER: 3}
_OPERATOR_RANK = 4  # chorus-admin: above every role


def apply(db: Db, m: Moderation) -> Applied:
    """Check ``m`` against the rules and store it with its event, in the caller's transaction (spec §9.15, §9.16).

    Raises ``Refused`` (then the caller rolls back: nothing is stored), ``TooManyRooms`` (INVITE of a user at the
    room limit), ``Unchanged`` (a REACT already there, an UNREACT of none: nothing stored).
    """
    now = now_ms()
    conv = db.one("SELECT kind, name FROM conversations WHERE id = :c", c=m.conv_id)
    if conv is None:
        raise Refused(ErrorCode.NOT_FOUND, "no such conversation")
    is_room = conv[0] == _ROOM
    room = conv[1] or ""
    if m.actor_id is None:
        rank = _OPERATOR_RANK
    elif is_room:
        actor_role = _role(db, m.conv_id, m.actor_id)
        if actor_role is None:
            raise Refused(ErrorCode.NOT_MEMBER, f"not a member of #{room}")
        rank = _RANK[actor_role]
    else:
        rank = _RANK[RoomRole.MEMBER]  # a direct pair: each may delete their own messages, nothing more
    target_name = _name(db, m.target_id)
    target_role = _role(db, m.conv_id, m.target_id) if m.target_id is not None and is_room else None
    removed_id = added_id = None
    tombstone = None
    kind = m.kind

    def moderator() -> None:
        if rank < _RANK[RoomRole.MODERATOR]:
            raise Refused(ErrorCode.FORBIDDEN, f"only moderators of #{room} may do that")

    def outranked() -> None:  # the actor must rank above the target
        if target_role is not None and _RANK[target_role] >= rank:
            raise Refused(ErrorCode.FORBIDDEN, f"{target_name} is a {target_role.name.lower()} of #{room}")

    def member_target() -> None:
        if target_role is None:
            raise Refused(ErrorCode.NOT_FOUND, f"{target_name or 'that user'} is not in #{room}")

    if kind not in _IN_ANY_CONVERSATION and not is_room:
        raise Refused(ErrorCode.INVALID_REQUEST, "only rooms have moderators")
    if kind == EventKind.KICK:
        moderator()
        member_target()
        outranked()
        db.run("DELETE FROM memberships WHERE conv_id = :c AND user_id = :u", c=m.conv_id, u=m.target_id)
        removed_id = m.target_id
    elif kind == EventKind.BAN:
        moderator()
        outranked()
        if target_role is not None:
            db.run("DELETE FROM memberships WHERE conv_id = :c AND user_id = :u", c=m.conv_id, u=m.target_id)
            removed_id = m.target_id
        _store_sanction(db, m)
    elif kind == EventKind.MUTE:
        moderator()
        member_target()
        outranked()
        _store_sanction(db, m)
    elif kind in (EventKind.UNBAN, EventKind.UNMUTE):
        moderator()
        sanction = EventKind.BAN if kind == EventKind.UNBAN else EventKind.MUTE
        if _sanction(db, m.conv_id, m.target_id or 0, sanction, now) is None:
            state = "banned" if sanction == EventKind.BAN else "muted"
            raise Refused(ErrorCode.NOT_FOUND, f"{target_name} is not {state} in #{room}")
        db.run("DELETE FROM sanctions WHERE conv_id = :c AND user_id = :u AND kind = :k", c=m.conv_id,
               u=m.target_id, k=int(sanction))
    elif kind == EventKind.TOPIC:
        moderator()
        db.run("UPDATE conversations SET topic = :t WHERE id = :c", t=m.text, c=m.conv_id)
    elif kind == EventKind.ROLE:
        if rank < _RANK[RoomRole.OWNER]:
            raise Refused(ErrorCode.FORBIDDEN, f"only the owner of #{room} gives roles")
        member_target()
        if m.target_id == m.actor_id:
            raise Refused(ErrorCode.FORBIDDEN, "the owner hands the room over by giving another member OWNER")
        if m.role == RoomRole.OWNER:  # one owner: the old one (if a user) steps down to moderator
            db.run("UPDATE memberships SET role = :r WHERE conv_id = :c AND role = :o", r=int(RoomRole.MODERATOR),
                   c=m.conv_id, o=int(RoomRole.OWNER))
        db.run("UPDATE memberships SET role = :r WHERE conv_id = :c AND user_id = :u", r=int(m.role), c=m.conv_id,
               u=m.target_id)
    elif kind == EventKind.INVITE:
        moderator()
        if target_role is not None:
            raise Refused(ErrorCode.INVALID_REQUEST, f"{target_name} is already in #{room}")
        if _sanction(db, m.conv_id, m.target_id or 0, EventKind.BAN, now) is not None:
            raise Refused(ErrorCode.FORBIDDEN, f"{target_name} is banned from #{room}")
        if m.max_rooms:
            (count,) = db.one("SELECT count(*) FROM memberships WHERE user_id = :u", u=m.target_id) or (0,)
            if count >= m.max_rooms:
                raise TooManyRooms(m.max_rooms)
        db.run("INSERT INTO memberships(user_id, conv_id, role) VALUES (:u, :c, :r)", u=m.target_id, c=m.conv_id,
               r=int(RoomRole.MEMBER))
        added_id = m.target_id
    elif kind == EventKind.DELETE:
        tombstone, target_name, m = _delete(db, m, rank, is_room)
    elif kind == EventKind.EDIT:
        target_name, m = _edit(db, m)
    elif kind in (EventKind.REACT, EventKind.UNREACT):
        target_name, m = _react(db, m)
    elif kind == EventKind.ACTION:
        return _action(db, m, ConvKind(conv[0]), room)
    else:
        raise Refused(ErrorCode.INVALID_REQUEST, f"{kind.name} is not an action")
    seq = _next_seq(db, m.conv_id)
    _insert_event(db, m.conv_id, seq, now, m, kind, m.target_id)
    event = proto.ConvEvent(seq, now, kind, _name(db, m.actor_id), target_name, m.target_seq, m.until_ms, m.role,
                            m.text)
    view = proto.Conversation(ConvKind(conv[0]), room if is_room else "")
    return Applied(m.conv_id, view, event, tombstone, removed_id, added_id, m.target_id)


#: The actions that direct conversations have too: on one's own messages, or as a message.
_IN_ANY_CONVERSATION = frozenset({EventKind.DELETE, EventKind.EDIT, EventKind.REACT, EventKind.UNREACT,
                                  EventKind.ACTION})
#: Distinct reactions one user may leave on one message.
MAX_REACTIONS_PER_MESSAGE = 20
#: What a version 1 client (which has no EVENTS) sees of an action: the convention older clients render.
ACTION_PREFIX = "/me "


def _message_row(db: Db, m: Moderation) -> tuple[int, int, str]:
    """(sender id, ts_ms, sender name) of the message at ``m.target_seq``; ``Refused`` NOT_FOUND unless there is one
    (an event, or a deleted message, is not)."""
    row = db.one("SELECT m.sender_id, m.ts_ms, u.name FROM messages m JOIN users u ON u.id = m.sender_id"
                 " WHERE m.conv_id = :c AND m.seq = :s AND NOT EXISTS"
                 " (SELECT 1 FROM events e WHERE e.conv_id = :c AND e.seq = :s AND e.kind = :d)",
                 c=m.conv_id, s=m.target_seq, d=int(EventKind.DELETED))
    if row is None:
        raise Refused(ErrorCode.NOT_FOUND, f"no message {m.target_seq}")
    return row[0], row[1], row[2]


def _edit(db: Db, m: Moderation) -> tuple[str, Moderation]:
    """EDIT_MESSAGE: the message's text replaced (an action's too); only its sender may."""
    sender_id, _, sender = _message_row(db, m)
    if sender_id != m.actor_id:
        raise Refused(ErrorCode.FORBIDDEN, "only its sender edits a message")
    action = db.run("UPDATE events SET text = :x WHERE conv_id = :c AND seq = :s AND kind = :k", x=m.text,
                    c=m.conv_id, s=m.target_seq, k=int(EventKind.ACTION))
    body = ACTION_PREFIX + m.text if action else m.text
    db.run("UPDATE messages SET body = :b WHERE conv_id = :c AND seq = :s", b=db.body(body), c=m.conv_id,
           s=m.target_seq)
    return sender, Moderation(EventKind.EDIT, m.conv_id, m.actor_id, sender_id, m.target_seq, text=m.text)


def _react(db: Db, m: Moderation) -> tuple[str, Moderation]:
    """REACT (add) or UNREACT: one row per (message, user, reaction); ``Unchanged`` if it is already so."""
    sender_id, _, sender = _message_row(db, m)
    key = {"c": m.conv_id, "s": m.target_seq, "u": m.actor_id, "r": m.text}
    if m.kind == EventKind.REACT:
        if db.one("SELECT 1 FROM reactions WHERE conv_id = :c AND seq = :s AND user_id = :u AND reaction = :r",
                  **key):
            raise Unchanged()
        (count,) = db.one("SELECT count(*) FROM reactions WHERE conv_id = :c AND seq = :s AND user_id = :u",
                          c=m.conv_id, s=m.target_seq, u=m.actor_id) or (0,)
        if count >= MAX_REACTIONS_PER_MESSAGE:
            raise Refused(ErrorCode.INVALID_REQUEST, f"at most {MAX_REACTIONS_PER_MESSAGE} reactions per message")
        db.run("INSERT INTO reactions(conv_id, seq, user_id, reaction) VALUES (:c, :s, :u, :r)", **key)
    elif not db.run("DELETE FROM reactions WHERE conv_id = :c AND seq = :s AND user_id = :u AND reaction = :r", **key):
        raise Unchanged()
    return sender, Moderation(m.kind, m.conv_id, m.actor_id, sender_id, m.target_seq, text=m.text)


def _action(db: Db, m: Moderation, kind: ConvKind, room: str) -> Applied:
    """SEND_ACTION: a message (its row keeps the retry key and, for version 1, the "/me " text) and an ACTION event
    at the same seq; a retry finds the stored one (spec §9.4: the same rule as SEND)."""
    now = now_ms()
    client_msg_id = to_db_id(m.client_msg_id)
    found = db.one("SELECT conv_id, seq, ts_ms FROM messages WHERE sender_id = :s AND client_msg_id = :i",
                   s=m.actor_id, i=client_msg_id)
    if found is not None:
        conv_id, seq, ts_ms = found
        if conv_id != m.conv_id:
            raise Refused(ErrorCode.INVALID_REQUEST, "client_msg_id already used in another conversation")
        row = db.one(f"{_EVENT_COLUMNS} WHERE e.conv_id = :c AND e.seq = :s", c=conv_id, s=seq)
        event = _event(row) if row is not None else proto.ConvEvent(
            seq, ts_ms, EventKind.ACTION, _name(db, m.actor_id), "", 0, 0, RoomRole.MEMBER, m.text)
        return Applied(conv_id, proto.Conversation(kind, room), event, duplicate=True)
    seq = _next_seq(db, m.conv_id)
    db.run("INSERT INTO messages(conv_id, seq, ts_ms, sender_id, client_msg_id, body) VALUES (:c, :s, :t, :u, :i, :b)",
           c=m.conv_id, s=seq, t=now, u=m.actor_id, i=client_msg_id, b=db.body(ACTION_PREFIX + m.text))
    _insert_event(db, m.conv_id, seq, now, m, EventKind.ACTION, None)
    event = proto.ConvEvent(seq, now, EventKind.ACTION, _name(db, m.actor_id), "", 0, 0, RoomRole.MEMBER, m.text)
    return Applied(m.conv_id, proto.Conversation(kind, room), event)


def _store_sanction(db: Db, m: Moderation) -> None:
    db.run("DELETE FROM sanctions WHERE conv_id = :c AND user_id = :u AND kind = :k", c=m.conv_id, u=m.target_id,
           k=int(m.kind))
    db.run("INSERT INTO sanctions(conv_id, user_id, kind, until_ms) VALUES (:c, :u, :k, :t)", c=m.conv_id,
           u=m.target_id, k=int(m.kind), t=m.until_ms)


def _delete(db: Db, m: Moderation, rank: int, is_room: bool) -> tuple[proto.ConvEvent, str, Moderation]:
    """DELETE_MESSAGE: the message at ``m.target_seq`` becomes a DELETED event at its seq (an action's ACTION
    event goes); the returned moderation names its sender as the target of the DELETE event that follows."""
    sender_id, ts_ms, sender = _message_row(db, m)
    if sender_id != m.actor_id and not (is_room and rank >= _RANK[RoomRole.MODERATOR]):
        raise Refused(ErrorCode.FORBIDDEN, "only moderators delete other people's messages")
    db.run("UPDATE messages SET body = :b WHERE conv_id = :c AND seq = :s", b=db.body(TOMBSTONE_BODY), c=m.conv_id,
           s=m.target_seq)
    db.run("DELETE FROM events WHERE conv_id = :c AND seq = :s", c=m.conv_id, s=m.target_seq)
    db.run("DELETE FROM reactions WHERE conv_id = :c AND seq = :s", c=m.conv_id, s=m.target_seq)
    marked = Moderation(EventKind.DELETED, m.conv_id, m.actor_id, sender_id)
    _insert_event(db, m.conv_id, m.target_seq, ts_ms, marked, EventKind.DELETED, sender_id)
    tombstone = proto.ConvEvent(m.target_seq, ts_ms, EventKind.DELETED, _name(db, m.actor_id), sender, 0, 0,
                                RoomRole.MEMBER, "")
    return tombstone, sender, Moderation(EventKind.DELETE, m.conv_id, m.actor_id, sender_id, m.target_seq)


# -- reading: pages of messages and events ---------------------------------------------------------------------------

Entry = proto.StoredMessage | proto.ConvEvent


def _event(row: Sequence[Any]) -> proto.ConvEvent:
    seq, ts_ms, kind, actor, target, target_seq, until_ms, role, text = row
    return proto.ConvEvent(seq, ts_ms, EventKind(kind), actor, target, target_seq, until_ms, RoomRole(role), text)


def merge(messages: list[proto.StoredMessage], events: list[proto.ConvEvent], limit: int, *,
          newest: bool) -> tuple[list[Entry], bool]:
    """One page of up to ``limit`` entries from each side's ``limit + 1`` nearest (an event replaces the tombstoned
    message at its seq), ascending; has_more = more exist beyond. ``newest``: the page ends at the far end."""
    by_seq: dict[int, Entry] = {msg.seq: msg for msg in messages}
    by_seq.update((ev.seq, ev) for ev in events)
    seqs = sorted(by_seq, reverse=newest)
    page = [by_seq[seq] for seq in seqs[:limit]]
    if newest:
        page.reverse()
    return page, len(seqs) > limit


def entries_after(db: Db, conv_id: int, after_seq: int, limit: int, clamp: Callable[[int], int],
                  stored: Callable[[Any], proto.StoredMessage]) -> tuple[list[Entry], bool]:
    """Up to ``limit`` entries (messages and events) with seq > ``after_seq``, ascending; has_more. ``clamp`` and
    ``stored`` are the store's: a wire u64 as its integers, a message row as a StoredMessage."""
    params = {"c": conv_id, "s": clamp(after_seq), "n": clamp(limit + 1)}
    messages = [stored(row) for row in db.all(f"{_MESSAGE_COLUMNS} WHERE m.conv_id = :c AND m.seq > :s"
                                                " ORDER BY m.seq LIMIT :n", **params)]
    events = [_event(row) for row in db.all(f"{_EVENT_COLUMNS} WHERE e.conv_id = :c AND e.seq > :s"
                                            " ORDER BY e.seq LIMIT :n", **params)]
    return merge(messages, events, limit, newest=False)


def entries_before(db: Db, conv_id: int, before_seq: int, limit: int, clamp: Callable[[int], int],
                   stored: Callable[[Any], proto.StoredMessage]) -> tuple[list[Entry], bool]:
    """Up to ``limit`` entries with seq < ``before_seq`` (an already clamped bound), ascending; has_more."""
    params = {"c": conv_id, "s": before_seq, "n": clamp(limit + 1)}
    messages = [stored(row) for row in db.all(f"{_MESSAGE_COLUMNS} WHERE m.conv_id = :c AND m.seq < :s"
                                                " ORDER BY m.seq DESC LIMIT :n", **params)]
    events = [_event(row) for row in db.all(f"{_EVENT_COLUMNS} WHERE e.conv_id = :c AND e.seq < :s"
                                            " ORDER BY e.seq DESC LIMIT :n", **params)]
    return merge(messages, events, limit, newest=True)


def room_details(db: Db, conv_id: int, viewer_id: int) -> tuple[str, bool, list[Any], list[proto.BanInfo]]:
    """(topic, private, members as (user_id, name, role, mute until or None), active bans as BanInfo; the bans
    only for a moderator or the owner) of room ``conv_id``."""
    now = now_ms()
    topic, private = db.one("SELECT topic, private FROM conversations WHERE id = :c", c=conv_id) or ("", 0)
    rows = db.all("SELECT u.id, u.name, m.role, s.until_ms FROM memberships m JOIN users u ON u.id = m.user_id"
                  " LEFT JOIN sanctions s ON s.conv_id = m.conv_id AND s.user_id = m.user_id AND s.kind = :k"
                  " WHERE m.conv_id = :c ORDER BY u.name LIMIT :n", c=conv_id, k=int(EventKind.MUTE),
                  n=proto.MAX_LIST_ITEMS)
    members = [(uid, name, RoomRole(role), until if active(until, now) else None) for uid, name, role, until in rows]
    viewer = next((role for uid, _, role, _ in members if uid == viewer_id), None)
    moderator = viewer is not None and _RANK[viewer] >= _RANK[RoomRole.MODERATOR]
    return topic, bool(private), members, room_bans(db, conv_id) if moderator else []


def room_bans(db: Db, conv_id: int) -> list[proto.BanInfo]:
    """The room's active bans, by user name (at most 1000)."""
    now = now_ms()
    return [proto.BanInfo(name, until) for name, until in db.all(
        "SELECT u.name, s.until_ms FROM sanctions s JOIN users u ON u.id = s.user_id"
        " WHERE s.conv_id = :c AND s.kind = :k ORDER BY u.name LIMIT :n", c=conv_id, k=int(EventKind.BAN),
        n=proto.MAX_LIST_ITEMS) if active(until, now)]


def join_refusal(db: Db, conv_id: int, user_id: int, room: str) -> None:
    """JOIN of an existing room by a non-member: raises ``Refused`` FORBIDDEN if the user is banned or the room is
    private (invite-only)."""
    if _sanction(db, conv_id, user_id, EventKind.BAN, now_ms()) is not None:
        raise Refused(ErrorCode.FORBIDDEN, f"banned from #{room}")
    row = db.one("SELECT private FROM conversations WHERE id = :c", c=conv_id)
    if row is not None and row[0]:
        raise Refused(ErrorCode.FORBIDDEN, f"#{room} is invite-only: ask one of its moderators to invite you")


# -- what a version 1 connection sees ---------------------------------------------------------------------------------

def utc_text(ms: int) -> str:
    """A time in ms since the epoch, as people read it in refusals, events and chorus-admin's tables."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def until_text(until_ms: int) -> str:
    """" until <time>" for a ban or mute that ends, "" for one with no expiry."""
    return "" if until_ms == NO_EXPIRY else " until " + utc_text(until_ms)


def _because(text: str) -> str:
    return f": {text}" if text else ""


def v1_text(ev: proto.ConvEvent) -> str:
    """The event in words, as a version 1 connection's MESSAGE body (never empty)."""
    who = ev.target or "someone"
    match ev.kind:
        case EventKind.KICK:
            return f"removed {who} from the room{_because(ev.text)}"
        case EventKind.BAN:
            return f"banned {who}{until_text(ev.until_ms)}{_because(ev.text)}"
        case EventKind.UNBAN:
            return f"lifted the ban on {who}"
        case EventKind.MUTE:
            return f"muted {who}{until_text(ev.until_ms)}{_because(ev.text)}"
        case EventKind.UNMUTE:
            return f"unmuted {who}"
        case EventKind.DELETE:
            return "deleted a message"
        case EventKind.DELETED:
            return TOMBSTONE_BODY
        case EventKind.TOPIC:
            return f"set the topic: {ev.text}" if ev.text else "cleared the topic"
        case EventKind.ROLE:
            return f"made {who} {ev.role.name.lower()}"
        case EventKind.INVITE:
            return f"added {who} to the room"
        case EventKind.EDIT:
            return f"edited a message: {ev.text}"
        case EventKind.REACT:
            return f"reacted {ev.text}"
        case EventKind.UNREACT:
            return f"took back {ev.text}"
        case EventKind.ACTION:
            return ACTION_PREFIX + ev.text
    return ev.kind.name.lower()


def v1_message(view: proto.Conversation, ev: proto.ConvEvent) -> proto.StoredMessage:
    """The StoredMessage a version 1 connection gets in place of ``ev`` (spec §9.15): sent by the actor (an
    operator's action by its target, or else by the room), client_msg_id 0. A tombstone keeps its sender."""
    sender = ev.target if ev.kind == EventKind.DELETED else (ev.actor or ev.target or view.name)
    return proto.StoredMessage(ev.seq, ev.ts_ms, sender, 0, v1_text(ev))


def v1_entries(view: proto.Conversation, entries: list[Entry]) -> tuple[proto.StoredMessage, ...]:
    return tuple(e if isinstance(e, proto.StoredMessage) else v1_message(view, e) for e in entries)
