"""The ports (server/_ports.py): implementations match them, ``serve`` takes them, and delivery survives a broker that
reorders or loses messages (issue 10; DESIGN.md "More than one machine").

The out-of-order tests run a real server on a real SQLite file, with real sockets, and a real broker built for them:
the local broker whose publish holds chosen messages back or loses them, as a network between nodes may. What they
check is what every client sees: each seq once, in order, none missing.
"""
from __future__ import annotations

import ast
import inspect
from functools import partial
from pathlib import Path

import pytest
import trio
from conftest import test_config as config_in
from rawclient import RawClient, alice_and_bob_in_lobby
from trio.testing import wait_all_tasks_blocked

from chorus import proto
from chorus.proto import CloseReason, ConvKind, ErrorCode
from chorus.server import _ports, serve
from chorus.server._broker import LocalBroker
from chorus.server._fanout import Fanout, Subscription
from chorus.server._ports import Appended, ConvRow, MemberJoined, MemberLeft, StoreError, TokenRevoked
from chorus.server._store import Store as SQLiteStore
from chorus.server._store import open_store
from chorus.server._websocket import wrap as ws_wrap

SERVER_DIR = Path(_ports.__file__).resolve().parent
LOBBY = proto.Conversation.room("lobby")
#: Nothing times out or PINGs while a test holds the mock clock still or jumps it by hand.
NO_DEADLINES = {"ping_interval_s": 10_000, "handshake_timeout_s": 10_000, "auth_timeout_s": 10_000,
                "frame_timeout_s": 10_000}


async def start(nursery, tmp_path, broker=None, **overrides):
    """A real server (SQLite in ``tmp_path``) with ``broker`` (a factory) or the default one."""
    return await nursery.start(partial(serve, config_in(tmp_path, **overrides), broker=broker))


async def pair_in_lobby(server) -> tuple[RawClient, RawClient]:
    return await alice_and_bob_in_lobby(await RawClient.connect(server.port), await RawClient.connect(server.port))


async def quiet_sender(server) -> RawClient:
    """alice on one more connection that never SYNCs: its rooms stay withheld, so it receives no MESSAGE and its
    requests skip none."""
    sender = await RawClient.connect(server.port)
    assert isinstance(await sender.request(proto.Login, "alice", "correct horse"), proto.AuthOk)
    return sender


def recording(brokers: list):
    def factory(config, store):
        brokers.append(RecordingBroker(config, store))
        return brokers[-1]

    return factory


async def nothing_more(client: RawClient, *kinds) -> None:
    """A PING round trip with no event of ``kinds`` before the PONG (what was written before it came first)."""
    rid = client.rid()
    await client.send(proto.Ping(rid, request_id=rid))
    while True:
        event = await client.next()
        assert not isinstance(event, kinds), event
        if isinstance(event, proto.Pong):
            return


# -- the ports themselves ---------------------------------------------------------------------------------------------

def _port_methods(protocol) -> dict:
    return {name: member for name, member in vars(protocol).items()
            if inspect.isfunction(member) and not name.startswith("_")}


@pytest.mark.parametrize("protocol, implementation", [(_ports.Store, SQLiteStore), (_ports.Broker, LocalBroker)],
                         ids=["Store", "Broker"])
def test_implementations_have_every_method_of_their_port(protocol, implementation):
    methods = _port_methods(protocol)
    assert len(methods) >= 12
    for name, declared in methods.items():
        actual = getattr(implementation, name, None)
        assert actual is not None, f"{implementation.__name__} has no {name}"
        assert inspect.iscoroutinefunction(actual) == inspect.iscoroutinefunction(declared), name
        declared_params = [(p.name, p.kind) for p in inspect.signature(declared).parameters.values()]
        actual_params = [(p.name, p.kind) for p in inspect.signature(actual).parameters.values()]
        assert actual_params == declared_params, name


