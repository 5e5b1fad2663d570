"""The server: accept loop, shared state, graceful shutdown (spec §9 "Shutdown").

``serve`` is meant for ``nursery.start``: it reports the running ``Server``
(whose ``port`` is the real one when the config says port 0). ``shutdown()``
stops accepting, sends GOAWAY to every client, gives every frame already read
(SENDs above all) until the grace deadline to be acted on, committed and
acknowledged, then says BYE(SHUTDOWN) and waits for each connection's bounded
close; the store commits what is pending last.

Storage and everything that crosses connections are behind the two ports of server/_ports.py: ``serve`` opens the
SQLite store and the in-process broker unless given others (``store=``, ``broker=``), and wires the store's commit
to the broker (``on_commit`` publishes, ``after_batch`` flushes); neither knows the other.

Every accepted socket takes a slot (``Admission``: in total and per address)
before anything else; a bug in one connection is caught at its boundary and
never reaches ``serve_listeners`` (whose handler exceptions would end the
server). The timer task closes at most ``_CLOSES_PER_TICK`` connections per
sweep and sweeps again soon, so thousands of deadlines in one tick cannot stall
the loop.
"""
from __future__ import annotations

import collections
import logging
import ssl
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from functools import partial
from pathlib import Path

import trio

from chorus import proto
from chorus.proto import CloseReason, ErrorCode

from ._adminactions import poll_admin_actions
from ._admission import Admission, open_file_budget
from ._auth import Passwords
from ._broker import LocalBroker
from ._budgets import Budgets
from ._config import Config
from ._conn import TICK_CLOSED, TICK_PINGED, ClientConnection, _bugs
from ._memory import GcPolicy
from ._metrics import Counters
from ._ports import Broker, BrokerFactory, Store, StoreError
from ._store import open_store
from ._tls import accept as tls_accept
from ._tls import load_context as load_tls_context
from ._transport import SocketStream, Transport, open_listener

log = logging.getLogger("chorus.server")

#: Connections the timer may begin closing in one step of a sweep; then the loop runs for a moment.
_CLOSES_PER_TICK = 20
_BACKLOG_PERIOD_S = 0.02
_TICKS_PER_STEP = 2000
_REFUSE_LINGER_S = 0.5
#: PINGs a sweep may send however few connections there are.
_MIN_PINGS_PER_SWEEP = 100


