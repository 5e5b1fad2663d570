"""One client connection: a nursery holding its reader and, when needed, its writer (STYLE.md §7).

The reader turns bytes into events with ``proto.Connection`` and hands them to
the ``Session``; SENDs are queued into the group commit without waiting (at
most ``max_inflight_sends`` per connection), so a client can pipeline them.
The writer task exists only while the ``Output`` holds bytes the kernel
refused. Liveness and deadlines are not a task per connection: the server's
one timer task calls ``tick`` on every connection (spec §9 "Liveness"): PING
a silent client, close it as STALE when PINGs go unanswered, close connections
that do not say HELLO and authenticate in time. At 10,000 idle connections two
fewer tasks and timers each is most of the memory and idle CPU (bench/).

Every close goes through ``close(reason)``: it records the first reason and
cancels the nursery; ``run`` then says ERROR/BYE where the protocol allows it,
flushes within a bounded, shielded deadline, and logs one line with the reason.
"""
from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import trio

import proto
from proto import CloseReason, ErrorCode

from ._output import Output
from ._ratelimit import TokenBucket
from ._session import RequestError, Session, clipped

if TYPE_CHECKING:
    from ._app import Server

log = logging.getLogger("chorus.conn")

_RECV_BYTES = 65536
_CLOSE_FLUSH_S = 1.0
_UNLIMITED = (proto.Pong, proto.Bye)  # answers to our PINGs and goodbyes are never rate limited
_NO_BYE = (CloseReason.CLIENT_QUIT, CloseReason.PEER_CLOSED, CloseReason.SLOW_CONSUMER)


