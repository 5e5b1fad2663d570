"""``python -m bench.cluster_bench``: Chorus in node mode (PostgreSQL store, Redis broker) on this machine (issue 11).

How a run works. Each scenario starts its own nodes (``bench/cluster.py``: ``chorus-server --store postgresql://…
--broker redis://… --reuse-port``) against a fresh PostgreSQL database ``chorus_bench_<scenario>_<pid>`` on the
machine's server (dropped afterwards, as are those of runs that died) and a ``redis-server`` of their own on a free
port (no persistence; the machine's Redis is shared with everyone's tests, and its CPU would not be the nodes'
alone), and drives them with the load-generator processes of ``bench/loadgen.py`` through ``bench.run.Workers``.
The measured windows are ``bench.run.Bench``'s own (``_idle_rep``, ``_fanout_rep``, ``_durable_rep``) with the
nodes standing in for its one server: CPU (utime + stime of ``/proc/PID/stat``) and RSS (``/proc/PID/status``)
summed over every node. Around each window the CPU of the bench's Redis and of the PostgreSQL backends serving the
bench's database is read the same way (PostgreSQL's shared WAL writer and checkpointer are not counted), so each
row gives the nodes' cost and the cost including the services they lean on. Every node runs with the bench's
lifted per-client limits (``NODE_FLAGS``): cheap password hashing (argon2id 1 pass, 1 MiB),
``--max-connections 19000``, ``--max-connections-per-user 1000``, the per-address budgets of ``bench.run``
(``--max-connections-per-address 20000``, ``--connections-per-s-per-address`` and ``--connection-burst-per-address``
1,000,000, …).

Scenarios:

- ``scale``: ``scale_nodes`` nodes sharing one port (SO_REUSEPORT spreads the connections), ``scale_users`` users
  registered, then ``scale_conns`` connections opened by load-generator processes of at most ``scale_per_worker``
  sockets each (per-process file limit 20,000), each from its own source address 127.0.0.x (so ephemeral ports
  do not run out), each connection HELLO → RESUME with one of the users' tokens (many connections per user: no
  password hash per connection) → SYNC. Reported: time to connect and authenticate them all; RSS per connection
  (summed over nodes, minus their RSS before any client); idle CPU per connection-second over windows of one
  heartbeat period, net of the nodes' CPU without clients; then, per repetition, every connection killed at once
  by the clients (RST), the time until the nodes let go of them, and the time to RESUME them all again.
- ``fanout``: one room of ``fanout_members`` members spread evenly over the nodes (each node on its own port, the
  member with index i on node i mod n), one member publishing at ``paced_deliveries_per_s`` deliveries per second;
  nodes = 1 is the single-node server (SQLite, in-process broker, ``bench.run.start_system``) measured in the same
  run as the reference; then 1, 2, 3 nodes in node mode. CPU µs per delivery, delivery latency p50/p99.
- ``durable``: ``durable_clients`` senders, each in its own room and waiting for its ACK before the next SEND:
  SQLite on one node against PostgreSQL with 1 and 2 nodes. Acked/s and ACK p50/p99.

Figures are medians of ``--reps`` repetitions with their range (min–max). Output: a table on stdout and in
``<out>/cluster.md`` (whatever follows the line ``END_OF_TABLES`` in an existing file is kept: the hand-written
notes), and every repetition in ``<out>/cluster.json``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from chorus import proto

from . import cluster, loadgen, run

SCENARIOS = ("scale", "fanout", "durable")
PG_SERVER = "postgresql://root@127.0.0.1:5432"
REDIS_HOST = "127.0.0.1"
REDIS_SERVER = "/usr/bin/redis-server"
NODE_MODULES = ("chorus.server._pgstore", "chorus.server._redisbroker")
END_OF_TABLES = "<!-- END_OF_TABLES: text below this line is kept when the bench rewrites the tables -->"


@dataclass(frozen=True)
class Sizes(run.Sizes):
    """``bench.run``'s sizes (its windows are reused: ``idle_s``, ``paced_s``, ``durable_s``, …) and this bench's."""

    scale_conns: int = 100_000
    scale_nodes: int = 8
    scale_users: int = 1000
    scale_per_worker: int = 15_000  # sockets per load-generator process (the file limit is 20,000)
    scale_concurrency: int = 200  # connections being set up at once per load-generator process
    scale_storms: int = 1  # kill-all-and-resume repetitions: each is scale_conns RESUMEs (minutes at 100,000)
    baseline_s: float = 3.0  # the nodes' CPU without clients is read over this long
    fanout_nodes: tuple[int, ...] = (1, 2, 3)
    durable_nodes: tuple[int, ...] = (1, 2)
    setup_timeout_s: float = 1200.0  # a storm of 100,000 RESUMEs takes minutes here (see cluster.md)


#: ``idle_s``: one heartbeat period, so every connection's PING falls in each idle window once.
FULL = Sizes()
SMOKE = Sizes(**dataclasses.asdict(run.SMOKE), scale_conns=300, scale_nodes=2, scale_users=10,
              scale_per_worker=150, scale_concurrency=50, baseline_s=0.3, fanout_nodes=(1, 2), setup_timeout_s=60.0)

#: Every node's flags: the bench is the only client, so the per-client limits are lifted (as bench.run does).
NODE_FLAGS = [
    "--rate-per-s", "1000000", "--rate-burst", "1000000", "--max-connections", "19000",
    "--max-connections-per-user", "1000", "--outbound-buffer-bytes", str(64 << 20), *run._LIFTED_BUDGETS,
    "--handshake-timeout-s", "120", "--auth-timeout-s", "300", "--shutdown-grace-s", "2",
    # Password hashing is not what this bench measures: argon2id at 1 pass and 1 MiB.
    "--argon2-time-cost", "1", "--argon2-memory-kib", "1024", "--log-level", "WARNING",
]


# -- load generators: connections that pick their node, register, resume ---------------------------------------------

class NodeConn(loadgen.ChorusConn):
    """A bench connection (REGISTER, JOIN, SYNC) on the node of its index: spec ``ports`` round robin."""

    kind = "node"

    def open(self, host: str, port: int, source: str | None) -> None:
        ports = self.w.spec.get("ports")
        super().open(host, ports[self.index % len(ports)] if ports else port, source)


class RegisterConn(NodeConn):
    """REGISTER, keep the session token (``cmd_tokens``), and stop there."""

    kind = "node-register"

    def event(self, event, now: int) -> None:
        if type(event) is proto.AuthOk:
            self.w.tokens[self.index] = event.token
            self.set_ready()
        else:
            super().event(event, now)


class ResumeConn(NodeConn):
    """HELLO → RESUME with token ``index mod len(tokens)`` → SYNC: many connections per user, no password hash."""

    kind = "node-resume"

    def event(self, event, now: int) -> None:
        kind = type(event)
        if kind is proto.Welcome:
            tokens = self.w.spec["tokens"]
            self.send_frame(proto.encode(proto.Resume(tokens[self.index % len(tokens)],
                                                      request_id=self.next_rid())))
        elif kind is proto.AuthOk:
            self.send_frame(proto.encode(proto.Sync((), request_id=self.next_rid())))
        else:
            super().event(event, now)


class ClusterWorker(loadgen.Worker):
    """``loadgen.Worker`` plus ``tokens`` (what RegisterConn kept) and ``abort`` (RST every connection)."""

    def __init__(self, pipe, spec: dict):
        super().__init__(pipe, spec)
        self.tokens: dict[int, str] = {}

    def cmd_tokens(self, cmd: dict) -> dict:
        return {"tokens": self.tokens}

    def cmd_abort(self, cmd: dict) -> dict:
        linger = struct.pack("ii", 1, 0)  # close() sends RST: no FIN handshake, no TIME_WAIT
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            conn.close()
        aborted, self.conns, self.ready_count = len(self.conns), [], 0
        self.failures.clear()
        return {"aborted": aborted}


loadgen.CONN_TYPES.update({cls.kind: cls for cls in (NodeConn, RegisterConn, ResumeConn)})


def worker_main(pipe, spec: dict) -> None:
    """Entry point of a load-generator process (``run.Workers(target=...)``)."""
    ClusterWorker(pipe, spec).serve_forever()


# -- the services and the nodes --------------------------------------------------------------------------------------

def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((REDIS_HOST, port), timeout=2) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """A redis-server of the bench's own on a free port (no persistence): its CPU is the nodes' doing alone."""

    def __init__(self):
        self.port = run._free_port()
        self.proc = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", REDIS_HOST, "--save", "",
                                      "--appendonly", "no", "--loglevel", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{REDIS_SERVER} did not start on port {self.port}")
            time.sleep(0.02)
        self.url = f"redis://{REDIS_HOST}:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def node_mode_problem() -> str | None:
    """Why node mode cannot run here (modules, redis-server or PostgreSQL missing), or None."""
    for module in (*NODE_MODULES, "psycopg", "coredis"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable (node mode not built or the node extra not installed)"
    if not os.access(REDIS_SERVER, os.X_OK):
        return f"{REDIS_SERVER} not found (Debian package redis-server)"
    import psycopg

    try:
        psycopg.connect(PG_SERVER + "/postgres", connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_SERVER}: {str(exc).strip()}"
    return None


def _admin(query, *params) -> list:
    import psycopg

    with psycopg.connect(PG_SERVER + "/postgres", autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


def drop_database(name: str) -> None:
    from psycopg import sql

    _admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def drop_stale_databases() -> None:
    """Drop the databases of bench runs that are gone (``chorus_bench_<scenario>_<pid>``, that pid not running)."""
    for (name,) in _admin("SELECT datname FROM pg_database WHERE datname LIKE 'chorus_bench_%'"):
        pid = name.rpartition("_")[2]
        if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
            drop_database(name)


def _cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_cpu(group: NodeGroup) -> dict[int, tuple[str, float]]:
    """CPU seconds so far, by pid, of the group's Redis and of the PostgreSQL backends serving its database
    (PostgreSQL's shared background processes, WAL writer and checkpointer, are not counted)."""
    pids = {group.redis.proc.pid: "redis"} if group.redis else {}
    if group.database:
        pids.update({pid: "postgresql" for (pid,) in _admin("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                                             group.database)})
    readings = {pid: (service, _cpu_s(pid)) for pid, service in pids.items()}
    return {pid: (service, cpu) for pid, (service, cpu) in readings.items() if cpu is not None}


def service_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds each service used between two ``service_cpu()`` readings (a backend that ended is lost)."""
    used = {"redis": 0.0, "postgresql": 0.0}
    for pid, (service, cpu) in after.items():
        used[service] += cpu - before.get(pid, (service, 0.0))[1]
    return used


class _Tail(threading.Thread):
    """Reads a node's output to the end (a full pipe would stop the node) and keeps its last lines."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, collections.deque(maxlen=20)

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line.rstrip())


class NodeGroup:
    """Server processes measured as one server: what ``run.Bench``'s windows read from an ``Endpoint`` (CPU, RSS),
    summed over the nodes. ``ports``: one per node, or one shared (SO_REUSEPORT)."""

    def __init__(self, label: str, endpoints: list, ports: list[int], *, stop=None, database: str | None = None,
                 redis: PrivateRedis | None = None, tails=()):
        self.label, self.endpoints, self.ports = label, endpoints, ports
        self.host, self.port, self.ws_port = "127.0.0.1", ports[0], None
        self._stop, self.database, self.redis, self.tails = stop, database, redis, list(tails)

    def __len__(self) -> int:
        return len(self.endpoints)

    def cpu(self) -> tuple[float, float]:
        each = [ep.cpu() for ep in self.endpoints]
        return sum(u for u, _ in each), sum(s for _, s in each)

    def node_cpu(self) -> list[float]:
        return [sum(ep.cpu()) for ep in self.endpoints]

    def rss_kb(self) -> int:
        return sum(ep.rss_kb() for ep in self.endpoints)

    def stats(self) -> dict | None:
        return self.endpoints[0].stats() if len(self.endpoints) == 1 else None

    def open_files(self) -> list[int]:
        return [len(os.listdir(f"/proc/{ep.pid}/fd")) for ep in self.endpoints]

    def check_alive(self) -> None:
        for i, ep in enumerate(self.endpoints):
            if ep.proc.poll() is not None:
                tail = " | ".join(list(self.tails[i].lines)[-5:]) if i < len(self.tails) else ep.log_tail()
                raise RuntimeError(f"node {i + 1} exited with code {ep.proc.returncode}: {tail}")

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
        else:
            for ep in self.endpoints:
                ep.stop()
        if self.database:
            drop_database(self.database)
        if self.redis:
            self.redis.stop()


def start_sqlite(heartbeat_s: int) -> NodeGroup:
    """The single-node server (SQLite, in-process broker) exactly as ``python -m bench`` runs it."""
    ep = run.start_system("chorus-tcp", heartbeat_s)
    return NodeGroup("SQLite, 1 process", [ep], [ep.port])


def start_node_group(scenario: str, count: int, *, shared_port: bool, heartbeat_s: int) -> NodeGroup:
    """``count`` nodes on a fresh database and a Redis of their own; one shared port or one port each."""
    run.Bench.code_now = run.code_fingerprint()
    drop_stale_databases()
    database = f"chorus_bench_{scenario}_{os.getpid()}"  # runs at the same time (a test, a bench) never meet
    redis = PrivateRedis()
    extra = [*NODE_FLAGS, "--ping-interval-s", str(heartbeat_s)]
    clusters: list[cluster.Cluster] = []
    ports: list[int] = []
    endpoints: list[run.Endpoint] = []

    def stop() -> None:
        for c in clusters:
            c.stop(grace_s=15)
        for ep in endpoints:
            ep.proc.stdout.close()

    try:
        for index in range(1 if shared_port else count):
            port = ports[0] if ports and shared_port else run._free_port()
            c = cluster.start_nodes(count if shared_port else 1, port=port, ws_port=None,
                                    store=f"{PG_SERVER}/{database}", broker=redis.url, extra=extra,
                                    prefix=f"bench-{scenario}-{index}")
            clusters.append(c)
            ports.append(port)
            endpoints += [run.Endpoint(f"node-{len(endpoints) + 1}", proc, port, None) for proc in c.nodes]
    except BaseException:
        stop()
        redis.stop()
        drop_database(database)
        raise
    tails = [_Tail(ep.proc.stdout) for ep in endpoints]
    for t in tails:
        t.start()
    return NodeGroup(f"{count} node{'s' * (count > 1)}", endpoints, ports, stop=stop, database=database,
                     redis=redis, tails=tails)


# -- measurements ----------------------------------------------------------------------------------------------------

def _merge(replies, key: str) -> dict:
    total: collections.Counter = collections.Counter()
    for r in replies:
        total.update(r.get(key) or {})
    return dict(total.most_common(8))


class ClusterBench:
    def __init__(self, sizes: Sizes, args):
        self.sizes = sizes
        self.args = args
        self.rows: list[dict] = []
        self.bench = run.Bench(sizes, types.SimpleNamespace(out=args.out, profile=False))  # its measured windows
        self.node_problem = node_mode_problem()

    log = run.Bench.log

    def workers(self, kind: str, group: NodeGroup, n: int, per_worker: int, *, room_size: int, prefix: str,
                **spec) -> run.Workers:
        spread = {"ports": group.ports} if len(set(group.ports)) > 1 else {}
        return run.Workers(kind, group, n, per_worker, room_size=room_size, room_prefix=prefix,
                           heartbeat_s=self.sizes.heartbeat_s, target=worker_main, extra_spec={**spread, **spec})

    def setup(self, workers: run.Workers, group: NodeGroup) -> dict:
        """Open and set up every connection; never raises for connections that failed: says how many got ready."""
        def generators() -> float:
            return sum(_cpu_s(proc.pid) or 0.0 for proc in workers.procs)

        cpu0, svc0, gen0 = sum(group.cpu()), service_cpu(group), generators()
        busy0, started = run.machine_busy_s(), time.monotonic()
        replies = workers.command({"cmd": "setup", "timeout_s": self.sizes.setup_timeout_s})
        seconds = time.monotonic() - started
        cpu, services = sum(group.cpu()) - cpu0, sum(service_delta(svc0, service_cpu(group)).values())
        gen = generators() - gen0
        ready = sum(r["ready"] for r in replies)
        out = {"ready": ready, "wanted": workers.n_conns, "seconds": seconds, "per_s": ready / seconds,
               "cpu_us_per_conn": cpu * 1e6 / max(ready, 1), "services_us_per_conn": services * 1e6 / max(ready, 1),
               "generator_us_per_conn": gen * 1e6 / max(ready, 1), "nodes_cores": cpu / seconds,
               "services_cores": services / seconds, "generator_cores": gen / seconds,
               "others_cores": max(0.0, run.machine_busy_s() - busy0 - cpu - services - gen) / seconds,
               "machine_util": (run.machine_busy_s() - busy0) / seconds / (os.cpu_count() or 1),
               "worker_seconds": [round(r["setup_s"], 2) for r in replies],
               "finished": all(r["finished"] for r in replies)}
        failures, errors = _merge(replies, "failures"), _merge(replies, "errors")
        if failures:
            out["failures"] = failures
        if errors:
            out["errors"] = errors
        group.check_alive()
        return out

    def measured(self, group: NodeGroup, fn, active_key: str | None, default_active_s: float) -> dict:
        """``fn()`` (one of run.Bench's windows) plus what it cannot see: Redis's and PostgreSQL's CPU, the busiest
        node, the whole machine."""
        svc0, nodes0, busy0, wall0 = service_cpu(group), group.node_cpu(), run.machine_busy_s(), time.monotonic()
        rep = fn()
        svc1, nodes1, busy1, wall1 = service_cpu(group), group.node_cpu(), run.machine_busy_s(), time.monotonic()
        used = service_delta(svc0, svc1)
        active_s = rep.get(active_key) if active_key else None
        active_s = active_s or default_active_s
        rep.update({"nodes": len(group), "redis_cpu_s": used["redis"], "postgresql_cpu_s": used["postgresql"],
                    "node_cpu_s": [round(b - a, 3) for a, b in zip(nodes0, nodes1, strict=True)],
                    "busiest_node_util": max(b - a for a, b in zip(nodes0, nodes1, strict=True)) / active_s,
                    "machine_util": (busy1 - busy0) / (wall1 - wall0) / (os.cpu_count() or 1)})
        if "limit" in rep:
            machine = " (machine busy)" if rep["machine_util"] >= 0.9 else ""
            rep["limit"] = run.limit_of(rep["busiest_node_util"], rep["generator_util"], active_key is not None,
                                        rep.get("others_cores", 0.0)) + machine
        group.check_alive()
        return rep

    def add_row(self, scenario: str, variant: str, system: str, status: str, reps=None, note: str = "",
                **extra) -> dict:
        row = {"scenario": scenario, "variant": variant, "system": system, "status": status, "note": note,
               "code": run.Bench.code_now, "reps": reps or [], "median": run.median_metrics(reps) if reps else {},
               **extra}
        m = row["median"]
        if "limit" in m:  # the limit of the medians, not a list of each repetition's
            m["limit"] = run.limit_of(m["busiest_node_util"], m["generator_util"], scenario == "fanout",
                                      m.get("others_cores", 0.0)) + (" (machine busy)" if m["machine_util"] >= 0.9
                                                                     else "")
        if status == "ok" and reps and not all(r.get("complete", True) for r in reps):
            row["status"] = "incomplete"
        self.rows.append(row)
        return row

    def failed(self, scenario: str, variant: str, system: str, exc: BaseException) -> None:
        status = exc.status if isinstance(exc, run.Unavailable) else "error"
        self.add_row(scenario, variant, system, status, note=str(exc)[:800])
        self.log(f"{scenario}/{variant}/{system}: {status}: {exc}")

    def start(self, scenario: str, nodes: int | None, *, shared_port: bool = False) -> NodeGroup:
        """nodes None: the SQLite single-node reference; else node mode (Unavailable when it cannot run)."""
        if nodes is None:
            return start_sqlite(self.sizes.heartbeat_s)
        if self.node_problem:
            raise run.Unavailable(self.node_problem, "not available")
        return start_node_group(scenario, nodes, shared_port=shared_port, heartbeat_s=self.sizes.heartbeat_s)

    # -- scenario 1: connections at scale -----------------------------------------------------------------------------
    def run_scale(self) -> None:
        s = self.sizes
        group = workers = None
        system = f"{s.scale_nodes} nodes"
        try:
            group = self.start("scale", s.scale_nodes, shared_port=True)
            time.sleep(1.0)
            base_rss, base_files = group.rss_kb(), group.open_files()
            cpu0, svc0 = sum(group.cpu()), service_cpu(group)
            time.sleep(s.baseline_s)
            base_cpu_s = (sum(group.cpu()) - cpu0) / s.baseline_s
            base_svc_s = sum(service_delta(svc0, service_cpu(group)).values()) / s.baseline_s
            self.log(f"scale: {len(group)} nodes on port {group.port}, {base_rss / 1024:.0f} MB RSS, "
                     f"{base_cpu_s * 100:.1f}% CPU without clients")
            reg = self.workers("node-register", group, s.scale_users, s.scale_users, room_size=1, prefix="s",
                               concurrency=50)
            try:
                register = self.setup(reg, group)
                tokens: dict[int, str] = {}
                for r in reg.command({"cmd": "tokens"}):
                    tokens.update(r["tokens"])
            finally:
                reg.close()
            if len(tokens) < s.scale_users:
                raise RuntimeError(f"only {len(tokens)} of {s.scale_users} users registered: {register}")
            self.log(f"scale: {s.scale_users} users registered in {register['seconds']:.1f}s")
            n_workers = -(-s.scale_conns // s.scale_per_worker)
            workers = self.workers("node-resume", group, s.scale_conns, -(-s.scale_conns // n_workers),
                                   room_size=1, prefix="s", tokens=[tokens[i] for i in sorted(tokens)],
                                   concurrency=s.scale_concurrency)
            connect = self.setup(workers, group)
            connect["open_files"] = [f - b for f, b in zip(group.open_files(), base_files, strict=True)]
            self.log(f"scale: {connect['ready']:,} of {s.scale_conns:,} connections resumed in "
                     f"{connect['seconds']:.1f}s ({connect['per_s']:,.0f}/s); per node {connect['open_files']}")
            idle = []
            for _ in range(s.reps):
                rep = self.measured(group, partial(self.bench._idle_rep, group, workers, base_rss), None,
                                    s.idle_s)
                live, cpu = max(rep["connections"], 1), rep["user_s"] + rep["sys_s"]
                services = rep["redis_cpu_s"] + rep["postgresql_cpu_s"]
                rep["base_cpu_pct"] = base_cpu_s * 100
                rep["net_cpu_us_per_conn_per_s"] = (cpu / s.idle_s - base_cpu_s) * 1e6 / live
                rep["services_us_per_conn_per_s"] = (services / s.idle_s - base_svc_s) * 1e6 / live
                rep["rss_mb"] = rep["rss_kb"] / 1024
                idle.append(rep)
            resume = []
            for _ in range(s.scale_storms):
                resume.append(self.kill_and_resume(group, workers, base_files))
                self.log(f"scale: killed and resumed {resume[-1]['ready']:,} in {resume[-1]['seconds']:.1f}s "
                         f"(the nodes let go of the killed ones in {resume[-1]['teardown_s']:.1f}s)")
            for rep in idle:
                rep["complete"] = rep["complete"] and all(r["ready"] == s.scale_conns for r in resume)
            note = (f"{len(group)} nodes sharing port {group.port} (SO_REUSEPORT); {len(workers)} load-generator "
                    f"processes from 127.0.0.2–{len(workers) + 1}; {s.scale_users} users, each connection RESUMEs "
                    f"with one of their tokens, then SYNC")
            self.add_row("scale", "connections", system, "ok", idle, note, register=register, connect=connect,
                         resume=resume, baseline={"rss_kb": base_rss, "cpu_pct": base_cpu_s * 100,
                                                  "services_cpu_pct": base_svc_s * 100, "open_files": base_files},
                         target=s.scale_conns)
        except Exception as exc:
            self.failed("scale", "connections", system, exc)
        finally:
            if workers is not None:
                workers.close()
            if group is not None:
                group.stop()

    def kill_and_resume(self, group: NodeGroup, workers: run.Workers, base_files: list[int]) -> dict:
        """Every client RSTs its connection at once; wait until the nodes have closed theirs; RESUME them all."""
        killed = sum(r["aborted"] for r in workers.command({"cmd": "abort"}))
        started = time.monotonic()
        deadline = started + self.sizes.setup_timeout_s
        # Done when what is left open is what the nodes hold without clients, give or take their pools growing.
        slack = 16 * len(group) + killed // 200
        while time.monotonic() < deadline:
            left = sum(group.open_files()) - sum(base_files)
            if left <= slack:
                break
            group.check_alive()
            time.sleep(0.2)
        teardown = time.monotonic() - started
        out = self.setup(workers, group)
        return {**out, "killed": killed, "teardown_s": teardown, "left_open": left}

    def each_config(self, scenario: str, variant: str, node_counts, measure) -> None:
        """``measure(group, system)`` → (reps, note, extra) on the SQLite reference, then on each count of nodes."""
        for system, nodes in [("SQLite, 1 process", None)] + [(f"{n} node{'s' * (n > 1)}", n) for n in node_counts]:
            group = None
            try:
                group = self.start(scenario, nodes)
                reps, note, extra = measure(group, system)
                self.add_row(scenario, variant, system, "ok", reps, note, **extra)
            except Exception as exc:
                self.failed(scenario, variant, system, exc)
            finally:
                if group is not None:
                    group.stop()

    def clients(self, group: NodeGroup, n: int, room_size: int, prefix: str) -> tuple[run.Workers, dict]:
        """``n`` bench clients (REGISTER, JOIN, SYNC) spread evenly over the group's nodes, set up."""
        workers = self.workers("node", group, n, self.sizes.conns_per_worker, room_size=room_size, prefix=prefix)
        try:
            setup = self.setup(workers, group)
            if setup["ready"] < n:
                raise RuntimeError(f"only {setup['ready']} of {n} clients set up: {setup}")
        except BaseException:
            workers.close()
            raise
        return workers, setup

    def repeat(self, group: NodeGroup, workers: run.Workers, window, active_key: str | None, active_s: float,
               unit: str, count_key: str) -> list[dict]:
        """``reps`` measured windows, then the clients close; adds the CPU per ``unit`` with Redis's and PG's."""
        reps = []
        try:
            for _ in range(self.sizes.reps):
                rep = self.measured(group, window, active_key, active_s)
                cpu = sum(rep["node_cpu_s"]) + rep["redis_cpu_s"] + rep["postgresql_cpu_s"]
                rep[f"with_services_us_per_{unit}"] = cpu * 1e6 / max(rep[count_key], 1)
                reps.append(rep)
        finally:
            workers.close()
        return reps

    # -- scenario 2: cross-node fan-out -------------------------------------------------------------------------------
    def run_fanout(self) -> None:
        s = self.sizes
        per_s = s.paced_deliveries_per_s / s.fanout_members
        n_msgs = max(1, round(per_s * s.paced_s))

        def measure(group: NodeGroup, system: str):
            workers, setup = self.clients(group, s.fanout_members, s.fanout_members, "fan")
            self.log(f"fanout/{system}: {s.fanout_members} members set up in {setup['seconds']:.1f}s")
            window = partial(self.bench._fanout_rep, group, workers, n_msgs, int(1e9 / per_s), paced=True)
            reps = self.repeat(group, workers, window, "duration_s", s.paced_s, "delivery", "deliveries")
            return reps, (f"{per_s:g} messages/s × {s.fanout_members} members for {s.paced_s:g}s, members spread "
                          f"evenly over {len(group)} process(es)"), {"setup": setup}

        self.each_config("fanout", "paced", s.fanout_nodes, measure)

    # -- scenario 3: durable sends ------------------------------------------------------------------------------------
    def run_durable(self) -> None:
        s = self.sizes

        def measure(group: NodeGroup, system: str):
            workers, setup = self.clients(group, s.durable_clients, 1, "d")
            window = partial(self.bench._durable_rep, group, workers, 1)
            reps = self.repeat(group, workers, window, None, s.durable_s, "ack", "acks_total")
            return reps, (f"{s.durable_clients} senders, each in its own room, one SEND in flight each, spread "
                          f"evenly over {len(group)} process(es)"), {"setup": setup}

        self.each_config("durable", "closed-loop", s.durable_nodes, measure)

    def run(self, scenarios) -> None:
        if self.node_problem:
            self.log(f"node mode cannot run here: {self.node_problem}")
        for scenario in SCENARIOS:
            if scenario in scenarios:
                self.log(f"{scenario} ...")
                getattr(self, f"run_{scenario}")()


# -- reporting -------------------------------------------------------------------------------------------------------

def _spread(row: dict | list, key: str, spec: str = ".1f", scale: float = 1.0) -> str:
    """The median and, over several repetitions (a row's, or a list of them), its range: ``12.3 (11.9–13.0)``."""
    values = [r[key] * scale for r in (row["reps"] if isinstance(row, dict) else row)
              if isinstance(r.get(key), (int, float))]
    if not values:
        return "–"
    text = format(statistics.median(values), spec)
    if len(values) > 1:
        text += f" ({format(min(values), spec)}–{format(max(values), spec)})"
    return text


def _unfinished(row: dict, width: int) -> list:
    return [row["system"], row["status"], *[""] * (width - 3), (row["note"].splitlines() or [""])[0][:80]]


def _reference(rows, scenario: str) -> dict | None:
    return next((r["median"] for r in rows if r["scenario"] == scenario and r["system"].startswith("SQLite")
                 and r["status"] in ("ok", "incomplete")), None)


def render(results: dict, markdown: bool = False) -> str:
    rows, sizes = results["rows"], Sizes(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in results["meta"]["sizes"].items()})
    nl = "\n\n" if markdown else "\n"
    parts = []
    reps = f"medians of {sizes.reps}, range in brackets"
    scale = [r for r in rows if r["scenario"] == "scale"]
    if scale:
        lines = []
        for row in scale:
            if row["status"] not in ("ok", "incomplete"):
                lines.append(_unfinished(row, 10))
                continue
            connect, register = row["connect"], row["register"]
            per_node = connect.get("open_files") or []
            lines.append([
                row["system"] + ("" if row["status"] == "ok" else " (incomplete)"),
                f"{connect['ready']:,} of {row['target']:,}",
                f"{register['seconds']:.1f}",
                f"{connect['seconds']:.1f} ({connect['per_s']:,.0f}/s, {connect['cpu_us_per_conn'] / 1000:.1f}"
                f"+{connect['services_us_per_conn'] / 1000:.1f} ms CPU)",
                f"{_spread(row['resume'], 'seconds')} ({_spread(row['resume'], 'per_s', ',.0f')}/s)",
                _spread(row["resume"], "teardown_s"),
                _spread(row, "kb_per_connection", ".2f"),
                _spread(row, "net_cpu_us_per_conn_per_s", ".2f"),
                _spread(row, "services_us_per_conn_per_s", ".2f"),
                f"{min(per_node):,}–{max(per_node):,}" if per_node else "–"])
        parts.append(f"Connections at scale: {sizes.scale_conns:,} connections (RESUME with {sizes.scale_users:,} "
                     f"users' tokens, then SYNC), heartbeat every {sizes.heartbeat_s}s, idle windows of "
                     f"{sizes.idle_s:g}s ({reps}){nl}" + run._table(
                         ["nodes", "connected", f"register {sizes.scale_users:,} users s",
                          "connect + auth s (CPU per conn: nodes+Redis+PG)", "kill all → resumed s",
                          "nodes let go s", "KB/conn (RSS, all nodes)", "idle µs/conn/s (nodes)",
                          "idle µs/conn/s (Redis+PG)", "open files per node"],
                         lines, markdown=markdown))
    for scenario, title in (
            ("fanout", f"Cross-node fan-out: one room of {sizes.fanout_members:,} members spread evenly over the "
                       f"nodes, {sizes.paced_deliveries_per_s:,} deliveries/s paced"),
            ("durable", f"Durable sends: {sizes.durable_clients} senders, each waiting for its ACK before the next")):
        lines = []
        ref = _reference(rows, scenario)
        for row in (r for r in rows if r["scenario"] == scenario):
            if row["status"] not in ("ok", "incomplete"):
                lines.append(_unfinished(row, 10))
                continue
            m = row["median"]
            name = row["system"] + ("" if row["status"] == "ok" else " (incomplete)")
            if scenario == "fanout":
                ratio = (f"cpu {run._fmt_ratio(run._ratio(m['cpu_us_per_delivery'], ref['cpu_us_per_delivery']))}, "
                         f"p99 {run._fmt_ratio(run._ratio(m['p99_ms'], ref['p99_ms']))}") if ref else "–"
                lines.append([name, _spread(row, "deliveries_per_s", ",.0f"),
                              _spread(row, "cpu_us_per_delivery", ".2f"),
                              _spread(row, "with_services_us_per_delivery", ".2f"), _spread(row, "p50_ms", ".2f"),
                              _spread(row, "p99_ms", ".2f"), ratio, _spread(row, "busiest_node_util", ".0f", 100),
                              _spread(row, "machine_util", ".0f", 100), m["limit"]])
            else:
                ratio = (f"acked/s {run._fmt_ratio(run._ratio(m['acked_per_s'], ref['acked_per_s']))}, "
                         f"p99 {run._fmt_ratio(run._ratio(m['ack_p99_ms'], ref['ack_p99_ms']))}") if ref else "–"
                lines.append([name, _spread(row, "acked_per_s", ",.0f"), _spread(row, "ack_p50_ms", ".2f"),
                              _spread(row, "ack_p99_ms", ".2f"), _spread(row, "cpu_us_per_ack", ".1f"),
                              _spread(row, "with_services_us_per_ack", ".1f"), ratio,
                              _spread(row, "busiest_node_util", ".0f", 100),
                              _spread(row, "machine_util", ".0f", 100), m["limit"]])
        if not lines:
            continue
        if scenario == "fanout":
            headers = ["server", "deliv/s", "CPU µs/deliv (nodes)", "µs/deliv incl. Redis+PG", "p50 ms", "p99 ms",
                       "÷ SQLite, 1 process", "busiest node %", "machine %", "limit"]
        else:
            headers = ["server", "acked/s", "ACK p50 ms", "ACK p99 ms", "CPU µs/ack (nodes)",
                       "µs/ack incl. Redis+PG", "÷ SQLite, 1 process", "busiest node %", "machine %", "limit"]
        parts.append(f"{title} ({reps}){nl}" + run._table(headers, lines, markdown=markdown))
    meta = results["meta"]
    dirty = " (server/ or proto/ modified)" if meta["chorus_server_or_proto_modified"] else ""
    parts.append(f"Command: `{meta['command']}` on {meta['cores']} cores ({meta['cpu']}), {meta['date']}, "
                 f"git {meta['chorus_git']}{dirty}, {meta['duration_s']}s.")
    return "\n\n".join(parts)


def write_markdown(path: Path, text: str) -> None:
    """Rewrite the generated tables; keep whatever follows END_OF_TABLES (the hand-written part)."""
    kept = ""
    if path.exists():
        old = path.read_text()
        if END_OF_TABLES in old:
            kept = old.split(END_OF_TABLES, 1)[1]
    path.write_text(text + "\n\n" + END_OF_TABLES + (kept or "\n"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: checks the harness only")
    parser.add_argument("--reps", type=int, help="repetitions per measurement (default 3; smoke 1)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS),
                        help="any of " + ", ".join(SCENARIOS) + " (space or comma separated)")
    parser.add_argument("--out", default=str(run.REPO / "bench" / "results"), help="output directory")
    parser.add_argument("--name", help="output file stem (default: cluster, or cluster-smoke with --smoke)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                        help="override one size, e.g. --size scale_conns=20000 (names: "
                             + ", ".join(f.name for f in dataclasses.fields(Sizes)) + ")")
    args = parser.parse_args(argv)
    args.argv = argv
    scenarios = [s for item in args.scenarios for s in item.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s}")
    sizes = SMOKE if args.smoke else FULL
    overrides = {"reps": args.reps} if args.reps else {}
    for item in args.size:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Sizes)}:
            parser.error(f"unknown size {key}")
        default = getattr(sizes, key)
        overrides[key] = tuple(int(v) for v in value.split(",")) if isinstance(default, tuple) else type(default)(value)
    sizes = dataclasses.replace(sizes, **overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("cluster-smoke" if args.smoke else "cluster")

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the nodes on the way out
    meta = run.machine_info(args, sizes)
    meta["command"] = "python -m bench.cluster_bench " + " ".join(argv)
    started = time.monotonic()
    bench = ClusterBench(sizes, args)
    meta["node_mode"] = bench.node_problem or "available"
    meta["node_flags"] = NODE_FLAGS
    bench.run(scenarios)
    meta["loadavg_end"] = os.getloadavg()
    meta["duration_s"] = round(time.monotonic() - started, 1)
    codes = sorted({r["code"] for r in bench.rows if r.get("code")})
    meta["code_fingerprints"] = codes
    if len(codes) > 1:
        print(f"WARNING: server/ or proto/ changed during the run ({', '.join(codes)}): rows measured on different "
              "code are not comparable; run again on a quiet tree.", file=sys.stderr)
    results = {"meta": meta, "rows": bench.rows}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_markdown(out / f"{name}.md", render(results, markdown=True))
    print(render(results))
    print(f"\nresults: {json_path}  ({meta['duration_s']}s)")
    return 1 if any(r["status"] == "error" for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
