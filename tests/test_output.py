"""The write-through output (server/_output.py) on a real socket pair."""
from __future__ import annotations

import socket

import pytest
import trio

from chorus.server._output import Output
from chorus.server._transport import SocketStream


class CountingStream(SocketStream):
    def __init__(self, sock):
        super().__init__(sock)
        self.calls = 0

    def try_send(self, data) -> int:
        self.calls += 1
        return super().try_send(data)


def pair():
    a, b = socket.socketpair()
    return CountingStream(a), b


async def read_exactly(sock, n):
    got = b""
    while len(got) < n:
        await trio.lowlevel.wait_readable(sock)
        got += sock.recv(n - len(got))
    return got


async def test_write_through_sends_at_once_without_the_writer():
    stream, peer = pair()
    out = Output(stream, limit_bytes=1 << 20, start_writer=pytest.fail)  # no writer task needed
    assert out.write(b"hello") and out.buffered_bytes == 0 and stream.calls == 1
    assert await read_exactly(peer, 5) == b"hello"


async def test_cork_coalesces_a_batch_into_one_send():
    stream, peer = pair()
    out = Output(stream, limit_bytes=1 << 20, start_writer=pytest.fail)
    out.cork()
    for i in range(50):
        assert out.write(b"frame%02d" % i)
    assert stream.calls == 0
    out.uncork()
    assert stream.calls == 1
    assert await read_exactly(peer, 50 * 7) == b"".join(b"frame%02d" % i for i in range(50))


async def test_writer_flushes_what_the_kernel_refused_and_overflow_fails():
    stream, peer = pair()
    peer.setblocking(False)
    started = []
    async with trio.open_nursery() as nursery:
        out = Output(stream, limit_bytes=4 << 20, start_writer=lambda flush: (started.append(1),
                                                                              nursery.start_soon(flush)))
        chunk = b"x" * 65536
        while out.buffered_bytes == 0:  # fill the kernel buffers until we have to queue
            assert out.write(chunk)
        assert started == [1]  # the writer exists only now, once
        assert out.write(chunk) and started == [1]
        written, total = out.bytes_out, 0
        while total < written:
            await trio.lowlevel.wait_readable(peer)
            total += len(peer.recv(1 << 20))
        await out.wait_drained()
        assert out.buffered_bytes == 0
    small = Output(pair()[0], limit_bytes=1000, start_writer=pytest.fail)
    small.cork()
    assert not small.write(b"y" * 1001) and small.overflowed and small.failed
    assert not small.write(b"z")  # nothing more after failing
