"""The Redis broker (server/_redisbroker.py): several real servers in one Trio run behave as one (issue 11).

Each test runs two or three nodes, each a real ``serve`` with real sockets, its own SQLite store opened on one shared
database file (SQLite serialises writers across connections and assigns seq inside BEGIN IMMEDIATE, so that is a
valid shared store), and a ``RedisBroker`` on the real Redis at ``CHORUS_TEST_REDIS`` under a prefix of its own,
whose keys are checked gone afterwards. What the tests check is what clients see: every seq once and in order on every
node, presence across nodes, the per-user limit across nodes, pushes across nodes, and that a lost link, a lost or
late publish and a crashed node cost nothing but time. Where nothing signals what a test waits for (a count seen by
another node, a link state), it polls with a deadline.
"""
from __future__ import annotations

import logging
import os
import uuid
from functools import partial

import pytest
import trio
from conftest import service_required
from conftest import test_config as config_in
from rawclient import RawClient
from test_ports import Conn, MemoryMessages, message, nothing_more
from trio.testing import wait_all_tasks_blocked

from chorus import proto
from chorus.proto import ErrorCode
from chorus.server import serve
from chorus.server._fanout import Fanout, Subscription
from chorus.server._ports import Appended, Muted, ReadMoved
from chorus.server._redisbroker import NodeInfo, RedisBroker, _Incomplete, _RespReader
from chorus.server._store import open_store

coredis = pytest.importorskip("coredis")

REDIS_URL = os.environ.get("CHORUS_TEST_REDIS", "redis://127.0.0.1:6379/0")
LOBBY = proto.Conversation.room("lobby")
#: Short enough that a crashed node is swept within a second; heartbeats every 0.2 s.
TTL_S = 0.6
OFFLINE_DELAY_S = 0.2
#: What a poll waits at most for a state that has no event.
DEADLINE_S = 5.0


def admin():
    return coredis.Redis.from_url(REDIS_URL, retry_policy=coredis.retry.NoRetryPolicy())


@pytest.fixture
async def prefix():
    """A key prefix of this test's own; nothing may be left under it afterwards but what a crash leaves."""
    prefix = f"chorustest:{uuid.uuid4().hex[:12]}"
    try:
        async with admin() as redis:
            await redis.ping()
    except Exception as exc:  # noqa: BLE001 - whatever stops us reaching it
        service_required("redis", f"{REDIS_URL}: {exc!r}")
    yield prefix
    async with admin() as redis:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(keys)


async def keys_under(prefix: str) -> list[bytes]:
    async with admin() as redis:
        return sorted([key async for key in redis.scan_iter(match=f"{prefix}:*")])


async def eventually(predicate, what: str, timeout: float = DEADLINE_S) -> None:
    """Poll ``predicate`` (sync or async) until true; fails after ``timeout``."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return
            await trio.sleep(0.01)
    raise AssertionError(f"not within {timeout} s: {what}")


class Node:
    def __init__(self, server, scope: trio.CancelScope):
        self.server, self.scope = server, scope
        self.stopped = trio.Event()

    @property
    def broker(self) -> RedisBroker:
        return self.server.broker

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


class Cluster:
    """Nodes sharing one SQLite file and one Redis prefix."""

    def __init__(self, nursery: trio.Nursery, tmp_path, prefix: str):
        self.nursery, self.tmp_path, self.prefix = nursery, tmp_path, prefix
        self.db = tmp_path / "shared.db"

    async def node(self, name: str, broker=RedisBroker, url: str = REDIS_URL, **overrides) -> Node:
        values = {"broker": url, "broker_prefix": self.prefix, "node_id": name, "node_ttl_s": TTL_S,
                  "presence_offline_delay_s": OFFLINE_DELAY_S, **overrides}
        return await self.nursery.start(self._run, config_in(self.tmp_path / name, **values), broker)

    async def _run(self, config, factory, *, task_status) -> None:
        node = None
        try:
            with trio.CancelScope() as scope:
                async with open_store(self.db) as store, trio.open_nursery() as nursery:
                    server = await nursery.start(partial(serve, config, store=store, broker=factory))
                    server.broker.set_address(server.port, server.ws_port)
                    node = Node(server, scope)
                    task_status.started(node)
        finally:
            if node is not None:
                node.stopped.set()


@pytest.fixture
async def cluster(nursery, tmp_path, prefix):
    return Cluster(nursery, tmp_path, prefix)


async def client(node: Node, name: str, *, register: bool = False, live: bool = True) -> RawClient:
    c = await RawClient.connect(node.port)
    if register:
        await c.register(name)
    else:
        reply = await c.request(proto.Login, name, "correct horse")
        assert isinstance(reply, proto.AuthOk), reply
    if live:
        await c.go_live()
    return c


async def members_of_lobby(*pairs: tuple[Node, str]) -> list[RawClient]:
    """Register each name on its node, make it live and join #lobby."""
    clients = []
    for node, name in pairs:
        c = await client(node, name, register=True)
        joined = await c.request(proto.Join, "lobby")
        assert isinstance(joined, proto.Joined), joined
        clients.append(c)
    return clients


