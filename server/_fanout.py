"""Node-local delivery of committed messages: subscriptions, seq filtering, gap filling, one encoding, corking.

How this works (DESIGN.md "Fan-out", "More than one machine"). Every broker hands the messages it receives to its
node's ``Fanout``: the local broker straight from the store's commit, a networked one also from the other nodes, where
they may arrive late, twice or out of order. Subscribers are this node's connections; each has one
``Subscription`` per conversation, whose ``sent_seq`` is the highest seq written to that connection:

- seq == sent_seq + 1 is written, and sent_seq moves on;
- seq <= sent_seq is a duplicate and dropped;
- seq > sent_seq + 1 is a gap. Messages are published only after their COMMIT and a conversation's next message
  commits only after it, so the missing ones are in the store already: the conversation's arrivals are held (at
  most ``max_held`` per conversation, shared by its subscribers) while one task per conversation reads the store
  from the lowest ``sent_seq`` on (``messages_after``) and delivers each gapped subscription its messages in order,
  from the page and the held ones. A late arrival that closes a gap is delivered at once with what it unblocks.
  Held messages a gap cannot fill in time (the store down) close the gapped connections as SLOW_CONSUMER: like a
  slow consumer, the client resumes by seq.

While a SYNC or JOIN reads where a connection stands, its subscription is withheld (``syncing``): nothing is written,
only the highest seq noted (``missed_seq``) so the reader knows to page on (spec §9.2, §9.5). The session changes a
subscription only through ``withhold`` and ``go_live``; everything else in it belongs to this module.

Per message, a frame is encoded once per subscription ``key``: (negotiated protocol version, view name, framing),
made when the connection subscribes, so the delivery loop does one dict lookup and one call per subscriber and
allocates nothing. A room has one view and a direct pair two (each side names it after the other user); TCP
writes the frame as it is and WebSocket connections share one ``wrap``; a v1 and a v2 connection in one room get
their own encodings. Frames of a batch are corked per output and sent in one write by ``flush`` (after the batch's
ACKs), so a group commit costs one send per connection.
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import trio

from chorus import proto
from chorus.proto import CloseReason, ConvEvent, StoredMessage

from ._moderation import v1_message

if TYPE_CHECKING:
    from ._ports import Appended, Entry, Store, Subscriber

log = logging.getLogger("chorus.fanout")

_EVENTS_VERSION = proto.FrameType.EVENTS.version
#: Messages held per conversation while a gap is filled: at a busy room's 1,000 messages/s, a second of store reads.
MAX_HELD = 1024
#: A gap fill the store refused (or could not advance) is retried after this, doubling up to ``_FILL_RETRY_MAX_S``.
_FILL_RETRY_S = 0.05
_FILL_RETRY_MAX_S = 2.0


class Subscription:
    """One connection's live delivery of one conversation: what has been written to it, and whether it is withheld."""

    __slots__ = ("view", "key", "sent_seq", "syncing", "missed_seq", "gapped")

    def __init__(self, view: proto.Conversation, *, sent_seq: int = 0, withheld: bool = False) -> None:
        self.view = view
        self.key = ""  # the encoding cache key: set by Fanout.subscribe
        self.sent_seq = sent_seq  # the highest seq written to the connection
        self.syncing = withheld  # live messages withheld while the session reads the store
        self.missed_seq = 0  # the highest seq withheld
        self.gapped = False  # a seq above sent_seq + 1 arrived: waiting for the gap to be filled

    def withhold(self) -> None:
        """Withhold live messages (noting the highest in ``missed_seq``) until ``go_live``; idempotent."""
        if not self.syncing:
            self.syncing, self.missed_seq, self.gapped = True, 0, False

    def go_live(self, seq: int) -> None:
        """The connection has everything up to ``seq``: deliver live from the next one."""
        if seq > self.sent_seq:
            self.sent_seq = seq
        self.syncing = False

    def __repr__(self) -> str:
        return (f"Subscription({self.view!r}, sent_seq={self.sent_seq}, syncing={self.syncing}, "
                f"gapped={self.gapped})")


