"""The in-process broker: the default ``Broker`` (server/_ports.py) of single-node mode (DESIGN.md "Layers").

Everything that crosses connections, when every connection is in this process. Committed messages go straight
from the store's commit to this node's ``Fanout`` (server/_fanout.py), which owns subscriptions, seq filtering,
encoding once and corking, and which a networked broker shares; what is left here is users:

- connections per user (the per-user limit), and user events (membership changed, token revoked) handed to each of
  the user's connections, which apply them to their own session's state;
- ephemeral frames (typing, presence, receipts) pushed to a user's connections or a conversation's subscribers,
  encoded once per protocol version;
- presence (spec §9.8): ONLINE when a user's first connection authenticates, OFFLINE a delay after its last one
  closes, unless the user is back by then (then neither goes out, so a flaky network or a reconnect loop makes no
  noise). The pending OFFLINEs wait in arrival order, which is deadline order (one delay for all), and one task
  of ``run`` sends them.

Named after its port rather than kept as "the hub": a Redis broker (node mode) implements the same protocol, keeps
a ``Fanout`` for its own node, and publishes across nodes what this one hands over in memory.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from chorus import proto

from ._fanout import MAX_HELD, Fanout, Subscription

if TYPE_CHECKING:
    from ._config import Config
    from ._ports import Appended, Store, Subscriber, UserEvent

log = logging.getLogger("chorus.broker")
#: OFFLINEs sent in one go before the timer lets other tasks run.
_OFFLINES_PER_STEP = 100


def push(conns: Iterable[Subscriber], event: proto.Event) -> None:
    """``event`` to each connection whose protocol version has it (spec §6.2), encoded once per version."""
    frames: dict[int, bytes] = {}
    introduced = event.FRAME.version
    for conn in conns:
        version = conn.wire.version
        if version < introduced:
            continue  # a frame type newer than the connection's version does not exist on it
        frame = frames.get(version)
        if frame is None:
            frame = frames[version] = proto.encode(event)
        conn.push(frame)


def announce(fanout: Fanout, own: Iterable[Subscriber], username: str, rooms: Iterable[int],
             status: proto.Status) -> None:
    """PRESENCE of ``username`` to this node's subscribers of ``rooms``, except ``own`` (the user's connections)."""
    targets: dict[Subscriber, None] = {}
    for conv_id in rooms:
        targets.update(dict.fromkeys(fanout.subscriptions(conv_id)))
    for conn in own:
        targets.pop(conn, None)
    if targets:
        push(targets, proto.Presence(username, status))


class LocalBroker:
    def __init__(self, config: Config, store: Store, *, max_held: int = MAX_HELD) -> None:
        self.fanout = Fanout(store, page=config.max_page, max_held=max_held)
        self._offline_delay_s = config.presence_offline_delay_s
        self._users: dict[int, dict[Subscriber, None]] = {}
        # user id -> (when, name, room ids): OFFLINE to announce unless the user is back by then
        self._offline: dict[int, tuple[float, str, tuple[int, ...]]] = {}
        self._offline_added: trio.Event | None = None
        self._presence_timer = False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The OFFLINE timer and the fan-out's gap fills, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.fanout.run)
            nursery.start_soon(self._run_presence_timer)
            task_status.started()

    # -- messages ---------------------------------------------------------------------------------------------------
    def publish(self, batch: list[Appended]) -> None:
        self.fanout.deliver(batch)

    def flush(self) -> None:
        self.fanout.flush()

    def republish(self, msg: Appended) -> None:
        pass  # publish follows COMMIT in this process with nothing between that could die alone

    def subscribe(self, conv_id: int, conn: Subscriber, sub: Subscription) -> None:
        self.fanout.subscribe(conv_id, conn, sub)

    def unsubscribe(self, conv_id: int, conn: Subscriber) -> None:
        self.fanout.unsubscribe(conv_id, conn)

    # -- ephemeral frames -------------------------------------------------------------------------------------------
    def push_to_user(self, user_id: int, event: proto.Event) -> None:
        push(self._users.get(user_id, ()), event)

    def push_to_conversation(self, conv_id: int, event: proto.Event, *, skip_user: int) -> None:
        push([conn for conn in self.fanout.subscriptions(conv_id) if conn.user_id != skip_user], event)

    # -- users --------------------------------------------------------------------------------------------------------
    def connection_count(self, user_id: int) -> int:
        return len(self._users.get(user_id, ()))

    def connections_of(self, user_id: int) -> list[Subscriber]:
        """This process's connections of the user (not part of the port: for tests and the operator)."""
        return list(self._users.get(user_id, ()))

    def add_connection(self, conn: Subscriber, user_id: int, username: str, rooms: Sequence[int],
                       limit: int) -> bool:
        conns = self._users.setdefault(user_id, {})
        if len(conns) >= limit:
            if not conns:
                del self._users[user_id]
            return False
        conns[conn] = None
        # A first connection that cancels a pending OFFLINE is no news: the others never learnt the user was gone.
        if len(conns) == 1 and self._offline.pop(user_id, None) is None:
            self._announce(user_id, username, rooms, proto.Status.ONLINE)
        return True

    def remove_connection(self, conn: Subscriber, user_id: int, username: str, rooms: Sequence[int]) -> None:
        conns = self._users.get(user_id)
        if conns is None or conn not in conns:
            return
        del conns[conn]
        if conns:
            return
        del self._users[user_id]
        if self._offline_delay_s <= 0 or not self._presence_timer:
            self._announce(user_id, username, rooms, proto.Status.OFFLINE)
            return
        self._offline[user_id] = (trio.current_time() + self._offline_delay_s, username, tuple(rooms))
        if self._offline_added is not None:
            self._offline_added.set()
            self._offline_added = None

    def user_event(self, event: UserEvent) -> None:
        for conn in list(self._users.get(event.user_id, ())):
            conn.user_event(event)

    # -- nodes: one process is the whole server, so there is no list to give --------------------------------------
    def live_nodes(self) -> list[proto.NodeInfo]:
        return []

    def set_address(self, port: int, ws_port: int | None) -> None:
        pass

    def set_draining(self, draining: bool) -> None:
        pass

    async def online(self, user_ids: Iterable[int]) -> set[int]:
        """As announced: a user whose OFFLINE is still pending counts as online."""
        return {uid for uid in user_ids if uid in self._users or uid in self._offline}

    # -- presence -----------------------------------------------------------------------------------------------------
    def _announce(self, user_id: int, username: str, rooms: Iterable[int], status: proto.Status) -> None:
        """PRESENCE to the other members' connections in ``rooms`` (never to the user's own)."""
        announce(self.fanout, self._users.get(user_id, ()), username, rooms, status)

    async def _run_presence_timer(self) -> None:
        """Send each pending OFFLINE when its delay is over; runs until cancelled."""
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
                    due = next(iter(pending), None)
                    if due is None or pending[due][0] > trio.current_time():
                        break
                    _, username, rooms = pending.pop(due)
                    self._announce_safely(due, username, rooms)
                await trio.lowlevel.checkpoint()
        finally:
            self._presence_timer = False
            while pending:  # stopping: whoever is still pending is gone
                user_id, (_, username, rooms) = pending.popitem()
                self._announce_safely(user_id, username, rooms)

    def _announce_safely(self, user_id: int, username: str, rooms: tuple[int, ...]) -> None:
        try:
            self._announce(user_id, username, rooms, proto.Status.OFFLINE)
        except Exception:  # a bug here must not end the timer (and with it every later OFFLINE)
            log.exception("OFFLINE of %s failed", username)

    def statistics(self) -> dict[str, Any]:
        return {**self.fanout.statistics(), "users": len(self._users), "offline_pending": len(self._offline)}
