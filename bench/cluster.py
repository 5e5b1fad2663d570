"""Start N Chorus nodes on this machine against its Redis and PostgreSQL (issue 11): ``make run-cluster``.

How this works. Each node is a ``chorus-server`` process with ``--store`` (one PostgreSQL database, created here
if missing), ``--broker`` (Redis) and ``--reuse-port``, so all of them listen on the same ports and the kernel
spreads new connections across them (SO_REUSEPORT). A node is ready when it prints its start-up line. The bench
(bench/run.py, cluster section) and tests use ``start_nodes``; ``python -m bench.cluster`` runs them until Ctrl-C
and stops them gracefully (SIGTERM: GOAWAY, drain, BYE).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_STORE = "postgresql://root@127.0.0.1:5432/chorus"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
SERVER = Path(sys.executable).with_name("chorus-server")


def ensure_database(url: str) -> None:
    """Create the database ``url`` names if it does not exist (connecting to the ``postgres`` database)."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


@dataclass
class Cluster:
    """Running nodes; ``stop()`` ends them (SIGTERM, then SIGKILL after ``grace_s``)."""

    nodes: list[subprocess.Popen[str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # each node's start-up line

    def stop(self, grace_s: float = 10.0) -> list[int]:
        for node in self.nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        codes = []
        for node in self.nodes:
            try:
                codes.append(node.wait(grace_s))
            except subprocess.TimeoutExpired:
                node.kill()
                codes.append(node.wait())
        return codes


def start_nodes(count: int, *, port: int = 7420, ws_port: int | None = 7421, store: str = DEFAULT_STORE,
                broker: str = DEFAULT_BROKER, host: str = "127.0.0.1", extra: Sequence[str] = (),
                prefix: str = "node") -> Cluster:
    """Start ``count`` nodes sharing ``port`` (and ``ws_port``) and wait until each has printed its start-up line.

    Raises ``RuntimeError`` with a node's output if it exits before it is ready.
    """
    ensure_database(store)
    cluster = Cluster()
    try:
        for index in range(1, count + 1):
            argv = [str(SERVER), "--host", host, "--port", str(port), "--store", store, "--broker", broker,
                    "--reuse-port", "--node-id", f"{prefix}-{index}", *extra]
            if ws_port is not None:
                argv += ["--ws-port", str(ws_port)]
            # A session of its own: Ctrl-C reaches this launcher only, which stops each node once (SIGTERM); a
            # second signal during a node's drain would cut it short.
            node = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            cluster.nodes.append(node)
            output = []
            assert node.stdout is not None
            for line in node.stdout:
                output.append(line)
                if line.startswith("Chorus listening"):
                    cluster.lines.append(line.strip())
                    break
            else:
                raise RuntimeError(f"node {index} exited ({node.wait()}):\n" + "".join(output[-20:]))
    except BaseException:
        cluster.stop(grace_s=2)
        raise
    return cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--port", type=int, default=7420)
    parser.add_argument("--ws-port", type=int, default=7421)
    parser.add_argument("--store", default=DEFAULT_STORE)
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    args, extra = parser.parse_known_args(argv)
    cluster = start_nodes(args.nodes, port=args.port, ws_port=args.ws_port, store=args.store, broker=args.broker,
                          extra=extra)
    for line in cluster.lines:
        print(line, flush=True)
    print(f"{args.nodes} nodes share port {args.port}; Ctrl-C stops them", flush=True)
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the nodes' drain short
        signal.signal(signum, signal.SIG_IGN)
    codes = cluster.stop()
    print(f"stopped: exit codes {codes}")
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
