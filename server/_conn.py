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
flushes within a bounded, shielded deadline, half-closes and drains the
client's input (so the kernel does not reset away the BYE), and logs one line
with the reason.

Failure is local (DESIGN.md): a store error inside a request becomes ERROR
SERVER_BUSY for that request; any other exception costs this connection alone
(logged once with its traceback, ERROR INTERNAL + BYE PROTOCOL_ERROR to the
peer), never the server. Every frame costs budget: PONG must answer one of our
outstanding PINGs, a frame once started must be finished within
``frame_timeout_s``, and before AUTH_OK reads are small.
"""
from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import trio

from chorus import proto
from chorus.proto import CloseReason, ErrorCode

from ._auth import Busy
from ._logs import episode, safe
from ._output import Output
from ._ports import StoreError, UserEvent
from ._ratelimit import TokenBucket
from ._session import RequestError, Session, clipped
from ._transport import LINGER_S, Transport

if TYPE_CHECKING:
    from ._app import Server

log = logging.getLogger("chorus.conn")

_RECV_BYTES = 65536
#: Flushing the last frames and draining the client's input (LINGER_S) together, at most.
_CLOSE_S = 3.0
#: Our PINGs a PONG may still answer; pings go out once per ping interval, so this covers minutes.
_OUTSTANDING_PINGS = 8
_NO_BYE = (CloseReason.CLIENT_QUIT, CloseReason.PEER_CLOSED, CloseReason.SLOW_CONSUMER)
#: What ``tick`` did: began closing, or sent a PING (the timer budgets both per sweep).
TICK_CLOSED = 1
TICK_PINGED = 2
_ALWAYS = float("-inf")  # a ``next_check`` that every sweep reaches
_NEVER = float("inf")
#: A PING frame up to its u64 nonce, the frame's last 8 bytes (spec §5): sent without a trip through construct.
_PING_HEAD = proto.encode(proto.Ping(0))[:-8]
#: Auth deadlines that waiting for password hashing may add, at most (then a queued login times out after all).
_AUTH_EXTENSIONS = 3


class ClientConnection:
    __slots__ = (
        "server", "config", "transport", "wire", "output", "session", "user_id", "reason", "_final",
        "opened_at", "last_heard", "_last_ping", "unanswered_pings", "_pings", "_bucket", "_violations",
        "inflight_sends", "_sends_changed", "_nursery", "wrap", "_frame_started", "next_check", "_idle",
        "_idle_changed",
        "_auth_waited", "_auth_refusals", "_hash_wait_began", "__weakref__",
    )

    def __init__(self, server: "Server", transport: Transport):
        config = server.config
        self.server = server
        self.config = config
        self.transport = transport
        self.wire = proto.Connection(proto.SERVER, max_frame_bytes=config.max_frame_bytes)
        # Clients accept 1 MiB, and more when WELCOME announces more (spec §2.3): pages may use that.
        self.wire.peer_max_frame_bytes = config.outbound_frame_bytes
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
        self._pings: list[int] | None = None  # the nonces of our unanswered PINGs, oldest first
        self._frame_started: float | None = None
        self.next_check = _ALWAYS  # the timer task looks at this connection again from then on (``tick``)
        self._idle = False  # the reader waits for bytes with no frame left to act on
        self._idle_changed: trio.Event | None = None
        # Time the auth deadline does not count: waits for a hashing thread, delays a refusal asked for.
        self._auth_waited = 0.0
        self._auth_refusals = 0.0  # the part of it that refusals asked for
        self._hash_wait_began: float | None = None
        self._bucket = TokenBucket(config.rate_per_s, config.rate_burst, now)
        self._violations = 0
        self.inflight_sends = 0  # SENDs waiting for their commit
        self._sends_changed: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        # A message-framed transport (the WebSocket bridge) wraps each Chorus frame in its own
        # framing and may want to write control frames or close us; plain TCP needs neither.
        self.wrap = transport.wrap
        transport.attach(self)

    # -- used by the session and the broker -----------------------------------
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
        self.server.counters.frames_out[event.FRAME] += 1
        if not self._write(self.wire.send(event)):
            self.output_failed()

    def push(self, frame: bytes) -> None:
        """An ephemeral frame: dropped rather than queued when this client is behind."""
        if self.reason is None and self.user_id is not None and self.output.buffered_bytes < 65536:
            self.server.counters.frames_out[frame[4]] += 1  # the header's type byte (spec §2.2)
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

    def user_event(self, event: UserEvent) -> None:
        """A change to this connection's user from anywhere (server/_ports.py), applied by its session.

        Called by the broker, maybe inside another connection's request: a bug here costs this connection alone.
        """
        if self.reason is None:
            try:
                self.session.user_event(event)
            except Exception as exc:
                self._internal_error(exc, 0)

    def goaway(self, reconnect_after_ms: int, message: str, nodes: tuple[proto.NodeInfo, ...] = ()) -> None:
        """GOAWAY; on a node of a cluster, NODES first, so that the client knows where to go (spec §9.14)."""
        if self.reason is None and self.wire.state not in (proto.State.HANDSHAKE, proto.State.NEGOTIATING):
            if nodes and self.wire.version >= proto.FrameType.NODES.version:
                self.send(proto.Nodes(nodes))
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

    def spend(self, frames: int = 1) -> bool:
        """Charge ``frames`` against the rate bucket (spec §9.11); False when refused.

        The WebSocket bridge charges its control and continuation frames here: every frame costs budget.
        Too many refusals in a row close the connection as RATE_LIMITED.
        """
        now = trio.current_time()
        ok = True
        for _ in range(frames):
            ok = self._bucket.take(now) and ok
        if ok:
            self._violations = 0
            return True
        self.rate_limited()
        if self._violations > self.config.max_rate_violations:
            self.close(CloseReason.RATE_LIMITED)
        return False

    def rate_limited(self) -> None:
        """Count one frame refused by this connection's rate bucket; the first of an episode is logged."""
        self._violations += 1
        self.server.counters.refusals["frames"] += 1
        if self._violations == 1 and episode("frames", self.transport.address):
            log.info("rate limited peer=%s user=%s (frames; logged once a minute per address)", self.transport.peer,
                     safe(self.session.username or "-"), extra={"event": "rate_limited", "kind": "frames",
                                                                "peer": str(self.transport.peer)})

    def mark_idle(self, idle: bool) -> None:
        self._idle = idle
        if self._idle_changed is not None:
            self._idle_changed.set()
            self._idle_changed = None

    async def wait_quiet(self) -> None:
        """Wait until every frame read so far was acted on and every SEND got its reply (shutdown drain)."""
        while not (self._idle and self.inflight_sends == 0) and self.reason is None:
            if self._idle_changed is None:
                self._idle_changed = trio.Event()
            changed = self._idle_changed
            if self.inflight_sends:
                await self.wait_sends_done()
            else:
                await changed.wait()

    # -- the auth deadline's clock (server/_auth.py AuthClock) ----------------------------------------------------
    def auth_waiting(self, waiting: bool) -> None:
        now = trio.current_time()
        if waiting:
            if self._hash_wait_began is None:
                self._hash_wait_began = now
        elif self._hash_wait_began is not None:
            self._auth_waited += now - self._hash_wait_began
            self._hash_wait_began = None

    def auth_refused(self, retry_after_s: float) -> None:
        """Refusals move the deadline by at most ``_AUTH_EXTENSIONS`` deadlines in all, so a connection cannot stay
        unauthenticated for ever by asking again and again while the server is full of logins."""
        extra = min(retry_after_s, _AUTH_EXTENSIONS * self.config.auth_timeout_s - self._auth_refusals)
        if extra > 0:
            self._auth_refusals += extra
            self._auth_waited += extra

    def _auth_deadline(self) -> float | None:
        """When an unauthenticated connection times out; None while its hash waits for a thread (a wait the
        server's own queue bounds: ``HashQueue``)."""
        if self._hash_wait_began is not None:
            return None
        return self.opened_at + self.config.auth_timeout_s + self._auth_waited

    def tick(self, now: float, may_ping: bool = True) -> int:
        """Deadlines and liveness, called by the server's timer task: ``TICK_CLOSED`` when it began closing,
        ``TICK_PINGED`` when it sent a PING, else 0. ``may_ping`` False: a PING that is due waits for a later sweep
        (the timer spreads them out). Sets ``next_check``: nothing can be due before it."""
        if self.reason is not None:
            return 0
        config = self.config
        check = _NEVER
        if self.user_id is None:
            if self.wire.state is proto.State.HANDSHAKE and now >= self.opened_at + config.handshake_timeout_s:
                self._close_with_error(CloseReason.AUTH_TIMEOUT, ErrorCode.HANDSHAKE_TIMEOUT, "no HELLO in time")
                return TICK_CLOSED
            deadline = self._auth_deadline()
            if deadline is not None and now >= deadline:
                self._close_with_error(CloseReason.AUTH_TIMEOUT, ErrorCode.HANDSHAKE_TIMEOUT,
                                       "not authenticated in time")
                return TICK_CLOSED
        started = self._frame_started
        if started is not None:
            if now >= started + config.frame_timeout_s:
                self._close_with_error(CloseReason.PROTOCOL_ERROR, ErrorCode.MALFORMED_FRAME,
                                       f"frame not finished within {config.frame_timeout_s:g} s")
                return TICK_CLOSED
            check = started + config.frame_timeout_s
        interval = config.ping_interval_s
        due = max(self.last_heard, self._last_ping) + interval
        if now < due or not may_ping:
            # Before AUTH_OK a connection is looked at every sweep: its deadlines are short, and few wait for them.
            self.next_check = min(check, due) if self.user_id is not None else _ALWAYS
            return 0
        if self.unanswered_pings >= config.max_missed_pings:
            self.close(CloseReason.STALE)
            return TICK_CLOSED
        self._last_ping = now
        self.next_check = min(check, now + interval) if self.user_id is not None else _ALWAYS
        if self.wire.state in (proto.State.HANDSHAKE, proto.State.NEGOTIATING):
            return 0
        self.unanswered_pings += 1
        nonce = secrets.randbits(63)
        pings = self._pings
        if pings is None:
            self._pings = [nonce]  # a list only while PINGs are outstanding: most connections have none
        else:
            pings.append(nonce)
            if len(pings) > _OUTSTANDING_PINGS:
                del pings[0]
        # PING changes no protocol state and is legal in every state after NEGOTIATING (spec §9.10): its bytes
        # come from a template of proto's own encoding (tests/test_conn_idle.py holds them equal).
        self.server.counters.frames_out[proto.FrameType.PING] += 1
        if not self._write(_PING_HEAD + nonce.to_bytes(8, "big")):
            self.output_failed()
        return TICK_PINGED

    @property
    def frame_started(self) -> float | None:
        """When the partial frame in the buffer began (None: no partial frame); its deadline is ``frame_timeout_s``
        later. Set by the reader, or by a transport that frames messages itself (the WebSocket bridge)."""
        return self._frame_started

    @frame_started.setter
    def frame_started(self, started: float | None) -> None:
        self._frame_started = started
        if started is not None:
            self.next_check = min(self.next_check, started + self.config.frame_timeout_s)

    def _start_writer(self, flush) -> None:
        if self._nursery is not None and self.reason is None:
            self._nursery.start_soon(self._writer, flush)

    async def _writer(self, flush) -> None:
        await flush()
        if self.output.failed:
            self.output_failed()

    # -- tasks ------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until it closes; never raises for client misbehaviour or a bug in a request."""
        log.info("open peer=%s", self.transport.peer)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.reason is None:
                    await self._reader()
                nursery.cancel_scope.cancel()  # a writer or a pending send ends with the connection
        except BaseException as exc:
            if not _bugs(exc):
                raise
            self._internal_error(exc, 0)
        finally:
            await self._finish()
            self._release()

    def _release(self) -> None:
        """Break the reference cycles through this closed connection, so that reference counting frees it.

        Long-lived objects are frozen out of the garbage collector (server/_gc.py); a frozen cycle is never
        collected, so a closed connection must not be one (about 25 objects each otherwise).
        """
        self._nursery = None
        self.output.release()
        self.transport.attach(None)  # the WebSocket bridge's transport keeps its connection
        del self.session  # (its ``conn`` points back here); nothing reads it once ``run`` has returned

    def _internal_error(self, exc: BaseException, request_id: int) -> None:
        """A bug: log it once with its traceback; this connection alone ends (ERROR INTERNAL, BYE)."""
        if self.reason is None:
            log.error("internal error on peer=%s user=%s", self.transport.peer, safe(self.session.username or "-"),
                      exc_info=exc)
            self._close_with_error(CloseReason.PROTOCOL_ERROR, ErrorCode.INTERNAL,
                                   "internal server error; reconnect and retry", request_id)
        else:
            log.debug("error while closing peer=%s", self.transport.peer, exc_info=exc)

    async def _reader(self) -> None:
        wire = self.wire
        transport = self.transport
        frames_in = self.server.counters.frames_in
        while True:
            self.mark_idle(True)
            try:
                # No more than one legal frame can need (293 bytes before AUTH_OK, spec §2.3): a connection
                # that never logs in costs a few hundred bytes, whatever it sends.
                data = await transport.receive_some(min(_RECV_BYTES, wire.max_pending_bytes))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.mark_idle(False)
            now = trio.current_time()
            self.last_heard = now
            self.unanswered_pings = 0  # any frame counts as hearing from the client (spec §9.10)
            wire.receive_data(data)
            events = 0
            while True:
                try:
                    event = wire.next_event()
                except proto.RemoteProtocolError as exc:
                    self.protocol_error(exc.code, str(exc))
                    return
                if event is proto.NEED_DATA:
                    break
                if type(event) is proto.ConnectionClosed:
                    self.close(CloseReason.PEER_CLOSED)
                    return
                events += 1
                frames_in[event.FRAME] += 1
                await self._dispatch(event)
                if self.reason is not None:
                    return
            # A frame that began in this read (or is the first one) starts its deadline now; one that was
            # already pending keeps its start, so a byte every few seconds cannot hold a slot forever.
            if not wire.buffered_bytes:
                self.frame_started = None
            elif events or self.frame_started is None:
                self.frame_started = now

    async def _dispatch(self, event: proto.Event) -> None:
        if isinstance(event, proto.Pong):
            # Only an answer to one of our PINGs is free; anything else would be a free way to burn our CPU.
            pings = self._pings
            if pings is None or event.nonce not in pings:
                self.protocol_error(ErrorCode.INVALID_REQUEST, "PONG does not answer an outstanding PING")
            elif len(pings) == 1:
                self._pings = None
            else:
                pings.remove(event.nonce)
            return
        if not isinstance(event, proto.Bye) and not self._bucket.take(trio.current_time()):
            self.rate_limited()
            if self._violations > self.config.max_rate_violations:
                self.close(CloseReason.RATE_LIMITED)
                return
            retry_ms = int(self._bucket.retry_after_s() * 1000) + 1
            self.send(proto.Error(ErrorCode.RATE_LIMITED, retry_ms, "slow down", request_id=event.request_id))
            return
        self._violations = 0
        try:
            if isinstance(event, proto.Send):
                # Pipelined sends join the next group commit; past the limit, stop reading until some are acked.
                await self.wait_sends_done(self.config.max_inflight_sends - 1)
                try:
                    queued = self.session.send_nowait(event)
                except RequestError as exc:
                    self.send(exc.reply(event.request_id, self.wire.version))
                    return
                self.inflight_sends += 1
                if not queued:
                    # The first SEND to a new direct conversation opens it: read on only once it is stored, so
                    # the SENDs pipelined after it keep their order (spec §8). Rare, and one commit long.
                    await self._handle_send(event)
            elif isinstance(event, proto.Ping):
                self.send(event.response())
            elif isinstance(event, proto.Bye):
                self.close(CloseReason.CLIENT_QUIT)
            elif isinstance(event, proto.Error):
                log.info("peer=%s sent ERROR %s: %s", self.transport.peer, event.code.name, safe(event.message))
            elif isinstance(event, proto.Resume):
                # After a restart every client resumes at once: served in turn, the rest told when to come back.
                async with self.server.budgets.resumes.slot(self):
                    await self.session.handle(event)
            else:
                await self.session.handle(event)
        except StoreError as exc:
            self.send(busy(exc, self.config.busy_retry_ms, event.request_id))
        except Busy as exc:
            self.send(proto.Error(ErrorCode.SERVER_BUSY, int(exc.retry_after_s * 1000) + 1, "too many resumes at once; "
                                  "retry later", request_id=event.request_id))
        except Exception as exc:
            self._internal_error(exc, event.request_id)

    async def _handle_send(self, event: proto.Send) -> None:
        try:
            await self.session.handle_send(event)
        except Exception as exc:
            self._internal_error(exc, event.request_id)

    async def _finish(self) -> None:
        reason = self.reason or CloseReason.PEER_CLOSED
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLOSE_S
            try:
                self.session.close()
                if reason not in _NO_BYE and not self.wire.we_said_bye:
                    for event in self._final + [proto.Bye(reason)]:
                        try:
                            self._write(self.wire.send(event))
                        except proto.LocalProtocolError:
                            pass
                    await self.output.flush()
            except Exception as exc:
                log.error("error while closing peer=%s", self.transport.peer, exc_info=exc)
            finally:
                # Linger only where there are last words to deliver: a peer that left or cannot keep up
                # gets nothing more, and its slot is freed at once.
                await self.transport.aclose(linger_s=LINGER_S if reason not in _NO_BYE else 0)
        log.info("close peer=%s user=%s reason=%s after=%.1fs", self.transport.peer,
                 safe(self.session.username or "-"), reason.name, trio.current_time() - self.opened_at)


def busy(exc: StoreError, retry_after_ms: int, request_id: int) -> proto.Error:
    """The reply to a request the store could not serve: retry later, nothing was done (spec §7.1).

    ``retry_after_ms`` (``Config.busy_retry_ms``) unless the store knows better."""
    hint = exc.retry_after_ms if exc.retry_after_ms is not None else retry_after_ms
    return proto.Error(ErrorCode.SERVER_BUSY, hint, "storage unavailable; retry later", request_id=request_id)


def _bugs(exc: BaseException) -> list[BaseException]:
    """The exceptions in ``exc`` (a group, or one) that are bugs, not cancellation or interrupts."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _bugs(sub)]
    return [exc] if isinstance(exc, Exception) else []
