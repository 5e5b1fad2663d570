"""``python -m bench --scenarios attack``: the honest client's round trip while the server is attacked (issue 9).

How a run works. For each attack the controller starts a fresh ``chorus-server`` (``bench.chorus_server``, as
the other scenarios do) with the default limits: only the log level is lowered (as everywhere in the bench), the
honest user's per-user send rate is lifted when the server has that option (the prober sends 50 SENDs/s, more
than the default per-user budget; no attacker ever logs in, so no attacker gains from it), and the mass-timeout
attack shortens ``--handshake-timeout-s`` so its deadline falls inside the window. Two helper processes live for
the whole scenario:

- the **prober** (trio, ``_Prober``) connects from **127.0.0.2** (all of 127.0.0.0/8 is loopback on Linux, so
  the per-address limit never counts it with the attackers on 127.0.0.1 / 127.0.1.x). User ``alice`` is logged in
  and joined to ``#lobby``; she SENDs a 100-byte message every 20 ms and times each one until her own MESSAGE
  comes back (send → store commit → fan-out → her socket). Beside that, every ``login_every_s`` a fresh
  connection logs in (``alice``, whose name the login flood also guesses, and ``carol``, whom nobody attacks)
  and times LOGIN → AUTH_OK. If her connection drops she logs in again; the probes she could not send or that
  were lost count with the time she waited.
- the **attacker** (``_Attack``) is one epoll loop over raw non-blocking sockets writing prebuilt bytes, so
  it stays cheap on this 2-core machine. Distributed attacks spread over 127.0.1.x, ``per_source`` connections
  per address (below the default per-address limit: it is the other defences these attacks test); slot filling
  comes from 127.0.0.1 alone.

Each attack then runs three windows on the same server: **baseline** (no attack), **attack** (the attacker
ramps up and keeps its pressure), **after** (the attacker has closed everything: does the server recover and
give its memory back?). A probe belongs to the window in which it was due to be sent.

The attacks (``ATTACKS``):

1. ``pong``: ``pong_conns`` connections say HELLO, then write unsolicited PONG frames as fast as the socket takes
   them; a closed connection comes back at once.
2. ``bigframe``: ``bigframe_conns`` connections say HELLO, then a header announcing a ``bigframe_body_bytes``
   REGISTER, and dribble the body (64 KiB at a time, all but its last byte within 70% of the window).
3. ``login``: ``login_conns`` connections send LOGIN with wrong passwords, half for ``alice``, half for random
   names, each sending the next guess as soon as the previous one is answered; a closed connection comes back.
4. ``slots``: from 127.0.0.1 alone, open connections (each says HELLO) until the server refuses ``refusals_to_stop``
   of them or ``slot_cap`` are open, hold them, reopen any the server drops, and keep trying a few more per
   second to take back any slot that frees up. The honest fresh logins (from 127.0.0.2) say whether a new user
   still gets in.
5. ``timeouts``: ``timeout_conns`` connections opened as fast as the server accepts them that never say HELLO,
   so they all reach the handshake deadline together; the max round trip shows the stall.

Reported per attack: the honest round trip p50/p99/max in each window, ratio = p99(attack) / p99(baseline),
fresh-login outcomes and LOGIN → AUTH_OK times, the server's RSS (``/proc/PID/status`` VmRSS, sampled every
100 ms): growth = peak during the attack − RSS when it began, per 1,000 attacking connections (the attacker's
peak of simultaneously open connections, counted as at least 1,000 so that a handful of flooding connections is
judged against 50 MB, not against noise), and what the server answered the attacker. Targets (issue 9):
every ratio ≤ 3 and RSS growth ≤ 50 MB per 1,000 attacking connections.

Noise, stated once: the machine has 2 cores and is shared, so the attacker, the prober and everybody else's work
compete with the server (each row says how many cores the rest of the machine used); and every password hash
(argon2, 19 MiB) can leave its buffer in the malloc arena of whichever worker thread ran it, so the RSS may step
up by about 19 MB when logins overlap for the first time, with or without an attack.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import hashlib
import heapq
import json
import math
import multiprocessing
import os
import random
import re
import resource
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import trio

from chorus import proto
from chorus.proto import FrameType

from .loadgen import probe_body
from .run import REPO, Endpoint, _read_first_line, machine_busy_s

ATTACKS = ("pong", "bigframe", "login", "slots", "timeouts")
TITLES = {"pong": "PONG flood", "bigframe": "pre-auth big frames", "login": "login flood",
          "slots": "slot filling from one address", "timeouts": "mass handshake timeouts"}
RATIO_TARGET = 3.0
RSS_TARGET_MB_PER_1000 = 50.0
HONEST_SOURCE = "127.0.0.2"
ATTACK_SOURCE = "127.0.0.1"  # slot filling: the address everything else in the bench also uses
PASSWORD = "honest-password-1"
ROOM = "lobby"


@dataclass(frozen=True)
class AttackSizes:
    baseline_s: float = 10.0
    attack_s: float = 10.0
    after_s: float = 4.0
    settle_s: float = 1.0  # after the prober logs in, before the baseline window
    probe_interval_s: float = 0.02
    login_every_s: float = 1.0
    pong_conns: int = 8
    bigframe_conns: int = 2000
    bigframe_body_bytes: int = 1 << 20  # the default max_frame_bytes: the largest the server lets through today
    login_conns: int = 1000
    slot_cap: int = 10200  # the default max_connections (10,000) and some: "as many as the server allows"
    refusals_to_stop: int = 200
    timeout_conns: int = 5000
    handshake_timeout_s: float = 4.0
    per_source: int = 200  # attacking connections per source address (distributed attacks)
    ramp_per_s: float = 4000.0  # connections opened per second while an attack ramps up


FULL = AttackSizes()
SMOKE = AttackSizes(baseline_s=0.6, attack_s=1.0, after_s=0.4, settle_s=0.2, login_every_s=0.3, pong_conns=2,
                    bigframe_conns=10, login_conns=10, slot_cap=60, refusals_to_stop=20, timeout_conns=40,
                    handshake_timeout_s=0.4)

_HDR = struct.Struct(">IBBI")
_IP_BIND_ADDRESS_NO_PORT = 24
_ERROR, _BYE, _WELCOME, _AUTH_OK, _PING = (int(t) for t in (FrameType.ERROR, FrameType.BYE, FrameType.WELCOME,
                                                            FrameType.AUTH_OK, FrameType.PING))


# -- the attacker: one epoll loop, raw sockets, prebuilt bytes ---------------------------------------------------------

class _AConn:
    __slots__ = ("sock", "fd", "slot", "connected_at", "connecting", "out", "off", "inb", "body_left", "errors",
                 "welcomed", "mask")

    def __init__(self, sock: socket.socket, slot: int):
        self.sock, self.fd, self.slot = sock, sock.fileno(), slot
        self.connected_at = 0.0
        self.connecting = True
        self.out = b""
        self.off = 0
        self.inb = b""
        self.body_left = 0
        self.errors = 0
        self.welcomed = False  # the server answered HELLO: it holds this connection (a slot, memory)
        self.mask = 0


class _Attack:
    """One attack, run until the controller says stop; ``run`` returns what the attacker saw."""

    _IN, _OUT = select.EPOLLIN, select.EPOLLOUT

    def __init__(self, spec: dict, pipe):
        self.spec, self.pipe = spec, pipe
        self.kind = spec["attack"]
        self.port = spec["port"]
        self.target = spec["conns"]
        self.sources = spec["sources"]
        self.per_source = spec["per_source"]
        self.ramp_interval = 1.0 / spec["ramp_per_s"]
        self.poll = select.epoll()
        self.poll.register(pipe.fileno(), select.EPOLLIN)
        self.by_fd: dict[int, _AConn] = {}
        self.timers: list = []
        self._seq = 0
        self.start = time.monotonic()
        self.opened = self.connected = self.open_now = self.peak_open = self.held_now = self.peak_held = 0
        self.closed_by_server = self.refused = self.reopened = 0
        self.bytes_sent = 0
        self.logins_sent = 0
        self.replies: collections.Counter[str] = collections.Counter()
        self.connect_errors: collections.Counter[str] = collections.Counter()
        self.close_times: list[float] = []
        self.ramp_done = False
        self.stopping = False
        self.full = False  # slot filling: the server has refused us enough; from now on only top up
        self.rng = random.Random(9)
        hello = proto.encode(proto.Hello(1, 1, "attacker", request_id=1))
        self.hello = hello
        if self.kind == "pong":
            pong = proto.encode(proto.Pong(0, request_id=0))
            per = 65536 // len(pong) + 1
            self.period = len(pong) * per
            self.flood = memoryview(pong * (2 * per))
        elif self.kind == "bigframe":
            self.body = spec["body_bytes"]
            self.first = hello + _HDR.pack(self.body, int(FrameType.REGISTER), 0, 2)
            self.chunk = 65536
            self.zeros = memoryview(bytes(self.chunk))
            chunks = max(1, math.ceil((self.body - 1) / self.chunk))
            self.dribble_every = spec["dribble_s"] / chunks
        elif self.kind == "login":
            frames = []
            for i in range(64):
                name = "alice" if i % 2 == 0 else "x" + "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                                                               for _ in range(10))
                frames.append(proto.encode(proto.Login(name, f"wrong-guess-{i:04d}", request_id=2 + i)))
            self.logins = frames

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _later(self, delay: float, what: str, arg) -> None:
        self._seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self._seq, what, arg))

    def _open(self, slot: int) -> None:
        self.opened += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.sources[min(slot // self.per_source, len(self.sources) - 1)], 0))
            err = sock.connect_ex(("127.0.0.1", self.port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(slot, err)
            return
        c = _AConn(sock, slot)
        self.by_fd[c.fd] = c
        c.mask = self._IN | self._OUT
        self.poll.register(c.fd, c.mask)

    def _connect_failed(self, slot: int, err: int) -> None:
        self.connect_errors[errno.errorcode.get(err, str(err))] += 1
        if self.kind == "slots":
            self.refused += 1
        elif self.kind in ("pong", "login"):
            self._later(0.5, "open", slot)

    def _arm(self, c: _AConn, mask: int) -> None:
        if c.mask != mask:
            c.mask = mask
            self.poll.modify(c.fd, mask)

    def _send(self, c: _AConn, data) -> int | None:
        """Bytes the kernel took (0 when its buffer is full); None when the connection is gone."""
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self._closed(c)
            return None
        self.bytes_sent += sent
        return sent

    def _write(self, c: _AConn, data) -> None:
        if c.out:
            c.out += bytes(data)
            return
        sent = self._send(c, data)
        if sent is not None and sent < len(data):
            c.out = bytes(data[sent:])
            self._arm(c, self._IN | self._OUT)

    def _closed(self, c: _AConn, by_server: bool = True) -> None:
        if self.by_fd.get(c.fd) is not c:
            return
        del self.by_fd[c.fd]
        try:
            self.poll.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()
        if c.connecting:
            if by_server:
                self._connect_failed(c.slot, errno.ECONNREFUSED)
            return
        self.open_now -= 1
        self.held_now -= c.welcomed
        if not by_server:
            return  # the attack is over: nothing to count, nothing to reopen
        now = time.monotonic()
        self.closed_by_server += 1
        self.close_times.append(now - self.start)
        if self.stopping:
            return
        if self.kind == "slots" and not c.welcomed:
            self.refused += 1  # turned away at the door: not retried (the top-up keeps knocking instead)
        elif self.kind in ("pong", "login", "slots"):
            self.reopened += 1
            self._later(0.01 if self.kind == "pong" else 0.2, "open", c.slot)

    # -- per attack --------------------------------------------------------------------------------------------
    def _on_connected(self, c: _AConn) -> None:
        c.connecting = False
        c.connected_at = time.monotonic()
        self.connected += 1
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        kind = self.kind
        if kind == "pong":
            self._write(c, self.hello)  # then flood on every writable event
            return
        self._arm(c, self._IN)
        if kind == "bigframe":
            self._write(c, self.first)
            c.body_left = self.body - 1  # never the last byte: the frame stays incomplete
            self._later(self.rng.random() * self.dribble_every, "dribble", c)
        elif kind == "login":
            self._write(c, self.hello + self._next_login())
        elif kind == "slots":
            self._write(c, self.hello)
        # timeouts: say nothing at all

    def _next_login(self) -> bytes:
        frame = self.logins[self.logins_sent % len(self.logins)]
        self.logins_sent += 1
        return frame

    def _dribble(self, c: _AConn) -> None:
        if self.by_fd.get(c.fd) is not c or c.body_left <= 0:  # closed meanwhile (its fd may be reused)
            return
        sent = self._send(c, self.zeros[:min(self.chunk, c.body_left)])
        if sent is None:
            return
        c.body_left -= sent
        if c.body_left > 0:
            self._later(self.dribble_every, "dribble", c)

    def _writable(self, c: _AConn) -> None:
        if c.connecting:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                del self.by_fd[c.fd]
                self.poll.unregister(c.fd)
                c.sock.close()
                self._connect_failed(c.slot, err)
                return
            self._on_connected(c)
            if c.fd not in self.by_fd:
                return
        if c.out:
            sent = self._send(c, c.out)
            if not sent:
                return
            c.out = c.out[sent:]
            if c.out:
                return
        if self.kind == "pong":
            for _ in range(4):
                sent = self._send(c, self.flood[c.off:c.off + 65536])
                if not sent:
                    return
                c.off = (c.off + sent) % self.period
        else:
            self._arm(c, self._IN)

    def _readable(self, c: _AConn) -> None:
        if c.connecting:
            self._writable(c)
            if c.fd not in self.by_fd or c.connecting:
                return
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._closed(c)
            return
        buf = c.inb + data if c.inb else data
        pos = 0
        while len(buf) - pos >= 10:
            length, ftype, _flags, rid = _HDR.unpack_from(buf, pos)
            end = pos + 10 + length
            if end > len(buf):
                break
            if ftype in (_ERROR, _BYE):
                try:
                    event = proto.decode(bytes(buf[pos:end]))
                    what = f"{type(event).__name__.upper()} {(event.code if ftype == _ERROR else event.reason).name}"
                except proto.RemoteProtocolError:
                    what = f"undecodable {ftype}"
                self.replies[what] += 1
                if ftype == _ERROR:
                    c.errors += 1
                    if self.kind == "login" and rid:
                        self._write(c, self._next_login())  # a refused guess: guess again at once
                        if c.fd not in self.by_fd:
                            return
            elif ftype == _WELCOME and not c.welcomed:
                c.welcomed = True
                self.held_now += 1
                self.peak_held = max(self.peak_held, self.held_now)
            elif ftype == _AUTH_OK:
                self.replies["AUTH_OK"] += 1
            elif ftype != _WELCOME and ftype != _PING:
                self.replies[f"frame 0x{ftype:02x}"] += 1
            pos = end
        c.inb = buf[pos:] if len(buf) - pos < (1 << 20) else b""

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        next_open = self.start
        slot = 0
        topup_every = 0.05
        pipe_fd = self.pipe.fileno()
        drain_until = 0.0
        while True:
            now = time.monotonic()
            if self.stopping:
                if self.open_now <= 0 or now >= drain_until:
                    return self._finish(usage0)
            elif not self.ramp_done:
                while next_open <= now and slot < self.target:
                    if self.kind == "slots" and (self.refused >= self.spec["refusals_to_stop"] or
                                                 self.open_now - self.held_now >= 500):
                        break  # refused enough; or many still unanswered: see what the server says first
                    self._open(slot)
                    slot += 1
                    next_open += self.ramp_interval
                    if next_open < now - 0.1:
                        next_open = now  # far behind: do not burst to catch up
                self.full = self.kind == "slots" and self.refused >= self.spec["refusals_to_stop"]
                if slot >= self.target or self.full:
                    self.ramp_done = True
                    self.ramp_s = now - self.start
                    next_open = now + topup_every
            elif self.full and next_open <= now and not self.stopping:
                self._open(slot)  # keep knocking: take back any slot that frees up
                slot += 1
                next_open = now + topup_every
            while self.timers and self.timers[0][0] <= now:
                _, _, what, arg = heapq.heappop(self.timers)
                if what == "open":
                    if not self.stopping:
                        self._open(arg)
                elif what == "dribble":
                    self._dribble(arg)
            wake = max(next_open, now + 0.005) if (not self.ramp_done or self.full) else now + 0.05
            if self.timers:
                wake = min(wake, self.timers[0][0])
            timeout = min(max(wake - time.monotonic(), 0.0), 0.05)
            for fd, ev in self.poll.poll(timeout):
                if fd == pipe_fd:
                    # stop; with drain_s, first wait (up to that long) for the server to close what is open
                    self.stopping = True
                    self.stop_s = time.monotonic() - self.start
                    drain_until = time.monotonic() + self.pipe.recv().get("drain_s", 0.0)
                    continue
                c = self.by_fd.get(fd)
                if c is None:
                    continue
                if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    self._readable(c)
                if ev & select.EPOLLOUT and c.fd in self.by_fd:
                    self._writable(c)

    def _finish(self, usage0) -> dict:
        elapsed = time.monotonic() - self.start
        open_at_stop, held_at_stop = self.open_now, self.held_now
        for c in list(self.by_fd.values()):
            self._closed(c, by_server=False)
        self.poll.close()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        closes = sorted(self.close_times)
        return {
            "attack": self.kind, "elapsed_s": elapsed, "opened": self.opened, "connected": self.connected,
            "peak_open": self.peak_open, "peak_welcomed": self.peak_held, "open_at_stop": open_at_stop,
            "held_at_stop": held_at_stop, "stop_s": getattr(self, "stop_s", elapsed),
            "closed_by_server": self.closed_by_server,
            "refused": self.refused, "reopened": self.reopened, "bytes_sent": self.bytes_sent,
            "logins_sent": self.logins_sent, "replies": dict(self.replies.most_common()),
            "connect_errors": dict(self.connect_errors), "ramp_s": getattr(self, "ramp_s", None),
            "first_close_s": closes[0] if closes else None, "last_close_s": closes[-1] if closes else None,
            "close_p90_s": closes[int(0.9 * (len(closes) - 1))] if closes else None,
            "cpu_s": cpu, "cpu_util": cpu / max(elapsed, 1e-6),
        }


def _serve_attack(cmd: dict, pipe) -> dict:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    return _Attack(cmd, pipe).run()


# -- the honest prober (trio) -----------------------------------------------------------------------------------------

class _Closed(Exception):
    pass


class _Peer:
    """One honest connection from HONEST_SOURCE: whole frames in, events out (proto.decode)."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = bytearray()
        self.rid = 0
        self.lock = trio.Lock()

    @classmethod
    async def open(cls, port: int) -> "_Peer":
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await sock.bind((HONEST_SOURCE, 0))
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return cls(trio.SocketStream(sock))

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    async def send(self, event) -> None:
        async with self.lock:
            try:
                await self.stream.send_all(proto.encode(event))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Closed(f"send: {exc}") from None

    async def next(self):
        while True:
            if len(self.buf) >= 10:
                length = _HDR.unpack_from(self.buf)[0]
                if len(self.buf) >= 10 + length:
                    frame = bytes(self.buf[:10 + length])
                    del self.buf[:10 + length]
                    event = proto.decode(frame)
                    if type(event) is proto.Ping:
                        await self.send(event.response())
                        continue
                    return event
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise _Closed("closed by the server")
            self.buf += data

    async def request(self, event, *want):
        """Send ``event``; the first ERROR/BYE or event of a type in ``want`` answers it (pushes skipped)."""
        await self.send(event)
        while True:
            reply = await self.next()
            if isinstance(reply, want):
                return reply
            if isinstance(reply, proto.Error) and reply.request_id in (0, event.request_id):
                raise _Closed(f"ERROR {reply.code.name}")
            if isinstance(reply, (proto.Bye, proto.GoAway)):
                raise _Closed(f"{type(reply).__name__.upper()} {reply.reason.name}")

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()


