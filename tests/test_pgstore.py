"""server/_pgstore.py against a real PostgreSQL (a fresh database per test; the Store contract itself, the room limit
between two stores included, runs against it in test_store.py): several nodes on one database, schema migrations,
real faults (backends terminated, the server gone and back through a relay, a connection lost during COMMIT), and the
whole server on it."""
from __future__ import annotations

import logging
import random
from urllib.parse import urlsplit

import psycopg
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from chorus import proto
from chorus.server import serve
from chorus.server import _pgstore
from chorus.server._invites import InviteInvalid, code_hash, new_code
from chorus.server._moderation import Moderation, Refused
from chorus.server._pgstore import SCHEMA_VERSION, open_pg_store
from chorus.server._ports import Appended, SchemaTooNew, StoreError
from conftest import test_config as config_for
from rawclient import RawClient, alice_and_bob_in_lobby
from test_store import POSTGRES, Hold, make_users, msg, pg_database

LOBBY = proto.Conversation.room("lobby")


@pytest.fixture
def pg_url():
    with pg_database() as url:
        yield url


def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    """Run one statement on its own connection (autocommit); its rows, if any."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def with_password(url: str, password: str) -> str:
    """``url`` with a password: trust authentication ignores it, so it only shows whether messages leak it."""
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5432}").geturl()


async def until(condition, what: str, timeout_s: float = 10.0) -> None:
    """Poll ``condition()`` (a database state another process reaches) until true."""
    with trio.fail_after(timeout_s):
        while not await trio.to_thread.run_sync(condition):
            await trio.sleep(0.005)


def waiting_for_lock(url: str) -> bool:
    """Some backend of ``url``'s database waits for a lock."""
    dbname = urlsplit(url).path.lstrip("/")
    return bool(sql(url, "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                    (dbname,)))


def terminate_backends(url: str) -> int:
    """End every other connection to ``url``'s database, as an administrator would, and wait until they are gone."""
    dbname = urlsplit(url).path.lstrip("/")
    return len(sql(url, "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)))


# -- several nodes on one database --------------------------------------------------------------------------------

async def test_two_nodes_append_into_the_same_conversations_gapless(pg_url):
    async with open_pg_store(pg_url, max_batch=32) as one, open_pg_store(pg_url, max_batch=32) as two:
        users = await make_users(one, *(f"u{i}" for i in range(6)))
        convs = [(await one.join_room(users[0].id, f"r{i}", max_rooms=100))[0] for i in range(8)]
        published: dict[int, list[Appended]] = {1: [], 2: []}
        one.on_commit, two.on_commit = published[1].extend, published[2].extend
        results: list[Appended] = []
        retries: list[tuple[Appended, Appended]] = []
        rng = random.Random(7)

        async def sender(node, user, order, first_id):
            # Every message goes to each conversation of ``order`` in turn: node one's senders walk the
            # conversations upwards and node two's downwards, so their batches overlap in opposite orders.
            for i, conv in enumerate(order * 3):
                results.append(await node.append(msg(conv, user, first_id + i)))

        async def retried(user, client_msg_id, conv):
            # The same send reaching both nodes at once (a client that retried on another node): one seq.
            got = {}

            async def on(node):
                got[node] = await node.append(msg(conv, user, client_msg_id))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(on, one)
                nursery.start_soon(on, two)
            retries.append((got[one], got[two]))

        async with trio.open_nursery() as nursery:
            for n, user in enumerate(users):
                node, order = (one, convs) if n % 2 == 0 else (two, convs[::-1])
                nursery.start_soon(sender, node, user, order, 1000)
            for k in range(40):
                nursery.start_soon(retried, users[k % 6], 10_000 + k, rng.choice(convs))

        for a, b in retries:
            assert (a.conv_id, a.seq) == (b.conv_id, b.seq) and {a.duplicate, b.duplicate} == {False, True}
        fresh = [r for r in results if not r.duplicate] + [a if not a.duplicate else b for a, b in retries]
        assert len(fresh) == 6 * 8 * 3 + 40
        for conv in convs:
            seqs = sorted(r.seq for r in fresh if r.conv_id == conv)
            assert seqs == list(range(1, len(seqs) + 1))  # every seq once: no gap, no repeat
            assert await two.last_seq(conv) == len(seqs)
            for node in (1, 2):  # each node published its own commits in seq order
                mine = [a.seq for a in published[node] if a.conv_id == conv]
                assert mine == sorted(mine)
        stats = [one.statistics(), two.statistics()]
        assert sum(s["appended"] for s in stats) == len(fresh) and all(s["failed_batches"] == 0 for s in stats)


async def test_a_deadlock_aborting_a_batch_is_retried_not_surfaced(pg_url):
    """PostgreSQL aborts the committer's batch as a deadlock victim; the batch is retried and every append acked."""
    # PostgreSQL checks for a deadlock once, deadlock_timeout after a wait began: the committer's check must come
    # after the other transaction closed the cycle (well within this), and before the other's own check.
    sql(pg_url, f"ALTER DATABASE {urlsplit(pg_url).path.lstrip('/')} SET deadlock_timeout = '500ms'")
    async with open_pg_store(pg_url) as store:
        alice, bob = await make_users(store, "alice", "bob")
        first, second = sorted([(await store.join_room(alice.id, name, max_rooms=9))[0] for name in ("a", "b")])
        other = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_url))
        try:
            # Another transaction holds the second conversation; the batch locks the first, then waits for it.
            await trio.to_thread.run_sync(lambda: other.execute("SET deadlock_timeout = '5s'"))
            await trio.to_thread.run_sync(
                lambda: other.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (second,)))
            results = {}
            async with trio.open_nursery() as nursery:
                hold = Hold(store)
                await hold.acquire()
                for m in (msg(first, alice, 1), msg(second, bob, 2)):
                    nursery.start_soon(_store_result, store, m, results)
                await wait_all_tasks_blocked()
                hold.release()
                await until(lambda: waiting_for_lock(pg_url), "the batch waits for the second conversation")
                # Now the other transaction wants the first: a cycle, which the committer's session detects first.
                await trio.to_thread.run_sync(
                    lambda: other.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (first,)))
                await trio.to_thread.run_sync(other.commit)
        finally:
            await trio.to_thread.run_sync(other.close)
        assert sorted((r.conv_id, r.seq, r.duplicate) for r in results.values()) == [(first, 1, False),
                                                                                     (second, 1, False)]
        assert store.statistics()["retries"] >= 1 and store.statistics()["failed_batches"] == 0


