"""Non-blocking TCP sockets for the write-through output path (DESIGN.md "Fan-out").

Trio's ``SocketStream`` only offers ``await send_all``; a broadcast wants to hand
bytes to the kernel *now* and fall back to a buffer only for what the kernel
refuses. So the server accepts with its own ``trio.abc.Listener`` whose streams
wrap a plain non-blocking socket and add ``try_send`` (never blocks) and
``wait_writable``. They still work with ``trio.serve_listeners``.
"""
from __future__ import annotations

import errno
import socket

import trio

_RECV_BYTES = 65536
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class SocketStream(trio.abc.Stream):
    """A connected TCP socket; ``try_send`` is the write-through primitive."""

    __slots__ = ("socket", "_closed", "peer")

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (e.g. a socketpair in tests)
            pass
        self.socket = sock
        self._closed = False
        try:
            self.peer = "%s:%s" % sock.getpeername()[:2]
        except (OSError, TypeError):
            self.peer = "?"

    def try_send(self, data) -> int:
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
                return self.socket.recv(max_bytes or _RECV_BYTES)
            except BlockingIOError:
                continue
            except _GONE as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


class SocketListener(trio.abc.Listener[SocketStream]):
    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.socket = sock

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    async def accept(self) -> SocketStream:
        """Next connection. Raises OSError (e.g. EMFILE, which serve_listeners waits out)."""
        while True:
            await trio.lowlevel.wait_readable(self.socket)
            try:
                conn, _ = self.socket.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            return SocketStream(conn)

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
        await trio.lowlevel.checkpoint()


def open_listener(host: str, port: int, *, backlog: int = 4096) -> SocketListener:
    """A listening socket on (host, port); port 0 picks a free port (see ``.port``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return SocketListener(sock)