def _frame(view: proto.Conversation, seq: int, ts_ms: int, sender: str, client_msg_id: int, body: str,
           wrap: Any) -> bytes:
    frame = proto.encode(proto.Message(view, seq, ts_ms, sender, client_msg_id, body))
    return frame if wrap is None else wrap(frame)


def _event_frame(view: proto.Conversation, event: ConvEvent, conn: Subscriber) -> bytes:
    """An event as this connection's version has it (the cache key holds the version): EVENTS from version 2 on,
    else the MESSAGE in words that stands in for it (spec §9.15)."""
    if conn.wire.version >= _EVENTS_VERSION:
        frame = proto.encode(proto.Events(view, (event,)))
        return frame if conn.wrap is None else conn.wrap(frame)
    shown = v1_message(view, event)
    return _frame(view, shown.seq, shown.ts_ms, shown.sender, 0, shown.body, conn.wrap)


def _entry_frame(view: proto.Conversation, entry: Entry, conn: Subscriber) -> bytes:
    if isinstance(entry, ConvEvent):
        return _event_frame(view, entry, conn)
    return _frame(view, entry.seq, entry.ts_ms, entry.sender, entry.client_msg_id, entry.body, conn.wrap)


def _as_stored(msg: Appended) -> Entry:
    if msg.event is not None:
        return msg.event
    return StoredMessage(msg.seq, msg.ts_ms, msg.sender_name, msg.client_msg_id, msg.body)


