"""The Store port's contract against both stores, SQLite (real files in tmp_path) and PostgreSQL (a fresh database
per test): group commit, gapless seqs, dedup, wire u64s, the room limit (also between two stores on one database),
paging, cursors, durability. server/_store.py's own behaviour (WAL, file modes, a full or read-only disk) is tested
at the end and in test_store_faults.py; PostgreSQL's (two nodes, faults) in test_pgstore.py."""
from __future__ import annotations

import os
import random
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from chorus.proto import ConvKind, CursorInfo, ReceiptKind, RoomInfo
from chorus.server._store import SCHEMA_VERSION, Appended, ConvRow, NameTaken, NewMessage, TooManyRooms, open_store
from conftest import service_required

#: The PostgreSQL server the tests create their databases on (trust auth); each test gets a fresh one.
POSTGRES = os.environ.get("CHORUS_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/postgres")


@contextmanager
def pg_database() -> Iterator[str]:
    """A fresh database on ``POSTGRES`` for one test (dropped after it): its URL. Skips (fails under CI) if
    PostgreSQL cannot be reached."""
    import psycopg

    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        service_required("postgresql", f"{POSTGRES}: {str(exc).strip()}")
    name = f"chorus_t_{secrets.token_hex(6)}"
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlsplit(POSTGRES)._replace(path="/" + name).geturl()
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


@dataclass
class Backend:
    """One store implementation under test, opened on the same database each time (so reopening finds the data)."""

    name: str
    where: Any  # the SQLite file's path, or the PostgreSQL database's URL
    integrity_error: type[Exception]  # what a broken constraint raises

    def open(self, **kw: Any):
        if self.name == "sqlite":
            return open_store(self.where, **kw)
        from chorus.server._pgstore import open_pg_store

        return open_pg_store(self.where, **kw)

    def schema_version(self) -> int:
        if self.name == "sqlite":
            with sqlite3.connect(self.where) as raw:
                (version,) = raw.execute("PRAGMA user_version").fetchone()
            raw.close()
            return version
        import psycopg

        with psycopg.connect(self.where) as raw:
            row = raw.execute("SELECT version FROM chorus_schema").fetchone()
        return row[0] if row else 0

    def set_schema_version(self, version: int) -> None:
        """Make the (possibly new) database look written by another version of Chorus."""
        if self.name == "sqlite":
            raw = sqlite3.connect(self.where)
            raw.execute(f"PRAGMA user_version = {version:d}")
            raw.close()
            return
        import psycopg

        with psycopg.connect(self.where, autocommit=True) as raw:
            raw.execute("CREATE TABLE IF NOT EXISTS chorus_schema"
                        " (one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)")
            raw.execute("INSERT INTO chorus_schema (version) VALUES (%s)"
                        " ON CONFLICT (one) DO UPDATE SET version = excluded.version", (version,))

    def current_version(self) -> int:
        if self.name == "sqlite":
            return SCHEMA_VERSION
        from chorus.server import _pgstore

        return _pgstore.SCHEMA_VERSION


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path / "chorus.db", sqlite3.IntegrityError)
        return
    import psycopg

    with pg_database() as url:
        yield Backend("postgresql", url, psycopg.IntegrityError)


@pytest.fixture
async def store(backend):
    async with backend.open() as s:
        yield s


async def make_users(store, *names):
    return [await store.create_user(name, f"hash-{name}") for name in names]


def msg(conv_id, user, client_msg_id, body=None, ts_ms=1000):
    return NewMessage(conv_id, user.id, user.name, client_msg_id, body or f"{user.name}-{client_msg_id}", ts_ms)


class Hold:
    """Occupies the committer's database slot, so that appends queue up behind it and form a known batch.

    Reaches into ``store._limiter`` (both stores have one): there is no public way to pause a group commit at a
    chosen point.
    """

    def __init__(self, store):
        self._limiter = store._limiter
        self.held = False

    async def acquire(self):
        await self._limiter.acquire_on_behalf_of(self)
        self.held = True

    def release(self):
        if self.held:
            self.held = False
            self._limiter.release_on_behalf_of(self)


async def start_appends(nursery, store, messages, results):
    """Start one appender task per message, then return once every one of them is queued (blocked)."""

    async def one(m):
        try:
            results[m] = await store.append(m)
        except Exception as exc:
            results[m] = exc

    for m in messages:
        nursery.start_soon(one, m)
    await wait_all_tasks_blocked()


# -- users and sessions --------------------------------------------------------------------------------------------

async def test_users(store):
    alice = await store.create_user("alice", "h1")
    assert await store.get_user("alice") == alice
    assert await store.get_user_by_id(alice.id) == alice
    assert await store.get_user("nobody") is None
    assert await store.get_user_by_id(alice.id + 100) is None
    with pytest.raises(NameTaken):
        await store.create_user("alice", "h2")
    bob = await store.create_user("bob", "h3")
    assert bob.id != alice.id and (await store.get_user("alice")).password_hash == "h1"


