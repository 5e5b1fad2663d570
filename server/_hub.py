"""The broadcast hub: who is subscribed to which conversation (DESIGN.md "Fan-out").

Subscribers are connections. A committed message is encoded once per view (one
view for a room; for a direct conversation each side names it after the other
user) and the same bytes are handed to every subscriber's write-through output.
Delivering never waits: a subscriber that cannot take the bytes is closed as a
slow consumer by its own output, so nobody else is held up (spec §9).
The hub runs in one process; a multi-node hub would publish through Redis behind
the same methods.

Presence (spec §9.8): ONLINE when a user's first connection authenticates,
OFFLINE a delay after its last one closes, unless the user is back by then (then
neither goes out, so a flaky network or a reconnect loop makes no noise). The
pending OFFLINEs wait in arrival order, which is deadline order (one delay for
all), and ``run_presence_timer`` (one task, started by the server) sends them.
"""
from __future__ import annotations

import logging
from typing import Iterable, Protocol

import trio

from chorus import proto

log = logging.getLogger("chorus.hub")
#: OFFLINEs sent in one go before the timer lets other tasks run.
_OFFLINES_PER_STEP = 100


class Subscriber(Protocol):
    """A connection as the hub sees it (server/_conn.py ClientConnection)."""

    user_id: int
    reason: object  # not None once closing
    inflight_sends: int  # its SENDs waiting for their commit
    output: object  # server/_output.py Output
    wrap: object  # None, or a function framing each frame for a message-based transport

    def output_failed(self) -> None: ...
    def push(self, frame: bytes) -> None: ...


class Subscription(Protocol):
    """What a subscriber's session keeps per conversation (server/_session.py ConvState)."""

    view: proto.Conversation
    syncing: bool
    missed_seq: int
    sent_seq: int