def test_session_code_reaches_storage_and_other_connections_only_through_the_ports():
    for name in ("_session.py", "_conn.py", "_fanout.py", "_broker.py"):
        tree = ast.parse((SERVER_DIR / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
        assert not imported & {"_store", "_hub", "_broker"}, f"{name} imports {imported}"
    # No session reaches into another connection's session: other connections change by user events.
    tree = ast.parse((SERVER_DIR / "_session.py").read_text())
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "session"]


class RecordingBroker(LocalBroker):
    """The local broker, recording what crosses connections."""

    def __init__(self, config, store, **kwargs):
        super().__init__(config, store, **kwargs)
        self.store = store
        self.published: list[int] = []
        self.events: list = []

    def publish(self, batch):
        self.published.extend(msg.seq for msg in batch)
        super().publish(batch)

    def user_event(self, event):
        self.events.append(event)
        super().user_event(event)


async def test_serve_takes_an_open_store_and_a_broker_factory(tmp_path):
    made = []

    def factory(config, store):
        made.append(RecordingBroker(config, store))
        return made[-1]

    async with open_store(tmp_path / "own.db") as store:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, config_in(tmp_path), store=store, broker=factory))
            assert server.store is store and made == [server.broker] and server.broker.store is store
            alice, bob = await pair_in_lobby(server)
            ack = await alice.request(proto.Send, LOBBY, 1, "hello")
            assert (await bob.next_of(proto.Message)).seq == ack.seq == 1
            assert made[0].published == [1] and server.statistics()["delivered"] == 2  # alice's and bob's
            nursery.cancel_scope.cancel()
        # The caller's store outlives the server, with the message in it.
        (lobby,) = await store.conversations(1)
        page, _ = await store.messages_after(lobby.id, 0, 10)
        assert [m.body for m in page] == ["hello"]
    assert not (tmp_path / "data" / "chorus.db").exists()  # the default store was never opened


async def test_the_users_other_connections_change_by_user_events(nursery, tmp_path):
    brokers = []
    server = await start(nursery, tmp_path, recording(brokers))
    (broker,) = brokers
    a1 = await RawClient.connect(server.port)
    token = (await a1.register("alice")).token
    await a1.go_live()
    a2 = await RawClient.connect(server.port)
    assert isinstance(await a2.request(proto.Resume, token), proto.AuthOk)
    await a2.go_live()
    bob = await RawClient.connect(server.port)
    await bob.register("bob")
    await bob.go_live()
    await bob.request(proto.Join, "lobby")
    for i in (1, 2):
        await bob.request(proto.Send, LOBBY, i, f"before alice {i}")
    (bob_joined,) = broker.events
    lobby_id = bob_joined.conv.id
    assert bob_joined == MemberJoined(2, ConvRow(lobby_id, ConvKind.ROOM, "lobby", 0, None))
    broker.events.clear()

    # JOIN on one connection: every connection of the user goes live after JOINED's last_seq, and only after it.
    joined = await a1.request(proto.Join, "lobby")
    assert joined.last_seq == 2
    assert broker.events == [MemberJoined(1, ConvRow(lobby_id, ConvKind.ROOM, "lobby", 2, None))]
    await bob.request(proto.Send, LOBBY, 3, "welcome")
    for client in (a1, a2):
        message = await client.next_of(proto.Message)
        assert (message.conv, message.seq, message.body) == (LOBBY, 3, "welcome")

    # LEAVE on the other: the first stops receiving the room.
    assert isinstance(await a2.request(proto.Leave, "lobby"), proto.Ok)
    assert broker.events[-1] == MemberLeft(1, lobby_id)
    await bob.request(proto.Send, LOBBY, 4, "gone?")
    await nothing_more(a1, proto.Message)
    await nothing_more(a2, proto.Message)

    # A direct conversation opened by bob is live on both of alice's connections.
    ack = await bob.request(proto.Send, proto.Conversation.direct("alice"), 5, "psst")
    for client in (a1, a2):
        message = await client.next_of(proto.Message)
        assert (message.conv, message.seq, message.body) == (proto.Conversation.direct("bob"), ack.seq, "psst")
    assert [type(e) for e in broker.events[-2:]] == [MemberJoined, MemberJoined]

    # LOGOUT on one connection closes every connection using that token.
    await a1.send(proto.Logout(request_id=a1.rid()))
    for client in (a1, a2):
        assert proto.Bye(CloseReason.LOGGED_OUT) in await client.drain_until_closed()
    assert isinstance(broker.events[-1], TokenRevoked) and broker.events[-1].user_id == 1


# -- out-of-order and lost publications -------------------------------------------------------------------------------