async def test_sessions_expire_and_slide(store):
    (alice,) = await make_users(store, "alice")
    token = b"\x01" * 32
    await store.add_session(token, alice.id, expires_at_ms=10_000)
    session = await store.get_session(token, now_ms=9_999)
    assert (session.user_id, session.username, session.expires_at_ms) == (alice.id, "alice", 10_000)
    assert await store.get_session(token, now_ms=10_000) is None  # expiry is exclusive
    assert await store.get_session(b"\x02" * 32, now_ms=0) is None
    await store.touch_session(token, expires_at_ms=20_000)
    assert (await store.get_session(token, now_ms=15_000)).expires_at_ms == 20_000
    await store.delete_session(token)
    assert await store.get_session(token, now_ms=0) is None


async def test_purge_removes_only_expired_sessions(store):
    (alice,) = await make_users(store, "alice")
    await store.add_session(b"\x01" * 32, alice.id, expires_at_ms=10_000)
    await store.add_session(b"\x02" * 32, alice.id, expires_at_ms=30_000)
    assert await store.purge_sessions(now_ms=20_000) == 1
    assert await store.get_session(b"\x02" * 32, now_ms=20_000) is not None
    assert await store.purge_sessions(now_ms=20_000) == 0


async def test_a_users_own_sessions_listed_by_id_and_revoked(store):
    """LIST_SESSIONS, REVOKE_SESSION, LOGOUT_ALL and CHANGE_PASSWORD's store side (spec §9.1)."""
    alice, bob = await make_users(store, "alice", "bob")
    await store.add_session(b"\x01" * 32, alice.id, expires_at_ms=50_000, now_ms=1_000)
    await store.add_session(b"\x02" * 32, alice.id, expires_at_ms=50_000, now_ms=2_000)
    await store.add_session(b"\x03" * 32, alice.id, expires_at_ms=5_000, now_ms=3_000)
    await store.add_session(b"\x04" * 32, bob.id, expires_at_ms=50_000, now_ms=4_000)
    listed = await store.list_sessions(alice.id, now_ms=6_000)  # the expired third is not listed
    assert [(s.token_hash, s.created_ms, s.last_used_ms, s.expires_at_ms) for s in listed] == [
        (b"\x01" * 32, 1_000, 1_000, 50_000), (b"\x02" * 32, 2_000, 2_000, 50_000)]
    first, second = listed
    assert first.id < second.id  # oldest first

    await store.touch_session(b"\x01" * 32, expires_at_ms=60_000, now_ms=7_000)  # a RESUME
    await store.touch_session(b"\x01" * 32, expires_at_ms=60_000, now_ms=6_500)  # last use never goes back
    [touched, _] = await store.list_sessions(alice.id, now_ms=6_000)
    assert (touched.id, touched.created_ms, touched.last_used_ms, touched.expires_at_ms) == (
        first.id, 1_000, 7_000, 60_000)

    [bobs] = await store.list_sessions(bob.id, now_ms=0)
    assert await store.delete_session_by_id(alice.id, bobs.id) is None  # not hers
    assert await store.get_session(b"\x04" * 32, now_ms=0) is not None
    assert await store.delete_session_by_id(alice.id, 2**64 - 1) is None  # any wire u64
    assert await store.delete_session_by_id(alice.id, second.id) == b"\x02" * 32
    assert await store.delete_session_by_id(alice.id, second.id) is None
    assert await store.get_session(b"\x02" * 32, now_ms=0) is None

    await store.add_session(b"\x05" * 32, alice.id, expires_at_ms=50_000, now_ms=8_000)
    newest = (await store.list_sessions(alice.id, now_ms=0))[-1]
    assert newest.token_hash == b"\x05" * 32 and newest.id > second.id  # ids are not reused
    assert await store.delete_user_sessions(alice.id, keep=b"\x05" * 32) == 2  # the first and the expired one
    assert [s.token_hash for s in await store.list_sessions(alice.id, now_ms=0)] == [b"\x05" * 32]
    assert await store.delete_user_sessions(alice.id) == 1
    assert await store.list_sessions(alice.id, now_ms=0) == []
    assert [s.token_hash for s in await store.list_sessions(bob.id, now_ms=0)] == [b"\x04" * 32]  # bob's stay


# -- administration (chorus-admin) ---------------------------------------------------------------------------------