class _Prober:
    def __init__(self, cmd: dict):
        self.port = cmd["port"]
        self.interval_ns = int(cmd["probe_interval_s"] * 1e9)
        self.login_every_s = cmd["login_every_s"]
        self.probes: list[list] = []  # [due_ns, rtt_ns | None, status]
        self.pending: dict[int, list] = {}  # client_msg_id -> probe
        self.by_rid: dict[int, int] = {}
        self.waiting: list[list] = []  # probes lost to a dropped connection or never sent: resolved on reconnect
        self.logins: list[dict] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.disconnects = 0
        self.skipped_late = 0
        self.cmid = 0
        self.next_k = 0
        self.t0_ns = 0
        self.connected = False

    async def _hello(self, peer: _Peer) -> None:
        await peer.request(proto.Hello(1, 1, "honest-prober", request_id=peer.next_rid()), proto.Welcome)

    async def setup(self) -> None:
        for name in ("alice", "carol"):
            peer = await _Peer.open(self.port)
            try:
                await self._hello(peer)
                await peer.request(proto.Register(name, PASSWORD, request_id=peer.next_rid()), proto.AuthOk)
            finally:
                await peer.aclose()

    async def _log_in(self) -> _Peer:
        peer = await _Peer.open(self.port)
        try:
            await self._hello(peer)
            await peer.request(proto.Login("alice", PASSWORD, request_id=peer.next_rid()), proto.AuthOk)
            await peer.request(proto.Join(ROOM, request_id=peer.next_rid()), proto.Joined)
            await peer.request(proto.Sync((), request_id=peer.next_rid()), proto.SyncDone)
        except BaseException:
            await peer.aclose()
            raise
        return peer

    async def main_session(self, task_status) -> None:
        """alice's connection: log in, probe until it drops, log in again."""
        started = False
        while True:
            try:
                peer = await self._log_in()
            except (OSError, _Closed, proto.RemoteProtocolError) as exc:
                self.errors[f"alice login: {exc}"[:120]] += 1
                if not started:
                    raise
                await trio.sleep(0.2)
                continue
            now = time.monotonic_ns()
            if not started:
                started = True
                self.t0_ns = now
                task_status.started()
            self._back_up(now)
            self.connected = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, peer)
                why = await self._reader(peer)
                nursery.cancel_scope.cancel()
            self.errors[f"alice: {why}"[:120]] += 1
            self.connected = False
            self.disconnects += 1
            self.waiting.extend(self.pending.values())
            for probe in self.pending.values():
                probe[2] = "lost"
            self.pending.clear()
            await peer.aclose()

    def _back_up(self, now: int) -> None:
        """alice is connected again (or the run ends): what she lost or could not send waited until now."""
        for probe in self.waiting:
            probe[1] = now - probe[0]
        self.waiting.clear()
        while (due := self.t0_ns + self.next_k * self.interval_ns) < now:
            self.probes.append([due, now - due, "down"])
            self.next_k += 1

    async def _sender(self, peer: _Peer) -> None:
        try:
            await self._send_probes(peer)
        except _Closed:
            pass  # the reader sees the connection end too, and says why

    async def _send_probes(self, peer: _Peer) -> None:
        conv = proto.Conversation.room(ROOM)
        while True:
            due = self.t0_ns + self.next_k * self.interval_ns
            self.next_k += 1
            delay = due - time.monotonic_ns()
            if delay > 0:
                await trio.sleep(delay / 1e9)
            elif -delay > self.interval_ns:
                self.skipped_late += 1  # the prober itself was late (CPU): not the server's doing
                continue
            self.cmid += 1
            rid = peer.next_rid()
            probe = [time.monotonic_ns(), None, "pending"]
            self.probes.append(probe)
            self.pending[self.cmid] = probe
            self.by_rid[rid] = self.cmid
            await peer.send(proto.Send(conv, self.cmid, probe_body(self.cmid, probe[0]).decode(), request_id=rid))

    async def _reader(self, peer: _Peer) -> str:
        """Match replies to probes until the connection ends; returns why it ended."""
        while True:
            try:
                event = await peer.next()
            except (_Closed, proto.RemoteProtocolError) as exc:
                return str(exc)
            kind = type(event)
            if kind is proto.Message:
                probe = self.pending.pop(event.client_msg_id, None) if event.sender == "alice" else None
                if probe is not None:
                    probe[1] = time.monotonic_ns() - probe[0]
                    probe[2] = "ok"
            elif kind is proto.Ack:
                self.by_rid.pop(event.request_id, None)
            elif kind is proto.Error:
                cmid = self.by_rid.pop(event.request_id, None)
                self.errors[f"ERROR {event.code.name}"] += 1
                probe = self.pending.pop(cmid, None) if cmid is not None else None
                if probe is not None:
                    probe[2] = f"refused {event.code.name}"
            elif kind in (proto.Bye, proto.GoAway):
                return f"{kind.__name__.upper()} {event.reason.name}"

    async def logins_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            i = 0
            while True:
                if sum(1 for r in self.logins if r["outcome"] is None) < 3:
                    record = {"t_ns": time.monotonic_ns(), "name": ("alice", "carol")[i % 2], "outcome": None,
                              "login_ms": None, "total_ms": None}
                    self.logins.append(record)
                    nursery.start_soon(self._one_login, record)
                    i += 1
                await trio.sleep(self.login_every_s)

    async def _one_login(self, record: dict) -> None:
        peer = None
        try:
            peer = await _Peer.open(self.port)
            await self._hello(peer)
            t1 = time.monotonic_ns()
            await peer.request(proto.Login(record["name"], PASSWORD, request_id=peer.next_rid()), proto.AuthOk)
            t2 = time.monotonic_ns()
            record.update(outcome="ok", login_ms=(t2 - t1) / 1e6, total_ms=(t2 - record["t_ns"]) / 1e6)
        except (_Closed, proto.RemoteProtocolError) as exc:
            record.update(outcome=str(exc), total_ms=(time.monotonic_ns() - record["t_ns"]) / 1e6)
        except OSError as exc:
            record.update(outcome=f"connect: {errno.errorcode.get(exc.errno, exc)}",
                          total_ms=(time.monotonic_ns() - record["t_ns"]) / 1e6)
        finally:
            if peer is not None:
                await peer.aclose()

    def result(self) -> dict:
        now = time.monotonic_ns()
        if not self.connected:
            self._back_up(now)
        for probe in self.probes:
            if probe[1] is None:
                probe[1] = now - probe[0]
                if probe[2] == "pending":
                    probe[2] = "unanswered"
        for record in self.logins:
            if record["outcome"] is None:
                record.update(outcome="unfinished", total_ms=(now - record["t_ns"]) / 1e6)
        return {"probes": self.probes, "logins": self.logins, "errors": dict(self.errors),
                "disconnects": self.disconnects, "skipped_late": self.skipped_late}


