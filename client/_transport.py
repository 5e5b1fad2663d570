"""One TCP connection of the client: a socket plus a sans-IO ``proto.Connection`` (spec/PROTOCOL.md §2, §8).

Exactly one task reads (the client's reader); many write (requests, the
reader's PONGs, the heartbeat), so writes take a lock and send one whole frame
each. The write itself is shielded from cancellation: a ``send_all`` cancelled
halfway would leave half a frame on the wire and desynchronise the stream for
good. A write that can never finish is ended by closing the stream (the
heartbeat or ``Client.close`` do), which makes it raise at once.

Frames the server counts against its rate limit (everything but PONG and BYE,
spec §9.11) are paced by a token bucket a little inside the limits the
server announced in WELCOME, so that a burst of requests, or the re-sending of a
whole outbox after a reconnect, is slowed down here instead of refused there.
"""
from __future__ import annotations

import trio

from chorus import proto

_READ_BYTES = 65536
_CLOSE_S = 1.0
# The server's bucket starts at the same time as ours but sees our frames later and
# possibly bunched together by the network: stay well inside its limits.
_RATE_MARGIN = 0.9
_BURST_MARGIN = 0.5
_DEFAULT_RATE_PER_S = 50
_DEFAULT_BURST = 100


class TransportClosed(Exception):
    """The connection is gone (closed by either side, or reset)."""


class _Pacer:
    """A token bucket that hands out delays instead of refusals."""

    def __init__(self, rate_per_s: float, burst: int):
        self.rate = rate_per_s * _RATE_MARGIN
        self.capacity = max(1.0, burst * _BURST_MARGIN)
        self.tokens = self.capacity
        self.stamp = trio.current_time()

    def reserve(self) -> float:
        """Take one token; returns how long to wait before using it."""
        now = trio.current_time()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Transport:
    """A connected stream and its protocol state; ``gen`` numbers the client's connection attempts."""

    def __init__(self, stream: trio.abc.Stream, gen: int, *, pace: bool = True):
        self.stream = stream
        self.gen = gen
        # Frames from the server may be as large as proto allows at all; a client can afford it.
        self.conn = proto.Connection(proto.CLIENT, max_frame_bytes=proto.ABSOLUTE_MAX_FRAME_BYTES)
        self.last_heard = trio.current_time()
        self.closed = trio.Event()  # set once the reader is done with this connection
        self.bye_reason: proto.CloseReason | None = None  # what the server's BYE said
        self.abort_reason: proto.CloseReason | None = None  # why we cut it ourselves
        self.detail = ""
        self.goaway: proto.GoAway | None = None
        self.goaway_at = 0.0
        self._pacer = _Pacer(_DEFAULT_RATE_PER_S, _DEFAULT_BURST) if pace else None
        self._pace_lock = trio.Lock()
        self._write_lock = trio.Lock()
        self._shut = False

    def set_limits(self, welcome: proto.Welcome) -> None:
        """Adopt the rate limit the server announced (0 = none)."""
        if self._pacer is not None:
            self._pacer = _Pacer(welcome.rate_per_s, welcome.rate_burst) if welcome.rate_per_s else None

    async def send(self, event: proto.Event) -> None:
        """Write one frame. Raises ``TransportClosed``, or ``proto.LocalProtocolError`` for a frame
        that is illegal now or cannot be encoded (too large, field out of range)."""
        if self._pacer is None or isinstance(event, (proto.Pong, proto.Bye)):
            await self._write(event)
            return
        # Pace in FIFO order, then write: frames leave in the order they were paced.
        async with self._pace_lock:
            delay = self._pacer.reserve() if self._pacer is not None else 0.0
            if delay:
                await trio.sleep(delay)
            await self._write(event)

    async def _write(self, event: proto.Event) -> None:
        async with self._write_lock:
            if self._shut or self.conn.we_said_bye:
                raise TransportClosed("connection closed")
            data = self.conn.send(event)
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._shut = True
                raise TransportClosed(str(exc) or type(exc).__name__) from None

    async def receive(self):
        """The next event from the server, or ``proto.ConnectionClosed`` at a clean EOF.

        Raises ``TransportClosed`` when the stream breaks or is closed under us, and
        ``proto.RemoteProtocolError`` when the server's bytes break the protocol.
        """
        while True:
            event = self.conn.next_event()
            if event is not proto.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(_READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise TransportClosed(str(exc) or type(exc).__name__) from None
            self.last_heard = trio.current_time()
            self.conn.receive_data(data)

    async def aclose(self) -> None:
        """Close the stream now (idempotent); blocked readers and writers raise at once."""
        self._shut = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_S):  # TLS says close_notify first: not for longer than this
                await self.stream.aclose()