async def test_admin_users_disable_password_and_sessions(store):
    alice, bob = await make_users(store, "alice", "bob")
    assert [u.name for u in await store.list_users()] == ["alice", "bob"]
    assert not alice.disabled and not (await store.get_user("alice")).disabled
    await store.add_session(b"\x01" * 32, alice.id, expires_at_ms=10_000)
    await store.add_session(b"\x02" * 32, alice.id, expires_at_ms=10_000)
    await store.add_session(b"\x03" * 32, bob.id, expires_at_ms=10_000)

    assert await store.set_disabled(alice.id, True)
    assert (await store.get_user("alice")).disabled and (await store.get_user_by_id(alice.id)).disabled
    assert (await store.get_session(b"\x01" * 32, now_ms=0)).disabled
    assert [(u.name, u.disabled) for u in await store.list_users()] == [("alice", True), ("bob", False)]
    assert await store.set_disabled(alice.id, False)
    assert not (await store.get_user("alice")).disabled
    assert not await store.set_disabled(alice.id + bob.id + 100, True)

    assert await store.set_password_hash(alice.id, "new-hash")
    assert (await store.get_user("alice")).password_hash == "new-hash"
    assert not await store.set_password_hash(alice.id + bob.id + 100, "x")

    assert await store.delete_user_sessions(alice.id) == 2
    assert await store.get_session(b"\x01" * 32, now_ms=0) is None
    assert await store.get_session(b"\x03" * 32, now_ms=0) is not None  # bob's stay
    assert await store.delete_user_sessions(alice.id) == 0


async def test_admin_room_stats_and_delete(store):
    alice, bob = await make_users(store, "alice", "bob")
    lobby, _ = await store.join_room(alice.id, "lobby", max_rooms=10)
    await store.join_room(bob.id, "lobby", max_rooms=10)
    empty = await store.room("empty", create=True)
    pair = await store.direct(alice.id, bob.id)
    for n in range(3):
        await store.append(msg(lobby, alice, n + 1))
    await store.append(msg(pair, bob, 9))
    await store.advance_cursor(bob.id, lobby, ReceiptKind.READ, 2)
    stats = await store.room_stats()
    assert [(r.id, r.name, r.members, r.messages) for r in stats] == [(empty, "empty", 0, 0), (lobby, "lobby", 2, 3)]

    assert await store.delete_room("lobby") == lobby
    assert await store.delete_room("lobby") is None
    assert await store.room("lobby", create=False) is None
    assert [r.name for r in await store.room_stats()] == ["empty"]
    assert await store.conversations(bob.id) == [ConvRow(pair, ConvKind.DIRECT, "alice", 1, alice.id)]
    assert await store.room_count(alice.id) == 0
    # The name can be used again, for a new room with a history of its own.
    again, _ = await store.join_room(alice.id, "lobby", max_rooms=10)
    assert again != lobby and await store.last_seq(again) == 0


async def test_admin_actions_are_read_in_id_order(store):
    assert await store.last_admin_action_id() == 0
    assert await store.admin_actions_after(0, 10) == []
    first = await store.append_admin_action("disable", 7, None, 1000)
    second = await store.append_admin_action("delete-room", None, 3, 2000)
    assert 0 < first < second and await store.last_admin_action_id() == second
    actions = await store.admin_actions_after(0, 10)
    assert [(a.id, a.kind, a.user_id, a.room_id, a.at_ms) for a in actions] == [
        (first, "disable", 7, None, 1000), (second, "delete-room", None, 3, 2000)]
    assert [a.id for a in await store.admin_actions_after(first, 10)] == [second]
    assert [a.id for a in await store.admin_actions_after(0, 1)] == [first]
    assert await store.admin_actions_after(second, 10) == []


# -- rooms, pairs, membership ----------------------------------------------------------------------------------------

async def test_rooms_and_membership(store):
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    assert await store.room("lobby", create=False) is None
    lobby = await store.room("lobby", create=True)
    assert await store.room("lobby", create=True) == lobby == await store.room("lobby", create=False)
    dev = await store.room("dev", create=True)
    zoo = await store.room("zoo", create=True)
    assert len({lobby, dev, zoo}) == 3

    assert await store.join(alice.id, lobby) is True
    assert await store.join(alice.id, lobby) is False
    assert await store.join(bob.id, lobby) is True
    assert await store.join(alice.id, zoo) is True
    assert await store.is_member(alice.id, lobby) and not await store.is_member(carol.id, lobby)
    assert await store.room_count(alice.id) == 2 and await store.room_count(carol.id) == 0
    assert await store.members(lobby) == [(alice.id, "alice"), (bob.id, "bob")]

    # joined first (by name), then the others by name, with member counts; "dev" has no members: not listed
    assert await store.list_rooms(alice.id, 100) == [RoomInfo("lobby", 2, 0, True), RoomInfo("zoo", 1, 0, True)]
    assert await store.list_rooms(carol.id, 1) == [RoomInfo("lobby", 2, 0, False)]
    assert await store.list_rooms(carol.id, 2**64 - 1) == [RoomInfo("lobby", 2, 0, False), RoomInfo("zoo", 1, 0, False)]

    assert await store.leave(bob.id, lobby) is True
    assert await store.leave(bob.id, lobby) is False
    assert await store.members(lobby) == [(alice.id, "alice")]
    assert not await store.is_member(bob.id, lobby)

    dm = await store.direct(alice.id, bob.id)
    with pytest.raises(ValueError):
        await store.join(carol.id, dm)  # a pair has no joinable membership
    assert await store.conversations(alice.id) == [
        ConvRow(lobby, ConvKind.ROOM, "lobby", 0, None), ConvRow(zoo, ConvKind.ROOM, "zoo", 0, None),
        ConvRow(dm, ConvKind.DIRECT, "bob", 0, bob.id)]
    assert await store.conversations(carol.id) == []