async def messages(client: RawClient, count: int) -> list[proto.Message]:
    return [await client.next_of(proto.Message) for _ in range(count)]


def sees(node: Node, user_id: int, connections: int):
    return lambda: node.broker.connection_count(user_id) == connections


# -- the pieces without Redis -------------------------------------------------------------------------------------

def test_the_pubsub_reader_takes_replies_whole_or_byte_by_byte_and_refuses_oversize():
    stream = (b"*3\r\n$9\r\nsubscribe\r\n$4\r\nc:17\r\n:1\r\n"
              b"*3\r\n$7\r\nmessage\r\n$4\r\nc:17\r\n$5\r\nM\x00\r\nx\r\n"
              b"*2\r\n$4\r\npong\r\n$0\r\n\r\n-ERR nope\r\n")
    expected = [[b"subscribe", b"c:17", 1], [b"message", b"c:17", b"M\x00\r\nx"], [b"pong", b""]]
    for pieces in ([stream], [stream[i:i + 1] for i in range(len(stream))]):
        reader, got = _RespReader(), []
        for piece in pieces:
            reader.feed(piece)
            while (reply := reader.next()) is not _Incomplete:
                got.append(reply)
        assert got[:3] == expected and str(got[3]) == "ERR nope"
    small = _RespReader(max_bytes=10)
    small.feed(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$11\r\n")
    with pytest.raises(Exception, match="11 bytes"):
        small.next()


async def test_fanout_resync_fills_live_subscriptions_to_the_end_of_the_store_and_holds_arrivals_behind():
    """What a node does when it cannot name what it missed (its link came back, it subscribed a channel): each live
    subscription reads the store to its end; a live subscription withheld by a SYNC is left to that SYNC."""
    store = MemoryMessages()
    fanout = Fanout(store, page=2)
    live, behind, syncing = Conn(), Conn(), Conn()
    fanout.subscribe(7, live, Subscription(LOBBY, sent_seq=1))
    fanout.subscribe(7, behind, Subscription(LOBBY, sent_seq=0))
    fanout.subscribe(7, syncing, Subscription(LOBBY, withheld=True))
    for seq in range(1, 6):
        store.add(message(seq))
    async with trio.open_nursery() as nursery:
        await nursery.start(fanout.run)
        fanout.resync()
        fanout.deliver([message(6)])  # arrives during the fill: held behind it
        await wait_all_tasks_blocked()
        fanout.flush()
        assert live.seqs() == [2, 3, 4, 5, 6] and behind.seqs() == [1, 2, 3, 4, 5, 6] and syncing.seqs() == []
        assert fanout.statistics()["gaps_open"] == 0
        fanout.resync(7)  # nothing new: nothing written
        await wait_all_tasks_blocked()
        assert live.seqs() == [2, 3, 4, 5, 6]
        nursery.cancel_scope.cancel()


# -- nodes ------------------------------------------------------------------------------------------------------------

async def test_clients_on_three_nodes_see_every_seq_once_in_order_under_concurrent_senders(cluster):
    nodes = [await cluster.node(f"n{i}") for i in range(3)]
    senders = await members_of_lobby(*[(node, f"s{i}") for i, node in enumerate(nodes)])
    readers = await members_of_lobby(*[(node, f"r{i}") for i, node in enumerate(nodes)])
    per_sender = 40
    acks: dict[tuple[str, int], int] = {}

    async def send_all(i: int, sender: RawClient) -> None:
        for n in range(1, per_sender + 1):
            ack = await sender.request(proto.Send, LOBBY, n, f"s{i} {n}")
            assert isinstance(ack, proto.Ack), ack
            acks[(f"s{i}", n)] = ack.seq

    received: dict[int, list[proto.Message]] = {}

    async def read_all(i: int, reader: RawClient) -> None:
        received[i] = await messages(reader, 3 * per_sender)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i, reader in enumerate(readers):
                nursery.start_soon(read_all, i, reader)
            for i, sender in enumerate(senders):
                nursery.start_soon(send_all, i, sender)
    total = 3 * per_sender
    assert sorted(acks.values()) == list(range(1, total + 1))  # the store: gapless, no seq twice
    for i, got in received.items():
        assert [m.seq for m in got] == list(range(1, total + 1)), f"reader {i}"
        assert {(m.sender, m.client_msg_id): m.seq for m in got} == acks  # each seq is the message acked with it
        await nothing_more(readers[i], proto.Message)
    crossed = sum(node.broker.statistics()["received"] for node in nodes)
    assert crossed > 0 and all(node.broker.statistics()["link"] == "up" for node in nodes)


async def test_direct_messages_and_presence_cross_nodes(cluster):
    n1, n2 = await cluster.node("n1"), await cluster.node("n2")
    alice, bob, dave = await members_of_lobby((n1, "alice"), (n2, "bob"), (n2, "dave"))
    # A direct conversation opened on one node is live on the other, both ways.
    ack = await alice.request(proto.Send, proto.Conversation.direct("bob"), 1, "psst")
    got = await bob.next_of(proto.Message)
    assert (got.conv, got.seq, got.body) == (proto.Conversation.direct("alice"), ack.seq, "psst")
    await bob.request(proto.Send, proto.Conversation.direct("alice"), 1, "yes?")
    assert (await alice.next_of(proto.Message)).body == "yes?"

    # bob's last connection anywhere goes: alice, on the other node, hears OFFLINE once, after the delay.
    await bob.stream.aclose()
    with trio.fail_after(DEADLINE_S):
        assert await alice.next_of(proto.Presence) == proto.Presence("bob", proto.Status.OFFLINE)
    # His first one anywhere (on alice's node this time): ONLINE.
    bob = await client(n1, "bob")
    with trio.fail_after(DEADLINE_S):
        assert await alice.next_of(proto.Presence) == proto.Presence("bob", proto.Status.ONLINE)
    assert await n2.broker.online([1, 2, 3, 99]) == {1, 2, 3}

    # A second connection on another node is no news, and neither is a move within the delay: bob leaves n1 and is
    # back on n2 before his OFFLINE is due.
    bob2 = await client(n2, "bob")
    await eventually(sees(n1, 2, 2), "n1 counts both of bob's connections")
    await bob.stream.aclose()
    await bob2.stream.aclose()
    bob3 = await client(n2, "bob")
    await eventually(lambda: n1.broker.statistics()["offline_pending"] == 0 and n1.broker.statistics()["queued"] == 0
                     and n2.broker.statistics()["queued"] == 0, "the pending OFFLINE decided")
    # Redis delivers one subscriber's messages in publish order: dave's TYPING comes after any PRESENCE.
    await dave.send(proto.Typing(LOBBY))
    while not isinstance(event := await alice.next(), proto.UserTyping):
        assert not isinstance(event, proto.Presence), event
    assert await n1.broker.online([2]) == {2}
    await bob3.stream.aclose()


async def test_the_per_user_connection_limit_counts_every_node(cluster):
    n1, n2 = await cluster.node("n1", max_connections_per_user=2), await cluster.node("n2", max_connections_per_user=2)
    first = await client(n1, "alice", register=True)
    second = await client(n2, "alice")  # noqa: F841 - held open: a dropped RawClient closes its socket
    await eventually(sees(n1, 1, 2), "n1 sees alice's connection on n2")
    third = await RawClient.connect(n1.port)
    refused = await third.request(proto.Login, "alice", "correct horse")
    assert isinstance(refused, proto.Error) and refused.code == ErrorCode.TOO_MANY_CONNECTIONS, refused
    # One gone (on n1): there is room again, on either node.
    await first.stream.aclose()
    await eventually(sees(n2, 1, 1), "n2 sees alice's n1 connection gone")
    assert (await client(n2, "alice")).conn is not None


async def test_typing_receipts_and_membership_cross_nodes(cluster):
    n1, n2 = await cluster.node("n1"), await cluster.node("n2")
    alice, bob = await members_of_lobby((n1, "alice"), (n2, "bob"))
    await alice.send(proto.Typing(LOBBY))
    assert await bob.next_of(proto.UserTyping) == proto.UserTyping(LOBBY, "alice")
    ack = await alice.request(proto.Send, proto.Conversation.direct("bob"), 1, "read me")
    assert (await bob.next_of(proto.Message)).seq == ack.seq
    # A receipt goes to the user's connections on every node (once n2 has heard where alice is).
    await eventually(sees(n2, 1, 1), "n2 sees alice on n1")
    await bob.send(proto.Read(proto.Conversation.direct("alice"), ack.seq))
    receipt = await alice.next_of(proto.Receipt)
    assert (receipt.conv, receipt.user, receipt.kind, receipt.seq) == (
        proto.Conversation.direct("bob"), "bob", proto.ReceiptKind.READ, ack.seq)
    # Typing in a direct conversation is a push to the user.
    await bob.send(proto.Typing(proto.Conversation.direct("alice")))
    assert await alice.next_of(proto.UserTyping) == proto.UserTyping(proto.Conversation.direct("bob"), "bob")
    # A JOIN on one node makes the user's connection on another node live in the room (a user event).
    alice2 = await client(n2, "alice")
    assert isinstance(await alice.request(proto.Join, "news"), proto.Joined)
    await bob.request(proto.Join, "news")
    sent = await bob.request(proto.Send, proto.Conversation.room("news"), 2, "extra")
    for c in (alice, alice2):
        got = await c.next_of(proto.Message)
        assert (got.conv, got.seq) == (proto.Conversation.room("news"), sent.seq)


class UnreliableBroker(RedisBroker):
    """Publishes to the other nodes what a network may make of it: the ``late`` seqs wait until ``release`` is out,
    then go out newest first in one payload; the ``lost`` ones never go out. One conversation: a seq names one
    message."""

    def __init__(self, config, store, *, late=(), release=0, lost=(), **kwargs):
        super().__init__(config, store, **kwargs)
        self.late, self.release, self.lost = set(late), release, set(lost)
        self.held: list = []

    def _send_messages(self, batch):
        for msg in batch:
            if msg.seq in self.late:
                self.held.insert(0, msg)
            elif msg.seq not in self.lost:
                super()._send_messages([msg])
                if msg.seq == self.release:
                    super()._send_messages(self.held)


async def test_late_and_lost_publishes_between_nodes_cost_a_store_read_not_the_order(cluster):
    n1 = await cluster.node("n1", broker=partial(UnreliableBroker, late={2, 5}, release=6, lost={7, 8}))
    n2 = await cluster.node("n2")
    sender, near, far = await members_of_lobby((n1, "alice"), (n1, "bob"), (n2, "carol"))
    for i in range(1, 11):
        assert (await sender.request(proto.Send, LOBBY, i, f"m{i}")).seq == i
    for c in (near, far):
        assert [m.seq for m in await messages(c, 10)] == list(range(1, 11))
        await nothing_more(c, proto.Message)
    stats = n2.broker.statistics()
    assert stats["gaps"] >= 2 and stats["filled"] >= 2


async def kill_links(name: str) -> int:
    """CLIENT KILL every Redis connection of broker ``name`` (by its client name); how many were killed."""
    async with admin() as redis:
        killed = 0
        for info in await redis.client_list():
            if info.get("name") == name:
                killed += await redis.client_kill(identifier=int(info["id"]))
        return killed


async def test_a_killed_link_comes_back_and_what_was_published_meanwhile_is_re_synced(cluster, caplog):
    caplog.set_level(logging.INFO, "chorus.redisbroker")
    user, password = f"{cluster.prefix.replace(':', '-')}-n2", "secret"
    async with admin() as redis:
        # n2 reaches Redis as a user of its own, so that the test can keep it out for a while.
        await redis.acl_setuser(user, "reset", "on", f">{password}", "~*", "&*", "+@all")
    try:
        n1 = await cluster.node("n1")
        n2 = await cluster.node("n2", url=REDIS_URL.replace("redis://", f"redis://{user}:{password}@"))
        # alice and carol send (their replies skip pushes); dave and bob only read, one on each node.
        alice, dave, bob, carol = await members_of_lobby((n1, "alice"), (n1, "dave"), (n2, "bob"), (n2, "carol"))
        assert (await alice.request(proto.Send, LOBBY, 1, "before")).seq == 1
        assert [(await c.next_of(proto.Message)).seq for c in (dave, bob)] == [1, 1]

        async with admin() as redis:
            await redis.acl_setuser(user, "off")
            await redis.client_kill(user=user)
        await eventually(lambda: n2.broker.statistics()["link"] == "down", "n2 sees its link gone")
        # Local delivery goes on without Redis ...
        assert (await carol.request(proto.Send, LOBBY, 2, "local")).seq == 2
        assert (await bob.next_of(proto.Message)).seq == 2
        # ... and what n1 commits meanwhile cannot reach n2 live (n1 fills 2 from the store when 3 shows the gap).
        for i in (3, 4):
            assert (await alice.request(proto.Send, LOBBY, i, f"while down {i}")).seq == i
        assert [m.seq for m in await messages(dave, 3)] == [2, 3, 4]

        async with admin() as redis:
            await redis.acl_setuser(user, "on")
        await eventually(lambda: n2.broker.statistics()["link"] == "up", "n2 reconnected")
        # Re-synced from the store: nothing after them was needed to reveal them.
        assert [m.seq for m in await messages(bob, 2)] == [3, 4]
        # Live across nodes again, both ways.
        assert (await carol.request(proto.Send, LOBBY, 5, "back")).seq == 5
        assert (await alice.request(proto.Send, LOBBY, 6, "and you")).seq == 6
        for c in (dave, bob):
            assert [m.seq for m in await messages(c, 2)] == [5, 6]
            await nothing_more(c, proto.Message)
        stats = n2.broker.statistics()
        assert stats["losses"] == 1 and stats["links"] == 2 and stats["resyncs"] >= 1
        await n2.stop()  # leaves Redis while its user may still log in
    finally:
        async with admin() as redis:
            await redis.acl_deluser([user])
    lines = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records if r.name == "chorus.redisbroker"]
    lost = [line for line in lines if "lost" in line[1]]
    restored = [line for line in lines if "restored" in line[1]]
    assert len(lost) == 1 and len(restored) == 1, lines
    assert lost[0][2] is None and restored[0][2] is None  # one line each, no traceback