async def _prober_session(pipe, cmd: dict) -> dict:
    prober = _Prober(cmd)
    with trio.fail_after(60):
        await prober.setup()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await nursery.start(prober.main_session)
        nursery.start_soon(prober.logins_loop)
        pipe.send({"ready": True})
        await trio.lowlevel.wait_readable(pipe.fileno())
        pipe.recv()  # stop
        nursery.cancel_scope.cancel()
    return prober.result()


def _serve_probe(cmd: dict, pipe) -> dict:
    return trio.run(_prober_session, pipe, cmd)


# -- the controller ---------------------------------------------------------------------------------------------------

def _child_main(pipe, serve) -> None:
    """A helper process: each command from the controller is answered with ``serve(cmd, pipe)``'s result."""
    while True:
        try:
            cmd = pipe.recv()
        except EOFError:
            return
        if cmd["cmd"] == "exit":
            return
        try:
            pipe.send(serve(cmd, pipe))
        except BaseException:
            pipe.send({"error": traceback.format_exc()})


class _Child:
    """The prober or the attacker process, driven over a pipe."""

    def __init__(self, ctx, name: str, serve):
        self.name = name
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(child, serve), daemon=True, name=f"bench-{name}")
        self.proc.start()
        child.close()

    def send(self, msg: dict) -> None:
        self.pipe.send(msg)

    def recv(self, timeout_s: float) -> dict:
        if not self.pipe.poll(timeout_s):
            raise RuntimeError(f"the {self.name} did not answer within {timeout_s:.0f}s")
        reply = self.pipe.recv()
        if "error" in reply:
            raise RuntimeError(f"the {self.name} failed:\n{reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.pipe.send({"cmd": "exit"})
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class _Code:
    """The server's code as it is when the scenario starts: a copy of server/, proto/ and the bench's entry point,
    so that every attack of a run measures the same code while people edit the checkout."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="chorus-bench-attack-code-"))
        for package in ("server", "proto"):
            shutil.copytree(REPO / package, self.root / package, ignore=shutil.ignore_patterns("__pycache__"))
        (self.root / "bench").mkdir()
        for name in ("__init__.py", "chorus_server.py"):
            shutil.copy2(REPO / "bench" / name, self.root / "bench" / name)
        digest = hashlib.sha1()  # as run.code_fingerprint, over the copy
        for path in sorted([*self.root.glob("server/*.py"), *self.root.glob("proto/*.py")]):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        self.fingerprint = digest.hexdigest()[:12]
        self.env = {**os.environ, "PYTHONPATH": str(self.root)}
        out = subprocess.run([sys.executable, "-m", "chorus.server", "--help"], cwd=self.root, capture_output=True,
                             text=True, env=self.env).stdout
        self.flags = set(re.findall(r"(--[a-z0-9-]+)", out))  # options come and go while the server is worked on

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _start_server(attack: str, sizes: AttackSizes, code: _Code) -> tuple[Endpoint, list[str]]:
    tmp = Path(tempfile.mkdtemp(prefix=f"chorus-bench-attack-{attack}-"))
    flags = ["--log-level", "WARNING"]
    if "--user-send-rate-per-s" in code.flags:
        flags += ["--user-send-rate-per-s", "1000", "--user-send-burst", "1000"]  # the prober's 50 SENDs/s
    if attack == "timeouts":
        flags += ["--handshake-timeout-s", str(sizes.handshake_timeout_s)]
    cmd = [sys.executable, "-m", "bench.chorus_server", "--host", "127.0.0.1", "--port", "0", "--data-dir",
           str(tmp / "data"), *flags]
    log_path = tmp / "server.log"
    stats_path = tmp / "stats.json"
    env = {**code.env, "CHORUS_BENCH_STATS": str(stats_path)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=code.root, stdout=subprocess.PIPE, stderr=log, env=env)
    try:
        line = _read_first_line(proc, 30)
        match = re.search(r"listening on [^\s:]+:(\d+)", line)
        if not match:
            raise RuntimeError(f"unexpected first line {line!r}")
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        proc.wait()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"chorus server did not start: {exc}; {' | '.join(tail)}") from None
    return Endpoint("chorus-tcp", proc, int(match.group(1)), tmp, stats_path=stats_path, log_path=log_path), flags


def _attack_spec(attack: str, sizes: AttackSizes, port: int) -> dict:
    conns = {"pong": sizes.pong_conns, "bigframe": sizes.bigframe_conns, "login": sizes.login_conns,
             "slots": sizes.slot_cap, "timeouts": sizes.timeout_conns}[attack]
    if attack == "slots":
        sources = [ATTACK_SOURCE]
        per_source = conns
    else:
        per_source = sizes.per_source
        sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(math.ceil(conns / per_source))]
    return {"cmd": "start", "attack": attack, "port": port, "conns": conns, "sources": sources,
            "per_source": per_source, "ramp_per_s": 1e6 if attack == "timeouts" else sizes.ramp_per_s,
            "body_bytes": sizes.bigframe_body_bytes, "dribble_s": 0.7 * sizes.attack_s,
            "refusals_to_stop": sizes.refusals_to_stop}


class _Watch:
    """RSS and liveness of the server, sampled every 100 ms while the controller waits."""

    def __init__(self, ep: Endpoint):
        self.ep = ep
        self.samples: list[tuple[int, int]] = []  # (monotonic ns, RSS KB)
        self.exit_code: int | None = None

    def until(self, deadline_ns: int) -> None:
        while True:
            self.sample()
            left = deadline_ns - time.monotonic_ns()
            if left <= 0 or self.exit_code is not None:
                return
            time.sleep(min(0.1, left / 1e9))

    def sample(self) -> int | None:
        if self.ep.proc.poll() is not None:
            self.exit_code = self.ep.proc.returncode
            return None
        try:
            kb = self.ep.rss_kb()
        except OSError:
            return None
        self.samples.append((time.monotonic_ns(), kb))
        return kb

    def peak(self, t0: int, t1: int) -> int | None:
        values = [kb for t, kb in self.samples if t0 <= t < t1]
        return max(values) if values else None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Meter:
    """CPU of the server, of the bench's own processes, and of everything else on the machine (other people's
    work on a shared machine: the noise in every figure here)."""

    def __init__(self, ep: Endpoint, ours: list[int]):
        self.ep, self.ours = ep, ours

    def read(self) -> tuple[float, float, float, float]:
        return (time.monotonic(), _cpu_s(self.ep.pid), sum(_cpu_s(p) for p in self.ours) + sum(os.times()[:2]),
                machine_busy_s())

    @staticmethod
    def cores(a, b) -> dict:
        wall = max(b[0] - a[0], 1e-6)
        server, bench, busy = (b[1] - a[1]) / wall, (b[2] - a[2]) / wall, (b[3] - a[3]) / wall
        return {"server_cores": server, "bench_cores": bench, "others_cores": max(0.0, busy - server - bench)}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[max(0, math.ceil(q * len(values)) - 1)]


def _window(result: dict, t0: int, t1: int) -> dict:
    probes = [p for p in result["probes"] if t0 <= p[0] < t1]
    rtts = sorted(p[1] / 1e6 for p in probes if p[2] in ("ok", "lost", "down", "unanswered"))
    statuses = collections.Counter(p[2] for p in probes)
    logins = [r for r in result["logins"] if t0 <= r["t_ns"] < t1]
    out = {"probes": len(probes), "p50_ms": _pct(rtts, 0.5), "p99_ms": _pct(rtts, 0.99),
           "max_ms": rtts[-1] if rtts else None, "statuses": dict(statuses),
           "not_ok": sum(n for s, n in statuses.items() if s != "ok"), "logins": {}}
    for name in ("alice", "carol"):
        mine = [r for r in logins if r["name"] == name]
        ok = sorted(r["login_ms"] for r in mine if r["outcome"] == "ok")
        out["logins"][name] = {"tries": len(mine), "ok": len(ok), "login_p50_ms": _pct(ok, 0.5),
                               "login_max_ms": ok[-1] if ok else None,
                               "slowest_ms": max((r["total_ms"] or 0 for r in mine), default=None),
                               "outcomes": dict(collections.Counter(r["outcome"] for r in mine))}
    return out


def _run_one(attack: str, sizes: AttackSizes, code: _Code, prober: _Child, attacker: _Child, log) -> dict:
    """Baseline, attack and after windows of one attack on a fresh server; returns the row."""
    row: dict = {"attack": attack, "title": TITLES[attack], "status": "ok", "note": ""}
    ep = None
    try:
        ep, flags = _start_server(attack, sizes, code)
        row["server_flags"] = flags
        row["code"] = code.fingerprint
        watch = _Watch(ep)
        meter = _Meter(ep, [prober.proc.pid, attacker.proc.pid])
        prober.send({"cmd": "start", "port": ep.port, "probe_interval_s": sizes.probe_interval_s,
                     "login_every_s": sizes.login_every_s})
        prober.recv(90)
        watch.until(time.monotonic_ns() + int(sizes.settle_s * 1e9))
        t_b0 = time.monotonic_ns()
        m0 = meter.read()
        watch.until(t_b0 + int(sizes.baseline_s * 1e9))
        watch.sample()
        t_a0 = time.monotonic_ns()
        # The honest fresh logins hash passwords (argon2: 19 MiB each, freed after) in every window, so the
        # reference is the baseline's peak, not one sample that may fall between two hashes.
        rss_before = watch.peak(t_b0, t_a0 + 1)
        m1 = meter.read()
        attacker.send(_attack_spec(attack, sizes, ep.port))
        watch.until(t_a0 + int(sizes.attack_s * 1e9))
        # Mass timeouts: the window lasts until the server has closed them all (or another attack_s passed).
        attacker.send({"cmd": "stop", "drain_s": sizes.attack_s if attack == "timeouts" else 0.0})
        while not attacker.pipe.poll(0.1):
            watch.sample()
        row["attacker"] = attacker.recv(1)
        t_a1 = time.monotonic_ns()
        m2 = meter.read()
        watch.until(t_a1 + int(sizes.after_s * 1e9))
        t_end = time.monotonic_ns()
        m3 = meter.read()
        rss_after = watch.sample()
        prober.send({"cmd": "stop"})
        probe = prober.recv(60)
        stats = ep.stats() if watch.exit_code is None else None
        attack_s = (t_a1 - t_a0) / 1e9
        row.update({
            "windows": {"baseline": _window(probe, t_b0, t_a0),
                        "attack": _window(probe, t_a0, t_a1),
                        "after": _window(probe, t_a1, t_end)},
            "honest_disconnects": probe["disconnects"], "honest_errors": probe["errors"],
            "prober_skipped_late": probe["skipped_late"],
            "rss_baseline_peak_kb": rss_before, "rss_peak_kb": watch.peak(t_a0, t_a1 + 1), "rss_after_kb": rss_after,
            "cpu": {"baseline": meter.cores(m0, m1), "attack": meter.cores(m1, m2), "after": meter.cores(m2, m3)},
            "attack_window_s": attack_s,
            "server_exit_code": watch.exit_code,
            "server_close_reasons": (stats or {}).get("close_reasons"),
        })
        if watch.exit_code is not None:
            row["status"] = "server died"
            row["note"] = f"the server exited with code {watch.exit_code}: {ep.log_tail(3)}"
    except Exception as exc:
        row["status"] = "error"
        row["note"] = str(exc)[:2000]
        log(f"attack/{attack}: error: {exc}")
    finally:
        if ep is not None:
            if ep.proc.poll() is None:
                ep.proc.kill()  # measured already; a graceful shutdown would only wait out its grace period
                ep.proc.wait()
            ep.stop()
    _judge(row)
    return row


def _judge(row: dict) -> None:
    windows = row.get("windows") or {}
    base, under = windows.get("baseline") or {}, windows.get("attack") or {}
    b99, a99 = base.get("p99_ms"), under.get("p99_ms")
    row["ratio"] = a99 / b99 if a99 is not None and b99 else None
    attacker = row.get("attacker") or {}
    # Slot filling: the slots the server let the attacker hold (the rest were refused at the door).
    conns = (attacker.get("peak_welcomed") if row["attack"] == "slots" else attacker.get("peak_open")) or 0
    row["attack_conns"] = conns
    if row.get("rss_peak_kb") is not None and row.get("rss_baseline_peak_kb") is not None:
        growth = max(0, row["rss_peak_kb"] - row["rss_baseline_peak_kb"]) / 1024
        row["rss_growth_mb"] = growth
        row["rss_mb_per_1000"] = growth / max(conns, 1000) * 1000
        row["rss_retained_mb"] = (row["rss_after_kb"] - row["rss_baseline_peak_kb"]) / 1024 \
            if row.get("rss_after_kb") is not None else None
    else:
        row["rss_growth_mb"] = row["rss_mb_per_1000"] = row["rss_retained_mb"] = None
    logins = under.get("logins") or {}
    tries = sum(v["tries"] for v in logins.values())
    row["honest_logins_ok"] = sum(v["ok"] for v in logins.values())
    row["honest_logins_tried"] = tries
    why = []
    if row["status"] != "ok":
        why.append(row["status"])
    if row["ratio"] is None or row["ratio"] > RATIO_TARGET:
        why.append(f"p99 ratio {_fmt(row['ratio'], '.1f')}× > {RATIO_TARGET:g}")
    if row["rss_mb_per_1000"] is None or row["rss_mb_per_1000"] > RSS_TARGET_MB_PER_1000:
        why.append(f"RSS {_fmt(row['rss_mb_per_1000'], '.0f')} MB/1000 > {RSS_TARGET_MB_PER_1000:g}")
    row["verdict"] = "FAIL" if why else "PASS"
    row["why"] = why


def evaluate(rows: list[dict]) -> list[dict]:
    def all_of(check):
        return all(check(r) for r in rows) if rows else None

    return [
        {"target": f"honest round-trip p99 during each attack ≤ {RATIO_TARGET:g} × its p99 with no attack",
         "measured": {r["attack"]: r.get("ratio") for r in rows},
         "met": all_of(lambda r: r.get("ratio") is not None and r["ratio"] <= RATIO_TARGET)},
        {"target": f"server RSS growth ≤ {RSS_TARGET_MB_PER_1000:g} MB per 1,000 attacking connections",
         "measured": {r["attack"]: r.get("rss_mb_per_1000") for r in rows},
         "met": all_of(lambda r: r.get("rss_mb_per_1000") is not None and
                       r["rss_mb_per_1000"] <= RSS_TARGET_MB_PER_1000)},
        {"target": "an honest fresh login gets in during each attack (reported, not an issue-9 number)",
         "measured": {r["attack"]: f"{r.get('honest_logins_ok')}/{r.get('honest_logins_tried')}" for r in rows},
         "met": all_of(lambda r: r.get("honest_logins_tried") and r["honest_logins_ok"] == r["honest_logins_tried"])},
    ]


def run_scenario(sizes: AttackSizes, log, attacks=ATTACKS) -> dict:
    """Run every attack in ``attacks``; returns ``{"sizes", "rows", "targets", ...}`` for the results file."""
    ctx = multiprocessing.get_context("spawn")
    started = time.monotonic()
    code = _Code()
    prober = _Child(ctx, "prober", _serve_probe)
    attacker = _Child(ctx, "attacker", _serve_attack)
    rows = []
    try:
        for attack in attacks:
            log(f"attack/{attack} ...")
            row = _run_one(attack, sizes, code, prober, attacker, log)
            rows.append(row)
            log(f"attack/{attack}: {row['verdict']} ratio {_fmt(row.get('ratio'), '.2f')}, RSS "
                f"{_fmt(row.get('rss_mb_per_1000'), '.0f')} MB/1000 ({row.get('attack_conns')} conns), logins "
                f"{row.get('honest_logins_ok')}/{row.get('honest_logins_tried')} {'; '.join(row['why'])}")
    finally:
        prober.close()
        attacker.close()
        code.remove()
    return {"sizes": dataclasses.asdict(sizes), "rows": rows, "targets": evaluate(rows),
            "code_fingerprint": code.fingerprint, "duration_s": round(time.monotonic() - started, 1),
            "loadavg_end": os.getloadavg()}


# -- reporting ---------------------------------------------------------------------------------------------------------

def _fmt(v, spec=".1f", none="–"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def _lat(w: dict | None) -> str:
    if not w:
        return "–"
    return f"{_fmt(w.get('p50_ms'))} / {_fmt(w.get('p99_ms'))} / {_fmt(w.get('max_ms'), '.0f')}"


def _logins(w: dict | None) -> str:
    if not w:
        return "–"
    parts = []
    for name, v in w["logins"].items():
        if not v["tries"]:
            continue
        text = f"{name} {v['ok']}/{v['tries']}"
        if v["ok"]:
            text += f" ≤{_fmt(v['login_max_ms'], '.0f')} ms"
        bad = [f"{o}" for o in v["outcomes"] if o != "ok"]
        if bad:
            text += f" ({', '.join(bad)[:60]}; slowest {_fmt(v['slowest_ms'] / 1000, '.1f')} s)"
        parts.append(text)
    return "; ".join(parts) or "–"


def _answered(row: dict) -> str:
    a = row.get("attacker") or {}
    replies = list((a.get("replies") or {}).items())[:2]
    text = ", ".join(f"{k} ×{v}" for k, v in replies) or "nothing"
    if a.get("connect_errors"):
        text += "; connect " + ", ".join(f"{k} ×{v}" for k, v in a["connect_errors"].items())
    return text


def _cpu(row: dict) -> str:
    cpu = row.get("cpu") or {}
    b, a = cpu.get("baseline") or {}, cpu.get("attack") or {}
    attacker = (row.get("attacker") or {}).get("cpu_util")
    return (f"server {_fmt(b.get('server_cores'), '.2f')} → {_fmt(a.get('server_cores'), '.2f')}, attacker "
            f"{_fmt(attacker, '.2f')}, others {_fmt(b.get('others_cores'))} → {_fmt(a.get('others_cores'))}")


def render(results: dict, markdown: bool = False) -> str:
    """The attack tables, led by two blank lines (appended to the bench's other tables), or "" if none ran."""
    from .run import _table

    attack = results.get("attack")
    if not attack or not attack.get("rows"):
        return ""
    sizes = AttackSizes(**attack["sizes"])
    nl = "\n\n" if markdown else "\n"
    lines, detail = [], []
    for row in attack["rows"]:
        if row["status"] == "error":
            lines.append([row["title"], "error", "", "", "", "", "", "", row["note"].splitlines()[0][:80]])
            continue
        a = row.get("attacker") or {}
        windows = row.get("windows") or {}
        lines.append([
            row["title"], f"{row['attack_conns']:,}", _lat(windows.get("baseline")), _lat(windows.get("attack")),
            f"{_fmt(row.get('ratio'), '.2f')}×", _lat(windows.get("after")),
            f"{_fmt(row.get('rss_growth_mb'), '.0f')} ({_fmt(row.get('rss_mb_per_1000'), '.0f')}/1000)",
            row["verdict"], "; ".join(row["why"]) or ""])
        w = windows.get("attack") or {}
        lost = {k: v for k, v in (w.get("statuses") or {}).items() if k != "ok"}
        detail.append([
            row["title"], _logins(w), _answered(row),
            f"{a.get('opened', 0):,} opened, {a.get('closed_by_server', 0):,} closed by server"
            + (f", {a['refused']:,} refused" if a.get("refused") else "")
            + (f", first/last close at {_fmt(a.get('first_close_s'))}/{_fmt(a.get('last_close_s'))} s"
               if row["attack"] == "timeouts" else ""),
            _cpu(row),
            f"{_fmt((row.get('rss_baseline_peak_kb') or 0) / 1024, '.0f')}"
            f" → {_fmt((row.get('rss_peak_kb') or 0) / 1024, '.0f')}"
            f" → {_fmt((row.get('rss_after_kb') or 0) / 1024, '.0f')}",
            "; ".join(filter(None, [
                ", ".join(f"{k} {v}" for k, v in lost.items()),
                f"{row['honest_disconnects']} disconnects" if row.get("honest_disconnects") else "",
                f"prober late, skipped {row['prober_skipped_late']} in the run" if row.get("prober_skipped_late")
                else ""]))])
    head = (f"Under attack (issue 9): the honest client (127.0.0.2) SENDs every {sizes.probe_interval_s * 1000:g} ms "
            f"and times its own MESSAGE; windows of {sizes.baseline_s:g} s without attack, {sizes.attack_s:g} s under "
            f"attack, {sizes.after_s:g} s after; a fresh server per attack, default limits (one run, no repetitions); "
            f"server code {attack.get('code_fingerprint', '?')} (copied from the checkout when the scenario began)")
    parts = [head + nl + _table(
        ["attack", "attacker conns (peak open)", "baseline p50/p99/max ms", "under attack p50/p99/max ms",
         "p99 ratio", "after p50/p99/max ms", "RSS growth MB (per 1,000)", "verdict", "why"], lines,
        markdown=markdown)]
    if detail:
        parts.append("Under attack, details: fresh honest logins during the attack (ok/tries, LOGIN → AUTH_OK), "
                     "what the server answered the attacker, CPU in cores (baseline → attack; others = processes "
                     "outside the bench on this shared machine), "
                     "RSS MB (baseline peak → attack peak → after), probes that did not come back normally" + nl
                     + _table(["attack", "fresh logins", "server answered", "attacker connections", "CPU",
                               "RSS MB", "probes not ok"], detail, markdown=markdown))
    target_lines = [[t["target"], json.dumps({k: (round(v, 2) if isinstance(v, float) else v)
                                              for k, v in t["measured"].items()}, ensure_ascii=False),
                     {True: "met", False: "NOT met", None: "not measured"}[t["met"]]] for t in attack["targets"]]
    parts.append("Targets (issue 9)" + nl + _table(["target", "measured", "verdict"], target_lines,
                                                    markdown=markdown))
    return "\n\n" + "\n\n".join(parts)


# -- stand-alone: python -m bench.attack -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attack",
                                     description="only the under-attack scenario (python -m bench --scenarios attack "
                                                 "runs the same inside the bench)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    for item in args.size:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(AttackSizes)}:
            parser.error(f"unknown size {key}")
        sizes = dataclasses.replace(sizes, **{key: type(getattr(sizes, key))(value)})
    attacks = [a for a in args.attacks.split(",") if a]
    for a in attacks:
        if a not in ATTACKS:
            parser.error(f"unknown attack {a}")

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    result = run_scenario(sizes, log, attacks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("attack-smoke" if args.smoke else "attack")
    results = {"meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": "python -m bench.attack "
                        + " ".join(argv if argv is not None else sys.argv[1:])}, "attack": result}
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(render(results, markdown=True).lstrip() + "\n")
    print(render(results).lstrip())
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
