"""Load-generator worker processes: many client connections on non-blocking sockets, one epoll loop.

The controller (``bench/run.py``) starts workers with ``multiprocessing`` (spawn) and drives each over a
pipe with commands: ``setup`` (open, handshake, log in, join, sync), then measurement phases (``fanout``,
``durable``, ``mixed``, ``idle``), then ``close``. Each reply carries what the worker saw and its own CPU
time (``getrusage``), so every result says whether the server or the generator was the limit.

Latency comes from inside the messages: every message a worker sends is a *probe* whose 100-byte body
ends with ``time.monotonic_ns()`` as 19 ASCII digits (CLOCK_MONOTONIC is one clock for every process of
the machine). Receivers stay cheap because they measure the server, not the parser:

- Chorus (spec/PROTOCOL.md §2): the 10-byte header is read with ``struct``; a MESSAGE body ends with the
  message text, so the timestamp is the frame's last 19 bytes. ACK and HISTORY_PAGE are matched by the
  header's request id; PING is answered by echoing its 8-byte body as PONG. Every other frame (setup
  replies, errors) is fully decoded with ``proto.decode``, and one MESSAGE in ``CHECK_EVERY`` is too, as
  a cross-check of the fast path.
- MQTT (bench/mqtt.py): a QoS 0 PUBLISH ends with its payload, so the same tail trick applies.
- WebSocket (bench/ws.py): server frames are unmasked; a binary message is either a Chorus frame (the
  Chorus bridge, one frame per message, §1) or the raw probe body (the ``websockets`` reference server).

Sends are written through at once; only what the kernel refuses is buffered until EPOLLOUT.
"""
from __future__ import annotations

import array
import collections
import errno
import os
import random
import resource
import select
import socket
import struct
import time
import traceback

from hdrh.histogram import HdrHistogram

from chorus import proto
from chorus.proto import FrameType

from . import mqtt, ws

BODY_BYTES = 100
TS_DIGITS = 19
PASSWORD = "bench-password"
CHECK_EVERY = 512  # fully decode one MESSAGE in this many
HIST_MAX_US = 60_000_000
_IP_BIND_ADDRESS_NO_PORT = 24  # Linux: take the source port at connect(), per 4-tuple
_RECV_BYTES = 262144

_HDR = struct.Struct(">IBBI")
_MESSAGE = int(FrameType.MESSAGE)
_ACK = int(FrameType.ACK)
_PING = int(FrameType.PING)
_PONG = int(FrameType.PONG)
_HISTORY_PAGE = int(FrameType.HISTORY_PAGE)
_COUNTED = {int(t): t.name for t in (FrameType.USER_TYPING, FrameType.PRESENCE, FrameType.RECEIPT, FrameType.PONG)}

_IN, _OUT, _ERRS = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP


def probes(first: int, count: int, now_ns: int) -> bytes:
    """``count`` probe bodies back to back: one publish carrying a whole burst (the peers' coalesced burst)."""
    return b"".join(probe_body(first + i, now_ns) for i in range(count))


def read_probes(lat, data, end: int, per_message: int, now: int) -> int:
    """The latency of each of the ``per_message`` probes that end a message at ``end``; returns how many."""
    for i in range(per_message):
        stop = end - i * BODY_BYTES
        lat.append(now - int(data[stop - TS_DIGITS:stop]))
    return per_message


def probe_body(seq: int, now_ns: int) -> bytes:
    """100 ASCII bytes ending with the send time; the same body for every system."""
    head = b"%08d:" % (seq % 100_000_000)
    return head + b"." * (BODY_BYTES - len(head) - TS_DIGITS) + b"%019d" % now_ns


