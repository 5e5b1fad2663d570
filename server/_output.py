"""The one place that writes to a client: write-through with a bounded buffer.

``write`` hands bytes to the kernel at once when nothing is queued; whatever the
kernel does not take is appended to a buffer that the writer task (``run``)
flushes, all of it in one call, whenever the socket is writable. This is the
Mosquitto/NATS design measured in DESIGN.md "Fan-out": no task switch and no
queue per frame. A buffer over ``limit_bytes`` means the client cannot keep up:
``write`` returns False and the owner closes it as SLOW_CONSUMER (spec §9).
"""
from __future__ import annotations

import trio

_CORK_MAX_BYTES = 16384


class Output:
    def __init__(self, transport, limit_bytes: int):
        self._transport = transport
        self._limit = limit_bytes
        self._buf = bytearray()
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self.corked = False  # while corked, writes only queue; uncork() sends them in one call
        self.failed = False  # overflowed or the peer is gone: nothing more will be written
        self.overflowed = False
        self.bytes_out = 0

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
            if self.corked and self._drained.is_set() and len(self._buf) >= _CORK_MAX_BYTES:
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
            self._drained = trio.Event()
            self._wake.set()
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
        if self._buf and not self.failed and self._drained.is_set():
            self._send_buffer()

    def _send_buffer(self) -> None:
        """Write through what was queued while corked; the writer task takes what the kernel refuses."""
        try:
            sent = self._transport.try_send(self._buf)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail()
            return
        del self._buf[:sent]
        if self._buf:
            self._drained = trio.Event()
            self._wake.set()

    def _fail(self) -> None:
        self.failed = True
        self._buf.clear()
        self._wake.set()
        self._drained.set()

    async def run(self) -> None:
        """Writer task: flush the buffer whenever the socket can take more.

        Returns when the output has failed (the owner then closes the connection).
        """
        while not self.failed:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._buf and not self.failed:
                await self._transport.wait_writable()
                try:
                    sent = self._transport.try_send(self._buf)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._fail()
                    break
                del self._buf[:sent]
            if not self._buf:
                self._drained.set()

    async def wait_drained(self) -> None:
        """Wait until everything queued so far has reached the kernel (or the output failed)."""
        await self._drained.wait()

    async def flush(self) -> None:
        """Push out what is buffered without the writer task (used while closing)."""
        while self._buf and not self.failed:
            await self._transport.wait_writable()
            try:
                sent = self._transport.try_send(self._buf)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._fail()
                return
            del self._buf[:sent]
        self._drained.set()
