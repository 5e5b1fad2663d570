"""The server's Prometheus metrics: counted as plain ints where things happen, turned into metrics on scrape.

How this works. Nothing on a hot path calls prometheus_client. What the server already counts (``statistics()``
of the server, the store's group committer, the broker and its fan-out) is read when ``/metrics`` is scraped, by
``ServerCollector``, a custom collector in a registry of the server's own (never the process-wide default, so
several servers in one process, as in the tests, do not mix). The few things nothing counted yet live in
``Counters``, one per server: frames in and out by frame type (a list indexed by the type byte: one ``+= 1`` per
frame), authentications by method and outcome, and rate-limit refusals by kind. Connections by transport and state
are a walk over the live connections at scrape time.

Fan-out writes are not counted per frame: ``chorus_frames_out_total{type="MESSAGE"}`` adds the broker's
``delivered`` counter to the MESSAGEs sent as replies, so the delivery loop stays as it was.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric,
)
from prometheus_client.registry import Collector

from chorus import proto
from chorus.proto import CloseReason, FrameType

if TYPE_CHECKING:
    from ._app import Server

__all__ = ["AUTH_METHODS", "Counters", "RATE_LIMIT_KINDS", "ServerCollector", "registry_for"]

#: ``Counters.auth`` keys: how a session authenticated (REGISTER, LOGIN, RESUME).
AUTH_METHODS = ("register", "password", "token")
#: ``Counters.refusals`` keys: which budget refused (spec §9.11, server/_budgets.py, server/_admission.py).
RATE_LIMIT_KINDS = ("frames", "sends", "logins", "registrations", "rooms_created", "hashes")
_TYPE_NAMES = {int(t): t.name for t in FrameType}


class Counters:
    """What the server counts for the metrics and nothing else counted: plain ints, no locks, no calls."""

    __slots__ = ("frames_in", "frames_out", "auth", "refusals")

    def __init__(self) -> None:
        self.frames_in = [0] * 256  # by frame type byte
        self.frames_out = [0] * 256  # replies and pushes; fan-out deliveries are the broker's ``delivered``
        self.auth: collections.Counter[tuple[str, bool]] = collections.Counter()  # (method, succeeded)
        self.refusals: collections.Counter[str] = collections.Counter()  # RATE_LIMIT_KINDS


def registry_for(server: "Server") -> CollectorRegistry:
    """A registry of the server's own metrics and the process's (CPU, memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    ProcessCollector(namespace="", registry=registry)
    return registry


class ServerCollector(Collector):
    """Reads the server's counters on each scrape (``collect``); costs nothing between scrapes."""

    def __init__(self, server: "Server") -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        stats = server.statistics()
        yield from _connections(server, stats)
        yield from _frames(server.counters, stats["delivered"])
        yield from _sessions(server, stats)
        yield from _store(stats["store"])
        yield from _broker(stats["broker"])

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _connections(server: "Server", stats: dict) -> Iterator[Metric]:
    by_kind: collections.Counter[tuple[str, str]] = collections.Counter()
    for conn in list(server.connections):
        transport = "tcp" if conn.wrap is None else "websocket"
        if conn.wire.state in (proto.State.HANDSHAKE, proto.State.NEGOTIATING):
            state = "handshake"
        else:
            state = "unauthenticated" if conn.user_id is None else "authenticated"
        by_kind[transport, state] += 1
    gauge = GaugeMetricFamily("chorus_connections", "Open Chorus connections by transport and state",
                              labels=["transport", "state"])
    for transport in ("tcp", "websocket"):
        for state in ("handshake", "unauthenticated", "authenticated"):
            gauge.add_metric([transport, state], by_kind[transport, state])
    yield gauge
    yield GaugeMetricFamily("chorus_sockets", "Admitted sockets (Chorus and web ports), each holding a slot",
                            value=stats["sockets"])
    yield CounterMetricFamily("chorus_sockets_refused", "Sockets refused at accept (connection limits)",
                              value=stats["refused_sockets"])
    closes = CounterMetricFamily("chorus_closes", "Connections closed, by close reason", labels=["reason"])
    reasons = stats["close_reasons"]
    for reason in CloseReason:
        closes.add_metric([reason.name], reasons.get(reason.name, 0))
    yield closes
    yield GaugeMetricFamily("chorus_draining", "1 while the server shuts down gracefully",
                            value=int(server.draining))


def _frames(counters: Counters, delivered: int) -> Iterator[Metric]:
    frames_in = CounterMetricFamily("chorus_frames_in", "Frames received, by frame type", labels=["type"])
    frames_out = CounterMetricFamily("chorus_frames_out", "Frames sent (replies, pushes and fan-out), by frame type",
                                     labels=["type"])
    for code, name in _TYPE_NAMES.items():
        frames_in.add_metric([name], counters.frames_in[code])
        extra = delivered if code == FrameType.MESSAGE else 0
        frames_out.add_metric([name], counters.frames_out[code] + extra)
    yield frames_in
    yield frames_out
    yield CounterMetricFamily("chorus_deliveries", "Stored messages written to subscribers' connections (fan-out)",
                              value=delivered)


def _sessions(server: "Server", stats: dict) -> Iterator[Metric]:
    counters = server.counters
    auth = CounterMetricFamily("chorus_auth", "Authentications by method and outcome", labels=["method", "outcome"])
    for method in AUTH_METHODS:
        for ok in (True, False):
            auth.add_metric([method, "success" if ok else "failure"], counters.auth[method, ok])
    yield auth
    refused = CounterMetricFamily("chorus_rate_limited", "Requests refused by a rate limit or budget, by kind",
                                  labels=["kind"])
    for kind in RATE_LIMIT_KINDS:
        refused.add_metric([kind], counters.refusals[kind])
    yield refused
    yield CounterMetricFamily("chorus_password_hashes", "Password hashes computed (register, login)",
                              value=stats["hashed"])


def _store(store: dict) -> Iterator[Metric]:
    yield CounterMetricFamily("chorus_messages_stored", "Messages committed (retries answered from the store excluded)",
                              value=store["appended"])
    yield CounterMetricFamily("chorus_messages_duplicate", "SENDs answered as retries of a stored message",
                              value=store["duplicates"])
    yield CounterMetricFamily("chorus_store_errors", "Store requests the database refused or could not serve",
                              value=store["refused"])
    yield CounterMetricFamily("chorus_store_failed_batches", "Group-commit batches whose transaction failed",
                              value=store["failed_batches"])
    yield GaugeMetricFamily("chorus_store_pending", "Messages waiting for the next group commit",
                            value=store["pending"])
    # batch_histogram: power of two n -> batches of size (n/2, n]; Prometheus wants cumulative counts.
    buckets, total = [], 0
    for bound, count in sorted(store["batch_histogram"].items()):
        total += count
        buckets.append((str(float(bound)), total))
    buckets.append(("+Inf", total))
    yield HistogramMetricFamily("chorus_commit_batch_size", "Messages per group-commit transaction",
                                buckets=buckets, sum_value=_batched(store))
    buckets, total = [], 0
    for bound, count in store["commit_seconds"].items():
        total += count
        buckets.append(("+Inf" if math.isinf(bound) else str(bound), total))
    yield HistogramMetricFamily("chorus_commit_seconds", "Latency of a group commit (queue for the connection, "
                                "transaction, thread hops)", buckets=buckets, sum_value=store["commit_seconds_sum"])


def _batched(store: dict) -> float:
    return store["batch_mean"] * store["commits"]


def _broker(broker: dict) -> Iterator[Metric]:
    node = "link" in broker
    info = InfoMetricFamily("chorus_broker", "Which broker carries messages between connections")
    info.add_metric([], {"mode": "redis" if node else "local", "node_id": str(broker.get("node_id", ""))})
    yield info
    if node:
        yield GaugeMetricFamily("chorus_broker_link_up", "1 while the link to the broker (Redis) is up",
                                value=int(broker["link"] == "up"))
        for key, help_text in (("links", "Links to the broker established"),
                               ("losses", "Links to the broker lost"),
                               ("publishes", "Publish round trips to the broker"),
                               ("published", "Items published to the broker"),
                               ("received", "Items received from the broker"),
                               ("resyncs", "Conversations re-read from the store after a lost link or a gap"),
                               ("dropped", "Items the broker link dropped")):
            yield CounterMetricFamily(f"chorus_broker_{key}", help_text, value=broker.get(key, 0))
    yield CounterMetricFamily("chorus_fanout_gaps", "Delivery gaps filled from the store", value=broker.get("gaps", 0))
    yield GaugeMetricFamily("chorus_users_online", "Users with a connection on this node", value=broker["users"])
