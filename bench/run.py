"""``python -m bench``: Chorus measured side by side with Mosquitto and a ``websockets`` broadcast server.

How a run works (issue 6; DESIGN.md "Fan-out"): for each scenario and system, the controller starts the
server process on a free loopback port (Chorus through ``bench.chorus_server``, which is
``python -m chorus.server`` plus a statistics dump on SIGUSR1; Mosquitto from ``/usr/sbin/mosquitto`` with its
own config; the ``websockets`` reference from ``bench/peers``), starts load-generator processes
(``bench/loadgen.py``) that open and set up every connection, then runs measured windows. Around each
window it reads the server's CPU time (utime/stime from ``/proc/PID/stat``) and RSS (``/proc/PID/status``);
the generators report their own CPU and HDR latency histograms. Each row keeps every repetition and their
median, and says whether the server or the generator was the limit.

Scenarios: ``fanout`` (one room of 1000, paced 20,000 deliveries/s, and a burst of 100 coalesced alike: by
Chorus's group commit and cork, by one publish for the peers; Chorus TCP, Chorus WebSocket, Mosquitto,
websockets side by side, repetitions interleaved), ``durable`` (100 clients sending and waiting for each ACK, and
a pipelined variant; Chorus only, next to the design source's 13,891 msg/s), ``idle`` (10,000 logged-in
connections with heartbeats), ``rooms`` (the same 10,000 Chorus connections in 1,000 rooms of 10, mixed
SEND/TYPING/HISTORY traffic), ``gc`` (worst collector pause at 18,000 connections, issue 14's policy against
the start-up freeze alone), ``storm`` (RSS after logins at argon2's real cost, malloc tuned or not), ``attack``
(the honest client's round trip during five attacks, issue 9: ``bench/attack.py``). Output: a table on stdout,
``<out>/<name>.json``, ``.md`` and ``.png`` (and, with ``--profile``, py-spy flame graph and text summaries).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hdrh.histogram import HdrHistogram

from . import loadgen

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = "/usr/sbin/mosquitto"
#: The design source's Go system: 100 concurrent senders (issue 6).
GO_REFERENCE = {"acked_per_s": 13891, "avg_ms": 7.2}
#: Orientation figures from issue 6 / DESIGN.md (same kind of machine, not this run).
ISSUE_FIGURES = {"mosquitto_us_per_delivery": 5.4, "websockets_us_per_delivery": 7.9,
                 "mosquitto_idle_kb": 0.83, "websockets_idle_kb": 12.7}
FANOUT_SYSTEMS = ("chorus-tcp", "chorus-ws", "mosquitto", "websockets")
IDLE_SYSTEMS = ("chorus-tcp", "mosquitto", "websockets")
PEERS = ("mosquitto", "websockets")
SCENARIOS = ("fanout", "durable", "idle", "rooms", "gc", "storm", "attack")
#: The garbage-collector rows (issue 14): server/_memory.py's policy against the start-up freeze alone.
GC_VARIANTS = (("startup freeze only", {"CHORUS_GC_POLICY": "off"}), ("freeze policy", {}))
#: The login-storm rows (issue 14): glibc's default malloc against server/_memory.py's tune_malloc.
STORM_VARIANTS = (("malloc defaults", {"CHORUS_MALLOC_TUNING": "off"}), ("mmap threshold 1 MiB, 2 arenas", {}))
#: argon2id at chorus-server's default cost, and its default auth deadline: the storm pays what a real one does.
_REAL_LOGIN_COST = ("--argon2-time-cost", "2", "--argon2-memory-kib", "19456", "--auth-timeout-s", "30")
BUSY = 0.85  # a process using this share of one core (or more) was the limit (threads waiting on fsync
# or on the event loop keep a saturated Chorus server just under 100%)


@dataclass(frozen=True)
class Sizes:
    reps: int = 3
    fanout_members: int = 1000
    burst_msgs: int = 100
    paced_deliveries_per_s: int = 20000
    paced_s: float = 3.0
    heartbeat_s: int = 15  # Chorus's default ping interval; MQTT keepalive and websockets pings match it
    durable_clients: int = 100
    durable_s: float = 3.0
    durable_window: int = 16
    idle_conns: int = 10000
    idle_s: float = 15.0  # one heartbeat period: every connection's heartbeat falls in the window once
    room_size: int = 10
    mixed_ops_per_s: int = 1000
    mixed_s: float = 5.0
    conns_per_worker: int = 5000
    gc_conns: int = 18000  # the fd limit per process is 20,000 (DESIGN.md)
    gc_service_s: float = 10.0
    storm_logins: int = 600  # at argon2's default cost: ~50 ms of a core each
    # Per generator process, i.e. per source address: HashQueue refuses a login that would wait more than 5 s
    # behind its own address's (server/_auth.py): 16 × up to 300 ms (a loaded machine) keeps every one admitted.
    storm_concurrency: int = 16
    profile_s: int = 5
    timeout_s: float = 60.0


FULL = Sizes()
SMOKE = Sizes(reps=1, fanout_members=20, burst_msgs=5, paced_deliveries_per_s=400, paced_s=0.5,
              durable_clients=4, durable_s=0.5, durable_window=4, idle_conns=40, idle_s=0.5, room_size=5,
              mixed_ops_per_s=100, mixed_s=0.5, conns_per_worker=20, gc_conns=60, gc_service_s=0.5, storm_logins=6,
              storm_concurrency=3, profile_s=1,
              timeout_s=20.0)


class Unavailable(Exception):
    """A system cannot run here; ``status`` says how to report it ("not available", "skipped", "error")."""

    def __init__(self, message: str, status: str = "not available"):
        super().__init__(message)
        self.status = status


# -- processes under test ------------------------------------------------------------------------------------

def _read_first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no startup line in time")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n")[0].decode(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} never accepted")


class Endpoint:
    """A running server process: its address, its CPU and memory, and how to stop it."""

    def __init__(self, name: str, proc: subprocess.Popen, port: int, tmp: Path, *, ws_port: int | None = None,
                 stats_path: Path | None = None, log_path: Path | None = None):
        self.name, self.proc, self.port, self.tmp = name, proc, port, tmp
        self.ws_port, self.stats_path, self.log_path = ws_port, stats_path, log_path
        self.host = "127.0.0.1"
        self._dumps = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the whole process, all threads."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stats(self) -> dict | None:
        """Chorus only: ``Server.statistics()`` dumped on SIGUSR1 (see bench/chorus_server.py)."""
        if self.stats_path is None:
            return None
        self._dumps += 1
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data = json.loads(self.stats_path.read_text())
                if data.get("dump", 0) >= self._dumps:
                    return data
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        return None

    def log_tail(self, n: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def code_fingerprint() -> str:
    """A hash of the server and protocol sources: rows measured on different code must not be compared."""
    import hashlib

    digest = hashlib.sha1()
    for path in sorted([*REPO.glob("server/*.py"), *REPO.glob("proto/*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def start_system(name: str, heartbeat_s: int, env: dict | None = None, args: tuple[str, ...] = ()) -> Endpoint:
    """Start ``name`` on a free loopback port; raises Unavailable when it cannot run here.

    ``env``, ``args``: more environment and flags for a Chorus server (the before/after switches of
    server/_memory.py; a flag given here wins over the bench's own)."""
    Bench.code_now = code_fingerprint()
    tmp = Path(tempfile.mkdtemp(prefix=f"chorus-bench-{name}-"))
    log_path = tmp / "server.log"
    try:
        if name.startswith("chorus"):
            return _start_chorus(name, heartbeat_s, tmp, log_path, env or {}, args)
        if name == "mosquitto":
            return _start_mosquitto(heartbeat_s, tmp, log_path)
        if name == "websockets":
            return _start_websockets(heartbeat_s, tmp, log_path)
        raise ValueError(name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: Issue 9's per-address and per-user budgets, lifted for the bench (one address, thousands of users).
_LIFTED_BUDGETS = [
    "--max-connections-per-address", "20000", "--connections-per-s-per-address", "1000000",
    "--connection-burst-per-address", "1000000", "--registrations-per-hour", "1000000",
    "--user-send-rate-per-s", "1000000", "--user-send-burst", "1000000", "--rooms-created-per-hour", "1000000",
    "--max-pending-hashes", "100000",
]


def _start_chorus(name: str, heartbeat_s: int, tmp: Path, log_path: Path, extra_env: dict,
                  extra_args: tuple[str, ...]) -> Endpoint:
    ws = name == "chorus-ws"
    if ws and importlib.util.find_spec("chorus.server._websocket") is None:
        raise Unavailable("the WebSocket bridge (server/_websocket.py) is not there yet")
    cmd = [sys.executable, "-m", "bench.chorus_server", "--host", "127.0.0.1", "--port", "0",
           "--data-dir", str(tmp / "data"),
           # The bench is the only client: lift the per-client limits that would throttle it.
           "--rate-per-s", "1000000", "--rate-burst", "1000000", "--max-connections", "20000",
           "--max-connections-per-user", "16", "--outbound-buffer-bytes", str(64 << 20),
           # ...and the per-address and per-user budgets: every bench client comes from 127.0.0.1.
           *_LIFTED_BUDGETS,
           "--handshake-timeout-s", "120", "--auth-timeout-s", "300",
           # Registering 10,000 users at argon2id's default cost (19 MiB, 2 passes) would take minutes;
           # the bench measures delivery, not password hashing.
           "--argon2-time-cost", "1", "--argon2-memory-kib", "8",
           "--ping-interval-s", str(heartbeat_s), "--log-level", "WARNING", *extra_args]
    if ws:
        cmd += ["--ws-port", "0"]
    stats_path = tmp / "stats.json"
    env = {**os.environ, "CHORUS_BENCH_STATS": str(stats_path), "PYTHONPATH": str(REPO), **extra_env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, env=env)
    try:
        line = _read_first_line(proc, 30)
        match = re.search(r"listening on [^\s:]+:(\d+)", line)
        if not match:
            raise RuntimeError(f"unexpected first line {line!r}")
        port = int(match.group(1))
        ws_port = None
        if ws:
            wsm = re.search(r"http://[^\s/]+:(\d+)/", line)
            if not wsm:
                raise Unavailable(f"the server did not report a WebSocket port: {line!r}")
            ws_port = int(wsm.group(1))
    except (Unavailable, RuntimeError, TimeoutError) as exc:
        proc.kill()
        proc.wait()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        if ws and isinstance(exc, (RuntimeError, TimeoutError)):
            raise Unavailable(f"server with --ws-port did not start: {exc}; {' | '.join(tail)}") from None
        raise RuntimeError(f"chorus server did not start: {exc}; {' | '.join(tail)}") from None
    return Endpoint(name, proc, port, tmp, ws_port=ws_port, stats_path=stats_path, log_path=log_path)


def _mosquitto_version() -> str | None:
    if not os.path.exists(MOSQUITTO):
        return None
    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else "?"


def _start_mosquitto(heartbeat_s: int, tmp: Path, log_path: Path) -> Endpoint:
    if not os.path.exists(MOSQUITTO):
        if os.environ.get("CI") == "true":
            raise Unavailable(f"{MOSQUITTO} is required under CI (Debian package mosquitto)", "error")
        raise Unavailable(f"{MOSQUITTO} not found: install the Debian package mosquitto", "skipped")
    port = _free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 1000000\n"
        "max_queued_bytes 0\n"
        "max_keepalive 65535\n"
        "set_tcp_nodelay true\n"  # Chorus and asyncio set TCP_NODELAY too
        "sys_interval 0\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_port(port, proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"mosquitto did not start: {exc}; {log_path.read_text(errors='replace')[-300:]}") from None
    return Endpoint("mosquitto", proc, port, tmp, log_path=log_path)


def _start_websockets(heartbeat_s: int, tmp: Path, log_path: Path) -> Endpoint:
    cmd = [sys.executable, "-m", "bench.peers.ws_broadcast", "--port", "0", "--ping-interval-s", str(heartbeat_s)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = _read_first_line(proc, 30)
        port = int(re.search(r"listening on [^\s:]+:(\d+)", line).group(1))
    except (AttributeError, TimeoutError) as exc:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"websockets peer did not start: {exc}; {log_path.read_text(errors='replace')[-300:]}") \
            from None
    return Endpoint("websockets", proc, port, tmp, log_path=log_path)


# -- load generators ---------------------------------------------------------------------------------------------

class Workers:
    """Load-generator processes, each with a contiguous slice of the connections (whole rooms)."""

    def __init__(self, system: str, ep: Endpoint, n_conns: int, per_worker: int, *, room_size: int,
                 room_prefix: str, heartbeat_s: int, target=loadgen.worker_main, extra_spec: dict | None = None):
        """``target``: each process's entry point; ``extra_spec``: more keys for its spec (bench/cluster_bench.py)."""
        kind = {"chorus-tcp": "chorus", "chorus-ws": "chorus-ws", "mosquitto": "mqtt"}.get(system, system)
        port = ep.ws_port if system == "chorus-ws" else ep.port
        per_worker = max(room_size, per_worker // room_size * room_size) if room_size <= per_worker else room_size
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.procs = [], []
        self.n_conns = n_conns
        first = 0
        try:
            while first < n_conns:
                count = min(per_worker, n_conns - first)
                spec = {"kind": kind, "host": ep.host, "port": port, "ws_path": "/ws", "first": first,
                        "count": count, "room_size": room_size, "room_prefix": room_prefix,
                        "heartbeat_s": heartbeat_s, "sources": [f"127.0.0.{2 + len(self.procs)}"],
                        **(extra_spec or {})}
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=target, args=(child, spec), daemon=True)
                proc.start()
                child.close()
                if not parent.poll(30):
                    raise RuntimeError("load generator did not start")
                parent.recv()
                self.pipes.append(parent)
                self.procs.append(proc)
                first += count
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.pipes)

    def command(self, cmds) -> list[dict]:
        """Send one command to every worker (a list: one each), then collect every reply."""
        if isinstance(cmds, dict):
            cmds = [cmds] * len(self.pipes)
        for pipe, cmd in zip(self.pipes, cmds, strict=True):
            pipe.send(cmd)
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(900):
                raise RuntimeError("load generator stopped answering")
            reply = pipe.recv()
            if "error" in reply:
                raise RuntimeError("load generator failed:\n" + reply["error"])
            replies.append(reply)
        return replies

    def setup(self, timeout_s: float = 600) -> float:
        """Open and set up every connection; returns seconds taken. Raises RuntimeError if any failed."""
        started = time.monotonic()
        replies = self.command({"cmd": "setup", "timeout_s": timeout_s})
        ready = sum(r["ready"] for r in replies)
        if ready < self.n_conns:
            failures = {}
            for r in replies:
                failures.update(r["failures"])
                failures.update(r["errors"])
            raise RuntimeError(f"only {ready} of {self.n_conns} connections set up: {failures}")
        return time.monotonic() - started

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send({"cmd": "close"})
            except OSError:
                pass
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            try:
                if pipe.poll(10):
                    pipe.recv()
            except (OSError, EOFError):
                pass
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.pipes, self.procs = [], []


# -- measurements ----------------------------------------------------------------------------------------------------

def merge_histograms(encoded) -> HdrHistogram:
    hist = HdrHistogram(1, loadgen.HIST_MAX_US, 3)
    for data in encoded:
        part = HdrHistogram.decode(data)
        if part.get_total_count():
            hist.add(part)
    return hist


def latency_ms(hist: HdrHistogram, prefix: str = "") -> dict:
    if not hist.get_total_count():
        return {f"{prefix}p50_ms": None, f"{prefix}p99_ms": None, f"{prefix}p999_ms": None,
                f"{prefix}mean_ms": None, f"{prefix}max_ms": None}
    return {
        f"{prefix}p50_ms": hist.get_value_at_percentile(50) / 1000,
        f"{prefix}p99_ms": hist.get_value_at_percentile(99) / 1000,
        f"{prefix}p999_ms": hist.get_value_at_percentile(99.9) / 1000,
        f"{prefix}mean_ms": hist.get_mean_value() / 1000,
        f"{prefix}max_ms": hist.get_max_value() / 1000,
    }


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has spent busy so far (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def limit_of(server_util: float, gen_util: float, paced: bool, others_cores: float = 0.0) -> str:
    """Who was the limit: a process near one full core, or, when neither was, other processes on the machine."""
    if server_util >= BUSY and gen_util >= BUSY:
        return "both"
    if server_util >= BUSY:
        return "server"
    if gen_util >= BUSY:
        return "generator"
    if others_cores >= 0.5:
        return f"other processes ({others_cores:.1f} cores)"
    return "neither (paced)" if paced else "neither"


def _gen_cpu(replies) -> tuple[float, float]:
    """(total generator CPU seconds, busiest worker's CPU seconds)."""
    each = [r["cpu_user_s"] + r["cpu_sys_s"] for r in replies]
    return sum(each), max(each)


def median_metrics(reps: list[dict]) -> dict:
    keys = [k for k in reps[0] if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                        for r in reps)]
    out = {k: statistics.median(r[k] for r in reps) for k in keys}
    for k in reps[0]:
        if k not in out:
            values = [r.get(k) for r in reps]
            out[k] = values[0] if all(v == values[0] for v in values) else values
    return out


class Bench:
    code_now: str | None = None  # fingerprint of server/ and proto/ when the last system started

    def __init__(self, sizes: Sizes, args):
        self.sizes = sizes
        self.args = args
        self.rows: list[dict] = []
        #: py-spy summaries of the Chorus server, by what it was doing (only with --profile).
        self.profiles: dict[str, dict] = {}
        self.out = Path(args.out)
        self.attack: dict | None = None  # the ``attack`` scenario's own rows and targets (bench/attack.py)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def add_row(self, scenario: str, variant: str, system: str, status: str, reps: list[dict] | None = None,
                note: str = "") -> None:
        row = {"scenario": scenario, "variant": variant, "system": system, "status": status, "note": note,
               "code": Bench.code_now, "reps": reps or [], "median": median_metrics(reps) if reps else {}}
        if reps and "limit" in row["median"]:  # the limit of the medians, not a list of per-rep verdicts
            m = row["median"]
            row["median"]["limit"] = limit_of(m["server_util"], m["generator_util"], variant != "burst" and
                                              scenario != "durable", m.get("others_cores", 0.0))
        if status == "ok" and reps and not all(r.get("complete", True) for r in reps):
            row["status"] = "incomplete"
        self.rows.append(row)

    def _failed(self, scenario: str, variants, system: str, exc: BaseException) -> None:
        status = exc.status if isinstance(exc, Unavailable) else "error"
        for variant in variants:
            if not any(r["scenario"] == scenario and r["variant"] == variant and r["system"] == system
                       for r in self.rows):
                self.add_row(scenario, variant, system, status, note=str(exc)[:500])
        self.log(f"{scenario}/{system}: {status}: {exc}")

    # -- scenario 1: fan-out -------------------------------------------------------------------------------------------
    def run_fanout(self, systems: list[str]) -> None:
        """Every system set up side by side, then each repetition of each variant taken in turn on every system
        (paced first: it is the headline, where nobody can coalesce), so that the machine's other load falls on
        all of them alike. A burst is 100 SENDs back to back for Chorus, which the group commit and the cork turn
        into one send per subscriber; the peers get the same coalescing: one publish carrying the 100 probes."""
        s = self.sizes
        running: dict[str, tuple[Endpoint, Workers]] = {}
        try:
            for system in systems:
                ep = workers = None
                try:
                    ep = start_system(system, s.heartbeat_s)
                    workers = Workers(system, ep, s.fanout_members, s.conns_per_worker, room_size=s.fanout_members,
                                      room_prefix="fan", heartbeat_s=s.heartbeat_s)
                    setup_s = workers.setup()
                except Exception as exc:
                    if workers is not None:
                        workers.close()
                    if ep is not None:
                        ep.stop()
                    self._failed("fanout", ("paced", "burst"), system, exc)
                    continue
                running[system] = (ep, workers)
                self.log(f"fanout/{system}: {s.fanout_members} members set up in {setup_s:.1f}s")
            per_s = s.paced_deliveries_per_s / s.fanout_members
            n_paced = max(1, round(per_s * s.paced_s))
            variants = (("paced", n_paced, int(1e9 / per_s),
                         f"{per_s:g} messages/s × {s.fanout_members} members for {s.paced_s:g}s"),
                        ("burst", s.burst_msgs, 0, f"{s.burst_msgs} messages to {s.fanout_members} members: Chorus "
                         "gets 100 SENDs back to back (coalesced by its group commit and cork), a peer one publish "
                         "carrying the 100"))
            for variant, n_msgs, interval, note in variants:
                reps: dict[str, list[dict]] = {system: [] for system in running}
                failed: dict[str, Exception] = {}
                for _ in range(s.reps):
                    for system, (ep, workers) in running.items():
                        if system in failed:
                            continue
                        try:
                            reps[system].append(self._fanout_rep(
                                ep, workers, n_msgs, interval, paced=variant == "paced",
                                coalesce=variant == "burst" and not system.startswith("chorus")))
                        except Exception as exc:
                            failed[system] = exc
                for system in running:
                    if system in failed:
                        self._failed("fanout", [variant], system, failed[system])
                    else:
                        self.add_row("fanout", variant, system, "ok", reps[system], note)
            profiled = running.get(self.args.profile_system)
            if self.args.profile and profiled is not None:
                ep, workers = profiled
                self.profiles["fan-out, paced"] = self._profile(ep, "fanout", lambda: self._fanout_rep(
                    ep, workers, n_paced, int(1e9 / per_s), paced=True, stats=False))
        finally:
            for ep, workers in running.values():
                ep.stop()
                workers.close()

    def _fanout_rep(self, ep: Endpoint, workers: Workers, n_msgs: int, interval_ns: int, *, paced: bool,
                    stats: bool = True, coalesce: bool = False) -> dict:
        stats0 = ep.stats() if stats else None
        (u0, s0), wall0, busy0 = ep.cpu(), time.monotonic(), machine_busy_s()
        t0 = time.monotonic_ns() + 100_000_000
        replies = workers.command([{"cmd": "fanout", "n_msgs": n_msgs, "interval_ns": interval_ns, "t0_ns": t0,
                                    "timeout_s": self.sizes.timeout_s, "sender": i == 0, "coalesce": coalesce}
                                   for i in range(len(workers))])
        (u1, s1), wall1, busy1 = ep.cpu(), time.monotonic(), machine_busy_s()
        stats1 = ep.stats() if stats else None
        deliveries = sum(r["received"] for r in replies)
        expected = sum(r["expected"] for r in replies)
        last = max(r["last_recv_ns"] for r in replies)
        active_s = max((last - t0) / 1e9, 1e-6) if last else wall1 - wall0
        user, system = u1 - u0, s1 - s0
        gen_total, gen_max = _gen_cpu(replies)
        rep = {
            "deliveries": deliveries, "expected": expected, "complete": deliveries >= expected,
            "duration_s": active_s, "deliveries_per_s": deliveries / active_s,
            "cpu_us_per_delivery": (user + system) * 1e6 / max(deliveries, 1),
            "user_us_per_delivery": user * 1e6 / max(deliveries, 1),
            "sys_us_per_delivery": system * 1e6 / max(deliveries, 1),
            "server_cpu_s": user + system, "server_util": (user + system) / active_s,
            "generator_cpu_s": gen_total, "generator_util": gen_max / active_s,
            "rss_kb": ep.rss_kb(),
            "others_cores": max(0.0, (busy1 - busy0) - (user + system) - gen_total) / (wall1 - wall0),
            "sender_lag_max_ms": max(r["sender_lag_max_ns"] for r in replies) / 1e6,
            **latency_ms(merge_histograms(r["lat_hist"] for r in replies)),
        }
        rep["limit"] = limit_of(rep["server_util"], rep["generator_util"], paced, rep["others_cores"])
        if stats0 and stats1:
            rep["server_counted_deliveries"] = stats1["delivered"] - stats0["delivered"]
        errors = {k: v for r in replies for k, v in r["errors"].items()}
        if errors:
            rep["errors"] = errors
        return rep

    def _profile(self, ep: Endpoint, name: str, drive, formats=("flamegraph", "raw")) -> dict:
        """py-spy on the Chorus server while ``drive()`` is called again and again (the load to profile)."""
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.path.exists(pyspy):
            return {"status": "py-spy not installed (pip install py-spy)"}
        self.out.mkdir(parents=True, exist_ok=True)
        result = {"status": "ok", "seconds": self.sizes.profile_s}
        suffix = {"flamegraph": "svg", "raw": "txt"}
        for fmt in formats:
            path = self.out / f"profile-{name}.{suffix[fmt]}"
            cmd = [pyspy, "record", "--pid", str(ep.pid), "--duration", str(self.sizes.profile_s), "--rate", "250",
                   "--nonblocking", "--function", "--format", fmt, "-o", str(path)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            rounds = 0
            while proc.poll() is None and rounds < 1000:
                drive()
                rounds += 1
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0 or not path.exists():
                return {"status": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
            result[fmt] = path.name
            result["rounds"] = result.get("rounds", 0) + rounds
        if "raw" in formats:
            result.update(summarize_profile(self.out / f"profile-{name}.txt"))
        return result

    # -- scenario 3: durable sends -------------------------------------------------------------------------------------
    def run_durable(self) -> None:
        s = self.sizes
        ep = workers = None
        variants = (("closed-loop", 1), ("pipelined", s.durable_window))
        try:
            ep = start_system("chorus-tcp", s.heartbeat_s)
            workers = Workers("chorus-tcp", ep, s.durable_clients, s.conns_per_worker, room_size=1,
                              room_prefix="d", heartbeat_s=s.heartbeat_s)
            setup_s = workers.setup()
            self.log(f"durable: {s.durable_clients} clients set up in {setup_s:.1f}s")
            for variant, window in variants:
                reps = [self._durable_rep(ep, workers, window) for _ in range(s.reps)]
                self.add_row("durable", variant, "chorus-tcp", "ok", reps,
                             f"{s.durable_clients} clients, each in its own room, {window} SEND(s) in flight each")
            if self.args.profile:
                self.profiles["durable sends, closed loop"] = self._profile(
                    ep, "durable", lambda: self._durable_rep(ep, workers, 1), formats=("raw",))
        except Exception as exc:
            self._failed("durable", [v for v, _ in variants], "chorus-tcp", exc)
        finally:
            if ep is not None:
                ep.stop()
            if workers is not None:
                workers.close()

    def _durable_rep(self, ep: Endpoint, workers: Workers, window: int) -> dict:
        duration = self.sizes.durable_s
        stats0 = ep.stats()
        (u0, s0), wall0, busy0 = ep.cpu(), time.monotonic(), machine_busy_s()
        t0 = time.monotonic_ns() + 100_000_000
        replies = workers.command({"cmd": "durable", "t0_ns": t0, "duration_s": duration, "window": window})
        (u1, s1), wall1, busy1 = ep.cpu(), time.monotonic(), machine_busy_s()
        stats1 = ep.stats()
        acks = sum(r["acks"] for r in replies)
        in_window = sum(r["acks_in_window"] for r in replies)
        active_s = max((time.monotonic_ns() - t0) / 1e9, duration)
        user, system = u1 - u0, s1 - s0
        gen_total, gen_max = _gen_cpu(replies)
        rep = {
            "acked": in_window, "acked_per_s": in_window / duration, "acks_total": acks,
            "complete": all(r["complete"] for r in replies),
            "cpu_us_per_ack": (user + system) * 1e6 / max(acks, 1),
            "user_us_per_ack": user * 1e6 / max(acks, 1), "sys_us_per_ack": system * 1e6 / max(acks, 1),
            "server_util": (user + system) / active_s, "generator_util": gen_max / active_s,
            "generator_cpu_s": gen_total, "rss_kb": ep.rss_kb(),
            "others_cores": max(0.0, (busy1 - busy0) - (user + system) - gen_total) / (wall1 - wall0),
            **latency_ms(merge_histograms(r["ack_hist"] for r in replies), "ack_"),
        }
        rep["limit"] = limit_of(rep["server_util"], rep["generator_util"], False, rep["others_cores"])
        if stats0 and stats1:
            st0, st1 = stats0["store"], stats1["store"]
            commits = st1["commits"] - st0["commits"]
            batched = (st1["appended"] + st1["duplicates"]) - (st0["appended"] + st0["duplicates"])
            rep["commits"] = commits
            rep["batch_mean"] = batched / commits if commits else 0.0
            rep["batch_histogram"] = {k: v - st0["batch_histogram"].get(k, 0)
                                      for k, v in st1["batch_histogram"].items()
                                      if v - st0["batch_histogram"].get(k, 0)}
            rep["batch_max_ever"] = st1["batch_max"]
        errors = {k: v for r in replies for k, v in r["errors"].items()}
        if errors:
            rep["errors"] = errors
        return rep

    # -- scenarios 2 and 4: idle, then many rooms ----------------------------------------------------------------------
    def run_idle(self, system: str, *, idle: bool, rooms: bool) -> None:
        s = self.sizes
        ep = workers = None
        variants = (["idle"] if idle else []) + (["mixed"] if rooms else [])
        try:
            ep = start_system(system, s.heartbeat_s)
            time.sleep(0.3)
            base_kb = ep.rss_kb()
            workers = Workers(system, ep, s.idle_conns, s.conns_per_worker, room_size=s.room_size,
                              room_prefix="r", heartbeat_s=s.heartbeat_s)
            setup_s = workers.setup()
            self.log(f"idle/{system}: {s.idle_conns} connections set up in {setup_s:.1f}s")
            if idle:
                reps = [self._idle_rep(ep, workers, base_kb) for _ in range(s.reps)]
                note = (f"{s.idle_conns} connections, heartbeat every {s.heartbeat_s}s, windows of {s.idle_s:g}s, "
                        f"setup {setup_s:.0f}s")
                if system == "chorus-tcp":
                    note += (f", each registered (argon2 cost lowered), joined to one of "
                             f"{s.idle_conns // s.room_size} rooms and synced")
                self.add_row("idle", "idle", system, "ok", reps, note)
                if self.args.profile and system == "chorus-tcp":
                    self.profiles["idle heartbeats"] = self._profile(ep, "idle", lambda: workers.command(
                        {"cmd": "idle", "duration_s": 1.0}), formats=("raw",))
            if rooms:
                reps = [self._mixed_rep(ep, workers) for _ in range(s.reps)]
                self.add_row("rooms", "mixed", system, "ok", reps,
                             f"{s.idle_conns} connections in {s.idle_conns // s.room_size} rooms of {s.room_size}; "
                             f"{s.mixed_ops_per_s} ops/s: 80% SEND, 15% TYPING, 5% HISTORY")
                if self.args.profile and system == "chorus-tcp":
                    self.profiles["many rooms, mixed traffic"] = self._profile(
                        ep, "rooms", lambda: self._mixed_rep(ep, workers), formats=("raw",))
        except Exception as exc:
            for variant in variants:
                self._failed("idle" if variant == "idle" else "rooms", [variant], system, exc)
        finally:
            if ep is not None:
                ep.stop()
            if workers is not None:
                workers.close()

    def _idle_rep(self, ep: Endpoint, workers: Workers, base_kb: int) -> dict:
        duration = self.sizes.idle_s
        (u0, s0), wall0, busy0 = ep.cpu(), time.monotonic(), machine_busy_s()
        replies = workers.command({"cmd": "idle", "duration_s": duration})
        (u1, s1), wall1, busy1 = ep.cpu(), time.monotonic(), machine_busy_s()
        live = sum(r["live"] for r in replies)
        rss = ep.rss_kb()
        counts: dict[str, int] = {}
        for r in replies:
            for k, v in r["counts"].items():
                counts[k] = counts.get(k, 0) + v
        cpu = (u1 - u0) + (s1 - s0)
        gen_total, gen_max = _gen_cpu(replies)
        return {
            "connections": live, "complete": live == workers.n_conns, "rss_kb": rss, "base_rss_kb": base_kb,
            "kb_per_connection": (rss - base_kb) / max(live, 1),
            "idle_cpu_pct": cpu / duration * 100, "cpu_us_per_conn_per_s": cpu * 1e6 / duration / max(live, 1),
            "user_s": u1 - u0, "sys_s": s1 - s0, "generator_util": gen_max / duration,
            "others_cores": max(0.0, (busy1 - busy0) - cpu - gen_total) / (wall1 - wall0),
            "heartbeats": counts,
        }

    def _mixed_rep(self, ep: Endpoint, workers: Workers) -> dict:
        s = self.sizes
        (u0, s0), wall0, busy0 = ep.cpu(), time.monotonic(), machine_busy_s()
        t0 = time.monotonic_ns() + 100_000_000
        rate = s.mixed_ops_per_s / len(workers)
        replies = workers.command([{"cmd": "mixed", "t0_ns": t0, "duration_s": s.mixed_s, "rate": rate,
                                    "mix": {"send": 0.8, "typing": 0.15, "history": 0.05}, "seed": i + 1}
                                   for i in range(len(workers))])
        (u1, s1), wall1, busy1 = ep.cpu(), time.monotonic(), machine_busy_s()
        active_s = max((time.monotonic_ns() - t0) / 1e9, s.mixed_s)
        ops: dict[str, int] = {}
        for r in replies:
            for k, v in r["ops"].items():
                ops[k] = ops.get(k, 0) + v
        n_ops = sum(ops.values())
        deliveries = sum(r["received"] for r in replies)
        user, system = u1 - u0, s1 - s0
        gen_total, gen_max = _gen_cpu(replies)
        rep = {
            "ops": n_ops, "ops_per_s": n_ops / s.mixed_s, "deliveries": deliveries,
            "deliveries_per_s": deliveries / s.mixed_s, "acks": sum(r["acks"] for r in replies),
            "complete": all(r["complete"] for r in replies),
            "cpu_us_per_op": (user + system) * 1e6 / max(n_ops, 1),
            "user_us_per_op": user * 1e6 / max(n_ops, 1), "sys_us_per_op": system * 1e6 / max(n_ops, 1),
            "server_util": (user + system) / active_s, "generator_util": gen_max / active_s,
            "rss_kb": ep.rss_kb(), "op_counts": ops,
            "others_cores": max(0.0, (busy1 - busy0) - (user + system) - gen_total) / (wall1 - wall0),
            **latency_ms(merge_histograms(r["lat_hist"] for r in replies)),
            **latency_ms(merge_histograms(r["ack_hist"] for r in replies), "ack_"),
            **latency_ms(merge_histograms(r["history_hist"] for r in replies), "history_"),
        }
        rep["limit"] = limit_of(rep["server_util"], rep["generator_util"], True, rep["others_cores"])
        errors = {k: v for r in replies for k, v in r["errors"].items()}
        if errors:
            rep["errors"] = errors
        return rep

    # -- scenario 5: garbage-collection pauses (issue 14) -------------------------------------------------------------
    def run_gc(self) -> None:
        """Each variant in turn, repetitions interleaved: a fresh server, ``gc_conns`` logins (the storm), then
        ``gc_service_s`` of mixed traffic; the worst collector pause of each phase comes from the server's
        own timing of every collection (server/_memory.py, reset at each statistics dump)."""
        s = self.sizes
        self._interleaved("gc", GC_VARIANTS, self._gc_rep,
                          f"{s.gc_conns} logins (argon2 cost lowered) in rooms of {s.room_size}, then "
                          f"{s.mixed_ops_per_s} ops/s for {s.gc_service_s:g}s")

    def _gc_rep(self, env: dict) -> dict:
        s = self.sizes
        ep = workers = None
        try:
            ep = start_system("chorus-tcp", s.heartbeat_s, env)
            deadline = time.monotonic() + 30
            while ep.stats()["gc"]["freezes"] < 1 and time.monotonic() < deadline:  # the window opens after the
                time.sleep(0.1)  # start-up freeze (a collection of everything loaded), which is not service
            workers = Workers("chorus-tcp", ep, s.gc_conns, s.conns_per_worker, room_size=s.room_size,
                              room_prefix="g", heartbeat_s=s.heartbeat_s)
            setup_s = workers.setup()
            storm = ep.stats()["gc"]
            self.log(f"gc/{storm['policy']}: {s.gc_conns} logins in {setup_s:.1f}s, worst pause "
                     f"{storm['window_max_pause_ms']:.1f} ms")
            t0 = time.monotonic_ns() + 100_000_000
            rate = s.mixed_ops_per_s / len(workers)
            replies = workers.command([{"cmd": "mixed", "t0_ns": t0, "duration_s": s.gc_service_s, "rate": rate,
                                        "mix": {"send": 0.8, "typing": 0.15, "history": 0.05}, "seed": i + 1}
                                       for i in range(len(workers))])
            service = ep.stats()["gc"]
            return {
                "connections": s.gc_conns, "setup_s": setup_s, "rss_kb": ep.rss_kb(),
                "storm_max_pause_ms": storm["window_max_pause_ms"], "storm_collections": storm["window_collections"],
                "storm_max_pause_cpu_ms": storm["window_max_pause_cpu_ms"],
                "service_max_pause_ms": service["window_max_pause_ms"],
                "service_max_pause_cpu_ms": service["window_max_pause_cpu_ms"],
                "service_collections": service["window_collections"],
                "full_collections": service["collections"][2], "freezes": service["freezes"],
                "worst_freeze_ms": service["worst_freeze_ms"], "frozen_objects": service["frozen_objects"],
                "complete": all(r["complete"] for r in replies),
                **latency_ms(merge_histograms(r["lat_hist"] for r in replies)),
            }
        finally:
            if ep is not None:
                ep.stop()
            if workers is not None:
                workers.close()

    # -- scenario 6: a login storm at the real password cost (issue 14) ------------------------------------------------
    def run_storm(self) -> None:
        """``storm_logins`` REGISTERs at argon2's default cost, ``storm_concurrency`` at once per generator, on a
        fresh server per repetition (variants interleaved): the RSS each login leaves behind once the storm is over,
        and how many logins the auth deadline cut off."""
        self._interleaved("storm", STORM_VARIANTS, self._storm_rep,
                          f"{self.sizes.storm_logins} REGISTERs at argon2id's default cost (2 passes, 19 MiB), "
                          f"{self.sizes.storm_concurrency} at once per generator, auth deadline 30 s")

    def _interleaved(self, scenario: str, variants, rep, note: str) -> None:
        """Repetitions of each variant in turn (a, b, a, b, ...), so that the machine's other load falls on both."""
        reps: dict[str, list[dict]] = {name: [] for name, _ in variants}
        errors: dict[str, BaseException] = {}
        for _ in range(self.sizes.reps):
            for name, env in variants:
                if name not in errors:
                    try:
                        reps[name].append(rep(env))
                    except Exception as exc:
                        errors[name] = exc
        for name, _ in variants:
            if name in errors:
                self._failed(scenario, [name], "chorus-tcp", errors[name])
            else:
                self.add_row(scenario, name, "chorus-tcp", "ok", reps[name], note)

    def _storm_rep(self, env: dict) -> dict:
        s = self.sizes
        ep = workers = None
        try:
            ep = start_system("chorus-tcp", s.heartbeat_s, env, _REAL_LOGIN_COST)
            time.sleep(0.3)
            base_kb = ep.rss_kb()
            per_worker = max(1, s.storm_logins // 2)
            workers = Workers("chorus-tcp", ep, s.storm_logins, per_worker, room_size=1, room_prefix="s",
                              heartbeat_s=s.heartbeat_s, extra_spec={"concurrency": s.storm_concurrency})
            (u0, s0), started = ep.cpu(), time.monotonic()
            replies = workers.command({"cmd": "setup", "timeout_s": 900})
            took = time.monotonic() - started
            (u1, s1) = ep.cpu()
            time.sleep(1.0)  # the last hashes' buffers are freed (or kept) by now
            rss = ep.rss_kb()
            ready = sum(r["ready"] for r in replies)
            failures: dict[str, int] = {}
            for r in replies:
                for why, n in {**r["failures"], **r["errors"]}.items():
                    failures[why] = failures.get(why, 0) + n
            timed_out = sum(n for why, n in failures.items() if "HANDSHAKE_TIMEOUT" in why)
            self.log(f"storm/{env or 'tuned'}: {ready} of {s.storm_logins} in {took:.0f}s, "
                     f"RSS +{(rss - base_kb) / 1024:.0f} MB")
            return {"logins": s.storm_logins, "ready": ready, "timed_out": timed_out, "storm_s": took,
                    "cpu_ms_per_login": ((u1 - u0) + (s1 - s0)) * 1000 / max(s.storm_logins, 1),
                    "rss_kb": rss, "base_rss_kb": base_kb, "rss_growth_mb": (rss - base_kb) / 1024,
                    "kb_per_connection": (rss - base_kb) / max(ready, 1), "failures": failures,
                    "complete": ready == s.storm_logins}
        finally:
            if ep is not None:
                ep.stop()
            if workers is not None:
                workers.close()

    # -- driver --------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        scenarios, systems = self.args.scenarios, self.args.systems
        if "fanout" in scenarios:
            self.log("fanout ...")
            self.run_fanout([system for system in FANOUT_SYSTEMS if system in systems])
        if "durable" in scenarios and "chorus-tcp" in systems:
            self.log("durable ...")
            self.run_durable()
        if "idle" in scenarios or "rooms" in scenarios:
            for system in IDLE_SYSTEMS:
                if system not in systems:
                    continue
                idle = "idle" in scenarios
                rooms = "rooms" in scenarios and system == "chorus-tcp"
                if idle or rooms:
                    self.log(f"idle/rooms {system} ...")
                    self.run_idle(system, idle=idle, rooms=rooms)
        if "gc" in scenarios and "chorus-tcp" in systems:
            self.log("gc ...")
            self.run_gc()
        if "storm" in scenarios and "chorus-tcp" in systems:
            self.log("storm ...")
            self.run_storm()
        if "attack" in scenarios and "chorus-tcp" in systems:
            from . import attack

            self.attack = attack.run_scenario(attack.SMOKE if self.args.smoke else attack.FULL, self.log)


# -- profile summary ---------------------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        try:
            path = str(Path(path).resolve().relative_to(REPO))
        except ValueError:
            pass
    return f"{m.group('fn')} ({path})"


def summarize_profile(path: Path, top: int = 15) -> dict:
    """Self and inclusive shares of the busiest functions in py-spy's collapsed-stack output."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        leaf = frames[-1]
        if leaf.startswith("EpollIOManager.get_events"):
            leaf = "(waiting in epoll_wait) " + leaf
        self_counts[leaf] = self_counts.get(leaf, 0) + n
        for f in set(frames):
            incl_counts[f] = incl_counts.get(f, 0) + n

    def ranked(counts):
        return [{"function": f, "share": c / total} for f, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "top_self": ranked(self_counts) if total else [],
            "top_inclusive": ranked(incl_counts) if total else []}


# -- reporting ---------------------------------------------------------------------------------------------------------

def _find(rows, scenario, variant, system):
    for row in rows:
        if (row["scenario"], row["variant"], row["system"]) == (scenario, variant, system) and row["status"] in (
                "ok", "incomplete"):
            return row["median"]
    return None


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def evaluate_targets(rows) -> list[dict]:
    out = []

    def fan(system, variant, key):
        m = _find(rows, "fanout", variant, system)
        return m.get(key) if m else None

    # Issue 14: paced, where nobody can coalesce, is the comparison that counts.
    for chorus, peer, key, limit, what in (
            ("chorus-tcp", "mosquitto", "cpu_us_per_delivery", 0.7, "server CPU per delivery"),
            ("chorus-tcp", "mosquitto", "p99_ms", 1.0, "p99 latency"),
            ("chorus-ws", "websockets", "p99_ms", 1.0, "p99 latency")):
        r = _ratio(fan(chorus, "paced", key), fan(peer, "paced", key))
        out.append({"target": f"paced fan-out {what}: {chorus} ≤ {limit:g} × {peer}",
                    "measured": fan(chorus, "paced", key), "reference": fan(peer, "paced", key),
                    "ratio": r, "met": None if r is None else r <= limit})
    idle = _find(rows, "idle", "idle", "chorus-tcp")
    kb = idle.get("kb_per_connection") if idle else None
    n = idle.get("connections") if idle else None
    out.append({"target": "idle memory ≤ 6 KB per connection at 10,000 connections",
                "measured": kb, "connections": n, "ratio": None if kb is None else kb / 6.0,
                "met": None if kb is None or (n or 0) < 10000 else kb <= 6.0})
    cpu = idle.get("cpu_us_per_conn_per_s") if idle else None
    out.append({"target": "idle CPU ≤ 3 µs per connection-second at 10,000 connections",
                "measured": cpu, "connections": n, "ratio": None if cpu is None else cpu / 3.0,
                "met": None if cpu is None or (n or 0) < 10000 else cpu <= 3.0})
    durable = _find(rows, "durable", "closed-loop", "chorus-tcp")
    piped = _find(rows, "durable", "pipelined", "chorus-tcp")
    rate = durable.get("acked_per_s") if durable else None
    p99 = durable.get("ack_p99_ms") if durable else None
    out.append({"target": "durable sends ≥ 28,000 acked msgs/s with p99 ACK ≤ 20 ms (100 senders waiting for ACKs)",
                "measured": {"acked_per_s": rate, "ack_p99_ms": p99,
                             "pipelined_acked_per_s": piped.get("acked_per_s") if piped else None,
                             "pipelined_ack_p99_ms": piped.get("ack_p99_ms") if piped else None},
                "ratio": None if rate is None else rate / 28000,
                "met": None if rate is None else (rate >= 28000 and p99 is not None and p99 <= 20)})
    gc_after, gc_before = (_find(rows, "gc", name, "chorus-tcp") for name, _ in reversed(GC_VARIANTS))
    worst = max(gc_after["storm_max_pause_ms"], gc_after["service_max_pause_ms"]) if gc_after else None
    before = max(gc_before["storm_max_pause_ms"], gc_before["service_max_pause_ms"]) if gc_before else None
    n = gc_after.get("connections") if gc_after else None
    out.append({"target": "worst GC pause ≤ 20 ms at 18,000 connections (login storm and service)",
                "measured": worst, "before": before, "connections": n,
                "ratio": None if worst is None else worst / 20.0,
                "met": None if worst is None or (n or 0) < 18000 else worst <= 20.0})
    return out


def _fmt(v, spec=".1f", none="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _range(row: dict, key: str, spec: str = ".1f") -> str:
    """The median of ``key`` with the range of the repetitions: ``m [lo–hi]``."""
    values = [r[key] for r in row["reps"] if isinstance(r.get(key), (int, float))]
    if not values:
        return "–"
    if len(values) == 1:
        return _fmt(values[0], spec)
    return f"{_fmt(statistics.median(values), spec)} [{_fmt(min(values), spec)}–{_fmt(max(values), spec)}]"


def _fmt_ratio(v):
    return "–" if v is None else f"{v:.2f}×"


def _unfinished(cells: list, row: dict, width: int) -> list:
    """The table row of a run that did not finish: ``cells``, its status, blanks, its note's first line."""
    return [*cells, row["status"], *[""] * (width - len(cells) - 2), (row["note"].splitlines() or [""])[0][:60]]


def _measured(rows, scenario: str, lines: list, width: int, key: str = "variant"):
    """(row, medians) of each measured row of ``scenario``; a row that did not finish becomes its line in ``lines``."""
    for row in rows:
        if row["scenario"] != scenario:
            continue
        if row["status"] not in ("ok", "incomplete"):
            lines.append(_unfinished([row[key]], row, width))
            continue
        yield row, row["median"]


def _table(headers, lines, markdown: bool = False) -> str:
    if markdown:
        cell = lambda x: str(x).replace("|", "/")  # noqa: E731
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(out + ["| " + " | ".join(cell(x) for x in line) + " |" for line in lines])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *lines, strict=True)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*map(str, line)) for line in lines]
    return "\n".join(out)


