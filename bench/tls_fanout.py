"""Fan-out with and without TLS (issue 12): the server's CPU per delivery, from /proc.

    python -m bench.tls_fanout [--members 200] [--messages 300] [--rate 50]

One room of ``members`` subscribers and one sender that sends ``messages`` paced at ``rate`` per second; the server
(``python -m chorus.server``, SQLite in a temporary directory) runs once on plain TCP and once with a throwaway
certificate (trustme, from the test extra). Reported: server CPU (user + system, from /proc/PID/stat) per delivery,
over the paced part only (set-up excluded), and the TLS/plain ratio. The clients run in this process.
"""
from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench.run import _LIFTED_BUDGETS
from chorus import proto

_TICKS = os.sysconf("SC_CLK_TCK")
LOBBY = proto.Conversation.room("lobby")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class Peer:
    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.conn = proto.Connection(proto.CLIENT, max_frame_bytes=proto.ABSOLUTE_MAX_FRAME_BYTES)
        self.rid = 0

    async def send(self, event: proto.Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def next(self):
        while (event := self.conn.next_event()) is proto.NEED_DATA:
            self.conn.receive_data(await self.stream.receive_some(65536))
        return event

    async def request(self, cls, *args):
        self.rid += 1
        await self.send(cls(*args, request_id=self.rid))
        while True:
            event = await self.next()
            if isinstance(event, proto.ConnectionClosed):
                raise RuntimeError("closed")
            if getattr(event, "request_id", 0) == self.rid and not isinstance(event, proto.SyncPage):
                return event


async def connect(port: int, context: ssl.SSLContext | None, name: str) -> Peer:
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if context is not None:
        stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
    peer = Peer(stream)
    await peer.send(proto.Hello(1, 1, "bench"))
    assert isinstance(await peer.next(), proto.Welcome)
    await peer.request(proto.Register, name, "correct horse battery")
    await peer.request(proto.Sync, ())
    await peer.request(proto.Join, "lobby")
    return peer


async def run_once(port: int, pid: int, context: ssl.SSLContext | None, members: int, messages: int,
                   rate: float) -> dict:
    peers = [await connect(port, context, f"m{i}") for i in range(members)]
    sender = peers[0]
    done = trio.Event()
    remaining = [members]

    async def receive(peer: Peer) -> None:
        got = 0
        while got < messages:
            event = await peer.next()
            got += isinstance(event, proto.Message)
        remaining[0] -= 1
        if not remaining[0]:
            done.set()

    async with trio.open_nursery() as nursery:
        for peer in peers[1:]:
            nursery.start_soon(receive, peer)
        cpu0, t0 = cpu_s(pid), time.monotonic()
        got = 0
        for i in range(messages):
            await sender.send(proto.Send(LOBBY, i + 1, "x" * 100, request_id=10_000 + i))
            await trio.sleep(1 / rate)
        while got < messages:  # the sender's own copies (and its ACKs)
            got += isinstance(await sender.next(), proto.Message)
        remaining[0] -= 1
        if not remaining[0]:
            done.set()
        await done.wait()
        cpu1, t1 = cpu_s(pid), time.monotonic()
    for peer in peers:
        await peer.stream.aclose()
    deliveries = members * messages
    return {"deliveries": deliveries, "server_cpu_s": cpu1 - cpu0, "wall_s": t1 - t0,
            "us_per_delivery": (cpu1 - cpu0) / deliveries * 1e6}


def start_server(data: Path, tls: tuple[Path, Path] | None) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "chorus.server", "--port", "0", "--data-dir", str(data), "--argon2-time-cost", "1",
           "--argon2-memory-kib", "1024", "--rate-per-s", "100000", "--rate-burst", "100000",
           "--log-level", "WARNING", *_LIFTED_BUDGETS]
    if tls is not None:
        cmd += ["--tls-cert-file", str(tls[0]), "--tls-key-file", str(tls[1])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("Chorus listening on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(line.split()[3].split(":")[-1].rstrip(","))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second")
    args = parser.parse_args()
    import trustme

    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_file))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        results = {}
        for name, tls in (("plain", None), ("tls", (cert_file, key_file))):
            proc, port = start_server(Path(tmp, name), tls)
            try:
                results[name] = trio.run(run_once, port, proc.pid, context if tls else None, args.members,
                                         args.messages, args.rate)
            finally:
                proc.terminate()
                proc.wait()
            r = results[name]
            print(f"{name:5}: {r['deliveries']} deliveries, server CPU {r['server_cpu_s']:.2f} s over "
                  f"{r['wall_s']:.1f} s, {r['us_per_delivery']:.2f} µs per delivery", flush=True)
        ratio = results["tls"]["us_per_delivery"] / results["plain"]["us_per_delivery"]
        print(f"TLS/plain: {ratio:.2f}×")


if __name__ == "__main__":
    main()
