"""Node mode end to end (issue 11): real ``chorus-server`` processes linked by the machine's Redis, storing in its
PostgreSQL, with library clients on different nodes.

What is checked is what users see: every client sees every seq of the room once and in order whichever node it is
on and whichever node the senders are on (a history checker over concurrent senders, not a spot check); a node
killed with SIGKILL under load costs its clients a reconnect to another node and nothing else; its users go
offline for the others within the node TTL; nodes sharing a port with ``--reuse-port`` all take connections.

Each test has its own PostgreSQL database and its own Redis key prefix (``--broker-prefix``), so tests and runs do
not see each other. Without PostgreSQL or Redis the tests skip (and fail under CI=true).
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from conftest import FAST_HASH, service_required

from chorus import proto
from chorus.client import open_client

REPO = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("CHORUS_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/postgres")
REDIS = os.environ.get("CHORUS_TEST_REDIS", "redis://127.0.0.1:6379/0")
#: Node TTL and OFFLINE delay of the test nodes: short, so that a dead node's users go offline quickly.
TTL_S = 2.0
OFFLINE_DELAY_S = 0.5

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def database():
    """A fresh PostgreSQL database's URL, dropped after the test."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError as exc:
        service_required("psycopg", f"the node extra is not installed ({exc})")
    name = f"chorus_c_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_required("postgresql", f"{POSTGRES.rsplit('@', 1)[-1]} unreachable: {str(exc).splitlines()[0]}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield POSTGRES.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def redis_command(*words: str) -> bytes:
    """One command to the test Redis over a plain socket (RESP); its raw reply."""
    host, port = REDIS.split("//", 1)[1].split("/", 1)[0].split(":")
    request = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request.encode())
        return sock.recv(65536)


@pytest.fixture
def broker_prefix():
    """A Redis key prefix of the test's own; its keys are deleted after the test."""
    prefix = f"chorus-test-{secrets.token_hex(6)}"
    try:
        redis_command("PING")
    except OSError as exc:
        service_required("redis", f"{REDIS} unreachable: {exc}")
    yield prefix
    redis_command("EVAL", "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end", "0",
                  prefix + "*")


class Node:
    """One ``python -m chorus.server`` node on a free port; ``kill()`` is SIGKILL, ``stop()`` SIGTERM."""

    def __init__(self, index: int, database: str, prefix: str, *, port: int = 0, reuse_port: bool = False,
                 broker: str = REDIS):
        self.node_id = f"n{index}"
        argv = [sys.executable, "-m", "chorus.server", "--port", str(port), "--store", database, "--broker", broker,
                "--broker-prefix", prefix, "--node-id", self.node_id, "--node-ttl-s", str(TTL_S),
                "--presence-offline-delay-s", str(OFFLINE_DELAY_S), "--log-level", "WARNING",
                "--argon2-time-cost", str(FAST_HASH["argon2_time_cost"]),
                "--argon2-memory-kib", str(FAST_HASH["argon2_memory_kib"])]
        if reuse_port:
            argv.append("--reuse-port")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("Chorus listening on"):
            self.proc.kill()
            raise AssertionError(f"node {self.node_id} did not start: {line}{self.proc.stderr.read()}")
        self.port = int(line.split()[3].split(":")[-1].rstrip(","))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def nodes(database, broker_prefix):
    """``start(count)`` → that many running nodes on one store and one broker; all stopped after the test."""
    started: list[Node] = []

    def start(count: int, **kwargs) -> list[Node]:
        new = [Node(len(started) + i + 1, database, broker_prefix, **kwargs) for i in range(count)]
        started.extend(new)
        return new

    yield start
    for node in started:
        node.stop()
    logs = {node.node_id: node.stderr() for node in started}
    for node_id, log in logs.items():
        print(f"--- {node_id} ---\n{log}")  # shown by pytest when the test failed
    for log in logs.values():  # a traceback in any node's log is a bug, whatever the test checked
        assert "Traceback" not in log, log


async def collect(client, room: proto.Conversation, count: int, seen: list[int]) -> None:
    """Record the seqs of ``room``'s messages as ``client`` hands them over, until ``count`` arrived."""
    async for event in client.events():
        if isinstance(event, proto.Message) and event.conv == room:
            seen.append(event.seq)
            if len(seen) == count:
                return


