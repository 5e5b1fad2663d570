"""TLS under the write-through output path (spec/PROTOCOL.md §1; DESIGN.md "Fan-out").

How this works. ``TLSStream`` is a ``Transport`` (server/_transport.py) over a ``SocketStream``: OpenSSL runs
sans-IO (``ssl.SSLObject`` between two ``ssl.MemoryBIO``) and every byte still goes through the one socket's
``try_send``. ``try_send`` encrypts at most one record (16 KiB of plaintext) at a time and hands its ciphertext to
the kernel at once. When the kernel takes only part of a record, the rest of the ciphertext waits here and the
record's plaintext counts as *not* taken: ``Output`` keeps it at the head of its buffer, as it does for TCP, and
offers it again, and this stream then skips those bytes once their ciphertext has left (OpenSSL's own rule for a
retried ``SSL_write``). So what a slow reader costs is bounded by ``Output``'s limit plus one record, and a reader
that keeps up costs one encryption and one ``send`` per write, no task.

``handshake`` runs before the connection's protocol starts, under a deadline the caller sets, reading at most
``HANDSHAKE_BYTES`` from the peer. ``receive_some`` reads ciphertext only when OpenSSL needs more, one record's worth
at a time, so at most a record plus one read is buffered. ``aclose`` sends close_notify (best effort) and then closes
the socket gracefully, as TCP does.

``load_context`` builds the server's context from PEM files: TLS 1.2 or later, the ciphers of
``ssl.create_default_context(Purpose.CLIENT_AUTH)``, no renegotiation, no compression.
"""
from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ._transport import LINGER_S, SocketStream

if TYPE_CHECKING:
    from ._conn import ClientConnection

log = logging.getLogger("chorus.server")

#: Largest plaintext of one TLS record (RFC 8446 §5.1): what one ``try_send`` step encrypts.
RECORD_BYTES = 16384
#: Ciphertext read from the socket at once: one full record and its overhead.
_READ_BYTES = RECORD_BYTES + 2048
#: What a peer may send before its handshake is done (a ClientHello is a few hundred bytes to a few KiB).
HANDSHAKE_BYTES = 65536
#: Ciphertext of our own control records (alerts, key updates) waiting for the socket; past it, the peer is gone.
_CONTROL_BYTES = 65536


class TLSHandshakeError(Exception):
    """The peer did not complete a TLS handshake (not TLS, refused our parameters, too slow, or left)."""


def load_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for ``cert_file`` (PEM chain) and ``key_file``. Raises ``OSError`` or ``ssl.SSLError``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(cert_file, key_file)
    return context