class UnreliableBroker(LocalBroker):
    """What a network between nodes may do to published messages: hold some back, lose some.

    ``late``: seq -> how many later messages are published before it. ``lost``: seqs never published. The tests use
    one conversation, so a seq names one message.
    """

    def __init__(self, config, store, *, late=None, lost=(), **kwargs):
        super().__init__(config, store, **kwargs)
        self.late = dict(late or {})
        self.lost = set(lost)
        self._waiting: list[list] = []  # [messages still to be published first, message]

    def publish(self, batch):
        for msg in batch:
            if msg.seq in self.lost:
                continue
            if msg.seq in self.late:
                self._waiting.append([self.late[msg.seq], msg])
                continue
            super().publish([msg])
            for entry in self._waiting:
                entry[0] -= 1
            due = [msg for left, msg in self._waiting if left <= 0]
            self._waiting = [entry for entry in self._waiting if entry[0] > 0]
            if due:
                super().publish(due)


async def received_seqs(client: RawClient, last: int) -> list[int]:
    seqs = []
    while not seqs or seqs[-1] < last:
        seqs.append((await client.next_of(proto.Message)).seq)
    return seqs


@pytest.mark.parametrize("late, lost", [
    ({2: 1}, ()),  # 3 arrives before 2, and 2 right after: the late one closes the gap
    ({2: 3}, ()),  # 2 arrives after 3, 4 and 5: the store fills the gap, the late 2 is a duplicate
    ({3: 1, 5: 1}, ()),  # two gaps, one after the other
    ({}, (2,)),  # 2 never arrives: the store fills the gap when 3 shows it
    ({}, (2, 3, 4)),  # several lost in a row
], ids=["late-by-1", "late-by-3", "two-late", "lost", "three-lost"])
async def test_every_subscriber_sees_each_seq_once_in_order_whatever_the_broker_does(nursery, tmp_path, late, lost):
    server = await start(nursery, tmp_path, partial(UnreliableBroker, late=late, lost=lost))
    alice, bob = await pair_in_lobby(server)
    sender = await quiet_sender(server)
    for i in range(1, 7):
        assert (await sender.request(proto.Send, LOBBY, i, f"m{i}")).seq == i
    for client in (alice, bob):  # alice's own messages reach her live connection too
        assert await received_seqs(client, 6) == [1, 2, 3, 4, 5, 6]
        await nothing_more(client, proto.Message)
    stats = server.broker.statistics()
    assert stats["gaps"] >= 1
    if lost:
        assert stats["filled"] >= len(lost)
    await wait_all_tasks_blocked()
    assert server.broker.statistics()["gaps_open"] == 0  # every fill finished
    # Live delivery goes on in order afterwards.
    await sender.request(proto.Send, LOBBY, 7, "after")
    assert [(await c.next_of(proto.Message)).seq for c in (alice, bob)] == [7, 7]


class RefusingReads:
    """The store as a gap fill sees it while its database is unreachable."""

    async def messages_after(self, conv_id, after_seq, limit):
        raise StoreError("database unreachable")


async def test_a_gap_the_store_cannot_fill_closes_the_gapped_connections_which_resume_by_seq(nursery, tmp_path):
    server = await start(nursery, tmp_path,
                         lambda config, store: UnreliableBroker(config, RefusingReads(), lost={2}, max_held=3))
    alice, bob = await pair_in_lobby(server)
    sender = await quiet_sender(server)  # not live in the room: never gapped
    for i in range(1, 7):
        assert (await sender.request(proto.Send, LOBBY, i, f"m{i}")).seq == i
    # 1 arrives; 3, 4 and 5 are held while 2 cannot be read; 6 is one too many.
    for client in (alice, bob):
        events = await client.drain_until_closed()
        assert [e.seq for e in events if isinstance(e, proto.Message)] == [1]
    await wait_all_tasks_blocked()
    assert server.close_reasons["SLOW_CONSUMER"] == 2
    assert server.broker.statistics()["gaps_open"] == 0
    # A client resumes by seq (guarantee 4) and misses nothing.
    bob = await RawClient.connect(server.port)
    assert isinstance(await bob.request(proto.Login, "bob", "correct horse"), proto.AuthOk)
    rid = bob.rid()
    await bob.send(proto.Sync((proto.Position(LOBBY, 1),), request_id=rid))
    seqs = []
    while not isinstance(event := await bob.next_of(proto.SyncPage, proto.SyncDone), proto.SyncDone):
        seqs += [m.seq for m in event.messages]
    assert seqs == [2, 3, 4, 5, 6]
    await sender.request(proto.Send, LOBBY, 7, "live again")
    assert (await bob.next_of(proto.Message)).seq == 7


