"""Transports: what a ``ClientConnection`` runs on, and non-blocking TCP sockets for the write-through output path
(DESIGN.md "Fan-out").

``Transport`` is the protocol the transports implement: ``SocketStream`` here (TCP), ``TLSStream`` over it
(server/_tls.py) and the WebSocket bridge's ``WebSocketTransport`` (server/_websocket.py). What differs between
them is explicit in it, not discovered: ``wrap`` (None for a byte stream, the message framing of a message-based
transport) and ``attach`` (a transport that needs its connection, to write control frames or to close it, keeps it;
TCP needs nothing).

Trio's ``SocketStream`` only offers ``await send_all``; a broadcast wants to hand
bytes to the kernel *now* and fall back to a buffer only for what the kernel
refuses. So the server accepts with its own ``trio.abc.Listener`` whose streams
wrap a plain non-blocking socket and add ``try_send`` (never blocks) and
``wait_writable``. They still work with ``trio.serve_listeners``.

Closing is graceful (spec §9.13): ``aclose`` half-closes (``shutdown(SHUT_WR)``)
after the last frame and reads and discards what the client still sends, for a
bounded time, before closing. Closing a socket with unread input makes the
kernel send RST, and a reset can discard the final ERROR/BYE still on its way.

``accept`` waits out a full file table (EMFILE/ENFILE/ENOBUFS/ENOMEM) by itself,
logging one line per episode instead of a traceback per attempt.
"""
from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

if TYPE_CHECKING:
    from ._conn import ClientConnection

log = logging.getLogger("chorus.server")

_RECV_BYTES = 65536
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
#: How long a closing socket keeps reading (and discarding) so that its last frames are not reset away.
LINGER_S = 2.0
#: What a closing socket reads and discards at most: an honest client has a few frames in flight, while a
#: flooding one would otherwise make us read its flood for the whole linger.
_LINGER_BYTES = 64 << 10
_OUT_OF_FILES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_OUT_OF_FILES_WAIT_S = 0.1


class Transport(Protocol):
    """What ``ClientConnection`` (server/_conn.py) and its ``Output`` (server/_output.py) need from a transport."""

    #: The peer as "address:port", for logs.
    peer: str
    #: The peer's IP address: the key of per-address limits and budgets.
    address: str

    @property
    def wrap(self) -> Callable[[bytes], bytes] | None:
        """None for a byte stream (frames go out as they are), or the framing that makes one Chorus frame one message
        of a message-based transport. The fan-out encodes a frame once for every connection with the same ``wrap``."""
        ...

    def attach(self, conn: ClientConnection | None) -> None:
        """Called by the connection that runs on this transport before it reads, and with None once it has closed
        (so that no reference cycle outlives it: server/_memory.py)."""
        ...

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes right now; the byte count. Raises ``trio.BrokenResourceError`` when the peer
        is gone, ``trio.ClosedResourceError`` after ``aclose``."""
        ...

    async def wait_writable(self) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes, ``b""`` at the end. Raises ``trio.BrokenResourceError`` on a reset."""
        ...

    async def aclose(self, linger_s: float = ...) -> None:
        """Close after the last frame; ``linger_s`` bounds how long the peer's last bytes are awaited (0: not)."""
        ...


class SocketStream(trio.abc.Stream):
    """A connected TCP socket; ``try_send`` is the write-through primitive. A ``Transport``."""

    __slots__ = ("socket", "_closed", "peer", "address", "eof")

    #: A byte stream: Chorus frames go out as they are.
    wrap: Callable[[bytes], bytes] | None = None

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (e.g. a socketpair in tests)
            pass
        self.socket = sock
        self._closed = False
        self.eof = False  # the peer closed its side: nothing left to drain
        try:
            name = sock.getpeername()
            self.address = str(name[0])
            self.peer = "%s:%s" % name[:2]
        except (OSError, TypeError, IndexError):
            self.address = self.peer = "?"

    def attach(self, conn: ClientConnection | None) -> None:
        """A byte stream needs nothing of its connection."""

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes right now; returns the byte count (0 if none).

        Raises ``trio.BrokenResourceError`` when the peer is gone, ``trio.ClosedResourceError`` after aclose.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def wait_send_all_might_not_block(self) -> None:
        await self.wait_writable()

    async def send_all(self, data) -> None:
        view = memoryview(data)
        while view:
            sent = self.try_send(view)
            view = view[sent:]
            if view:
                await self.wait_writable()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Bytes received, ``b""`` at EOF; raises ``trio.BrokenResourceError`` on a reset."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            await trio.lowlevel.wait_readable(self.socket)
            try:
                data = self.socket.recv(max_bytes or _RECV_BYTES)
            except BlockingIOError:
                continue
            except _GONE as exc:
                self.eof = True
                raise trio.BrokenResourceError(str(exc)) from exc
            if not data:
                self.eof = True
            return data

    async def aclose(self, linger_s: float = LINGER_S) -> None:
        """Half-close, drain the client's input for up to ``linger_s`` (0: not at all), then close."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if linger_s > 0 and not self.eof:
                with trio.move_on_after(linger_s):
                    await self._linger()
        finally:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()

    def shutdown_write(self) -> None:
        """Half-close: the peer reads EOF after what was sent. Raises ``OSError``."""
        self.socket.shutdown(socket.SHUT_WR)

    async def _linger(self) -> None:
        try:
            self.shutdown_write()
        except OSError:
            return
        received = 0
        while received < _LINGER_BYTES:
            await trio.lowlevel.wait_readable(self.socket)
            try:
                data = self.socket.recv(_RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            received += len(data)


class SocketListener(trio.abc.Listener[SocketStream]):
    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.socket = sock
        self.out_of_files = 0  # accepts refused by a full file table, for statistics()

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    async def accept(self) -> SocketStream:
        """Next connection; waits out a full file table. Raises OSError for anything else."""
        waiting = False
        while True:
            await trio.lowlevel.wait_readable(self.socket)
            try:
                conn, _ = self.socket.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno not in _OUT_OF_FILES:
                    raise
                self.out_of_files += 1
                if not waiting:
                    waiting = True
                    log.warning("accept: %s; waiting for connections to close", errno.errorcode[exc.errno])
                await trio.sleep(_OUT_OF_FILES_WAIT_S)
                continue
            if waiting:
                log.info("accept: file descriptors available again")
            return SocketStream(conn)

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
        await trio.lowlevel.checkpoint()


def open_listener(host: str, port: int, *, backlog: int = 4096, reuse_port: bool = False) -> SocketListener:
    """A listening socket on (host, port); port 0 picks a free port (see ``.port``).

    ``reuse_port``: SO_REUSEPORT, so that several processes (nodes) listen on the same port and the kernel spreads
    new connections across them.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return SocketListener(sock)