async def test_a_link_killed_by_client_kill_reconnects_at_once(cluster):
    n1, n2 = await cluster.node("n1"), await cluster.node("n2")
    alice, bob = await members_of_lobby((n1, "alice"), (n2, "bob"))
    # The subscriber and the command connections (the first kill may end the link before the others are reached).
    assert await kill_links(f"{cluster.prefix}/n2") >= 1
    await eventually(lambda: n2.broker.statistics()["links"] == 2 and n2.broker.statistics()["link"] == "up",
                     "n2 reconnected")
    await eventually(lambda: n2.broker.statistics()["channels"] >= 2, "n2 subscribed again")
    ack = await alice.request(proto.Send, LOBBY, 1, "still there?")
    assert (await bob.next_of(proto.Message)).seq == ack.seq


class CrashingBroker(RedisBroker):
    """A node that dies without a word: no deregistration when its server stops."""

    async def _deregister(self) -> None:
        pass


async def test_a_crashed_nodes_users_go_offline_on_the_others_within_the_ttl(cluster, prefix):
    n1 = await cluster.node("n1", broker=CrashingBroker)
    n2 = await cluster.node("n2")
    alice, bob = await members_of_lobby((n1, "alice"), (n2, "bob"))
    await eventually(sees(n2, 1, 1), "n2 sees alice on n1")
    assert {n.id for n in await n2.broker.nodes()} == {"n1", "n2"}
    await n1.stop()
    with trio.fail_after(3 * TTL_S + OFFLINE_DELAY_S + 2):
        assert await bob.next_of(proto.Presence) == proto.Presence("alice", proto.Status.OFFLINE)
    assert [n.id for n in await n2.broker.nodes()] == ["n2"]
    assert await n2.broker.online([1, 2]) == {2}
    assert n2.broker.connection_count(1) == 0 and n2.broker.statistics()["swept_nodes"] >= 1
    # Nothing of n1 is left in Redis.
    assert not [k for k in await keys_under(prefix) if b"n1" in k]