class MemoryMessages:
    """Messages by conversation and seq, answering ``messages_after`` like a store."""

    def __init__(self):
        self.rows: dict[int, dict[int, proto.StoredMessage]] = {}

    def add(self, msg: Appended) -> Appended:
        self.rows.setdefault(msg.conv_id, {})[msg.seq] = proto.StoredMessage(msg.seq, msg.ts_ms, msg.sender_name,
                                                                             msg.client_msg_id, msg.body)
        return msg

    async def messages_after(self, conv_id, after_seq, limit):
        rows = [m for seq, m in sorted(self.rows.get(conv_id, {}).items()) if seq > after_seq]
        return rows[:limit], len(rows) > limit


class Output:
    def __init__(self):
        self.frames: list[bytes] = []
        self.corked = False

    def write(self, data: bytes) -> bool:
        self.frames.append(data)
        return True

    def cork(self):
        self.corked = True

    def uncork(self):
        self.corked = False


class Conn:
    """A connection as the fan-out sees it (server/_ports.py Subscriber)."""

    def __init__(self, version: int = proto.MIN_PROTOCOL_VERSION, wrap=None):
        self.user_id, self.reason, self.inflight_sends = 1, None, 0
        self.output, self.wrap = Output(), wrap
        self.wire = proto.Connection(proto.SERVER)
        self.wire.version = version  # as HELLO negotiated it

    def output_failed(self):
        raise AssertionError("the output never fails here")

    def seqs(self) -> list[int]:
        return [proto.decode(frame).seq for frame in self.output.frames]


def message(seq: int, conv_id: int = 7) -> Appended:
    return Appended(conv_id, seq, 1000 + seq, 1, "alice", 100 + seq, f"m{seq}", False)


async def test_the_fanout_drops_duplicates_and_orders_what_arrives_out_of_order():
    messages = MemoryMessages()
    fanout = Fanout(messages, page=2)
    early, late = Conn(), Conn()
    fanout.subscribe(7, early, Subscription(LOBBY))
    async with trio.open_nursery() as nursery:
        await nursery.start(fanout.run)
        fanout.deliver([messages.add(message(1)), messages.add(message(2))])
        fanout.deliver([message(2), message(1)])  # duplicates
        fanout.subscribe(7, late, Subscription(LOBBY, sent_seq=2))  # live after 2
        m3, m4, m5 = (messages.add(message(seq)) for seq in (3, 4, 5))
        fanout.deliver([m4, m3])  # out of order within one batch: 4 is held until 3 comes
        fanout.deliver([m5])
        assert early.seqs() == [1, 2, 3, 4, 5] and late.seqs() == [3, 4, 5]
        for seq in range(6, 12):
            messages.add(message(seq))
        fanout.deliver([message(11)])  # 6..10 never published: read from the store, two a page
        await wait_all_tasks_blocked()
        fanout.flush()
        assert early.seqs() == list(range(1, 12)) and late.seqs() == list(range(3, 12))
        assert fanout.statistics()["gaps_open"] == 0 and fanout.filled >= 5
        nursery.cancel_scope.cancel()


def test_each_protocol_version_and_framing_gets_its_own_encoding():
    fanout = Fanout(MemoryMessages())
    v1 = [Conn(1) for _ in range(3)]
    v2 = Conn(2)
    ws = Conn(1, wrap=ws_wrap)
    dm = Conn(1)
    conns = [*v1, v2, ws]
    for conn in conns:
        fanout.subscribe(7, conn, Subscription(LOBBY))
    fanout.subscribe(7, dm, Subscription(proto.Conversation.direct("alice")))  # another view, same conversation
    fanout.deliver([message(1)])
    (first,) = v1[0].output.frames
    assert all(conn.output.frames[0] is first for conn in v1)  # encoded once for all three
    assert v2.output.frames[0] is not first  # its own encoding
    assert proto.decode(v2.output.frames[0]) == proto.decode(first) == proto.Message(LOBBY, 1, 1001, "alice", 101, "m1")
    assert ws.output.frames[0] == ws_wrap(first)
    assert proto.decode(dm.output.frames[0]).conv == proto.Conversation.direct("alice")
    assert fanout.delivered == len(conns) + 1