async def _store_result(store, m, results):
    try:
        results[m] = await store.append(m)
    except Exception as exc:
        results[m] = exc


async def test_a_key_stored_by_another_node_meanwhile_resolves_to_a_duplicate(pg_url):
    """Another node inserts the same (sender, client_msg_id) after the batch looked for it: the batch is retried
    and answers the other node's row as the original."""
    async with open_pg_store(pg_url) as store:
        (alice,) = await make_users(store, "alice")
        here, there = [(await store.join_room(alice.id, name, max_rooms=9))[0] for name in ("here", "there")]
        other = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_url))
        try:
            # The other node's transaction: seq 1 of "there" with alice's id 5, not committed yet.
            await trio.to_thread.run_sync(lambda: other.execute(
                "UPDATE conversations SET last_seq = 1 WHERE id = %s;", (there,)))
            await trio.to_thread.run_sync(lambda: other.execute(
                "INSERT INTO messages VALUES (%s, 1, 42, %s, 5, 'theirs')", (there, alice.id)))
            results = {}
            async with trio.open_nursery() as nursery:
                ours = msg(here, alice, 5, "ours")
                nursery.start_soon(_store_result, store, ours, results)
                await until(lambda: waiting_for_lock(pg_url), "the INSERT waits for the other transaction's key")
                await trio.to_thread.run_sync(other.commit)
        finally:
            await trio.to_thread.run_sync(other.close)
        got = results[ours]
        assert (got.conv_id, got.seq, got.ts_ms, got.body, got.duplicate) == (there, 1, 42, "theirs", True)
        assert await store.last_seq(here) == 0  # no seq was taken
        assert store.statistics()["retries"] == 1
        assert (await store.append(msg(here, alice, 6))).seq == 1