def encode_histogram(values_ns) -> bytes:
    """An HDR histogram (µs, 3 significant digits) of ``values_ns``, encoded for the pipe."""
    hist = HdrHistogram(1, HIST_MAX_US, 3)
    for us, count in collections.Counter(min(max(v // 1000, 1), HIST_MAX_US) for v in values_ns).items():
        hist.record_value(us, count)
    return hist.encode()


class SetupError(Exception):
    pass


class Conn:
    """One client socket: write-through output, a receive buffer, and a setup state."""

    kind = "?"

    def __init__(self, worker: "Worker", index: int, room: str):
        self.w = worker
        self.index = index  # global index: names and rooms derive from it
        self.room = room
        self.sock: socket.socket | None = None
        self.fd = -1
        self.out = bytearray()
        self.inb = b""
        self.connecting = True
        self.ready = False
        self.closed = False
        self.writable_armed = True
        self.rid = 0
        self.cmid = 0
        self.pending: dict[int, int] = {}  # request id -> send time (ns)
        self.next_ping_ns = 0

    # -- socket plumbing ------------------------------------------------------------------------------------
    def open(self, host: str, port: int, source: str | None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise SetupError(f"connect: {os.strerror(err)}")
        self.sock, self.fd = sock, sock.fileno()
        self.w.register(self)

    def write(self, data) -> None:
        if self.closed:
            return
        if self.out or self.connecting:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.fail(f"send: {exc}")
            return
        if sent < len(data):
            self.out += memoryview(data)[sent:]
            self.w.arm(self, True)

    def on_writable(self) -> None:
        if self.closed:
            return
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(f"connect: {os.strerror(err)}")
                return
            self.connecting = False
            self.on_connected()
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(f"send: {exc}")
                return
            del self.out[:sent]
        if not self.out:
            self.w.arm(self, False)

    def on_readable(self, now: int) -> None:
        if self.closed or self.connecting:
            return
        try:
            data = self.sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(f"recv: {exc}")
            return
        if not data:
            self.fail("closed by the server")
            return
        if self.inb:
            data = self.inb + data
        used = self.feed(data, now)
        self.inb = data[used:] if used < len(data) else b""

    def fail(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.w.conn_failed(self, why)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.sock is not None:
            self.w.unregister(self)
            self.sock.close()
            self.sock = None

    def set_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.w.conn_ready(self)

    def next_rid(self) -> int:
        self.rid = self.rid % 0xFFFFFFFF + 1
        return self.rid

    # -- per protocol -----------------------------------------------------------------------------------------
    def on_connected(self) -> None:
        raise NotImplementedError

    def feed(self, data: bytes, now: int) -> int:
        """Consume whole frames from ``data``; returns how many bytes were used."""
        raise NotImplementedError

    def send_probe(self, seq: int) -> None:
        raise NotImplementedError

    def send_batch(self, first: int, count: int) -> None:
        """``count`` probes in one message (peers only: a Chorus SEND carries one)."""
        raise NotImplementedError

    def heartbeat(self) -> None:
        """Client-side keepalive, for protocols where the client must ping (MQTT)."""


class ChorusConn(Conn):
    """HELLO → REGISTER → JOIN → SYNC, then probes as SEND; frames parsed on the fast path."""

    kind = "chorus"

    def __init__(self, worker, index, room):
        super().__init__(worker, index, room)
        self.conv = proto.Conversation.room(room)
        self.step = "hello"

    def on_connected(self) -> None:
        self.send_frame(proto.encode(proto.Hello(1, 1, "chorus-bench", request_id=self.next_rid())))

    def send_frame(self, frame: bytes) -> None:
        self.write(frame)

    def send_probe(self, seq: int) -> None:
        self.cmid += 1
        rid = self.next_rid()
        now = time.monotonic_ns()
        self.pending[rid] = now
        self.send_frame(proto.encode(proto.Send(self.conv, self.cmid, probe_body(seq, now).decode("ascii"),
                                                request_id=rid)))

    def send_typing(self) -> None:
        self.send_frame(proto.encode(proto.Typing(self.conv, request_id=self.next_rid())))

    def send_history(self) -> None:
        rid = self.next_rid()
        self.pending[rid] = time.monotonic_ns()
        self.send_frame(proto.encode(proto.History(self.conv, proto.Direction.BEFORE, 0, 20, request_id=rid)))

    def feed(self, data, now):
        w = self.w
        lat = w.lat
        unpack = _HDR.unpack_from
        n = len(data)
        pos = got = 0
        while n - pos >= 10:
            length, ftype, _flags, rid = unpack(data, pos)
            end = pos + 10 + length
            if end > n:
                break
            if ftype == _MESSAGE:
                lat.append(now - int(data[end - TS_DIGITS:end]))
                got += 1
                last = pos
            else:
                self.frame(ftype, rid, data, pos, end, now)
            pos = end
        if got and w.delivered(got, now):
            self.check_message(bytes(data[last:last + 10 + _HDR.unpack_from(data, last)[0]]))
        return pos

    def frame(self, ftype: int, rid: int, data, pos: int, end: int, now: int) -> None:
        w = self.w
        if ftype == _ACK or ftype == _HISTORY_PAGE:
            sent = self.pending.pop(rid, None)
            if sent is not None:
                w.replied(self, ftype == _ACK, now - sent, now)
        elif ftype == _PING:
            self.send_frame(_HDR.pack(8, _PONG, 0, rid) + bytes(data[pos + 10:end]))
            w.counts["PING answered"] += 1
        elif ftype in _COUNTED:
            w.counts[_COUNTED[ftype]] += 1
        else:
            try:
                event = proto.decode(bytes(data[pos:end]))
            except proto.RemoteProtocolError as exc:
                self.fail(f"undecodable frame type {ftype}: {exc}")
                return
            self.event(event, now)

    def check_message(self, frame: bytes) -> None:
        """Cross-check of the fast path: the frame decodes and its body ends with the timestamp we read."""
        event = proto.decode(frame)
        if type(event) is not proto.Message or len(event.body) != BODY_BYTES or not event.body[-TS_DIGITS:].isdigit():
            self.w.errors[f"fast path disagrees with proto.decode: {event!r}"[:200]] += 1

    def event(self, event, now: int) -> None:
        kind = type(event)
        if kind is proto.Welcome:
            self.send_frame(proto.encode(proto.Register(f"u{self.index}", PASSWORD, request_id=self.next_rid())))
        elif kind is proto.AuthOk:
            self.send_frame(proto.encode(proto.Join(self.room, request_id=self.next_rid())))
        elif kind is proto.Joined:
            self.send_frame(proto.encode(proto.Sync((), request_id=self.next_rid())))
        elif kind is proto.SyncDone:
            self.set_ready()
        elif kind is proto.SyncPage:
            pass
        elif kind is proto.Error:
            self.w.errors[f"ERROR {event.code.name}: {event.message}"[:200]] += 1
            if not self.ready:
                self.fail(f"ERROR {event.code.name} during setup: {event.message}")
            elif self.pending.pop(event.request_id, None) is not None:
                self.w.refused(self)
        elif kind in (proto.Bye, proto.GoAway):
            self.w.errors[f"{kind.__name__} {event.reason.name}"] += 1
        else:
            self.w.counts[kind.__name__] += 1


class ChorusWsConn(ChorusConn):
    """Chorus frames inside binary WebSocket messages (spec/PROTOCOL.md §1), one frame per message."""

    kind = "chorus-ws"

    def __init__(self, worker, index, room):
        super().__init__(worker, index, room)
        self.key = b""
        self.upgraded = False

    def on_connected(self) -> None:
        request, self.key = ws.handshake_request(self.w.host, self.w.port, self.w.ws_path)
        self.write(request)

    def send_frame(self, frame: bytes) -> None:
        self.write(ws.encode_frame(ws.BINARY, frame))

    def feed(self, data, now):
        pos = 0
        if not self.upgraded:
            head_end = data.find(b"\r\n\r\n")
            if head_end < 0:
                if len(data) > 16384:
                    self.fail("WebSocket handshake reply too long")
                return 0
            try:
                ws.check_handshake_response(bytes(data[:head_end]), self.key)
            except ws.HandshakeError as exc:
                self.fail(f"WebSocket handshake refused: {exc}")
                return len(data)
            self.upgraded = True
            pos = head_end + 4
            ChorusConn.on_connected(self)
        w = self.w
        lat = w.lat
        unpack = _HDR.unpack_from
        n = len(data)
        got = 0
        while n - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if n - start < 2:
                    break
                length = (data[start] << 8) | data[start + 1]
                start += 2
            elif length == 127 or b1 & 0x80:
                parsed = ws.parse_frame(data, pos)
                if parsed is None:
                    break
                self.fail("server sent a masked or huge WebSocket frame")
                return n
            end = start + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode == ws.BINARY and length >= 10:
                ftype = data[start + 4]
                if ftype == _MESSAGE:
                    lat.append(now - int(data[end - TS_DIGITS:end]))
                    got += 1
                    last = (start, end)
                else:
                    _length, ftype, _flags, rid = unpack(data, start)
                    self.frame(ftype, rid, data, start, end, now)
            elif opcode == ws.PING:
                self.write(ws.encode_frame(ws.PONG, bytes(data[start:end])))
                w.counts["WS PING answered"] += 1
            elif opcode == ws.CLOSE:
                self.fail(f"WebSocket closed by the server: {bytes(data[start:end])!r}")
                return n
            elif opcode != ws.PONG:
                self.fail(f"unexpected WebSocket opcode {opcode}")
                return n
            pos = end
        if got and w.delivered(got, now):
            self.check_message(bytes(data[last[0]:last[1]]))
        return pos


class WsBroadcastConn(Conn):
    """A client of the ``websockets`` broadcast peer: the probe body is the whole binary message."""

    kind = "websockets"

    def __init__(self, worker, index, room):
        super().__init__(worker, index, room)
        self.key = b""
        self.upgraded = False

    def on_connected(self) -> None:
        request, self.key = ws.handshake_request(self.w.host, self.w.port, "/")
        self.write(request)

    def send_probe(self, seq: int) -> None:
        self.write(ws.encode_frame(ws.BINARY, probe_body(seq, time.monotonic_ns())))

    def send_batch(self, first: int, count: int) -> None:
        self.write(ws.encode_frame(ws.BINARY, probes(first, count, time.monotonic_ns())))

    def feed(self, data, now):
        pos = 0
        if not self.upgraded:
            head_end = data.find(b"\r\n\r\n")
            if head_end < 0:
                return 0
            try:
                ws.check_handshake_response(bytes(data[:head_end]), self.key)
            except ws.HandshakeError as exc:
                self.fail(f"WebSocket handshake refused: {exc}")
                return len(data)
            self.upgraded = True
            pos = head_end + 4
            self.set_ready()
        w = self.w
        lat = w.lat
        n = len(data)
        got = 0
        while n - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if n - start < 2:
                    break
                length = (data[start] << 8) | data[start + 1]
                start += 2
            elif length == 127 or b1 & 0x80:
                if ws.parse_frame(data, pos) is None:
                    break
                self.fail("server sent a masked or huge WebSocket frame")
                return n
            end = start + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode == ws.BINARY or opcode == ws.TEXT:
                got += read_probes(lat, data, end, w.per_message, now)
            elif opcode == ws.PING:
                self.write(ws.encode_frame(ws.PONG, bytes(data[start:end])))
                w.counts["WS PING answered"] += 1
            elif opcode == ws.CLOSE:
                self.fail(f"WebSocket closed by the server: {bytes(data[start:end])!r}")
                return n
            pos = end
        if got:
            w.delivered(got, now)
        return pos


class MqttConn(Conn):
    """CONNECT → SUBSCRIBE(room topic, QoS 0); probes are QoS 0 PUBLISHes to that topic."""

    kind = "mqtt"

    def __init__(self, worker, index, room):
        super().__init__(worker, index, room)
        self.topic = room.encode()

    def on_connected(self) -> None:
        self.write(mqtt.connect(f"bench-{self.index}", self.w.heartbeat_s))

    def send_probe(self, seq: int) -> None:
        self.write(mqtt.publish(self.topic, probe_body(seq, time.monotonic_ns())))

    def send_batch(self, first: int, count: int) -> None:
        self.write(mqtt.publish(self.topic, probes(first, count, time.monotonic_ns())))

    def heartbeat(self) -> None:
        self.write(mqtt.PINGREQ_PACKET)

    def feed(self, data, now):
        w = self.w
        lat = w.lat
        n = len(data)
        pos = got = 0
        parse = mqtt.parse_header
        while n - pos >= 2:
            try:
                parsed = parse(data, pos)
            except ValueError as exc:
                self.fail(str(exc))
                return n
            if parsed is None:
                break
            ptype, start, end = parsed
            if ptype == mqtt.PUBLISH:
                got += read_probes(lat, data, end, w.per_message, now)
            elif ptype == mqtt.PINGRESP:
                w.counts["PINGRESP"] += 1
            elif ptype == mqtt.CONNACK:
                if end - start != 2 or data[start + 1] != 0:
                    self.fail(f"CONNACK refused: {bytes(data[start:end])!r}")
                    return n
                self.write(mqtt.subscribe(1, self.room))
            elif ptype == mqtt.SUBACK:
                if data[end - 1] == 0x80:
                    self.fail("SUBACK refused")
                    return n
                self.set_ready()
            else:
                w.counts[f"MQTT type {ptype}"] += 1
            pos = end
        if got:
            w.delivered(got, now)
        return pos


CONN_TYPES = {"chorus": ChorusConn, "chorus-ws": ChorusWsConn, "websockets": WsBroadcastConn, "mqtt": MqttConn}


class Worker:
    """One process: its slice of the connections and the loop that serves them."""

    def __init__(self, pipe, spec: dict):
        self.pipe = pipe
        self.spec = spec
        self.host, self.port = spec["host"], spec["port"]
        self.ws_path = spec.get("ws_path", "/ws")
        self.heartbeat_s = int(spec.get("heartbeat_s", 60))
        self.ep = select.epoll()
        self.fds: dict[int, Conn] = {}
        self.conns: list[Conn] = []
        self.pipe_ready = False
        self.ep.register(pipe.fileno(), _IN)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.ready_count = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.reset()

    # -- bookkeeping used by connections ------------------------------------------------------------------------
    def reset(self) -> None:
        self.lat = array.array("q")
        self.reply_lat = {True: array.array("q"), False: array.array("q")}  # ACK, HISTORY_PAGE
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.received = 0
        self.last_recv_ns = 0
        self.acks = 0
        self.acks_in_window = 0
        self.outstanding = 0
        self.window_end_ns = 0
        self.on_ack = None
        self.checked = 0
        self.per_message = 1  # probes in each message a peer delivers (a coalesced burst: all of them)

    def delivered(self, count: int, now: int) -> bool:
        """Count ``count`` probes received at ``now``; True when one should be cross-checked by proto."""
        self.received += count
        self.last_recv_ns = now
        self.checked += count
        if self.checked >= CHECK_EVERY:
            self.checked = 0
            return True
        return False

    def replied(self, conn: Conn, is_ack: bool, latency_ns: int, now: int) -> None:
        self.reply_lat[is_ack].append(latency_ns)
        self.outstanding -= 1
        if is_ack:
            self.acks += 1
            if now <= self.window_end_ns:
                self.acks_in_window += 1
            if self.on_ack is not None:
                self.on_ack(conn, now)

    def refused(self, conn: Conn) -> None:
        self.outstanding -= 1
        if self.on_ack is not None:
            self.on_ack(conn, time.monotonic_ns())

    def conn_ready(self, conn: Conn) -> None:
        self.ready_count += 1

    def conn_failed(self, conn: Conn, why: str) -> None:
        self.failures[why[:200]] += 1
        if conn.ready:
            self.ready_count -= 1

    def register(self, conn: Conn) -> None:
        self.fds[conn.fd] = conn
        self.ep.register(conn.fd, _IN | _OUT)
        conn.writable_armed = True

    def arm(self, conn: Conn, writable: bool) -> None:
        if conn.writable_armed != writable and conn.fd in self.fds:
            conn.writable_armed = writable
            self.ep.modify(conn.fd, _IN | _OUT if writable else _IN)

    def unregister(self, conn: Conn) -> None:
        if self.fds.pop(conn.fd, None) is not None:
            try:
                self.ep.unregister(conn.fd)
            except OSError:
                pass

    # -- the loop --------------------------------------------------------------------------------------------------
    def poll(self, timeout_s: float) -> None:
        events = self.ep.poll(timeout_s)
        now = time.monotonic_ns()
        fds = self.fds
        for fd, mask in events:
            conn = fds.get(fd)
            if conn is None:
                self.pipe_ready = True
                continue
            if mask & _OUT:
                conn.on_writable()
            if mask & (_IN | _ERRS):
                conn.on_readable(now)

    def run_until(self, done, deadline_ns: int, tick=None) -> bool:
        """Serve sockets until ``done()`` (True) or the deadline (False); ``tick(now)`` returns its next time."""
        next_beat = time.monotonic_ns() + 1_000_000_000
        while True:
            now = time.monotonic_ns()
            if done():
                return True
            if now >= deadline_ns:
                return False
            wake = min(deadline_ns, next_beat)
            if tick is not None:
                t = tick(now)
                if t is not None:
                    wake = min(wake, t)
                if done():
                    return True
            if now >= next_beat:
                self.heartbeats(now)
                next_beat = now + 1_000_000_000
            self.poll(max(0.0, (wake - time.monotonic_ns()) / 1e9))

    def heartbeats(self, now: int) -> None:
        """Client keepalives (MQTT): each connection once per period, first at a random phase so that
        any window one period long holds exactly one heartbeat of every connection."""
        period = self.heartbeat_s * 1_000_000_000
        for conn in self.conns:
            if conn.ready and not conn.closed and conn.kind == "mqtt" and now >= conn.next_ping_ns:
                if conn.next_ping_ns:
                    conn.heartbeat()
                    conn.next_ping_ns += period
                else:
                    conn.next_ping_ns = now + random.randrange(period)

    # -- commands ------------------------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self.pipe.send({"pid": os.getpid()})
        while True:
            self.pipe_ready = False
            self.run_until(lambda: self.pipe_ready, time.monotonic_ns() + 3600 * 10**9)
            try:
                cmd = self.pipe.recv()
            except EOFError:
                return
            try:
                reply = getattr(self, "cmd_" + cmd["cmd"])(cmd)
            except Exception:
                reply = {"error": traceback.format_exc()}
            self.pipe.send(reply)
            if cmd["cmd"] == "close":
                return

    def _usage(self):
        return resource.getrusage(resource.RUSAGE_SELF)

    def _result(self, r0, t0_ns: int, extra: dict) -> dict:
        r1 = self._usage()
        wall_ns = time.monotonic_ns() - t0_ns
        result = {
            "received": self.received,
            "last_recv_ns": self.last_recv_ns,
            "cpu_user_s": r1.ru_utime - r0.ru_utime,
            "cpu_sys_s": r1.ru_stime - r0.ru_stime,
            "wall_s": wall_ns / 1e9,
            "acks": self.acks,
            "acks_in_window": self.acks_in_window,
            "counts": dict(self.counts),
            "errors": dict(self.errors.most_common(10)),
            "failures": dict(self.failures.most_common(10)),
            "ready": self.ready_count,
            **extra,
        }
        result["lat_hist"] = encode_histogram(self.lat)
        result["ack_hist"] = encode_histogram(self.reply_lat[True])
        result["history_hist"] = encode_histogram(self.reply_lat[False])
        return result

    def cmd_setup(self, cmd: dict) -> dict:
        spec = self.spec
        cls = CONN_TYPES[spec["kind"]]
        first, count, room_size = spec["first"], spec["count"], spec["room_size"]
        prefix = spec.get("room_prefix", "r")
        sources = spec.get("sources") or [None]
        started = time.monotonic()
        todo = collections.deque(range(first, first + count))
        concurrency = spec.get("concurrency", 50)

        def tick(now):
            while todo and len(self.conns) - self.ready_count - sum(self.failures.values()) < concurrency:
                index = todo.popleft()
                conn = cls(self, index, f"{prefix}{index // room_size}")
                self.conns.append(conn)
                try:
                    conn.open(self.host, self.port, sources[index % len(sources)])
                except (OSError, SetupError) as exc:
                    conn.closed = True
                    self.failures[f"connect: {exc}"[:200]] += 1
            return None

        done = lambda: not todo and self.ready_count + sum(self.failures.values()) >= count  # noqa: E731
        finished = self.run_until(done, time.monotonic_ns() + int(cmd.get("timeout_s", 300) * 1e9), tick)
        return {"ready": self.ready_count, "count": count, "finished": finished,
                "failures": dict(self.failures.most_common(5)), "errors": dict(self.errors.most_common(5)),
                "setup_s": time.monotonic() - started}

    def _live(self) -> list[Conn]:
        return [c for c in self.conns if c.ready and not c.closed]

    def cmd_fanout(self, cmd: dict) -> dict:
        """Worker 0's first connection sends ``n_msgs`` probes (at once, or one per ``interval_ns``);
        every connection of every worker receives each of them."""
        self.reset()
        r0, start = self._usage(), time.monotonic_ns()
        live = self._live()
        n_msgs, interval, t0 = cmd["n_msgs"], cmd["interval_ns"], cmd["t0_ns"]
        # A coalesced burst (peers): the sender publishes all n_msgs probes as one message, which is what a
        # Chorus burst becomes after the group commit and the cork (one send per subscriber).
        coalesce = cmd.get("coalesce", False) and interval == 0
        self.per_message = n_msgs if coalesce else 1
        expected = n_msgs * len(live)
        sender = live[0] if cmd["sender"] and live else None
        sent = 0
        lag_max = 0

        def tick(now):
            nonlocal sent, lag_max
            if sender is None or sent >= n_msgs or now < t0:
                return t0 if sender is not None and sent < n_msgs else None
            if coalesce:
                sender.send_batch(0, n_msgs)
                sent = n_msgs
                return None
            if interval == 0:
                while sent < n_msgs:
                    sender.send_probe(sent)
                    sent += 1
                return None
            while sent < n_msgs and t0 + sent * interval <= now:
                lag_max = max(lag_max, now - (t0 + sent * interval))
                sender.send_probe(sent)
                sent += 1
            return t0 + sent * interval if sent < n_msgs else None

        complete = self.run_until(lambda: self.received >= expected and (sender is None or sent >= n_msgs),
                                  t0 + int(cmd["timeout_s"] * 1e9), tick)
        return self._result(r0, start, {"expected": expected, "complete": complete, "sent": sent,
                                        "sender_lag_max_ns": lag_max, "receivers": len(live)})

    def cmd_durable(self, cmd: dict) -> dict:
        """Every connection keeps ``window`` SENDs in flight (1 = send, wait for the ACK, send again)."""
        self.reset()
        r0, start = self._usage(), time.monotonic_ns()
        live = self._live()
        t0, window = cmd["t0_ns"], cmd["window"]
        stop = self.window_end_ns = t0 + int(cmd["duration_s"] * 1e9)
        seq = 0

        def on_ack(conn, now):
            nonlocal seq
            if now < stop:
                seq += 1
                self.outstanding += 1
                conn.send_probe(seq)

        self.on_ack = on_ack
        begun = False

        def tick(now):
            nonlocal begun, seq
            if begun:
                return None
            if now < t0:
                return t0
            begun = True
            for conn in live:
                for _ in range(window):
                    seq += 1
                    self.outstanding += 1
                    conn.send_probe(seq)
            return None

        def done():
            return begun and time.monotonic_ns() >= stop and self.outstanding <= 0

        complete = self.run_until(done, stop + int(cmd.get("drain_s", 10) * 1e9), tick)
        self.on_ack = None
        return self._result(r0, start, {"complete": complete, "sent": seq, "senders": len(live),
                                        "outstanding": self.outstanding})

    def cmd_mixed(self, cmd: dict) -> dict:
        """Paced ops on random connections: SEND to the connection's room, TYPING, or HISTORY."""
        self.reset()
        r0, start = self._usage(), time.monotonic_ns()
        live = [c for c in self._live() if isinstance(c, ChorusConn)]
        t0, rate = cmd["t0_ns"], cmd["rate"]
        stop = self.window_end_ns = t0 + int(cmd["duration_s"] * 1e9)
        interval = int(1e9 / rate) if rate > 0 else 0
        p_send, p_typing = cmd["mix"]["send"], cmd["mix"]["typing"]
        rng = random.Random(cmd.get("seed", 1))
        ops = collections.Counter()
        room_size = self.spec["room_size"]
        n = 0

        def tick(now):
            nonlocal n
            if not interval or not live:
                return None
            while t0 + n * interval <= now and t0 + n * interval < stop:
                conn = live[rng.randrange(len(live))]
                r = rng.random()
                if r < p_send:
                    self.outstanding += 1
                    conn.send_probe(n)
                    ops["send"] += 1
                elif r < p_send + p_typing:
                    conn.send_typing()
                    ops["typing"] += 1
                else:
                    self.outstanding += 1
                    conn.send_history()
                    ops["history"] += 1
                n += 1
            nxt = t0 + n * interval
            return nxt if nxt < stop else None

        def done():
            return (time.monotonic_ns() >= stop and self.outstanding <= 0
                    and self.received >= self.acks * room_size)

        complete = self.run_until(done, stop + int(cmd.get("drain_s", 10) * 1e9), tick)
        return self._result(r0, start, {"complete": complete, "ops": dict(ops),
                                        "expected": self.acks * room_size, "outstanding": self.outstanding})

    def cmd_idle(self, cmd: dict) -> dict:
        """Just keep the connections alive (answer PINGs, send keepalives) for ``duration_s``."""
        self.reset()
        r0, start = self._usage(), time.monotonic_ns()
        self.run_until(lambda: False, start + int(cmd["duration_s"] * 1e9))
        return self._result(r0, start, {"live": len(self._live())})

    def cmd_close(self, cmd: dict) -> dict:
        for conn in self.conns:
            conn.close()
        return {"closed": len(self.conns)}


def worker_main(pipe, spec: dict) -> None:
    """Entry point of a worker process (``multiprocessing`` target)."""
    Worker(pipe, spec).serve_forever()