class Server:
    def __init__(self, config: Config, store: Store, broker: Broker):
        self.config = config
        self.store = store
        self.broker = broker
        self.budgets = Budgets(config)  # what one user or address may spend across its connections
        # Committed messages go out before any ACK of their batch, and one write per connection follows the ACKs.
        store.on_commit = broker.publish
        store.after_batch = broker.flush
        self.passwords = Passwords(time_cost=config.argon2_time_cost, memory_kib=config.argon2_memory_kib)
        self.connections: set[ClientConnection] = set()
        self.admission = Admission(config.max_connections, config.max_connections_per_address,
                                   config.connections_per_s_per_address, config.connection_burst_per_address)
        self.port: int | None = None
        self.ws_port: int | None = None
        self.admin_port: int | None = None  # the admin listener's (server/_admin.py), when config.admin_port is set
        self.close_reasons: collections.Counter[str] = collections.Counter()
        self.counters = Counters()  # for the metrics (server/_metrics.py): frames by type, auth, rate limits
        self.gc_policy: GcPolicy | None = None  # set by chorus-server (server/__main__.py), which owns the process
        self._shutdown = trio.Event()
        # TLS (server/_tls.py): the context new connections use; reload_tls() swaps it.
        self.tls: ssl.SSLContext | None = None
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            self.tls = load_tls_context(config.tls_cert_file, config.tls_key_file)

    def reload_tls(self) -> bool:
        """Read the certificate and key again (SIGHUP) for new connections; on a bad file keep the old context and
        log one line. Returns whether the new files were taken; False too when TLS is off."""
        config = self.config
        if self.tls is None or config.tls_cert_file is None or config.tls_key_file is None:
            return False
        try:
            self.tls = load_tls_context(config.tls_cert_file, config.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS reload failed, keeping the old certificate: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", config.tls_cert_file)
        return True

    def shutdown(self) -> None:
        """Ask ``serve`` to shut down gracefully; returns at once."""
        self._shutdown.set()

    @property
    def draining(self) -> bool:
        """True from ``shutdown()`` on: not ready for new clients (``/readyz``)."""
        return self._shutdown.is_set()

    def statistics(self) -> dict:
        broker = self.broker.statistics()
        return {
            "connections": len(self.connections),
            "sockets": self.admission.total,
            "refused_sockets": self.admission.refused,
            "delivered": broker["delivered"],
            "broker": broker,
            "budgets": self.budgets.statistics(),
            "hashed": self.passwords.hashed,
            "close_reasons": dict(self.close_reasons),
            "store": self.store.statistics(),
            "gc": self.gc_policy.statistics() if self.gc_policy is not None else None,
        }

    async def handle_tcp(self, stream: SocketStream) -> None:
        """``serve_listeners``' handler for the Chorus port: take a slot, serve, give the slot back."""
        refusal = self.admission.acquire(stream.address)
        if refusal is not None:
            if self.tls is None:
                await self.refuse(stream, refusal)
            else:  # a TLS client cannot read a plaintext ERROR, and a handshake is what a refusal must not cost
                self.close_reasons[CloseReason.SERVER_FULL.name] += 1
                await stream.aclose(linger_s=0)
            return
        try:
            if self.tls is None:
                await self.handle(stream)
            elif (secure := await tls_accept(stream, self.tls, self.config.handshake_timeout_s)) is not None:
                await self.handle(secure)
        finally:
            self.admission.release(stream.address)

    async def refuse(self, transport: Transport, message: str) -> None:
        """ERROR TOO_MANY_CONNECTIONS + BYE SERVER_FULL, then close (no HELLO needed, spec §7.1)."""
        wrap = transport.wrap or bytes
        frames = (wrap(proto.encode(proto.Error(ErrorCode.TOO_MANY_CONNECTIONS, self.config.reconnect_hint_ms,
                                                message)))
                  + wrap(proto.encode(proto.Bye(CloseReason.SERVER_FULL))))
        try:
            transport.try_send(frames)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(_REFUSE_LINGER_S):  # holds a descriptor but no slot: keep it short
            await transport.aclose()
        self.close_reasons[CloseReason.SERVER_FULL.name] += 1

    async def handle(self, transport: Transport) -> None:
        """Serve one admitted stream (TCP, or the WebSocket bridge's adapter); never raises for a bug."""
        if self._shutdown.is_set():
            await self.refuse(transport, "server shutting down")
            return
        conn = ClientConnection(self, transport)
        self.connections.add(conn)
        try:
            await conn.run()
        except BaseException as exc:  # conn.run catches its own; this is the last line before serve_listeners
            if not _bugs(exc):
                raise
            log.error("connection from %s failed", transport.peer, exc_info=exc)
        finally:
            self.connections.discard(conn)
            self.close_reasons[(conn.reason or CloseReason.PEER_CLOSED).name] += 1

    async def watch_connections(self) -> None:
        """The one timer task: deadlines and liveness of every connection (``ClientConnection.tick``).

        Each sweep ticks the connections whose ``next_check`` has come (one comparison each for the others: an
        idle connection is looked at once per ping interval, not every sweep). Closing is what costs (a task
        woken, frames written, a linger), so a sweep begins at most ``_CLOSES_PER_TICK`` closes and then lets the
        loop run for ``_BACKLOG_PERIOD_S`` before it goes on where it stopped: thousands of deadlines falling in
        one tick are spread over seconds instead of stalling everyone. PINGs are spread too: a sweep sends at
        most twice its share of one interval's PINGs, and the rest go out in the next sweeps, so connections
        that all logged in together do not all get their PING in the same millisecond. Long sweeps also yield
        every ``_TICKS_PER_STEP`` connections.
        """
        config = self.config
        # A twentieth of the shortest deadline (so timing is within 5%), at most once a second.
        period = min(1.0, min(config.ping_interval_s, config.handshake_timeout_s, config.auth_timeout_s,
                              config.frame_timeout_s) / 20)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            due = [conn for conn in self.connections if conn.next_check <= now]
            pings = max(_MIN_PINGS_PER_SWEEP, int(2 * len(self.connections) * period / config.ping_interval_s))
            budget, ticked = _CLOSES_PER_TICK, 0
            for conn in due:
                if budget <= 0 or ticked >= _TICKS_PER_STEP:
                    await trio.sleep(_BACKLOG_PERIOD_S if budget <= 0 else 0)
                    now = trio.current_time()
                    budget, ticked = _CLOSES_PER_TICK, 0
                ticked += 1
                done = conn.tick(now, pings > 0)
                if done == TICK_CLOSED:
                    budget -= 1
                elif done == TICK_PINGED:
                    pings -= 1

    async def purge_sessions(self, period_s: float = 3600.0) -> None:
        """Forget expired session tokens at start and then hourly, so the table does not grow forever."""
        while True:
            try:
                gone = await self.store.purge_sessions(time.time_ns() // 1_000_000)
            except StoreError as exc:  # a full disk: expired tokens are refused anyway; try again later
                log.warning("session purge postponed: %s", exc)
            else:
                if gone:
                    log.info("purged %d expired sessions", gone)
            await trio.sleep(period_s)

    async def _drain(self) -> None:
        config = self.config
        deadline = trio.current_time() + config.shutdown_grace_s
        self.broker.set_draining(True)
        nodes = tuple(self.broker.live_nodes())
        for conn in list(self.connections):
            conn.goaway(config.reconnect_hint_ms, "server shutting down", nodes)
        with trio.move_on_at(deadline):
            for conn in list(self.connections):
                await conn.wait_quiet()
        for conn in list(self.connections):
            conn.close(CloseReason.SHUTDOWN)


async def serve(config: Config, *, store: Store | None = None, broker: BrokerFactory | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run a Chorus server until ``shutdown()`` (graceful) or cancellation (abrupt).

    ``store``: an open store, which the caller closes after this returns; by default the SQLite store in
    ``config.data_dir``, opened and closed here. ``broker``: called with the config and the store, returns the
    broker (default ``LocalBroker``); its ``run`` is started before the listener opens.
    """
    async with AsyncExitStack() as stack:
        opened = store if store is not None else await stack.enter_async_context(open_configured_store(config))
        await _serve(config, opened, (broker or configured_broker(config))(config, opened), task_status)
    log.info("stopped")


def open_configured_store(config: Config) -> AbstractAsyncContextManager[Store]:
    """The store ``config`` names: PostgreSQL at ``config.store`` (node mode), else SQLite in ``config.data_dir``."""
    if config.store is not None:
        from ._pgstore import open_pg_store  # psycopg is imported only in node mode

        return open_pg_store(config.store, max_batch=config.max_batch, pool_size=config.pg_pool_size)
    return _open_sqlite(config)


def configured_broker(config: Config) -> BrokerFactory:
    """The broker ``config`` names: Redis at ``config.broker`` (node mode), else the in-process one."""
    if config.broker is not None:
        from ._redisbroker import RedisBroker  # coredis is imported only in node mode

        return RedisBroker
    return LocalBroker


def _open_sqlite(config: Config) -> AbstractAsyncContextManager[Store]:
    data_dir = Path(config.data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data_dir.stat().st_mode & 0o077:  # not ours to change (it may be any directory), but say so
        log.warning("data dir %s is readable by other users (mode %o); chmod 700 it", data_dir,
                    data_dir.stat().st_mode & 0o777)
    return open_store(config.db_path, synchronous=config.sqlite_synchronous, max_batch=config.max_batch)


async def _serve(config: Config, store: Store, broker: Broker, task_status) -> None:
    budget = open_file_budget()
    server = Server(config, store, broker)
    if budget < config.max_connections:
        log.warning("max_connections %d is above what the open-file limit allows; using %d",
                    config.max_connections, budget)
        server.admission.total_limit = budget
    listener = open_listener(config.host, config.port, reuse_port=config.reuse_port)
    server.port = listener.port
    async with trio.open_nursery() as timers:
        await timers.start(broker.run)
        timers.start_soon(server.watch_connections)
        timers.start_soon(server.purge_sessions)
        timers.start_soon(poll_admin_actions, server)  # chorus-admin's changes to live connections
        if config.admin_port is not None:  # metrics and health, until the drain is over (server/_admin.py)
            from ._admin import serve_admin

            server.admin_port = await timers.start(serve_admin, server)
        await _serve_until_shutdown(server, listener, task_status)
        timers.cancel_scope.cancel()


async def _serve_until_shutdown(server: Server, listener, task_status) -> None:
    config = server.config
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as accepting:
            await accepting.start(partial(trio.serve_listeners, server.handle_tcp, [listener],
                                          handler_nursery=handlers))
            if config.ws_port is not None:
                from ._websocket import serve_websocket

                server.ws_port = await accepting.start(serve_websocket, server, handlers)
            server.broker.set_address(listener.port, server.ws_port)
            log.info("listening on %s:%d (data %s)", config.host, server.port, config.storage)
            task_status.started(server)
            await server._shutdown.wait()
            log.info("shutting down: %d connections", len(server.connections))
            accepting.cancel_scope.cancel()
        await server._drain()