async def test_clients_on_three_nodes_see_one_order(nodes):
    await chat_under_fault(nodes(3), None, None, per_sender=25)


async def test_a_killed_node_costs_its_clients_a_reconnect_and_nothing_else(nodes):
    a, b = nodes(2)
    room = proto.Conversation.room("hall")
    addresses = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    per_sender = 40
    async with AsyncExitStack() as stack:
        watcher = await stack.enter_async_context(open_client(
            "127.0.0.1", a.port, username="watcher", password="correct horse", register=True))
        await watcher.join("hall")
        # bob's first address is b; he also knows a (the client library moves on node loss)
        bob = await stack.enter_async_context(open_client(
            "127.0.0.1", b.port, servers=addresses, username="bob", password="correct horse", register=True,
            backoff_base_s=0.05, backoff_cap_s=0.5))
        await bob.join("hall")
        alice = await stack.enter_async_context(open_client(
            "127.0.0.1", a.port, username="alice", password="correct horse", register=True))
        await alice.join("hall")
        bob_seen: list[int] = []
        watcher_seen: list[int] = []
        acked: list[int] = []

        async def send_all(client, killer: bool) -> None:
            for k in range(per_sender):
                acked.append((await client.send(room, f"m{k}")).seq)
                if killer and k == per_sender // 2:
                    b.kill()  # under load: bob's node dies between two of alice's sends

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, bob, room, 2 * per_sender, bob_seen)
                nursery.start_soon(collect, watcher, room, 2 * per_sender, watcher_seen)
                nursery.start_soon(send_all, alice, True)
                nursery.start_soon(send_all, bob, False)  # bob's unacked sends are retried on node a
        assert sorted(acked) == list(range(1, 2 * per_sender + 1))
        assert bob_seen == list(range(1, 2 * per_sender + 1))  # caught up on a: nothing lost, nothing twice
        assert watcher_seen == bob_seen
        assert bob.statistics().reconnects >= 1


async def presence_of(client, user: str) -> proto.Status:
    async for event in client.events():
        if isinstance(event, proto.Presence) and event.user == user:
            return event.status
    raise AssertionError("event stream ended")


async def test_a_dead_nodes_users_go_offline_within_the_ttl(nodes):
    a, b = nodes(2)
    async with AsyncExitStack() as stack:
        alice = await stack.enter_async_context(open_client(
            "127.0.0.1", a.port, username="alice", password="correct horse", register=True))
        await alice.join("hall")
        async with open_client("127.0.0.1", a.port, username="carol", password="correct horse", register=True,
                               reconnect=False) as carol:
            await carol.join("hall")  # now carol's presence concerns alice
        with trio.fail_after(10):
            assert await presence_of(alice, "carol") == proto.Status.OFFLINE
        async with open_client("127.0.0.1", b.port, username="carol", password="correct horse",
                               reconnect=False):
            with trio.fail_after(10):  # carol's ONLINE crossed from b to a
                assert await presence_of(alice, "carol") == proto.Status.ONLINE
            b.kill()  # no goodbye: only b's silence in the registry tells a
            start = trio.current_time()
            with trio.fail_after(TTL_S * 3 + OFFLINE_DELAY_S + 5):
                assert await presence_of(alice, "carol") == proto.Status.OFFLINE
            assert trio.current_time() - start >= TTL_S / 2  # it took the TTL, not a goodbye


async def next_event(stream: trio.SocketStream, wire: proto.Connection) -> proto.Event:
    """The next frame from a raw connection; ``EOFError`` at its end."""
    with trio.fail_after(10):
        while (event := wire.next_event()) is proto.NEED_DATA:
            data = await stream.receive_some(4096)
            if not data:
                raise EOFError
            wire.receive_data(data)
    assert isinstance(event, proto.Event), event
    return event