async def test_direct_pair_is_symmetric(store):
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    ab = await store.direct(bob.id, alice.id)
    assert await store.direct(alice.id, bob.id) == ab
    ac = await store.direct(alice.id, carol.id)
    assert ac != ab
    with pytest.raises(ValueError):
        await store.direct(alice.id, alice.id)
    assert await store.members(ab) == [(alice.id, "alice"), (bob.id, "bob")]
    assert await store.is_member(bob.id, ab) and not await store.is_member(carol.id, ab)
    assert await store.conversation(alice.id, ab) == ConvRow(ab, ConvKind.DIRECT, "bob", 0, bob.id)
    assert await store.conversation(bob.id, ab) == ConvRow(ab, ConvKind.DIRECT, "alice", 0, alice.id)
    assert await store.conversation(carol.id, ab) is None
    assert await store.conversation(alice.id, 999) is None
    lobby = await store.room("lobby", create=True)
    assert await store.conversation(carol.id, lobby) == ConvRow(lobby, ConvKind.ROOM, "lobby", 0, None)
    assert [c.name for c in await store.conversations(bob.id)] == ["alice"]
    assert [c.name for c in await store.conversations(alice.id)] == ["bob", "carol"]


async def test_join_room(store):
    alice, bob = await make_users(store, "alice", "bob")
    lobby, new = await store.join_room(alice.id, "lobby", max_rooms=2)
    assert new and await store.room("lobby", create=False) == lobby
    assert await store.join_room(alice.id, "lobby", max_rooms=2) == (lobby, False)
    dev, _ = await store.join_room(alice.id, "dev", max_rooms=2)
    assert await store.join_room(alice.id, "dev", max_rooms=2) == (dev, False)  # a member rejoins at the limit
    with pytest.raises(TooManyRooms) as info:
        await store.join_room(alice.id, "zoo", max_rooms=2)
    assert info.value.limit == 2
    assert await store.room("zoo", create=False) is None  # refused: no room was created
    with pytest.raises(LookupError):
        await store.join_room(bob.id, "nowhere", max_rooms=2, create=False)
    assert await store.room("nowhere", create=False) is None
    assert await store.join_room(bob.id, "dev", max_rooms=2, create=False) == (dev, True)
    assert await store.room_count(alice.id) == 2 and await store.members(dev) == [(alice.id, "alice"),
                                                                                   (bob.id, "bob")]


