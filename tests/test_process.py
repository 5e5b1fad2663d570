"""The real ``chorus-server`` process: kill -9 loses nothing acknowledged; SIGTERM is graceful."""
from __future__ import annotations

import signal
import subprocess
import sys

import trio

from chorus import proto
from chorus.proto import CloseReason
from rawclient import RawClient

LOBBY = proto.Conversation.room("lobby")


async def start_process(data_dir, nursery):
    """Start ``python -m chorus.server`` on a free port; returns (process, port)."""
    cmd = [sys.executable, "-m", "chorus.server", "--port", "0", "--data-dir", str(data_dir),
           "--argon2-time-cost", "1", "--argon2-memory-kib", "1024", "--rate-per-s", "100000",
           "--rate-burst", "100000", "--user-send-rate-per-s", "100000", "--user-send-burst", "100000"]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    buf = b""
    while b"\n" not in buf:
        chunk = await proc.stdout.receive_some(4096)
        assert chunk, "server exited before printing its port"
        buf += chunk
    line = buf.split(b"\n")[0].decode()
    assert line.startswith("Chorus listening on"), line
    port = int(line.split()[3].split(":")[-1].rstrip(","))
    return proc, port


async def test_sigkill_right_after_acks_loses_nothing(tmp_path, nursery):
    proc, port = await start_process(tmp_path, nursery)
    c = await RawClient.connect(port)
    await c.register("alice")
    await c.request(proto.Join, "lobby")
    for i in range(1, 301):
        await c.send(proto.Send(LOBBY, i, f"durable {i}", request_id=i))
    acked = {}
    while len(acked) < 200:
        event = await c.next()
        if isinstance(event, proto.Ack):
            acked[event.seq] = f"durable {event.client_msg_id}"
    proc.kill()  # SIGKILL: no chance to flush anything not already committed
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    proc, port = await start_process(tmp_path, nursery)
    try:
        c = await RawClient.connect(port)
        await c.request(proto.Login, "alice", "correct horse")
        stored, seq, more = {}, 0, True
        while more:
            page = await c.request(proto.History, LOBBY, proto.Direction.AFTER, seq, 100)
            stored.update((m.seq, m.body) for m in page.messages)
            seq, more = (page.messages[-1].seq if page.messages else seq), page.has_more
        assert {s: stored.get(s) for s in acked} == acked
        assert sorted(stored) == list(range(1, len(stored) + 1))  # gapless
    finally:
        proc.kill()
        await proc.wait()


async def test_sigterm_sends_goaway_and_exits_zero(tmp_path, nursery):
    proc, port = await start_process(tmp_path, nursery)
    c = await RawClient.connect(port)
    await c.register("alice")
    await c.request(proto.Join, "lobby")
    assert (await c.request(proto.Send, LOBBY, 1, "before")).seq == 1
    proc.send_signal(signal.SIGTERM)
    events = await c.drain_until_closed()
    kinds = [type(e) for e in events]
    assert kinds == [proto.GoAway, proto.Bye, proto.ConnectionClosed], events
    assert events[0].reason == CloseReason.SHUTDOWN and events[0].reconnect_after_ms == 1000
    assert events[1] == proto.Bye(CloseReason.SHUTDOWN)
    with trio.fail_after(10):
        assert await proc.wait() == 0