async def test_nodes_sharing_a_port_with_reuse_port_all_take_connections(nodes):
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    first, second = nodes(2, port=port, reuse_port=True)
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(24)]
    wires = [proto.Connection(proto.CLIENT) for _ in streams]
    for stream, wire in zip(streams, wires, strict=True):  # HELLO each: a node answers WELCOME
        await stream.send_all(wire.send(proto.Hello(1, proto.PROTOCOL_VERSION, "probe")))
        assert isinstance(await next_event(stream, wire), proto.Welcome)
    first.kill()
    alive = 0
    for stream, wire in zip(streams, wires, strict=True):
        try:
            await stream.send_all(wire.send(proto.Ping(7, request_id=1)))
            while not isinstance(await next_event(stream, wire), proto.Pong):  # NODES came after WELCOME
                pass
            alive += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass
    # both nodes took some: the killed one's connections ended, the other's answer (2/2**24 odds of a false fail)
    assert 0 < alive < len(streams)
    for stream in streams:
        await stream.aclose()
    assert second.proc.poll() is None


class PrivateRedis:
    """A redis-server of the test's own on a free port, so that the test may kill and restart it."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.tmp_path = tmp_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "Ready to accept connections" in line:
                return
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def chat_under_fault(cluster: list[Node], fault, heal, *, per_sender: int = 30) -> None:
    """Two users per node in one room send ``per_sender`` messages each, concurrently; if there is a ``fault``, it
    strikes a third of the way, and once every sender has an ACK after it (so each node kept serving through it),
    ``heal()``. A history checker: every client must end with every seq once and in order, each sender's seqs
    must keep its order, and the ACKs must be gapless: nothing acked was lost, no seq given twice."""
    room = proto.Conversation.room("hall")
    senders = [(node, j) for node in cluster for j in range(2)]
    total = len(senders) * per_sender
    async with AsyncExitStack() as stack:
        clients = []
        for node, j in senders:
            client = await stack.enter_async_context(open_client(
                "127.0.0.1", node.port, username=f"{node.node_id}x{j}", password="correct horse", register=True,
                backoff_base_s=0.05, backoff_cap_s=0.5))
            await client.join("hall")
            clients.append(client)
        seen: dict[int, list[int]] = defaultdict(list)
        acked: list[int] = []
        mine: dict[int, list[int]] = defaultdict(list)
        faulted = trio.Event()
        after_fault: set[int] = set()

        done: set[int] = set()

        def maybe_heal() -> None:
            if heal is not None and after_fault | done == set(range(len(clients))):
                heal()

        async def send_all(index: int, client) -> None:
            for k in range(per_sender):
                acked.append((await client.send(room, f"{index}:{k}")).seq)
                mine[index].append(acked[-1])
                if faulted.is_set():
                    after_fault.add(index)
                    maybe_heal()
                if fault is not None and k == per_sender // 3:
                    # Every sender waits here for the fault, so each has sends left to make through it: on a busy
                    # machine one node's senders could otherwise be done before the fault strikes.
                    if index == 0:
                        fault()
                        faulted.set()
                    else:
                        await faulted.wait()
            done.add(index)
            maybe_heal()

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                for index, client in enumerate(clients):
                    nursery.start_soon(collect, client, room, total, seen[index])
                for index, client in enumerate(clients):
                    nursery.start_soon(send_all, index, client)
    assert sorted(acked) == list(range(1, total + 1))
    assert all(seqs == sorted(seqs) for seqs in mine.values())
    if fault is not None:  # every node stored and acked while the fault lasted
        assert {senders[index][0].node_id for index in after_fault} == {node.node_id for node in cluster}
    for index in range(len(clients)):
        assert seen[index] == list(range(1, total + 1)), f"client {index}: {seen[index]}"


async def test_a_redis_restart_under_load_loses_nothing(database, broker_prefix, tmp_path):
    redis = PrivateRedis(tmp_path)
    redis.start()
    cluster = [Node(i, database, broker_prefix, broker=redis.url) for i in (1, 2)]
    try:
        healed = []

        def heal() -> None:
            if not healed:
                healed.append(True)
                redis.start()  # a new, empty Redis on the same port: the nodes re-register and re-sync

        await chat_under_fault(cluster, redis.kill, heal)
    finally:
        for node in cluster:
            node.stop()
        redis.kill()
    for node in cluster:
        log = node.stderr()
        assert "Traceback" not in log, log


async def test_postgresql_connections_cut_under_load_lose_nothing(nodes, database):
    import psycopg

    cluster = nodes(2)
    name = database.rsplit("/", 1)[1]

    def cut() -> None:  # every connection of every node to the database ends at once, as in a restart
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                          "pg_backend_pid()", (name,))

    await chat_under_fault(cluster, cut, None)


async def nodes_seen(port: int, version: int = proto.PROTOCOL_VERSION) -> list[proto.Event]:
    """What a raw connection of ``version`` gets after HELLO, up to (not including) the first PING or EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    wire = proto.Connection(proto.CLIENT)
    await stream.send_all(wire.send(proto.Hello(1, version, "probe", request_id=1)))
    events = [await next_event(stream, wire)]  # WELCOME: then a PING's PONG marks the end of what came with it
    await stream.send_all(wire.send(proto.Ping(5, request_id=2)))
    while not isinstance(event := await next_event(stream, wire), proto.Pong):
        events.append(event)
    await stream.aclose()
    return events