class Fanout:
    def __init__(self, store: Store, *, page: int = 100, max_held: int = MAX_HELD) -> None:
        self._store = store  # where gaps are filled from
        self._page = page
        self._max_held = max_held
        self._subs: dict[int, dict[Subscriber, Subscription]] = {}
        self._corked: list[Any] = []  # outputs holding a batch's frames until flush()
        self._gaps: dict[int, dict[int, Entry]] = {}  # conv id -> held messages by seq, while a gap is open
        self._nursery: trio.Nursery | None = None
        self._fill_failing = False
        self.delivered = 0
        self.gaps = 0  # gaps opened
        self.filled = 0  # messages read from the store to fill them

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery of the gap fills until cancelled (the broker's ``run`` starts it)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- subscriptions --------------------------------------------------------------------------------------------
    def subscribe(self, conv_id: int, conn: Subscriber, sub: Subscription) -> None:
        wrap = conn.wrap
        # One str per distinct key, its hash cached: the delivery loop's lookup costs what a name's did. The
        # version is the one HELLO negotiated, fixed before a connection can subscribe (after AUTH_OK).
        sub.key = sys.intern(f"{conn.wire.version} {0 if wrap is None else id(wrap)} {sub.view.name}")
        self._subs.setdefault(conv_id, {})[conn] = sub

    def unsubscribe(self, conv_id: int, conn: Subscriber) -> None:
        subs = self._subs.get(conv_id)
        if subs is not None:
            subs.pop(conn, None)
            if not subs:
                del self._subs[conv_id]

    def subscribers(self, conv_id: int) -> list[Subscriber]:
        return list(self._subs.get(conv_id, ()))

    def subscriptions(self, conv_id: int) -> dict[Subscriber, Subscription]:
        """The live mapping connection -> subscription of ``conv_id`` (empty if none); do not change it."""
        return self._subs.get(conv_id, {})

    # -- delivery ---------------------------------------------------------------------------------------------------
    def deliver(self, appended: list[Appended]) -> None:
        """Write committed messages (in seq order per conversation, as far as the broker knows) to subscribers.

        Per subscriber: withheld while its SYNC runs (noting the seq), dropped if already sent, held if it leaves a
        gap, else queued on its corked output; ``flush`` (after the batch's ACKs) sends each output's share in one
        call, so a group commit costs one send per connection, not one per message.
        """
        corked = self._corked
        gaps = self._gaps
        batch = len(appended) > 1
        delivered = 0
        for msg in appended:
            subs = self._subs.get(msg.conv_id)
            if not subs:
                continue
            if gaps and msg.conv_id in gaps:
                delivered += self._deliver_gapped(msg, subs)
                continue
            seq = msg.seq
            frames: dict[str, bytes] = {}
            for conn, sub in subs.items():
                if sub.syncing:
                    if seq > sub.missed_seq:
                        sub.missed_seq = seq
                    continue
                if seq != sub.sent_seq + 1 or conn.reason is not None:
                    if seq > sub.sent_seq + 1 and conn.reason is None:
                        self._open_gap(msg, sub)
                    continue
                sub.sent_seq = seq
                frame = frames.get(sub.key)
                if frame is None:
                    if msg.event is None:
                        frame = _frame(sub.view, seq, msg.ts_ms, msg.sender_name, msg.client_msg_id, msg.body,
                                       conn.wrap)
                    else:
                        frame = _event_frame(sub.view, msg.event, conn)
                    frames[sub.key] = frame
                output = conn.output
                # Cork when more of this batch will follow for this connection: more messages, or the ACK of its
                # own send. A lone message to a plain subscriber is written through at once.
                if not output.corked and (batch or conn.inflight_sends):
                    output.cork()
                    corked.append(output)
                if not output.write(frame):
                    conn.output_failed()
                delivered += 1
        self.delivered += delivered

    def flush(self) -> None:
        """Send what ``deliver`` corked: called once the batch's ACKs are queued too."""
        corked, self._corked = self._corked, []
        for output in corked:
            output.uncork()

    def _write(self, conn: Subscriber, frame: bytes) -> None:
        """Write off the fast path (gaps): always corked, sent by the next ``flush``."""
        output = conn.output
        if not output.corked:
            output.cork()
            self._corked.append(output)
        if not output.write(frame):
            conn.output_failed()

    # -- gaps -------------------------------------------------------------------------------------------------------
    def _open_gap(self, msg: Appended, sub: Subscription) -> None:
        """``msg`` is above ``sub``'s next seq: hold it, and fill the conversation's gaps from the store."""
        sub.gapped = True
        held = self._gaps.get(msg.conv_id)
        if held is None:
            held = self._start_fill(msg.conv_id)
        held.setdefault(msg.seq, _as_stored(msg))

    def _start_fill(self, conv_id: int) -> dict[int, Entry]:
        held: dict[int, Entry] = {}
        self._gaps[conv_id] = held
        self.gaps += 1
        if self._nursery is None:
            log.error("gap in conversation %d but the broker is not running: nothing fills it", conv_id)
        else:
            self._nursery.start_soon(self._fill, conv_id, held)
        return held

    def _deliver_gapped(self, msg: Appended, subs: dict[Subscriber, Subscription]) -> int:
        """A message of a conversation with a gap open: held, and written to every subscriber it is next for."""
        conv_id, seq = msg.conv_id, msg.seq
        held = self._gaps[conv_id]
        if seq not in held:
            if len(held) >= self._max_held:
                self._give_up(conv_id, subs)
                self.deliver([msg])  # the others, in order, on the fast path
                return 0
            held[seq] = _as_stored(msg)
        top = max(held)
        frames: dict[tuple[int, str], bytes] = {}
        delivered = 0
        for conn, sub in subs.items():
            if sub.syncing:
                if seq > sub.missed_seq:
                    sub.missed_seq = seq
                continue
            if seq <= sub.sent_seq or conn.reason is not None:
                continue
            delivered += self._catch_up(conn, sub, held, frames)
            sub.gapped = top > sub.sent_seq
        return delivered

    def _catch_up(self, conn: Subscriber, sub: Subscription, held: dict[int, Entry],
                  frames: dict[tuple[int, str], bytes]) -> int:
        """Write the held messages that follow ``sub.sent_seq`` without a gap; returns how many."""
        written = 0
        while conn.reason is None:
            msg = held.get(sub.sent_seq + 1)
            if msg is None:
                break
            sub.sent_seq = msg.seq
            frame = frames.get((msg.seq, sub.key))
            if frame is None:
                frame = frames[(msg.seq, sub.key)] = _entry_frame(sub.view, msg, conn)
            self._write(conn, frame)
            written += 1
        return written

    def _gapped(self, conv_id: int) -> list[tuple[Subscriber, Subscription]]:
        return [(conn, sub) for conn, sub in self._subs.get(conv_id, {}).items()
                if sub.gapped and not sub.syncing and conn.reason is None]

    def _give_up(self, conv_id: int, subs: dict[Subscriber, Subscription]) -> None:
        """Too much held: the gapped connections resume by seq instead (their fill stops with the record)."""
        del self._gaps[conv_id]
        closed = 0
        for conn, sub in subs.items():
            if sub.gapped:
                sub.gapped = False
                if conn.reason is None:
                    conn.close(CloseReason.SLOW_CONSUMER)
                    closed += 1
        log.warning("conversation %d: a gap was not filled within %d held messages; %d connections closed to resume "
                    "by seq", conv_id, self._max_held, closed)

    async def _fill(self, conv_id: int, held: dict[int, Entry]) -> None:
        """Read the store from the lowest gapped ``sent_seq`` and deliver, until no subscription has a gap."""
        retry = _FILL_RETRY_S
        try:
            while self._gaps.get(conv_id) is held:
                gapped = self._gapped(conv_id)
                if not gapped:
                    return
                after = min(sub.sent_seq for _, sub in gapped)
                try:
                    page, has_more = await self._store.messages_after(conv_id, after, self._page)
                except Exception as exc:  # the store refused (or a bug): the gap stays open, retried
                    if not self._fill_failing:
                        self._fill_failing = True
                        log.warning("gap fill of conversation %d failed: %r (retrying; logged again once one "
                                    "succeeds)", conv_id, exc)
                    await trio.sleep(retry)
                    retry = min(2 * retry, _FILL_RETRY_MAX_S)
                    continue
                if self._fill_failing:
                    self._fill_failing = False
                    log.warning("gap fills succeed again")
                if self._gaps.get(conv_id) is not held:
                    return  # given up meanwhile
                self.filled += len(page)
                for msg in page:
                    held.setdefault(msg.seq, msg)
                top = max(held, default=0)
                frames: dict[tuple[int, str], bytes] = {}
                moved = False
                for conn, sub in self._gapped(conv_id):
                    before = sub.sent_seq
                    self.delivered += self._catch_up(conn, sub, held, frames)
                    moved = moved or sub.sent_seq > before
                    # Closed when nothing held is above it and the store had nothing more after this page.
                    sub.gapped = has_more or top > sub.sent_seq
                self.flush()
                still = self._gapped(conv_id)
                low = min((sub.sent_seq for _, sub in still), default=top)
                for seq in [seq for seq in held if seq <= low]:
                    del held[seq]
                if still and not moved:
                    # The store is behind what was published (a lagging replica): wait, do not spin.
                    await trio.sleep(retry)
                    retry = min(2 * retry, _FILL_RETRY_MAX_S)
                else:
                    retry = _FILL_RETRY_S
        finally:
            if self._gaps.get(conv_id) is held:
                del self._gaps[conv_id]

    def resync(self, conv_id: int | None = None) -> None:
        """Fill every live subscription of ``conv_id`` (of all conversations when None) from the store to its end.

        For a networked broker that may have lost messages it cannot name (its link came back, it subscribed a new
        channel): the same path as a gap, without a known message above it.
        """
        for cid in list(self._subs) if conv_id is None else [conv_id]:
            subs = self._subs.get(cid, {})
            for conn, sub in subs.items():
                if not sub.syncing and conn.reason is None:
                    sub.gapped = True
            if cid not in self._gaps and any(sub.gapped for sub in subs.values()):
                self._start_fill(cid)

    def statistics(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "conversations": len(self._subs), "gaps": self.gaps,
                "gaps_open": len(self._gaps), "filled": self.filled}