def render_tables(rows, targets, profiles: dict, sizes: Sizes, markdown: bool = False) -> str:
    parts = []
    md = markdown
    nl = "\n\n" if md else "\n"  # a markdown table must not touch the paragraph above it
    fan_lines = []
    for variant in ("paced", "burst"):
        for system in FANOUT_SYSTEMS:
            row = next((r for r in rows if r["scenario"] == "fanout" and r["variant"] == variant
                        and r["system"] == system), None)
            if row is None:
                continue
            m = row["median"]
            if row["status"] not in ("ok", "incomplete"):
                fan_lines.append(_unfinished([variant, system], row, 12))
                continue
            ratios = []
            if system.startswith("chorus"):
                for peer in PEERS:
                    pm = _find(rows, "fanout", variant, peer)
                    if pm:
                        cpu = _ratio(m["cpu_us_per_delivery"], pm["cpu_us_per_delivery"])
                        p99 = _ratio(m["p99_ms"], pm["p99_ms"])
                        ratios.append(f"{peer}: cpu {_fmt_ratio(cpu)} p99 {_fmt_ratio(p99)}")
            fan_lines.append([
                variant, system + ("" if row["status"] == "ok" else " (incomplete)"),
                _fmt(m["deliveries_per_s"], ",.0f"),
                f"{_fmt(m['cpu_us_per_delivery'], '.2f')} ({_fmt(m['user_us_per_delivery'], '.2f')}u+"
                f"{_fmt(m['sys_us_per_delivery'], '.2f')}s)",
                _fmt(m["p50_ms"], ".2f"), _fmt(m["p99_ms"], ".2f"), _fmt(m["p999_ms"], ".2f"),
                _fmt(m["rss_kb"] / 1024, ".0f"), f"{_fmt(m['server_util'] * 100, '.0f')}%",
                f"{_fmt(m['generator_util'] * 100, '.0f')}%", m["limit"], "; ".join(ratios)])
    if fan_lines:
        parts.append(f"Fan-out: one room of {sizes.fanout_members:,} members, 100-byte messages; paced = "
                     f"{sizes.paced_deliveries_per_s:,} deliveries/s (nobody can coalesce: the headline); burst = "
                     f"{sizes.burst_msgs} messages coalesced alike (Chorus by its group commit and cork, a peer by one "
                     f"publish carrying them), latency from each message's own send time (medians of {sizes.reps}, "
                     f"systems side by side, repetitions interleaved){nl}" + _table(
            ["variant", "system", "deliv/s", "CPU µs/deliv (user+sys)", "p50 ms", "p99 ms", "p99.9 ms", "RSS MB",
             "server", "gen max", "limit", "Chorus ÷ peer"], fan_lines, markdown=md))
    dur_lines = []
    for row, m in _measured(rows, "durable", dur_lines, 10):
        dur_lines.append([row["variant"], _fmt(m["acked_per_s"], ",.0f"), _fmt(m["ack_p50_ms"], ".2f"),
                          _fmt(m["ack_p99_ms"], ".2f"), _fmt(m["ack_mean_ms"], ".2f"), _fmt(m.get("batch_mean"), ".1f"),
                          _fmt(m["cpu_us_per_ack"], ".1f"), f"{_fmt(m['server_util'] * 100, '.0f')}%", m["limit"],
                          f"{_fmt_ratio(m['acked_per_s'] / GO_REFERENCE['acked_per_s'])} msgs/s, "
                          f"{_fmt_ratio(m['ack_mean_ms'] / GO_REFERENCE['avg_ms'] if m['ack_mean_ms'] else None)} avg"])
    if dur_lines:
        dur_lines.append(["design source (Go)", f"{GO_REFERENCE['acked_per_s']:,}", "", "", f"{GO_REFERENCE['avg_ms']}",
                          "", "", "", "", ""])
        parts.append(f"Durable sends: Chorus TCP, SQLite synchronous=FULL, {sizes.durable_clients} clients; "
                     f"pipelined = {sizes.durable_window} in flight each (medians of {sizes.reps}){nl}" + _table(
            ["variant", "acked/s", "ACK p50 ms", "ACK p99 ms", "ACK mean ms", "batch mean", "CPU µs/ack", "server",
             "limit", "÷ design source"], dur_lines, markdown=md))
    idle_lines = []
    for row, m in _measured(rows, "idle", idle_lines, 8, "system"):
        ratios = []
        if row["system"].startswith("chorus"):
            for peer in PEERS:
                pm = _find(rows, "idle", "idle", peer)
                if pm:
                    ratios.append(f"{peer}: mem {_fmt_ratio(_ratio(m['kb_per_connection'], pm['kb_per_connection']))}"
                                  f" cpu {_fmt_ratio(_ratio(m['idle_cpu_pct'], pm['idle_cpu_pct']))}")
        idle_lines.append([row["system"], _fmt(m["connections"], ",.0f"), _fmt(m["kb_per_connection"], ".2f"),
                           _fmt(m["rss_kb"] / 1024, ".0f"), _fmt(m["idle_cpu_pct"], ".1f"),
                           _fmt(m["cpu_us_per_conn_per_s"], ".2f"), _fmt(m.get("others_cores"), ".1f"),
                           "; ".join(ratios)])
    if idle_lines:
        parts.append(f"Idle: {sizes.idle_conns:,} logged-in connections, heartbeat every {sizes.heartbeat_s}s "
                     f"(medians of {sizes.reps}){nl}" + _table(
            ["system", "conns", "KB/conn", "RSS MB", "idle CPU %", "µs/conn/s", "others (cores)", "Chorus ÷ peer"],
            idle_lines, markdown=md))
    room_lines = []
    for row, m in _measured(rows, "rooms", room_lines, 9, "system"):
        room_lines.append([row["system"], _fmt(m["ops_per_s"], ",.0f"), _fmt(m["deliveries_per_s"], ",.0f"),
                           _fmt(m["cpu_us_per_op"], ".1f"),
                           f"{_fmt(m['p50_ms'], '.2f')}/{_fmt(m['p99_ms'], '.2f')}/{_fmt(m['p999_ms'], '.2f')}",
                           _fmt(m["ack_p99_ms"], ".2f"), _fmt(m["history_p99_ms"], ".2f"),
                           f"{_fmt(m['server_util'] * 100, '.0f')}%", m["limit"]])
    if room_lines:
        parts.append(f"Many rooms: {sizes.idle_conns:,} connections in {sizes.idle_conns // sizes.room_size:,} rooms "
                     f"of {sizes.room_size}, {sizes.mixed_ops_per_s:,} ops/s (80% SEND, 15% TYPING, 5% HISTORY) "
                     f"(medians of {sizes.reps}){nl}" + _table(
            ["system", "ops/s", "deliv/s", "CPU µs/op", "deliv p50/p99/p99.9 ms", "ACK p99 ms", "HISTORY p99 ms",
             "server", "limit"], room_lines, markdown=md))
    gc_lines = []
    for row, m in _measured(rows, "gc", gc_lines, 9):
        gc_lines.append([row["variant"], _fmt(m["connections"], ",.0f"),
                         f"{_range(row, 'storm_max_pause_ms')} / {_range(row, 'storm_max_pause_cpu_ms')}",
                         f"{_range(row, 'service_max_pause_ms')} / {_range(row, 'service_max_pause_cpu_ms')}",
                         _fmt(m["full_collections"], ".0f"),
                         _fmt(m["freezes"], ".0f"), _fmt(m["p99_ms"], ".2f"), _fmt(m["rss_kb"] / 1024, ".0f"),
                         _fmt(m["setup_s"], ".0f")])
    if gc_lines:
        parts.append(f"Garbage collector: {sizes.gc_conns:,} logins, then {sizes.mixed_ops_per_s:,} ops/s in rooms of "
                     f"{sizes.room_size} for {sizes.gc_service_s:g}s; worst pause per phase, as the loop saw it (wall) "
                     f"and as the collector spent it (the loop thread's CPU: without the time a busy machine gave to "
                     f"others), median [min–max] of {sizes.reps}, variants interleaved{nl}" + _table(
            ["policy", "conns", "worst pause in the login storm ms (wall / CPU)",
             "worst pause in service ms (wall / CPU)", "full collections", "freezes", "delivery p99 ms", "RSS MB",
             "storm s"], gc_lines, markdown=md))
    storm_lines = []
    for row, m in _measured(rows, "storm", storm_lines, 7):
        storm_lines.append([row["variant"], f"{_fmt(m['ready'], ',.0f')} of {_fmt(m['logins'], ',.0f')}",
                            _fmt(m["timed_out"], ".0f"), _range(row, "storm_s", ".0f"),
                            _range(row, "rss_growth_mb", ".0f"), _range(row, "kb_per_connection", ".1f"),
                            _fmt(m["cpu_ms_per_login"], ".1f")])
    if storm_lines:
        parts.append(f"Login storm: {sizes.storm_logins:,} REGISTERs at argon2id's default cost, "
                     f"{sizes.storm_concurrency} at once per generator; RSS once it is over, median [min–max] of "
                     f"{sizes.reps}, variants interleaved{nl}" + _table(
            ["malloc", "logged in", "timed out", "storm s", "RSS growth MB", "KB per connection", "CPU ms/login"],
            storm_lines, markdown=md))
    target_lines = []
    for t in targets:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        ratio = t["ratio"]
        if isinstance(ratio, dict):
            ratio = ", ".join(f"{k} {_fmt_ratio(v)}" for k, v in ratio.items())
        else:
            ratio = _fmt_ratio(ratio)
        target_lines.append([t["target"], ratio, met])
    parts.append(f"Targets (issues 6 and 14){nl}" + _table(["target", "ratio", "verdict"], target_lines, markdown=md))
    for what, profile in profiles.items():
        if profile and profile.get("top_self"):
            lines = [[f"{p['share'] * 100:.1f}%", p["function"]] for p in profile["top_self"][:12]]
            parts.append(f"py-spy, Chorus server during {what} ({profile['samples']} samples): self time{nl}"
                         + _table(["share", "function"], lines, markdown=md))
    return "\n\n".join(parts)