async def test_two_nodes_create_one_direct_conversation_per_pair(pg_url):
    async with open_pg_store(pg_url) as one, open_pg_store(pg_url) as two:
        users = await make_users(one, *(f"u{i}" for i in range(8)))
        pairs = [(a, b) for a in users for b in users if a.id < b.id]
        got: dict[tuple[int, int, int], int] = {}

        async def direct(node, n, a, b):
            got[n, a.id, b.id] = await node.direct(a.id, b.id) if n % 2 else await node.direct(b.id, a.id)

        async with trio.open_nursery() as nursery:
            for a, b in pairs:
                for n, node in enumerate((one, two, one, two)):
                    nursery.start_soon(direct, node, n, a, b)
        for a, b in pairs:
            assert len({got[n, a.id, b.id] for n in range(4)}) == 1
        assert sql(pg_url, "SELECT count(*) FROM conversations WHERE kind = %s",
                   (int(proto.ConvKind.DIRECT),)) == [(len(pairs),)]


async def test_two_nodes_moderate_and_append_into_one_room_gapless(pg_url):
    """Moderation on both nodes, among both nodes' group commits into the same room: every seq once (events and
    messages), nothing refused but the second of two DELETEs of one message, sent to both nodes at once."""
    async with open_pg_store(pg_url, max_batch=16) as one, open_pg_store(pg_url, max_batch=16) as two:
        owner, *users = await make_users(one, "owner", "u0", "u1", "u2", "u3")
        lobby, _ = await one.join_room(owner.id, "lobby", max_rooms=9)
        for user in users:
            await two.join_room(user.id, "lobby", max_rooms=9)
        targets = [await one.append(msg(lobby, users[0], k)) for k in range(1, 11)]
        events, refusals = [], []

        async def sender(node, user):
            for i in range(30):
                await node.append(msg(lobby, user, 1000 + i))

        async def topics(node, n):
            for i in range(15):
                events.append(await node.moderate(Moderation(proto.EventKind.TOPIC, lobby, owner.id, text=f"{n}.{i}")))

        async def delete(node, seq):
            try:
                events.append(await node.moderate(Moderation(proto.EventKind.DELETE, lobby, owner.id, target_seq=seq)))
            except Refused as exc:
                refusals.append(exc.code)

        async with trio.open_nursery() as nursery:
            for n, user in enumerate(users):
                nursery.start_soon(sender, (one, two)[n % 2], user)
            nursery.start_soon(topics, one, 1)
            nursery.start_soon(topics, two, 2)
            for target in targets:
                nursery.start_soon(delete, one, target.seq)
                nursery.start_soon(delete, two, target.seq)
        assert refusals == [proto.ErrorCode.NOT_FOUND] * len(targets)
        last = await two.last_seq(lobby)
        assert last == len(targets) + 4 * 30 + 2 * 15 + len(targets)  # a tombstone keeps its message's seq
        page, more = await two.messages_after(lobby, 0, 10_000)
        assert [e.seq for e in page] == list(range(1, last + 1)) and not more
        assert sorted(a.event.seq for a in events) == [e.seq for e in page if isinstance(e, proto.ConvEvent)
                                                       and e.kind != proto.EventKind.DELETED]
        assert [e.kind for e in page[:len(targets)]] == [proto.EventKind.DELETED] * len(targets)