async def test_concurrent_joins_on_two_stores_never_exceed_the_limit(backend):
    limit = 7
    # Two stores on one database, as two processes or nodes: only the database serialises their joins.
    async with backend.open() as one, backend.open() as two:
        users = await make_users(one, "u0", "u1", "u2")
        outcomes: dict[tuple[int, int], object] = {}

        async def join(store, user, i):
            try:
                outcomes[user.id, i] = await store.join_room(user.id, f"room{i % 20}", max_rooms=limit)
            except TooManyRooms as exc:
                outcomes[user.id, i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(40):
                for n, user in enumerate(users):
                    nursery.start_soon(join, (one, two)[(i + n) % 2], user, i)
        for user in users:
            mine = [v for (uid, _), v in outcomes.items() if uid == user.id]
            joined = [v for v in mine if isinstance(v, tuple) and v[1]]
            assert len(joined) == limit == await two.room_count(user.id)
            assert any(isinstance(v, TooManyRooms) for v in mine)
        for i in range(20):  # a refused join created no room: every room that exists has a member
            conv = await one.room(f"room{i}", create=False)
            assert conv is None or await one.members(conv), f"room{i}"


async def test_empty_rooms_do_not_bury_real_ones(store):
    hoarder, alice, carol = await make_users(store, "hoarder", "alice", "carol")
    for i in range(300):  # JOIN then LEAVE: each leaves an empty room behind
        conv, _ = await store.join_room(hoarder.id, f"a{i:03}", max_rooms=5)
        assert await store.leave(hoarder.id, conv)
    real, _ = await store.join_room(alice.id, "zzz", max_rooms=5)
    mine, _ = await store.join_room(carol.id, "mine", max_rooms=5)
    assert await store.list_rooms(carol.id, 100) == [RoomInfo("mine", 1, 0, True), RoomInfo("zzz", 1, 0, False)]
    assert await store.leave(alice.id, real)
    assert await store.list_rooms(carol.id, 100) == [RoomInfo("mine", 1, 0, True)]
    assert await store.join_room(carol.id, "a000", max_rooms=5) == (await store.room("a000", create=False), True)
    assert [r.name for r in await store.list_rooms(hoarder.id, 100)] == ["a000", "mine"]


# -- group commit ----------------------------------------------------------------------------------------------------

async def test_concurrent_appends_are_gapless_batched_and_published_first(backend):
    published: list[Appended] = []
    returned: set[tuple[int, int]] = set()

    def on_commit(batch):
        for a in batch:
            # published before any waiter of this batch has woken
            assert (a.sender_id, a.client_msg_id) not in returned
            assert not a.duplicate
        published.extend(batch)

    async with backend.open(max_batch=16, on_commit=on_commit) as store:
        users = await make_users(store, "alice", "bob", "carol")
        lobby, dev = await store.room("lobby", create=True), await store.room("dev", create=True)
        dm = await store.direct(users[0].id, users[1].id)
        convs = [lobby, dev, dm]
        results: dict[NewMessage, Appended] = {}

        async def appender(m):
            for _ in range(random.randrange(3)):
                await trio.sleep(0)
            results[m] = a = await store.append(m)
            returned.add((a.sender_id, a.client_msg_id))

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(appender, msg(convs[i % 3], users[i % 3], i))

        stats = store.statistics()
        assert stats["appended"] == 200 and stats["duplicates"] == 0
        assert stats["commits"] > 1 and stats["batch_max"] > 1 and stats["batch_mean"] > 1
        assert stats["batch_max"] <= 16 and sum(stats["batch_histogram"].values()) == stats["commits"]

        for conv in convs:
            seqs = [results[m].seq for m in results if m.conv_id == conv]
            assert sorted(seqs) == list(range(1, len(seqs) + 1))  # gapless, no repeats
            assert [a.seq for a in published if a.conv_id == conv] == sorted(seqs)  # published in seq order
            assert await store.last_seq(conv) == len(seqs)
            stored, has_more = await store.messages_after(conv, 0, 100)
            assert not has_more
            assert [(s.seq, s.client_msg_id) for s in stored] == sorted(
                (results[m].seq, m.client_msg_id) for m in results if m.conv_id == conv)
        assert len(published) == 200


async def test_duplicates_return_the_original(store):
    published = []
    store.on_commit = published.extend
    alice, bob = await make_users(store, "alice", "bob")
    lobby, dev = await store.room("lobby", create=True), await store.room("dev", create=True)

    first = await store.append(msg(lobby, alice, 7, "hello", ts_ms=100))
    again = await store.append(msg(lobby, alice, 7, "changed", ts_ms=200))
    assert (first.seq, first.duplicate) == (1, False)
    assert (again.seq, again.ts_ms, again.body, again.duplicate) == (1, 100, "hello", True)
    assert (await store.append(msg(lobby, bob, 7))).seq == 2  # the id is per sender
    # a retry names the original even if sent to another conversation
    elsewhere = await store.append(msg(dev, alice, 7, "x"))
    assert (elsewhere.conv_id, elsewhere.seq, elsewhere.duplicate) == (lobby, 1, True)
    assert await store.last_seq(dev) == 0
    # u64 ids above the signed range round-trip
    big = await store.append(msg(lobby, alice, 2**64 - 1))
    assert (await store.append(msg(lobby, alice, 2**64 - 1))).seq == big.seq == 3
    with pytest.raises(ValueError):
        await store.append(msg(lobby, alice, 2**64))
    assert [(a.seq, a.client_msg_id) for a in published] == [(1, 7), (2, 7), (3, 2**64 - 1)]
    page, _ = await store.messages_after(lobby, 0, 10)
    assert [m.client_msg_id for m in page] == [7, 7, 2**64 - 1]
    # where a sender's id is stored: what a first SEND to a new direct conversation checks before opening it
    assert (await store.sent_in(alice.id, 7), await store.sent_in(alice.id, 2**64 - 1)) == (lobby, lobby)
    assert (await store.sent_in(alice.id, 8), await store.sent_in(bob.id, 2**64 - 1)) == (None, None)

    # the same (sender, id) twice inside one batch resolves to one row
    published.clear()
    hold = Hold(store)
    await hold.acquire()
    results = {}
    async with trio.open_nursery() as nursery:
        await start_appends(nursery, store, [msg(dev, bob, 50, "first-of-batch")], results)
        twins = [msg(dev, alice, 60, "a"), msg(dev, alice, 60, "b"), msg(dev, bob, 61)]
        await start_appends(nursery, store, twins, results)
        hold.release()
    a, b, other = (results[m] for m in twins)
    assert store.statistics()["batch_max"] == 3
    assert a.seq == b.seq and {a.duplicate, b.duplicate} == {False, True}
    assert a.body == b.body  # the duplicate reports the stored body
    assert sorted([a.seq, other.seq]) == [2, 3]
    assert [x.seq for x in published] == [1, 2, 3] and not any(x.duplicate for x in published)
    assert store.statistics()["duplicates"] == 4
    assert await store.last_seq(dev) == 3


async def test_any_body_text_round_trips(store):
    alice, bob = await make_users(store, "alice", "bob")
    conv = await store.direct(alice.id, bob.id)
    bodies = ["nul \x00 inside", "\U0001f600 emoji", "x" * 4096]  # PostgreSQL's text cannot hold NUL
    for i, body in enumerate(bodies):
        await store.append(msg(conv, alice, i, body))
    assert (await store.append(msg(conv, alice, 0, "again"))).body == bodies[0]  # the duplicate reports it
    page, _ = await store.messages_after(conv, 0, 10)
    assert [m.body for m in page] == bodies


async def test_cancelled_appender_still_commits(store):
    published = []
    store.on_commit = published.extend
    (alice,) = await make_users(store, "alice")
    lobby = await store.room("lobby", create=True)
    hold = Hold(store)
    await hold.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.append, msg(lobby, alice, 1))
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # the appender is cancelled while its message waits
    hold.release()
    after = await store.append(msg(lobby, alice, 2))
    assert after.seq == 2
    assert [a.client_msg_id for a in published] == [1, 2]
    page, _ = await store.messages_after(lobby, 0, 10)
    assert [m.client_msg_id for m in page] == [1, 2]