async def test_nodes_tell_version_2_clients_the_cluster_and_a_draining_node_sends_them_on(nodes):
    a, b = nodes(2)
    ports = {a.port, b.port}
    with trio.fail_after(TTL_S * 2 + 5):  # each node learns the other at its next heartbeat (ttl/3)
        while True:
            welcome, *rest = await nodes_seen(b.port)
            if rest and {n.port for n in rest[0].nodes} == ports:
                break
            await trio.sleep(TTL_S / 6)
    assert isinstance(welcome, proto.Welcome) and welcome.version == 2
    [listed] = rest
    assert isinstance(listed, proto.Nodes)
    assert {(n.node, n.host, n.port, n.draining) for n in listed.nodes} == {
        ("n1", "127.0.0.1", a.port, False), ("n2", "127.0.0.1", b.port, False)}
    assert [type(e) for e in await nodes_seen(b.port, version=1)] == [proto.Welcome]  # never to version 1

    room = proto.Conversation.room("hall")
    async with open_client("127.0.0.1", b.port, username="erin", password="correct horse", register=True,
                           backoff_base_s=0.05) as erin:
        assert {n.port for n in erin.nodes} == ports  # learnt from NODES: no servers= needed
        await erin.join("hall")
        await erin.send(room, "before")
        goaway = trio.Event()

        async def watch() -> None:
            async for event in erin.events():
                if isinstance(event, proto.GoAway):
                    goaway.set()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            b.proc.send_signal(signal.SIGTERM)  # b drains: NODES (b draining), GOAWAY, BYE
            with trio.fail_after(10):
                await goaway.wait()
        ack = await erin.send(room, "after")  # sent once erin is on a
        assert erin.address == ("127.0.0.1", a.port)
        assert ack.seq == 2
    assert b.proc.wait(15) == 0


async def test_account_revocations_reach_the_users_connections_on_other_nodes(nodes):
    """CHANGE_PASSWORD, REVOKE_SESSION and LOGOUT_ALL on one node close the user's connections on another (issue 12,
    spec §9.1): the revocations are user events, carried by Redis."""
    from rawclient import RawClient

    a, b = nodes(2)

    async def logged_in(port: int, password: str = "correct horse", *, register: bool = False) -> RawClient:
        raw = await RawClient.connect(port, hello=False)
        await raw.send(proto.Hello(1, 2, "accounts"))
        assert (await raw.next()).version == 2
        auth = await raw.request(proto.Register if register else proto.Login, "alice", password)
        assert isinstance(auth, proto.AuthOk), auth
        await raw.go_live()
        return raw

    async def logged_out(raw: RawClient) -> None:
        with trio.fail_after(10):
            events = await raw.drain_until_closed()
        assert [e.reason for e in events if isinstance(e, proto.Bye)] == [proto.CloseReason.LOGGED_OUT], events

    phone = await logged_in(a.port, register=True)
    laptop = await logged_in(b.port)
    assert isinstance(await phone.request(proto.ChangePassword, "correct horse", "battery staple"), proto.Ok)
    await logged_out(laptop)

    tablet = await logged_in(b.port, "battery staple")
    _, theirs = (await phone.request(proto.ListSessions)).sessions
    assert isinstance(await phone.request(proto.RevokeSession, theirs.session_id), proto.Ok)
    await logged_out(tablet)

    desktop = await logged_in(b.port, "battery staple")
    await phone.send(proto.LogoutAll(request_id=phone.rid()))
    await logged_out(phone)
    await logged_out(desktop)