async def test_one_invite_code_redeemed_on_two_nodes_at_once_makes_one_account(pg_url):
    async with open_pg_store(pg_url) as one, open_pg_store(pg_url) as two:
        codes = [code_hash(new_code()) for _ in range(20)]
        await one.add_invites(codes, 0)
        made, refused = [], []

        async def register(node, name, code):
            try:
                made.append(await node.create_user(name, "h", invite=code))
            except InviteInvalid:
                refused.append(name)

        async with trio.open_nursery() as nursery:
            for k, code in enumerate(codes):
                nursery.start_soon(register, one, f"a{k}", code)
                nursery.start_soon(register, two, f"b{k}", code)
        assert len(made) == len(refused) == len(codes)
        assert sorted(u.name for u in await one.list_users()) == sorted(u.name for u in made)
        assert sorted(r.used_by for r in await two.list_invites()) == sorted(u.name for u in made)


# -- schema ---------------------------------------------------------------------------------------------------------

async def test_a_database_from_before_moderation_migrates_with_its_rooms_unowned_and_public(pg_url):
    """Step 4 on a version 3 database with a room, members and messages: the members are MEMBERs (no owner), the
    room is public, its pages are its messages; new rooms get owners."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE chorus_schema (one boolean PRIMARY KEY DEFAULT true CHECK (one),"
                     " version integer NOT NULL)")
        for step in _pgstore._MIGRATIONS[:3]:
            conn.execute(step.encode())
        conn.execute("INSERT INTO chorus_schema (version) VALUES (3)")
        conn.execute("INSERT INTO users (name, password_hash) VALUES ('alice', 'h'), ('bob', 'h')")
        conn.execute("INSERT INTO conversations (kind, name, last_seq) VALUES (%s, 'old', 1)",
                     (int(proto.ConvKind.ROOM),))
        conn.execute("INSERT INTO memberships (user_id, conv_id) SELECT u.id, c.id FROM users u, conversations c")
        conn.execute("INSERT INTO messages (conv_id, seq, ts_ms, sender_id, client_msg_id, body)"
                     " SELECT c.id, 1, 5, u.id, 1, 'hi'::bytea FROM users u, conversations c WHERE u.name = 'alice'")
    async with open_pg_store(pg_url) as store:
        alice, bob = await store.get_user("alice"), await store.get_user("bob")
        old = await store.room("old", create=False)
        topic, private, members, bans = await store.room_details(old, alice.id)
        assert (topic, private, [(name, role) for _, name, role, _ in members], bans) == (
            "", False, [("alice", proto.RoomRole.MEMBER), ("bob", proto.RoomRole.MEMBER)], [])
        assert await store.messages_after(old, 0, 10) == ([proto.StoredMessage(1, 5, "alice", 1, "hi")], False)
        assert [r.name for r in await store.list_rooms(bob.id, 10)] == ["old"]
        with pytest.raises(Refused):  # no one may moderate it until an operator names an owner
            await store.moderate(Moderation(proto.EventKind.KICK, old, alice.id, bob.id))
        new, _ = await store.join_room(bob.id, "new", max_rooms=9)
        assert (await store.room_details(new, bob.id))[2][0][2] == proto.RoomRole.OWNER
    assert sql(pg_url, "SELECT version FROM chorus_schema") == [(SCHEMA_VERSION,)]


async def test_schema_is_created_by_the_first_of_two_nodes_and_newer_is_refused(pg_url):
    async with trio.open_nursery() as nursery:  # two nodes starting at once on an empty database
        opened = []

        async def node():
            async with open_pg_store(pg_url) as store:
                opened.append(store)
                await trio.sleep_forever()

        nursery.start_soon(node)
        nursery.start_soon(node)
        with trio.fail_after(10):
            while len(opened) < 2:
                await trio.sleep(0.005)
        alice = await opened[0].create_user("alice", "h")
        assert await opened[1].get_user("alice") == alice
        nursery.cancel_scope.cancel()
    assert sql(pg_url, "SELECT version FROM chorus_schema") == [(SCHEMA_VERSION,)]
    sql(pg_url, "UPDATE chorus_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer"):
        async with open_pg_store(pg_url):
            pass


# -- faults -----------------------------------------------------------------------------------------------------------

async def test_terminated_connections_are_replaced(pg_url):
    async with open_pg_store(pg_url, pool_size=3) as store:
        alice, bob = await make_users(store, "alice", "bob")
        conv = await store.direct(alice.id, bob.id)
        assert (await store.append(msg(conv, alice, 1))).seq == 1
        assert await store.last_seq(conv) == 1
        before = store.statistics()
        assert await trio.to_thread.run_sync(terminate_backends, pg_url) >= 2  # the committer's and a reader's
        # Found dead before anything ran: the batch and the query are redone on fresh connections.
        assert (await store.append(msg(conv, alice, 2))).seq == 2
        assert await store.last_seq(conv) == 2
        after = store.statistics()
        assert after["retries"] >= before["retries"] + 2 and after["connects"] >= before["connects"] + 2
        # An INSERT that is not safe to repeat (it may have run) is answered StoreError once; then it works.
        await trio.to_thread.run_sync(terminate_backends, pg_url)
        with pytest.raises(StoreError):
            await store.create_user("carol", "h")
        assert (await store.create_user("carol", "h")).name == "carol"


async def test_a_connection_lost_during_commit_fails_the_batch(pg_url):
    """The backend dies inside COMMIT (a deferred trigger ends it): the outcome is unknown, so every waiter of the
    batch gets StoreError; the client's retry with the same client_msg_id then stores it once."""
    async with open_pg_store(pg_url) as store:
        alice, bob = await make_users(store, "alice", "bob")
        conv = await store.direct(alice.id, bob.id)
        await store.append(msg(conv, alice, 1))
        sql(pg_url, """
            CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(10); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON messages DEFERRABLE INITIALLY DEFERRED
              FOR EACH ROW WHEN (NEW.body = convert_to('die at commit', 'UTF8')) EXECUTE FUNCTION die();
            CREATE TRIGGER die_now AFTER INSERT ON messages
              FOR EACH ROW WHEN (NEW.body = convert_to('die now', 'UTF8')) EXECUTE FUNCTION die();
        """)
        results = {}
        batch = [msg(conv, alice, 2, "die at commit"), msg(conv, bob, 3)]
        async with trio.open_nursery() as nursery:
            hold = Hold(store)
            await hold.acquire()
            for m in batch:
                nursery.start_soon(_store_result, store, m, results)
            await wait_all_tasks_blocked()
            hold.release()
        for m in batch:
            assert isinstance(results[m], StoreError) and "during COMMIT" in str(results[m]), results[m]
        # Dying inside the transaction, before COMMIT: nothing is stored, and the batch fails too.
        with pytest.raises(StoreError):
            await store.append(msg(conv, alice, 4, "die now"))
        sql(pg_url, "DROP TRIGGER die_at_commit ON messages; DROP TRIGGER die_now ON messages")
        retry = await store.append(msg(conv, alice, 2, "die at commit"))
        assert (retry.seq, retry.duplicate) == (2, False)  # it had not committed; no seq was lost
        assert (await store.append(msg(conv, bob, 3))).seq == 3
        stats = store.statistics()
        assert stats["failed_batches"] == 2 and stats["refused"] == 2