async def test_the_registry_lists_live_nodes_with_load_and_draining_and_a_clean_stop_leaves_nothing(cluster, prefix):
    n1, n2 = await cluster.node("n1"), await cluster.node("n2")
    alice = await client(n1, "alice", register=True)  # noqa: F841 - held open
    n2.broker.set_draining(True)
    # n2's NODES say so at once (what its GOAWAY goes with), before any registry read
    assert [n.draining for n in n2.broker.live_nodes() if n.node == "n2"] == [True]
    await eventually(lambda: _draining(n1), "n1 reads n2 draining")
    await eventually(lambda: _connections(n1), "n1's entry counts alice (at most a heartbeat later)")
    nodes = await n1.broker.nodes()
    assert [(n.id, n.port, n.connections, n.draining) for n in nodes] == [
        ("n1", n1.port, 1, False), ("n2", n2.port, 0, True)]
    assert all(isinstance(n, NodeInfo) and n.host == "127.0.0.1" and n.started_ms > 0 for n in nodes)
    assert [(n.node, n.connections, n.draining) for n in n1.broker.live_nodes()] == [  # least loaded first
        ("n2", 0, True), ("n1", 1, False)]
    await n2.stop()
    assert await _ids(n1) == ["n1"]  # gone from the registry at once: it left
    await n1.stop()
    assert not await keys_under(prefix)