def make_chart(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {"chorus-tcp": "#1f77b4", "chorus-ws": "#6baed6", "mosquitto": "#d62728", "websockets": "#ff9896"}

    ax = axes[0][0]
    labels, users, syss, cols = [], [], [], []
    for variant in ("paced", "burst"):
        for system in FANOUT_SYSTEMS:
            m = _find(rows, "fanout", variant, system)
            if m:
                labels.append(f"{system}\n{variant}")
                users.append(m["user_us_per_delivery"])
                syss.append(m["sys_us_per_delivery"])
                cols.append(colors[system])
    x = range(len(labels))
    ax.bar(x, users, color=cols, label="user")
    ax.bar(x, syss, bottom=users, color=cols, alpha=0.45, hatch="//", label="system")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("server CPU µs per delivery")
    ax.set_title("Fan-out: server CPU per delivery (solid user, hatched system)")

    ax = axes[0][1]
    systems = [s for s in FANOUT_SYSTEMS if _find(rows, "fanout", "paced", s)]
    width = 0.25
    for i, (key, label) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))):
        vals = [_find(rows, "fanout", "paced", s)[key] or 0 for s in systems]
        ax.bar([j + (i - 1) * width for j in range(len(systems))], vals, width, label=label)
    ax.set_xticks(list(range(len(systems))), systems, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("Fan-out paced: delivery latency")
    ax.legend()

    ax = axes[1][0]
    systems = [s for s in IDLE_SYSTEMS if _find(rows, "idle", "idle", s)]
    vals = [_find(rows, "idle", "idle", s)["kb_per_connection"] for s in systems]
    ax.bar(systems, vals, color=[colors[s] for s in systems])
    ax.axhline(6.0, color="k", linestyle="--", linewidth=1)
    ax.text(0, 6.2, "target 6 KB", fontsize=8)
    ax.set_ylabel("KB RSS per connection")
    ax.set_title("Idle connections: memory per connection")

    ax = axes[1][1]
    names, rates, p99s = [], [], []
    for variant in ("closed-loop", "pipelined"):
        m = _find(rows, "durable", variant, "chorus-tcp")
        if m:
            names.append(f"chorus {variant}")
            rates.append(m["acked_per_s"])
            p99s.append(m["ack_p99_ms"])
    names.append("design source (Go)")
    rates.append(GO_REFERENCE["acked_per_s"])
    p99s.append(None)
    ax.bar(names, rates, color=["#1f77b4"] * (len(names) - 1) + ["#999999"])
    ax.axhline(28000, color="k", linestyle="--", linewidth=1)
    ax.text(-0.4, 28500, "target 28,000/s", fontsize=8)
    for i, p in enumerate(p99s):
        if p is not None:
            ax.text(i, rates[i], f"p99 {p:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("acknowledged messages/s")
    ax.set_title("Durable sends (100 clients)")

    fig.suptitle("Chorus vs Mosquitto vs websockets (same machine, same run; medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine_info(args, sizes: Sizes) -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "server", "proto"],
                                    cwd=REPO, capture_output=True, text=True).stdout.strip())
    except OSError:
        rev, dirty = None, None
    try:
        mem_kb = int(open("/proc/meminfo").readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m bench " + " ".join(args.argv),
        "host": platform.node(), "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1048576, 1) if mem_kb else None,
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "chorus_git": rev, "chorus_server_or_proto_modified": dirty,
        "versions": {p: version(p) for p in ("trio", "construct", "lz4", "websockets", "hdrhistogram",
                                             "matplotlib", "py-spy", "wsproto")},
        "mosquitto": _mosquitto_version(),
        "fd_limit": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE),
        "sizes": dataclasses.asdict(sizes),
        "references": {"design_source_go": GO_REFERENCE, "issue_6_figures": ISSUE_FIGURES},
    }


