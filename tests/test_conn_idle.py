"""What an idle connection costs (issue 14): the timer looks at it once per ping interval, its PING is a template
of proto's encoding, and PINGs due together go out spread over the following sweeps."""
from __future__ import annotations

import random

import trio
from rawclient import RawClient

from chorus import proto
from chorus.server import _app
from chorus.server._conn import _PING_HEAD, TICK_PINGED


def test_the_ping_template_is_protos_encoding():
    for nonce in [0, 1, 2**63 - 1, *(random.getrandbits(63) for _ in range(100))]:
        assert _PING_HEAD + nonce.to_bytes(8, "big") == proto.encode(proto.Ping(nonce))


class _DueForPing:
    """An idle connection whose PING is due: its tick pings when allowed to, once."""

    next_check = float("-inf")

    def __init__(self, pinged: list):
        self.pinged = pinged
        self.ticks = 0

    def tick(self, now: float, may_ping: bool = True) -> int:
        self.ticks += 1
        if not may_ping:
            return 0
        self.pinged.append(now)
        self.next_check = float("inf")  # nothing more to do for a long while
        return TICK_PINGED


async def test_pings_due_together_are_spread_over_sweeps(make_config, autojump_clock):
    pinged: list[float] = []
    server = _app.Server.__new__(_app.Server)
    server.config = make_config(ping_interval_s=15, handshake_timeout_s=10, auth_timeout_s=30, frame_timeout_s=10)
    conns = [_DueForPing(pinged) for _ in range(5000)]
    server.connections = set(conns)
    with trio.move_on_after(10):
        await server.watch_connections()
    assert len(pinged) == 5000  # every one got its PING, within a few seconds of each other
    per_sweep: dict[float, int] = {}
    for stamp in pinged:
        per_sweep[stamp] = per_sweep.get(stamp, 0) + 1
    # A sweep every 0.5 s sends at most twice its share of one interval's PINGs (5000 / 15 s * 0.5 s * 2 = 333).
    assert max(per_sweep.values()) == 333 and len(per_sweep) == 16
    # Once pinged, a connection is not looked at again until its next_check: one tick each after that.
    assert max(conn.ticks for conn in conns) <= 16


async def test_an_idle_connection_is_pinged_and_its_pong_is_free(start_server):
    server = await start_server(ping_interval_s=0.3, max_missed_pings=2)
    client = await RawClient.connect(server.port)
    await client.send(proto.Register("idler", "password123", request_id=client.rid()))
    await client.next_of(proto.AuthOk)
    conn = next(iter(server.connections))
    for _ in range(3):  # more intervals than max_missed_pings: answered PINGs keep it open
        ping = await client.next_of(proto.Ping)
        assert conn.next_check > trio.current_time()  # not looked at again before its next PING is due
        await client.send(ping.response())
    assert isinstance(await client.request(proto.Ping, 1), proto.Pong)  # the server has read our last PONG
    assert not conn.closing
    assert conn._pings is None or ping.nonce not in conn._pings  # answered PINGs are forgotten