async def test_failed_transaction_fails_only_its_batch(store, backend):
    published = []
    store.on_commit = published.extend
    (alice,) = await make_users(store, "alice")
    lobby = await store.room("lobby", create=True)
    hold = Hold(store)
    await hold.acquire()
    results = {}
    async with trio.open_nursery() as nursery:
        ok = msg(lobby, alice, 1)
        await start_appends(nursery, store, [ok], results)
        doomed = [msg(lobby, alice, 2), NewMessage(lobby, alice.id, "alice", 3, "", 0), msg(lobby, alice, 4)]
        await start_appends(nursery, store, doomed, results)  # the empty body breaks a CHECK constraint
        hold.release()
    assert results[ok].seq == 1
    for m in doomed:
        assert isinstance(results[m], backend.integrity_error), results[m]
    assert len({id(results[m]) for m in doomed}) == 3  # each waiter raises its own copy
    later = await store.append(msg(lobby, alice, 2))  # the committer survived; the failed batch took no seq
    assert (later.seq, later.duplicate) == (2, False)
    assert [a.client_msg_id for a in published] == [1, 2]
    page, _ = await store.messages_after(lobby, 0, 10)
    assert [m.client_msg_id for m in page] == [1, 2]
    stats = store.statistics()
    assert (stats["failed_batches"], stats["appended"]) == (1, 2)


async def test_unknown_conversation_fails_the_append(store):
    (alice,) = await make_users(store, "alice")
    with pytest.raises(LookupError):
        await store.append(msg(12345, alice, 1))


# -- reading ---------------------------------------------------------------------------------------------------------

async def test_paging(store):
    alice, bob = await make_users(store, "alice", "bob")
    lobby, dev = await store.room("lobby", create=True), await store.room("dev", create=True)
    for i in range(1, 26):
        await store.append(msg(lobby, (alice, bob)[i % 2], i, ts_ms=i))
    await store.append(msg(dev, alice, 100))

    async def after(seq, limit):
        page, more = await store.messages_after(lobby, seq, limit)
        return [m.seq for m in page], more

    async def before(seq, limit):
        page, more = await store.messages_before(lobby, seq, limit)
        return [m.seq for m in page], more

    assert await after(0, 10) == (list(range(1, 11)), True)
    assert await after(19, 5) == ([20, 21, 22, 23, 24], True)
    assert await after(20, 5) == ([21, 22, 23, 24, 25], False)  # exactly the rest: no more
    assert await after(25, 5) == ([], False)
    assert await after(0, 100) == (list(range(1, 26)), False)
    assert await before(0, 10) == (list(range(16, 26)), True)  # 0 = from the newest, still ascending
    assert await before(7, 5) == ([2, 3, 4, 5, 6], True)
    assert await before(6, 5) == ([1, 2, 3, 4, 5], False)  # exactly the rest: no more
    assert await before(1, 5) == ([], False)
    assert await before(100, 3) == ([23, 24, 25], True)
    page, _ = await store.messages_after(lobby, 2, 2)
    assert [(m.seq, m.ts_ms, m.sender, m.client_msg_id, m.body) for m in page] == [
        (3, 3, "bob", 3, "bob-3"), (4, 4, "alice", 4, "alice-4")]
    assert [m.seq for m in (await store.messages_after(dev, 0, 10))[0]] == [1]
    with pytest.raises(ValueError):
        await store.messages_after(lobby, 0, 0)
    with pytest.raises(ValueError):
        await store.messages_before(lobby, 0, 0)