class PushedConn(Conn):
    def __init__(self, version: int):
        super().__init__(version)
        self.pushed: list[bytes] = []

    def push(self, frame: bytes) -> None:
        self.pushed.append(frame)


def test_a_push_goes_to_the_connections_whose_version_has_its_frame_type_encoded_once_per_version(tmp_path):
    broker = LocalBroker(config_in(tmp_path), MemoryMessages())
    v1, v1_too, v2 = PushedConn(1), PushedConn(1), PushedConn(2)
    for conn in (v1, v1_too, v2):
        assert broker.add_connection(conn, 1, "alice", (), limit=8)
    presence = proto.Presence("bob", proto.Status.ONLINE)  # version 1
    membership = proto.Membership("lobby", "bob", proto.MembershipChange.JOINED)  # version 2
    broker.push_to_user(1, presence)
    broker.push_to_user(1, membership)
    assert v1.pushed == v1_too.pushed == [proto.encode(presence)] and v1.pushed[0] is v1_too.pushed[0]
    assert [proto.decode(frame) for frame in v2.pushed] == [presence, membership]


# -- the shared rules in Config and proto -----------------------------------------------------------------------------

async def test_typing_is_coalesced_below_the_clients_interval(nursery, tmp_path, mock_clock):
    server = await start(nursery, tmp_path, **NO_DEADLINES)
    alice, bob = await pair_in_lobby(server)
    interval = proto.TYPING_INTERVAL_S

    async def typing_reaches_bob() -> bool:
        await alice.send(proto.Typing(LOBBY))
        await nothing_more(alice, proto.UserTyping)  # alice's TYPING is handled: its push is on bob's socket
        rid = bob.rid()
        await bob.send(proto.Ping(rid, request_id=rid))
        seen = False
        while not isinstance(event := await bob.next(), proto.Pong):
            seen = seen or event == proto.UserTyping(LOBBY, "alice")
        return seen

    assert await typing_reaches_bob()
    mock_clock.jump(interval / 2)
    assert not await typing_reaches_bob()  # twice the allowed rate: coalesced
    mock_clock.jump(interval * 0.4)
    assert await typing_reaches_bob()  # an honest client's next TYPING, arriving a tenth of an interval early


async def read_only(server, on: bool) -> None:
    """``PRAGMA query_only`` on the store's writing connection: every write is refused (SQLITE_READONLY)."""
    await server.store._run(lambda conn: conn.execute(f"PRAGMA query_only = {int(on)}"))


async def test_server_busy_carries_the_configured_retry_hint(nursery, tmp_path):
    server = await start(nursery, tmp_path, busy_retry_ms=4321)
    alice, _ = await pair_in_lobby(server)
    await read_only(server, True)
    refused_join = await alice.request(proto.Join, "elsewhere")  # a write the store refuses
    refused_send = await alice.request(proto.Send, LOBBY, 1, "not now")  # a group commit the store refuses
    for reply in (refused_join, refused_send):
        assert (reply.code, reply.retry_after_ms) == (ErrorCode.SERVER_BUSY, 4321), reply
    await read_only(server, False)
    assert (await alice.request(proto.Send, LOBBY, 1, "now")).seq == 1


async def test_max_batch_bounds_the_group_commit(nursery, tmp_path):
    server = await start(nursery, tmp_path, max_batch=3)
    alice, _ = await pair_in_lobby(server)
    ids = range(1, 21)
    for i in ids:  # pipelined: they gather while a commit runs
        await alice.send(proto.Send(LOBBY, i, f"m{i}", request_id=1000 + i))
    acks = set()
    while len(acks) < len(ids):
        acks.add((await alice.next_of(proto.Ack)).client_msg_id)
    stats = server.store.statistics()
    assert stats["batch_max"] == 3 and stats["commits"] >= 7