async def _draining(node: Node) -> bool:
    return any(n.draining for n in await node.broker.nodes())


async def _connections(node: Node) -> bool:
    return [n.connections for n in await node.broker.nodes()] == [1, 0]


async def _ids(node: Node) -> list[str]:
    return [n.id for n in await node.broker.nodes()]


async def test_a_node_starts_and_serves_locally_while_redis_is_unreachable(cluster, caplog):
    caplog.set_level(logging.INFO, "chorus.redisbroker")
    node = await cluster.node("lonely", url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert node.broker.statistics()["link"] == "down"
    alice, bob = await members_of_lobby((node, "alice"), (node, "bob"))
    ack = await alice.request(proto.Send, LOBBY, 1, "just us")
    assert (await bob.next_of(proto.Message)).seq == ack.seq
    lines = [r for r in caplog.records if r.name == "chorus.redisbroker"]
    assert len(lines) == 1 and "unreachable" in lines[0].getMessage() and lines[0].exc_info is None


# -- the payloads of moderation (spec §9.15) and read state between nodes ----------------------------------------------

class UserConn:
    """One connection of a user as a broker sees it: the user events it is given."""

    reason = None

    def __init__(self, user_id: int):
        self.user_id, self.events = user_id, []

    def user_event(self, event) -> None:
        self.events.append(event)


async def test_events_ride_with_messages_and_mutes_reach_the_users_other_node_whole(tmp_path, prefix):
    """Two bare brokers on one store: an ``Appended`` carrying an event (beside a plain message, in one payload), the
    ``Muted`` user events (with an expiry, without one, lifted) and a ``ReadMoved`` arrive on the other node as they
    were sent."""
    ban = proto.ConvEvent(5, 1234, proto.EventKind.BAN, "alice", "bob", 0, 2**64 - 1, proto.RoomRole.MEMBER,
                          "spam ✓ \"quoted\"")
    sent = [Appended(7, 4, 1000, 1, "alice", 2**64 - 1, "hello", False),
            Appended(7, 5, 1234, 1, "alice", 0, "banned bob: spam", False, ban)]
    user_events = [Muted(2, 7, 2**63), Muted(2, 7, 0), Muted(2, 7, None), ReadMoved(2, 7, 2**64 - 1)]
    async with open_store(tmp_path / "shared.db") as store, trio.open_nursery() as nursery:
        n1, n2 = (RedisBroker(config_in(tmp_path / name, broker=REDIS_URL, broker_prefix=prefix, node_id=name,
                                        node_ttl_s=TTL_S, presence_offline_delay_s=OFFLINE_DELAY_S), store)
                  for name in ("n1", "n2"))
        for broker in (n1, n2):
            await nursery.start(broker.run)
        heard: list[Appended] = []
        n2.fanout.deliver = heard.extend  # what n2 receives, before its fan-out
        n2.subscribe(7, Conn(), Subscription(LOBBY))
        bob = UserConn(2)
        assert n2.add_connection(bob, 2, "bob", [], 10)
        # A publish reaches n2 only once Redis confirmed its subscriptions: send again until heard.
        with trio.fail_after(DEADLINE_S):
            while not heard:
                n1.publish(sent)
                await trio.sleep(0.02)
            while not all(m in bob.events for m in user_events):
                for m in user_events:
                    n1.user_event(m)
                await trio.sleep(0.02)
        assert heard[:2] == sent and heard[1].event == ban
        assert set(bob.events) == set(user_events)
        nursery.cancel_scope.cancel()