async def test_cursors_max_wins_and_cap(store):
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    lobby = await store.room("lobby", create=True)
    for user in (alice, bob):
        await store.join(user.id, lobby)
    for i in range(5):
        await store.append(msg(lobby, alice, i))
    delivered, read = ReceiptKind.DELIVERED, ReceiptKind.READ
    assert await store.advance_cursor(bob.id, lobby, delivered, 3) == 3
    assert await store.advance_cursor(bob.id, lobby, delivered, 2) is None  # an older device: max wins
    assert await store.advance_cursor(bob.id, lobby, delivered, 3) is None
    assert await store.advance_cursor(bob.id, lobby, delivered, 99) == 5  # capped at last_seq
    assert await store.advance_cursor(bob.id, lobby, delivered, 6) is None
    assert await store.advance_cursor(bob.id, lobby, read, 0) is None
    assert await store.advance_cursor(bob.id, lobby, read, 4) == 4
    assert await store.advance_cursor(bob.id, 999, read, 4) is None
    assert await store.cursors(lobby) == [CursorInfo("alice", 0, 0), CursorInfo("bob", 5, 4)]

    dm = await store.direct(carol.id, alice.id)
    assert await store.advance_cursor(carol.id, dm, read, 1) is None  # nothing to read yet
    await store.append(msg(dm, alice, 100))
    assert await store.advance_cursor(carol.id, dm, read, 1) == 1
    assert await store.cursors(dm) == [CursorInfo("alice", 0, 0), CursorInfo("carol", 0, 1)]


async def test_undelivered(store):
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    busy, quiet = await store.room("busy", create=True), await store.room("quiet", create=True)
    await store.join(alice.id, busy)
    await store.join(alice.id, quiet)
    dm = await store.direct(alice.id, bob.id)
    for i in range(3):
        await store.append(msg(busy, carol, i))
    for i in range(2):
        await store.append(msg(dm, bob, i))

    async def undelivered(user):
        return [(row.name, row.last_seq, cursor) for row, cursor in await store.undelivered(user.id)]

    assert await undelivered(alice) == [("busy", 3, 0), ("bob", 2, 0)]
    assert await store.advance_cursor(alice.id, busy, ReceiptKind.DELIVERED, 3) == 3
    await store.advance_cursor(alice.id, dm, ReceiptKind.DELIVERED, 1)
    await store.advance_cursor(alice.id, dm, ReceiptKind.READ, 2)  # read does not count as delivered
    assert await undelivered(alice) == [("bob", 2, 1)]
    assert await undelivered(bob) == [("alice", 2, 0)]
    assert await undelivered(carol) == []  # carol wrote in busy but never joined it


@pytest.mark.parametrize("big", [2**63 - 1, 2**63, 2**64 - 1])
async def test_wire_u64s_never_overflow(store, big):
    """Seqs, limits and ids from the wire are u64; the databases' integers are signed 64-bit."""
    alice, bob = await make_users(store, "alice", "bob")
    lobby, _ = await store.join_room(alice.id, "lobby", max_rooms=10)
    for i in range(5):
        await store.append(msg(lobby, alice, i))

    assert await store.messages_after(lobby, big, 10) == ([], False)
    page, more = await store.messages_after(lobby, 0, big)
    assert [m.seq for m in page] == [1, 2, 3, 4, 5] and not more
    newest, more = await store.messages_before(lobby, big, 2)  # everything is before it: the newest page
    assert ([m.seq for m in newest], more) == ([4, 5], True)
    assert (await store.messages_before(lobby, 0, 2)) == (newest, more)
    page, more = await store.messages_before(lobby, big, big)
    assert [m.seq for m in page] == [1, 2, 3, 4, 5] and not more

    assert await store.advance_cursor(bob.id, lobby, ReceiptKind.DELIVERED, big) == 5  # capped at last_seq
    assert await store.advance_cursor(bob.id, lobby, ReceiptKind.READ, big) == 5
    assert await store.advance_cursor(bob.id, lobby, ReceiptKind.READ, big) is None
    assert await store.list_rooms(bob.id, big) == [RoomInfo("lobby", 1, 5, False)]


# -- lifecycle -------------------------------------------------------------------------------------------------------

async def test_data_survives_reopen(backend):
    async with backend.open() as store:
        alice, bob = await make_users(store, "alice", "bob")
        lobby = await store.room("lobby", create=True)
        await store.join(bob.id, lobby)
        dm = await store.direct(alice.id, bob.id)
        await store.add_session(b"t" * 32, alice.id, 5_000)
        for i in range(1, 4):
            await store.append(msg(lobby, alice, i))
        await store.append(msg(dm, bob, 9))
        await store.advance_cursor(bob.id, lobby, ReceiptKind.READ, 2)
    assert backend.schema_version() == backend.current_version()
    async with backend.open() as store:
        assert await store.get_user("alice") == alice
        assert (await store.get_session(b"t" * 32, 0)).username == "alice"
        assert await store.room("lobby", create=False) == lobby and await store.is_member(bob.id, lobby)
        assert await store.direct(bob.id, alice.id) == dm
        page, more = await store.messages_after(lobby, 0, 10)
        assert [(m.seq, m.body) for m in page] == [(1, "alice-1"), (2, "alice-2"), (3, "alice-3")] and not more
        assert await store.cursors(lobby) == [CursorInfo("bob", 0, 2)]
        assert (await store.append(msg(lobby, alice, 4))).seq == 4  # seqs continue
        assert (await store.append(msg(lobby, alice, 1))).duplicate  # dedup survives too
        assert await store.last_seq(dm) == 1