def _relimit(rows) -> None:
    for row in rows:
        for m in [row.get("median") or {}, *row.get("reps", [])]:
            if "limit" in m:
                m["limit"] = limit_of(m["server_util"], m["generator_util"],
                                      row["variant"] != "burst" and row["scenario"] != "durable",
                                      m.get("others_cores", 0.0))


def report(path: Path) -> int:
    """Re-render an earlier results file next to it (same stem)."""
    from . import attack

    results = json.loads(path.read_text())
    sizes = Sizes(**results["meta"]["sizes"])
    _relimit(results["rows"])
    results["targets"] = evaluate_targets(results["rows"])
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    profiles = results.get("profiles") or {}
    path.with_suffix(".md").write_text(render_tables(results["rows"], results["targets"], profiles, sizes,
                                                     markdown=True) + attack.render(results, markdown=True) + "\n")
    make_chart(results["rows"], path.with_suffix(".png"))
    print(render_tables(results["rows"], results["targets"], profiles, sizes) + attack.render(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: checks the harness only")
    parser.add_argument("--reps", type=int, help="repetitions per measurement (default 3; smoke 1)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of " + ",".join(SCENARIOS))
    parser.add_argument("--systems", default=",".join(FANOUT_SYSTEMS), help="comma-separated subset of systems")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory")
    parser.add_argument("--name", help="output file stem (default: bench, or smoke with --smoke)")
    parser.add_argument("--profile", action="store_true", help="py-spy the Chorus server during the paced fan-out "
                        "(and the other scenarios)")
    parser.add_argument("--profile-system", default="chorus-tcp", help="which Chorus transport --profile samples "
                        "during the paced fan-out (default chorus-tcp)")
    parser.add_argument("--report", metavar="JSON", help="measure nothing: re-render the tables, markdown and chart "
                        "of an earlier results file (limits and targets recomputed)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                        help="override one size, e.g. --size idle_conns=2000 (names: "
                             + ", ".join(f.name for f in dataclasses.fields(Sizes)) + ")")
    args = parser.parse_args(argv)
    args.argv = argv
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.systems = [s for s in args.systems.split(",") if s]
    for s in args.scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s}")
    sizes = SMOKE if args.smoke else FULL
    if args.reps:
        sizes = dataclasses.replace(sizes, reps=args.reps)
    for item in args.size:
        key, _, value = item.partition("=")
        field = {f.name: f for f in dataclasses.fields(Sizes)}.get(key)
        if field is None:
            parser.error(f"unknown size {key}")
        sizes = dataclasses.replace(sizes, **{key: type(getattr(sizes, key))(value)})
    name = args.name or ("smoke" if args.smoke else "attack" if args.scenarios == ["attack"] else "bench")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(Path(args.report))

    meta = machine_info(args, sizes)
    started = time.monotonic()
    bench = Bench(sizes, args)
    bench.run()
    meta["loadavg_end"] = os.getloadavg()
    codes = sorted({r["code"] for r in bench.rows if r.get("code")})
    meta["code_fingerprints"] = codes
    if len(codes) > 1:
        print(f"WARNING: server/ or proto/ changed during the run ({', '.join(codes)}): rows measured on different "
              "code are not comparable; run again on a quiet tree.", file=sys.stderr)
    meta["duration_s"] = round(time.monotonic() - started, 1)
    targets = evaluate_targets(bench.rows)
    profiles = bench.profiles
    results = {"meta": meta, "rows": bench.rows, "targets": targets, "profiles": profiles}
    if bench.attack is not None:
        results["attack"] = bench.attack
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    png_path = out / f"{name}.png"
    from . import attack

    def tables(md: bool = False) -> str:  # an attack-only run has no issue-6 tables or chart
        return ((render_tables(bench.rows, targets, profiles, sizes, markdown=md) if bench.rows else "")
                + attack.render(results, markdown=md)).lstrip()

    if bench.rows:
        make_chart(bench.rows, png_path)
    (out / f"{name}.md").write_text(tables(True) + "\n")
    print(tables())
    print(f"\nresults: {json_path}" + (f"  chart: {png_path}" if bench.rows else "") + f"  ({meta['duration_s']}s)")
    return 1 if any(r["status"] == "error" for r in bench.rows + (bench.attack or {}).get("rows", [])) else 0
