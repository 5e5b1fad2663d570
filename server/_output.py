"""The one place that writes to a client: write-through with a bounded buffer.

``write`` hands bytes to the kernel at once when nothing is queued; whatever the
kernel does not take is appended to a buffer, and only then is a writer task
started (through ``start_writer``) to flush the buffer, all of it in one call,
whenever the socket is writable; it ends when the buffer is empty. This is the
Mosquitto/NATS design measured in DESIGN.md "Fan-out": no task switch and no
queue per frame, and no task at all for a connection that keeps up. A buffer
over ``limit_bytes`` means the client cannot keep up: ``write`` returns False
and the owner closes it as SLOW_CONSUMER (spec §9.12).
"""
from __future__ import annotations

from typing import Awaitable, Callable

import trio

from ._transport import Transport

_CORK_MAX_BYTES = 16384


def _no_writer(flush: Callable[[], Awaitable[None]]) -> None:
    """``start_writer`` of a released output: its connection is gone, so nothing may start a task."""


class Output:
    __slots__ = ("_transport", "_limit", "_buf", "_start_writer", "_writing", "_drained", "corked", "failed",
                 "overflowed", "bytes_out")

    def __init__(self, transport: Transport, limit_bytes: int,
                 start_writer: Callable[[Callable[[], Awaitable[None]]], None]):
        self._transport = transport
        self._limit = limit_bytes
        self._buf = bytearray()
        self._start_writer = start_writer
        self._writing = False
        self._drained: trio.Event | None = None  # made only when someone waits
        self.corked = False  # while corked, writes only queue; uncork() sends them in one call
        self.failed = False  # overflowed or the peer is gone: nothing more will be written
        self.overflowed = False
        self.bytes_out = 0

    def release(self) -> None:
        """Forget the owner's callback (its connection closed): no cycle through a bound method remains."""
        self._start_writer = _no_writer

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the client, sending at once when possible.

        Returns False when the client is gone or over its buffer limit.
        """
        if self.failed:
            return False
        self.bytes_out += len(data)
        if self._buf or self.corked:
            self._buf += data
            if self.corked and not self._writing and len(self._buf) >= _CORK_MAX_BYTES:
                self._send_buffer()  # coalescing is a hint, not a reason to hold megabytes
        else:
            try:
                sent = self._transport.try_send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._fail()
                return False
            if sent == len(data):
                return True
            self._buf += memoryview(data)[sent:]
            self._need_writer()
        if len(self._buf) > self._limit:
            self.overflowed = True
            self._fail()
            return False
        return True

    def cork(self) -> None:
        """Queue writes without sending until ``uncork`` (a hub batch: one send call per subscriber)."""
        self.corked = True

    def uncork(self) -> None:
        self.corked = False
        if self._buf and not self.failed and not self._writing:
            self._send_buffer()

    def _send_buffer(self) -> None:
        """Write through what is queued; the writer task takes what the kernel refuses."""
        try:
            sent = self._transport.try_send(self._buf)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail()
            return
        del self._buf[:sent]
        if self._buf:
            self._need_writer()
        else:
            self._set_drained()

    def _need_writer(self) -> None:
        if not self._writing:
            self._writing = True
            self._start_writer(self._flush_when_writable)

    async def _flush_when_writable(self) -> None:
        """The writer task: flush whenever the socket can take more, until the buffer is empty."""
        try:
            await self.flush()
        finally:
            self._writing = False

    def _fail(self) -> None:
        self.failed = True
        self._buf.clear()
        self._set_drained()

    def _set_drained(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    async def wait_drained(self) -> None:
        """Wait until everything queued so far has reached the kernel (or the output failed)."""
        while self._buf and not self.failed:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    async def flush(self) -> None:
        """Push out what is buffered, waiting for the socket as needed (also used while closing)."""
        while self._buf and not self.failed:
            await self._transport.wait_writable()
            try:
                sent = self._transport.try_send(self._buf)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._fail()
                return
            del self._buf[:sent]
        self._set_drained()