async def test_open_rejects_bad_arguments_and_newer_schema(backend):
    with pytest.raises(ValueError):
        async with backend.open(max_batch=0):
            pass
    backend.set_schema_version(99)
    with pytest.raises(RuntimeError, match="newer"):
        async with backend.open():
            pass


async def test_sqlite_specifics_at_open(tmp_path):
    with pytest.raises(ValueError):
        async with open_store(tmp_path / "a.db", synchronous="OFF"):
            pass
    async with open_store(tmp_path / "b.db"):
        pass
    with sqlite3.connect(tmp_path / "b.db") as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.close()


@pytest.mark.parametrize("by_cancel", [False, True])
async def test_close_commits_appends_in_flight(backend, by_cancel):
    results = {}
    published = []
    # a lost batch would leave its appenders waiting forever: fail instead of hanging
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:  # the appenders outlive the store's block
            with trio.CancelScope() as scope:
                async with backend.open(max_batch=4, on_commit=published.extend) as store:
                    (alice,) = await make_users(store, "alice")
                    lobby = await store.room("lobby", create=True)
                    hold = Hold(store)
                    await hold.acquire()
                    messages = [msg(lobby, alice, i) for i in range(20)]
                    await start_appends(outer, store, messages, results)
                    if by_cancel:
                        # the committer is cancelled while its batch waits for the database; the shielded close
                        # must still commit everything, so only let the database go once the close is waiting
                        async def release_when_closing():
                            await wait_all_tasks_blocked()
                            hold.release()

                        outer.start_soon(release_when_closing)
                        scope.cancel()
                        await trio.sleep_forever()
                    hold.release()
    assert scope.cancelled_caught == by_cancel
    assert sorted(a.seq for a in results.values()) == list(range(1, 21))
    assert len(published) == 20
    with pytest.raises(trio.ClosedResourceError):
        await store.append(msg(lobby, alice, 99))
    with pytest.raises(trio.ClosedResourceError):
        await store.last_seq(lobby)
    async with backend.open() as reopened:
        page, _ = await reopened.messages_after(lobby, 0, 100)
        assert sorted(m.client_msg_id for m in page) == list(range(20))


async def test_append_nowait_calls_back_after_commit_and_publish(store):
    alice, bob = await make_users(store, "alice", "bob")
    conv = await store.direct(alice.id, bob.id)
    order = []
    store.on_commit = lambda rows: order.extend(("published", r.seq) for r in rows)
    done = trio.Event()

    def callback(appended, error):
        order.append(("acked", appended.seq, appended.duplicate, error))
        if len(order) == 3:
            done.set()

    store.append_nowait(msg(conv, alice, 1), callback)
    store.append_nowait(msg(conv, alice, 1), callback)  # a retry inside the same batch
    await done.wait()
    assert order == [("published", 1), ("acked", 1, False, None), ("acked", 1, True, None)]
    with pytest.raises(ValueError):
        store.append_nowait(msg(conv, alice, -1), callback)


async def test_wal_is_checkpointed_beside_the_writer(tmp_path, mock_clock):
    # Virtual time moves only when the test moves it: a checkpoint step runs in a worker thread, and an autojump
    # clock jumps while any thread works (Trio sees every task blocked), so "a quiet second" could be a step still
    # under way, counted only after the test had looked.
    async def a_second_passes():
        """The checkpointer's second: it wakes, and the step it starts, if any, is over when this returns."""
        mock_clock.jump(1)
        await wait_all_tasks_blocked()  # it woke and either started its step (a thread) or went back to waiting
        async with store._checkpoint_lock:  # its step holds this (reaches in: nothing public tells a step is over)
            pass

    async with open_store(tmp_path / "chorus.db") as store:
        alice, bob = await make_users(store, "alice", "bob")
        conv = await store.direct(alice.id, bob.id)
        await store.append(msg(conv, alice, 1))
        assert store.statistics()["checkpoints"] == 0  # not inside the writes: beside them, a second later
        await a_second_passes()
        assert store.statistics()["checkpoints"] == 1
        for _ in range(5):
            await a_second_passes()
        assert store.statistics()["checkpoints"] == 1  # nothing new committed, nothing to copy
        await store.append(msg(conv, alice, 2))
        await a_second_passes()
        assert store.statistics()["checkpoints"] == 2
        messages, _ = await store.messages_after(conv, 0, 10)
        assert [m.seq for m in messages] == [1, 2]