class Relay:
    """A TCP relay in front of PostgreSQL that the test takes down (every connection cut, new ones refused) and
    brings back on the same port: the database going away and returning, as the store sees it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._scope: trio.CancelScope | None = None

    async def up(self, nursery: trio.Nursery) -> None:
        self._scope = await nursery.start(self._serve)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._relay, listeners)
                task_status.started(scope)

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                server = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with server, trio.open_nursery() as nursery:

                async def pump(source, sink):
                    try:
                        async for data in source:
                            await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)


async def test_postgres_down_then_back(pg_url, caplog):
    target = urlsplit(POSTGRES)
    async with trio.open_nursery() as nursery:
        relay = Relay(target.hostname or "127.0.0.1", target.port or 5432)
        await relay.up(nursery)
        url = with_password(urlsplit(pg_url)._replace(netloc=f"root@127.0.0.1:{relay.port}").geturl(), "s3cret")
        caplog.set_level(logging.INFO)
        async with open_pg_store(url, pool_size=2) as store:
            alice, bob = await make_users(store, "alice", "bob")
            conv = await store.direct(alice.id, bob.id)
            assert (await store.append(msg(conv, alice, 1))).seq == 1
            relay.down()
            errors = []
            for op in (lambda: store.append(msg(conv, alice, 2)), lambda: store.last_seq(conv),
                       lambda: store.get_user("alice"), lambda: store.create_user("carol", "h")):
                with pytest.raises(StoreError) as info:
                    await op()
                errors.append(str(info.value))
            outcome = trio.Event()
            nowait: list = []
            store.append_nowait(msg(conv, alice, 2), lambda a, e: (nowait.append((a, e)), outcome.set()))
            await outcome.wait()
            assert isinstance(nowait[0][1], StoreError)
            await relay.up(nursery)  # back: the same store serves again, nothing to restart
            assert (await store.append(msg(conv, alice, 2))).seq == 2  # the refused ones took no seq
            assert await store.last_seq(conv) == 2
            assert (await store.create_user("carol", "h")).name == "carol"
            assert store.statistics()["refused"] == 5
        nursery.cancel_scope.cancel()
    assert all("s3cret" not in text for text in errors + [r.getMessage() for r in caplog.records]), errors
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_opening_fails_clearly(pg_url):
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = f"postgresql://root:s3cret@127.0.0.1:{port}/chorus"
    with trio.fail_after(5):
        with pytest.raises(StoreError, match="cannot open postgresql://root:\\*\\*\\*@127.0.0.1") as info:
            async with open_pg_store(closed):
                pass
    assert "refused" in str(info.value) and "s3cret" not in str(info.value)
    for bad in ("postgresql://root:s3cret@[::1/x", with_password(pg_url, "s3cret") + "?nonsense=1"):
        with pytest.raises(StoreError) as info:
            async with open_pg_store(bad):
                pass
        assert "s3cret" not in str(info.value), info.value
    with pytest.raises(ValueError):
        async with open_pg_store(pg_url, pool_size=0):
            pass


# -- the whole server -------------------------------------------------------------------------------------------------

async def test_two_servers_on_one_database(pg_url, tmp_path, nursery):
    """Real clients on two nodes (local brokers, one PostgreSQL): register, join, send, read history."""
    one = await nursery.start(serve, config_for(tmp_path / "one", store=pg_url))
    two = await nursery.start(serve, config_for(tmp_path / "two", store=pg_url))
    alice, bob = await alice_and_bob_in_lobby(await RawClient.connect(one.port), await RawClient.connect(one.port))
    ack = await alice.request(proto.Send, LOBBY, 1, "over postgres")
    assert (ack.seq, ack.duplicate) == (1, False)
    got = await bob.next_of(proto.Message)
    assert (got.sender, got.body, got.seq) == ("alice", "over postgres", 1)
    again = await alice.request(proto.Send, LOBBY, 1, "over postgres")
    assert (again.seq, again.duplicate) == (1, True)

    carol = await RawClient.connect(two.port)  # the other node: the same users, rooms and seqs
    await carol.register("carol")
    await carol.request(proto.Join, "lobby")
    ack = await carol.request(proto.Send, LOBBY, 1, "from node two")
    assert ack.seq == 2
    login = await RawClient.connect(two.port)
    assert isinstance(await login.request(proto.Login, "bob", "correct horse"), proto.AuthOk)
    page = await login.request(proto.History, LOBBY, proto.Direction.AFTER, 0, 10)
    assert [(m.seq, m.sender, m.body) for m in page.messages] == [(1, "alice", "over postgres"),
                                                                  (2, "carol", "from node two")]
    assert not page.has_more
    assert one.statistics()["store"]["appended"] == 1 and two.statistics()["store"]["appended"] == 1