class ClientConnection:
    __slots__ = (
        "server", "config", "transport", "proto", "output", "session", "user_id", "reason", "_final",
        "opened_at", "last_heard", "_last_ping", "unanswered_pings", "_bucket", "_violations",
        "inflight_sends", "_sends_changed", "_nursery", "wrap", "__weakref__",
    )

    def __init__(self, server: "Server", transport):
        config = server.config
        self.server = server
        self.config = config
        self.transport = transport
        self.proto = proto.Connection(proto.SERVER, max_frame_bytes=config.max_frame_bytes)
        self.output = Output(transport, config.outbound_buffer_bytes, self._start_writer)
        self.session = Session(server, self)
        self.user_id: int | None = None
        self.reason: CloseReason | None = None
        self._final: list[proto.Event] = []
        now = trio.current_time()
        self.opened_at = now
        self.last_heard = now
        self._last_ping = now
        self.unanswered_pings = 0
        self._bucket = TokenBucket(config.rate_per_s, config.rate_burst, now)
        self._violations = 0
        self.inflight_sends = 0  # SENDs waiting for their commit
        self._sends_changed: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        # A message-framed transport (the WebSocket bridge) wraps each Chorus frame in its own
        # framing and may want to write control frames or close us; plain TCP needs neither.
        self.wrap = getattr(transport, "wrap", None)
        attach = getattr(transport, "attach", None)
        if attach is not None:
            attach(self)

    # -- used by the session and the hub --------------------------------------
    @property
    def closing(self) -> bool:
        return self.reason is not None

    def authenticated(self, username: str) -> None:
        self.user_id = self.session.user_id
        log.info("auth peer=%s user=%s", self.transport.peer, username)

    def send(self, event: proto.Event) -> None:
        """Reply or push one event through the state machine and the output."""
        if self.reason is not None:
            return
        if not self._write(self.proto.send(event)):
            self.output_failed()

    def push(self, frame: bytes) -> None:
        """An ephemeral frame: dropped rather than queued when this client is behind."""
        if self.reason is None and self.user_id is not None and self.output.buffered_bytes < 65536:
            if not self._write(frame):
                self.output_failed()

    def _write(self, frame: bytes) -> bool:
        return self.output.write(self.wrap(frame) if self.wrap is not None else frame)

    def output_failed(self) -> None:
        self.close(CloseReason.SLOW_CONSUMER if self.output.overflowed else CloseReason.PEER_CLOSED)

    def close(self, reason: CloseReason) -> None:
        """Begin closing for ``reason`` (the first reason wins). Never blocks."""
        if self.reason is None:
            self.reason = reason
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    def protocol_error(self, code: ErrorCode, message: str, request_id: int = 0) -> None:
        self._close_with_error(CloseReason.PROTOCOL_ERROR, code, message, request_id)

    def refuse(self, code: ErrorCode, message: str, request_id: int = 0) -> None:
        self._close_with_error(CloseReason.SERVER_FULL, code, message, request_id)

    def _close_with_error(self, reason: CloseReason, code: ErrorCode, message: str, request_id: int = 0) -> None:
        """Close for ``reason``, saying ERROR(code, message) before the BYE."""
        self._final.append(proto.Error(code, 0, clipped(message), request_id=request_id))
        self.close(reason)

    def goaway(self, reconnect_after_ms: int, message: str) -> None:
        if self.reason is None and self.proto.state not in (proto.State.HANDSHAKE, proto.State.NEGOTIATING):
            self.send(proto.GoAway(CloseReason.SHUTDOWN, reconnect_after_ms, message))

    def send_finished(self) -> None:
        """One SEND got its commit result (called by the session)."""
        self.inflight_sends -= 1
        if self._sends_changed is not None:
            self._sends_changed.set()
            self._sends_changed = None

    async def wait_sends_done(self, at_most: int = 0) -> None:
        """Wait until at most ``at_most`` SENDs of this connection wait for their commit."""
        while self.inflight_sends > at_most:
            if self._sends_changed is None:
                self._sends_changed = trio.Event()
            await self._sends_changed.wait()

    def tick(self, now: float) -> None:
        """Deadlines and liveness, called by the server's timer task every fraction of a second."""
        if self.reason is not None:
            return
        config = self.config
        if self.user_id is None:
            if self.proto.state is proto.State.HANDSHAKE and now >= self.opened_at + config.handshake_timeout_s:
                self._close_with_error(CloseReason.AUTH_TIMEOUT, ErrorCode.HANDSHAKE_TIMEOUT, "no HELLO in time")
                return
            if now >= self.opened_at + config.auth_timeout_s:
                self._close_with_error(CloseReason.AUTH_TIMEOUT, ErrorCode.HANDSHAKE_TIMEOUT,
                                       "not authenticated in time")
                return
        interval = config.ping_interval_s
        if now - self.last_heard < interval or now - self._last_ping < interval:
            return
        if self.unanswered_pings >= config.max_missed_pings:
            self.close(CloseReason.STALE)
            return
        self._last_ping = now
        if self.proto.state not in (proto.State.HANDSHAKE, proto.State.NEGOTIATING):
            self.unanswered_pings += 1
            self.send(proto.Ping(secrets.randbits(63)))

    def _start_writer(self, flush) -> None:
        if self._nursery is not None and self.reason is None:
            self._nursery.start_soon(self._writer, flush)

    async def _writer(self, flush) -> None:
        await flush()
        if self.output.failed:
            self.output_failed()

    # -- tasks ------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until it closes; never raises for client misbehaviour."""
        log.info("open peer=%s", self.transport.peer)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.reason is None:
                    await self._reader()
                nursery.cancel_scope.cancel()  # a writer or a pending send ends with the connection
        finally:
            await self._finish()

    async def _reader(self) -> None:
        conn = self.proto
        while True:
            try:
                data = await self.transport.receive_some(_RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.last_heard = trio.current_time()
            self.unanswered_pings = 0
            conn.receive_data(data)
            while True:
                try:
                    event = conn.next_event()
                except proto.RemoteProtocolError as exc:
                    self.protocol_error(exc.code, str(exc))
                    return
                if event is proto.NEED_DATA:
                    break
                if type(event) is proto.ConnectionClosed:
                    self.close(CloseReason.PEER_CLOSED)
                    return
                await self._dispatch(event)
                if self.reason is not None:
                    return

    async def _dispatch(self, event: proto.Event) -> None:
        if not isinstance(event, _UNLIMITED):
            if not self._bucket.take(trio.current_time()):
                self._violations += 1
                if self._violations > self.config.max_rate_violations:
                    self.close(CloseReason.RATE_LIMITED)
                    return
                retry_ms = int(self._bucket.retry_after_s() * 1000) + 1
                self.send(proto.Error(ErrorCode.RATE_LIMITED, retry_ms, "slow down", request_id=event.request_id))
                return
            self._violations = 0
        kind = type(event)
        if kind is proto.Send:
            # Pipelined sends join the next group commit; past the limit, stop reading until some are acked.
            await self.wait_sends_done(self.config.max_inflight_sends - 1)
            try:
                queued = self.session.send_nowait(event)
            except RequestError as exc:
                self.send(exc.reply(event.request_id))
                return
            self.inflight_sends += 1
            if not queued:
                self._nursery.start_soon(self.session.handle_send, event)
        elif kind is proto.Ping:
            self.send(event.response())
        elif kind is proto.Bye:
            self.close(CloseReason.CLIENT_QUIT)
        elif kind is proto.Error:
            log.info("peer=%s sent ERROR %s: %s", self.transport.peer, event.code.name, event.message)
        elif kind is not proto.Pong:
            await self.session.handle(event)

    async def _finish(self) -> None:
        reason = self.reason or CloseReason.PEER_CLOSED
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLOSE_FLUSH_S
            try:
                self.session.close()
                if reason not in _NO_BYE and not self.proto.we_said_bye:
                    for event in self._final + [proto.Bye(reason)]:
                        try:
                            self._write(self.proto.send(event))
                        except proto.LocalProtocolError:
                            pass
                    await self.output.flush()
            finally:
                await self.transport.aclose()
        log.info("close peer=%s user=%s reason=%s after=%.1fs", self.transport.peer,
                 self.session.username or "-", reason.name, trio.current_time() - self.opened_at)
