"""The broadcast hub: who is subscribed to which conversation (DESIGN.md "Fan-out").

Subscribers are connections. A committed message is encoded once per view (one
view for a room; for a direct conversation each side names it after the other
user) and the same bytes are handed to every subscriber's write-through output.
Delivering never waits: a subscriber that cannot take the bytes is closed as a
slow consumer by its own output, so nobody else is held up (spec §9).
The hub runs in one process; a multi-node hub would publish through Redis behind
the same methods.
"""
from __future__ import annotations

from typing import Iterable, Protocol

import proto


class Subscriber(Protocol):
    user_id: int

    def conv_view(self, conv_id: int) -> proto.Conversation | None: ...
    def deliver(self, conv_id: int, seq: int, frame: bytes) -> None: ...
    def push(self, frame: bytes) -> None: ...


class Hub:
    def __init__(self):
        self._subs: dict[int, dict[Subscriber, None]] = {}
        self._users: dict[int, dict[Subscriber, None]] = {}
        self.delivered = 0

    # -- users --------------------------------------------------------------
    def add_user(self, conn: Subscriber) -> bool:
        """Register an authenticated connection; True if it is the user's first."""
        conns = self._users.setdefault(conn.user_id, {})
        conns[conn] = None
        return len(conns) == 1

    def remove_user(self, conn: Subscriber) -> bool:
        """Forget a connection; True if it was the user's last."""
        conns = self._users.get(conn.user_id)
        if conns is None or conn not in conns:
            return False
        del conns[conn]
        if not conns:
            del self._users[conn.user_id]
            return True
        return False

    def connections_of(self, user_id: int) -> list[Subscriber]:
        return list(self._users.get(user_id, ()))

    def online(self, user_id: int) -> bool:
        return user_id in self._users

    # -- subscriptions ------------------------------------------------------
    def subscribe(self, conv_id: int, conn: Subscriber) -> None:
        self._subs.setdefault(conv_id, {})[conn] = None

    def unsubscribe(self, conv_id: int, conn: Subscriber) -> None:
        subs = self._subs.get(conv_id)
        if subs is not None:
            subs.pop(conn, None)
            if not subs:
                del self._subs[conv_id]

    def subscribers(self, conv_id: int) -> list[Subscriber]:
        return list(self._subs.get(conv_id, ()))

    # -- delivery -----------------------------------------------------------
    def publish(self, appended: Iterable) -> None:
        """Deliver committed messages (store ``Appended`` rows, in seq order) to live subscribers."""
        for msg in appended:
            subs = self._subs.get(msg.conv_id)
            if not subs:
                continue
            frames: dict[proto.Conversation, bytes] = {}
            for conn in list(subs):
                view = conn.conv_view(msg.conv_id)
                if view is None:
                    continue
                frame = frames.get(view)
                if frame is None:
                    frame = frames[view] = proto.encode(proto.Message(
                        view, msg.seq, msg.ts_ms, msg.sender_name, msg.client_msg_id, msg.body))
                conn.deliver(msg.conv_id, msg.seq, frame)
            self.delivered += len(subs)

    def push(self, conns: Iterable[Subscriber], frame: bytes) -> None:
        """Hand an ephemeral frame (presence, typing, receipt) to each connection once."""
        for conn in conns:
            conn.push(frame)