class TLSStream:
    """A TLS session over a ``SocketStream``; a ``Transport`` whose ``try_send`` writes through like TCP's."""

    __slots__ = ("raw", "_ssl", "_in", "_out", "_pending", "_pending_plain", "_closed", "peer", "address")

    #: A byte stream: Chorus frames go out as they are (encrypted per connection).
    wrap: Callable[[bytes], bytes] | None = None

    def __init__(self, raw: SocketStream, context: ssl.SSLContext):
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self._pending = memoryview(b"")  # ciphertext the kernel has not taken yet
        self._pending_plain = 0  # plaintext bytes (at the head of the next try_send) whose record is in _pending
        self._closed = False
        self.peer = raw.peer
        self.address = raw.address

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    def attach(self, conn: ClientConnection | None) -> None:
        """A byte stream needs nothing of its connection."""

    async def handshake(self) -> None:
        """Complete the server side of the handshake; the caller bounds its time.

        Raises ``TLSHandshakeError`` (one line in ``str()``), ``trio.BrokenResourceError``.
        """
        received = 0
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                await self._send_out()  # the alert, if any: the peer learns why
                raise TLSHandshakeError(exc.reason or exc.__class__.__name__) from None
            await self._send_out()
            if received >= HANDSHAKE_BYTES:
                raise TLSHandshakeError(f"handshake over {HANDSHAKE_BYTES} bytes")
            data = await self.raw.receive_some(min(_READ_BYTES, HANDSHAKE_BYTES - received))
            if not data:
                raise TLSHandshakeError("closed during the handshake")
            received += len(data)
            self._in.write(data)
        await self._send_out()  # the last flight (and TLS 1.3 session tickets)

    async def _send_out(self) -> None:
        """Send everything in the outgoing BIO now, waiting for the socket (handshake only: nothing else writes)."""
        data = self._out.read()
        while data:
            sent = self.raw.try_send(data)
            data = data[sent:]
            if data:
                await self.raw.wait_writable()

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt and send what the kernel takes now; the plaintext byte count whose ciphertext has left.

        A record the kernel took only part of is not counted: the caller offers the same bytes again at the head
        of its next call (as ``Output`` does), and they are skipped once the rest of the record has left.
        Raises ``trio.BrokenResourceError`` when the peer is gone, ``trio.ClosedResourceError`` after ``aclose``.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        taken = 0
        if self._pending:
            sent = self.raw.try_send(self._pending)
            self._pending = self._pending[sent:]
            if self._pending:
                return 0
            taken, self._pending_plain = self._pending_plain, 0
        view = memoryview(data)
        size = len(view)
        while taken < size:
            chunk = view[taken:taken + RECORD_BYTES]
            try:
                self._ssl.write(chunk)
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc.reason or exc}") from None
            cipher = self._out.read()
            sent = self.raw.try_send(cipher)
            if sent < len(cipher):
                self._pending = memoryview(cipher)[sent:]
                self._pending_plain = len(chunk)
                return taken
            taken += len(chunk)
        return taken

    async def wait_writable(self) -> None:
        await self.raw.wait_writable()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Everything, waiting for the socket as needed (HTTP responses; the connection's frames use ``Output``)."""
        view = memoryview(data)
        while True:
            sent = self.try_send(view)
            view = view[sent:]
            if not view and not self._pending:
                break
            await self.raw.wait_writable()
        await trio.lowlevel.checkpoint()

    def _send_control(self) -> None:
        """Records OpenSSL wrote while reading (alerts, key updates): behind what is pending, sent when possible."""
        if not self._out.pending:
            return
        control = self._out.read()
        if self._pending:
            self._pending = memoryview(bytes(self._pending) + control)
        else:
            sent = self.raw.try_send(control)
            self._pending = memoryview(control)[sent:]
        if len(self._pending) > _CONTROL_BYTES:
            raise trio.BrokenResourceError("TLS: peer does not read")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes, ``b""`` at the end (close_notify or EOF). Raises ``trio.BrokenResourceError`` on a
        reset or a TLS error, ``trio.ClosedResourceError`` after ``aclose``."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            try:
                data = self._ssl.read(max_bytes or RECORD_BYTES)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # the frames say where they end: an EOF without close_notify truncates nothing of ours
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc.reason or exc}") from None
            else:
                self._send_control()
                return data
            self._send_control()
            ciphertext = await self.raw.receive_some(_READ_BYTES)
            if ciphertext:
                self._in.write(ciphertext)
            else:
                self._in.write_eof()

    def shutdown_write(self) -> None:
        """close_notify, then half-close the socket. Raises ``OSError``."""
        self._close_notify()
        self.raw.shutdown_write()

    def _close_notify(self) -> None:
        if self._closed or self.raw.eof:
            return
        try:
            self._ssl.unwrap()
        except ssl.SSLError:  # SSLWantReadError: the peer's close_notify is not awaited
            pass
        try:
            self._send_control()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def aclose(self, linger_s: float = LINGER_S) -> None:
        """close_notify (best effort), then the socket's graceful close (half-close, bounded linger)."""
        if not self._closed:
            self._close_notify()
            self._closed = True
        await self.raw.aclose(linger_s=linger_s)


async def accept(raw: SocketStream, context: ssl.SSLContext, timeout_s: float) -> TLSStream | None:
    """The TLS session on an accepted socket, or None (logged once, the socket closed) if its handshake failed."""
    stream = TLSStream(raw, context)
    problem = None
    with trio.move_on_after(timeout_s) as scope:
        try:
            await stream.handshake()
        except TLSHandshakeError as exc:
            problem = str(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            problem = f"connection lost ({exc})"
    if scope.cancelled_caught:
        problem = f"no handshake within {timeout_s:g} s"
    if problem is None:
        return stream
    log.info("tls handshake failed peer=%s: %s", raw.peer, problem)
    await raw.aclose(linger_s=0)
    return None