class Hub:
    def __init__(self):
        self._subs: dict[int, dict[Subscriber, Subscription]] = {}
        self._users: dict[int, dict[Subscriber, None]] = {}
        self._corked: list = []  # outputs holding a batch's frames until flush()
        self.delivered = 0
        # user id -> (when, name, room ids): OFFLINE to announce unless the user is back by then
        self._offline: dict[int, tuple[float, str, tuple[int, ...]]] = {}
        self._offline_added: trio.Event | None = None
        self._presence_timer = False

    # -- users --------------------------------------------------------------
    def add_user(self, conn: Subscriber) -> bool:
        """Register an authenticated connection; True if the user came online (announce ONLINE).

        False for a further connection, and for a first one that cancels a pending OFFLINE: the others
        never learnt the user was gone.
        """
        conns = self._users.setdefault(conn.user_id, {})
        conns[conn] = None
        return len(conns) == 1 and self._offline.pop(conn.user_id, None) is None

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
        """As announced: a user whose OFFLINE is still pending counts as online."""
        return user_id in self._users or user_id in self._offline

    # -- presence -------------------------------------------------------------
    def announce(self, user_id: int, username: str, rooms: Iterable[int], status: proto.Status) -> None:
        """PRESENCE to the other members' connections in ``rooms`` (never to the user's own)."""
        targets: dict = {}
        for conv_id in rooms:
            subs = self._subs.get(conv_id)
            if subs:
                targets.update(dict.fromkeys(subs))
        for conn in self._users.get(user_id, ()):
            targets.pop(conn, None)
        if targets:
            self.push(targets, proto.encode(proto.Presence(username, status)))

    def went_offline(self, user_id: int, username: str, rooms: tuple[int, ...], delay_s: float) -> None:
        """The user's last connection closed: OFFLINE after ``delay_s`` unless it is back by then.

        At once when ``delay_s`` is 0 or no presence timer runs.
        """
        if delay_s <= 0 or not self._presence_timer:
            self.announce(user_id, username, rooms, proto.Status.OFFLINE)
            return
        self._offline[user_id] = (trio.current_time() + delay_s, username, rooms)
        if self._offline_added is not None:
            self._offline_added.set()
            self._offline_added = None

    async def run_presence_timer(self) -> None:
        """Send each pending OFFLINE when its delay is over; runs until cancelled (the server starts it)."""
        pending = self._offline
        self._presence_timer = True
        try:
            while True:
                if not pending:
                    self._offline_added = trio.Event()
                    await self._offline_added.wait()
                    continue
                user_id = next(iter(pending))
                when = pending[user_id][0]
                if when > trio.current_time():
                    await trio.sleep_until(when)  # a later entry is never due earlier: one delay for all
                    continue
                for _ in range(_OFFLINES_PER_STEP):
                    user_id = next(iter(pending), None)
                    if user_id is None or pending[user_id][0] > trio.current_time():
                        break
                    _, username, rooms = pending.pop(user_id)
                    self._announce_safely(user_id, username, rooms)
                await trio.lowlevel.checkpoint()
        finally:
            self._presence_timer = False
            while pending:  # stopping: whoever is still pending is gone
                user_id, (_, username, rooms) = pending.popitem()
                self._announce_safely(user_id, username, rooms)

    def _announce_safely(self, user_id: int, username: str, rooms: tuple[int, ...]) -> None:
        try:
            self.announce(user_id, username, rooms, proto.Status.OFFLINE)
        except Exception:  # a bug here must not end the timer (and with it every later OFFLINE)
            log.exception("OFFLINE of %s failed", username)

    # -- subscriptions ------------------------------------------------------
    def subscribe(self, conv_id: int, conn: Subscriber, state: Subscription) -> None:
        self._subs.setdefault(conv_id, {})[conn] = state

    def unsubscribe(self, conv_id: int, conn: Subscriber) -> None:
        subs = self._subs.get(conv_id)
        if subs is not None:
            subs.pop(conn, None)
            if not subs:
                del self._subs[conv_id]

    def subscribers(self, conv_id: int) -> list[Subscriber]:
        return list(self._subs.get(conv_id, ()))

    # -- delivery -----------------------------------------------------------
    def publish(self, appended: list) -> None:
        """Deliver committed messages (store ``Appended`` rows, in seq order) to live subscribers.

        Per subscriber: withheld while its SYNC runs (noting the seq), skipped if already sent, else
        queued on its corked output; ``flush`` (after the batch's ACKs) sends each output's share in one
        call, so a group commit costs one send per connection, not one per message.
        """
        corked = self._corked
        batch = len(appended) > 1
        delivered = 0
        for msg in appended:
            subs = self._subs.get(msg.conv_id)
            if not subs:
                continue
            seq = msg.seq
            # One encoding per view name (a room has one; a direct pair two) and per framing (TCP, or the
            # one wrap function every WebSocket transport shares).
            # Keyed by the name string, not the Conversation: dataclass hashing is slow Python.
            plain: dict[str, bytes] = {}
            wrapped: dict[str, bytes] = {}
            for conn, state in subs.items():
                if state.syncing:
                    if seq > state.missed_seq:
                        state.missed_seq = seq
                    continue
                if seq <= state.sent_seq or conn.reason is not None:
                    continue
                state.sent_seq = seq
                wrap = conn.wrap
                frames = plain if wrap is None else wrapped
                frame = frames.get(state.view.name)
                if frame is None:
                    frame = proto.encode(proto.Message(
                        state.view, seq, msg.ts_ms, msg.sender_name, msg.client_msg_id, msg.body))
                    if wrap is not None:
                        frame = wrap(frame)
                    frames[state.view.name] = frame
                output = conn.output
                # Cork when more of this batch will follow for this connection: more messages, or the
                # ACK of its own send. A lone message to a plain subscriber is written through at once.
                if not output.corked and (batch or conn.inflight_sends):
                    output.cork()
                    corked.append(output)
                if not output.write(frame):
                    conn.output_failed()
                delivered += 1
        self.delivered += delivered

    def flush(self) -> None:
        """Send what ``publish`` corked: called once the batch's ACKs are queued too."""
        corked, self._corked = self._corked, []
        for output in corked:
            output.uncork()

    def push(self, conns: Iterable[Subscriber], frame: bytes) -> None:
        """Hand an ephemeral frame (presence, typing, receipt) to each connection once."""
        for conn in conns:
            conn.push(frame)
