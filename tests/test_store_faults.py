"""server/_store.py when things go wrong: a full or read-only database, a growing WAL, file modes. Real SQLite files
in tmp_path; the "full disk" is a real SQLite limit (``PRAGMA max_page_count``) and, where mounting is allowed, a
real full tmpfs. What every store must do (wire u64s, the room limit, empty rooms) is in test_store.py's contract."""
from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from chorus.proto import ReceiptKind, RoomInfo
from chorus.server._store import WAL_CHECKPOINT_BYTES, WAL_MAX_BYTES, NewMessage, StoreError, open_store


def msg(conv_id, user, client_msg_id, body=None):
    return NewMessage(conv_id, user.id, user.name, client_msg_id, body or f"{user.name}-{client_msg_id}", 1000)


async def set_read_only(store, on: bool) -> None:
    """``PRAGMA query_only`` on the store's writing connection: SQLite then refuses every write (SQLITE_READONLY).

    Reaches into ``store._run``: no public way to make a database refuse writes that root cannot bypass.
    """
    await store._run(lambda conn: conn.execute(f"PRAGMA query_only = {int(on)}"))


def assert_refused(exc: BaseException) -> None:
    assert isinstance(exc, StoreError), repr(exc)
    assert exc.retry_after_ms is None  # no hint of its own: the server answers with Config.busy_retry_ms
    assert isinstance(exc.__cause__, sqlite3.OperationalError), repr(exc.__cause__)


async def refused(op: Callable[[], Awaitable[Any]]) -> StoreError:
    with pytest.raises(StoreError) as info:
        await op()
    assert_refused(info.value)
    return info.value


async def append_nowait(store, message) -> Any:
    """``append_nowait``'s callback outcome: the Appended, or the error."""
    done = trio.Event()
    outcome: list[Any] = []

    def callback(appended, error):
        outcome.append(error or appended)
        done.set()

    store.append_nowait(message, callback)
    await done.wait()
    return outcome[0]


# -- refusals become StoreError ------------------------------------------------------------------------------------

async def populate(store, users: int = 3):
    """Users u0.., room "lobby" with u0 in it and one message, a session for u0."""
    people = [await store.create_user(f"u{i}", "h") for i in range(users)]
    lobby, _ = await store.join_room(people[0].id, "lobby", max_rooms=1000)
    await store.append(msg(lobby, people[0], 1))
    await store.add_session(b"s" * 32, people[0].id, 10_000)
    return people, lobby


async def test_a_read_only_database_refuses_every_write_and_serves_reads(tmp_path):
    published = []
    async with open_store(tmp_path / "chorus.db", synchronous="NORMAL", on_commit=published.extend) as store:
        (u0, u1, u2), lobby = await populate(store)
        await set_read_only(store, True)
        writes: dict[str, Callable[[], Awaitable[Any]]] = {
            "create_user": lambda: store.create_user("new", "h"),
            "add_session": lambda: store.add_session(b"t" * 32, u0.id, 10_000),
            "touch_session": lambda: store.touch_session(b"s" * 32, 20_000),
            "delete_session": lambda: store.delete_session(b"s" * 32),
            "purge_sessions": lambda: store.purge_sessions(10**12),
            "room": lambda: store.room("new", create=True),
            "join": lambda: store.join(u1.id, lobby),
            "join_room": lambda: store.join_room(u1.id, "lobby", max_rooms=10),
            "leave": lambda: store.leave(u0.id, lobby),
            "direct": lambda: store.direct(u0.id, u1.id),
            "advance_cursor": lambda: store.advance_cursor(u0.id, lobby, ReceiptKind.READ, 1),
            "append": lambda: store.append(msg(lobby, u0, 2)),
        }
        for op in writes.values():
            await refused(op)
        assert_refused(await append_nowait(store, msg(lobby, u0, 2)))
        stats = store.statistics()
        assert stats["refused"] == len(writes) + 1 and stats["failed_batches"] == 2

        # reads are served, and nothing was written
        assert await store.get_user("new") is None and (await store.get_user("u1")).id == u1.id
        assert (await store.get_session(b"s" * 32, 0)).expires_at_ms == 10_000
        assert await store.members(lobby) == [(u0.id, "u0")]
        assert [m.seq for m in (await store.messages_after(lobby, 0, 10))[0]] == [1]
        assert await store.list_rooms(u1.id, 10) == [RoomInfo("lobby", 1, 1, False)]
        assert [c.name for c in await store.conversations(u0.id)] == ["lobby"]

        # the same store recovers by itself once the database accepts writes again
        await set_read_only(store, False)
        assert (await store.append(msg(lobby, u0, 2))).seq == 2
        assert (await append_nowait(store, msg(lobby, u0, 3))).seq == 3
        assert await store.join_room(u1.id, "lobby", max_rooms=10) == (lobby, True)
        assert await store.direct(u0.id, u2.id) > 0
        assert [a.client_msg_id for a in published] == [1, 2, 3]


async def test_each_waiter_of_a_refused_batch_gets_its_own_store_error(tmp_path):
    async with open_store(tmp_path / "chorus.db", synchronous="NORMAL") as store:
        (u0, *_), lobby = await populate(store)
        await set_read_only(store, True)
        errors: dict[int, BaseException] = {}
        async with trio.open_nursery() as nursery:
            # Holding the writer's limiter (no public way to pause the committer) makes the appends one batch.
            await store._limiter.acquire_on_behalf_of(nursery)

            async def one(i):
                try:
                    await store.append(msg(lobby, u0, 100 + i))
                except StoreError as exc:
                    errors[i] = exc

            for i in range(5):
                nursery.start_soon(one, i)
            await wait_all_tasks_blocked()
            store._limiter.release_on_behalf_of(nursery)
        assert sorted(errors) == list(range(5)) and len({id(e) for e in errors.values()}) == 5
        for exc in errors.values():
            assert_refused(exc)
        assert store.statistics()["failed_batches"] == 1


# -- a full database -----------------------------------------------------------------------------------------------

async def until_refused(make_op: Callable[[int], Awaitable[Any]], most: int = 5000) -> int:
    """Run ``make_op(i)`` for i = 0, 1, ... until the database refuses it; returns how many succeeded."""
    for i in range(most):
        try:
            await make_op(i)
        except StoreError as exc:
            assert_refused(exc)
            assert "full" in str(exc)
            return i
    raise AssertionError(f"still accepted after {most} writes")


async def test_a_full_database_refuses_writes_serves_reads_and_recovers(tmp_path):
    async with open_store(tmp_path / "chorus.db", synchronous="NORMAL") as store:
        people, lobby = await populate(store, users=120)
        u0 = people[0]
        rooms = [(await store.join_room(u0.id, f"r{i}", max_rooms=1000))[0] for i in range(10)]
        for i, conv in enumerate(rooms):
            await store.append(msg(conv, u0, 1000 + i))
        pages = await store.set_max_page_count(1)  # never below the current size: no page more from now on
        assert pages > 1

        # Every kind of write that needs space fills its own pages, then is refused. Each gets fresh rows.
        await until_refused(lambda i: store.append(msg(lobby, u0, 10_000 + i, "x" * 500)))
        await until_refused(lambda i: store.create_user(f"new{i}", "h" * 100))
        await until_refused(lambda i: store.add_session(i.to_bytes(32, "big"), u0.id, 10_000))
        await until_refused(lambda i: store.room(f"empty{i}", create=True))
        await until_refused(lambda i: store.join_room(people[1 + i % 119].id, f"room{i // 119}", max_rooms=1000))
        await until_refused(lambda i: store.join(people[1 + i % 119].id, rooms[i // 119]), most=119 * 10)
        pairs = [(a.id, b.id) for a in people[1:] for b in people[1:] if a.id < b.id]
        await until_refused(lambda i: store.direct(*pairs[i]))
        await until_refused(lambda i: store.advance_cursor(people[1 + i % 119].id, rooms[i // 119],
                                                           ReceiptKind.READ, 1), most=119 * 10)
        outcome = await append_nowait(store, msg(lobby, u0, 99_999, "x" * 500))
        assert_refused(outcome)
        assert store.statistics()["refused"] >= 9

        # reads are served
        assert (await store.get_user("u7")).name == "u7"
        page, more = await store.messages_before(lobby, 0, 3)
        assert len(page) == 3 and more
        assert (await store.list_rooms(u0.id, 3))[0] == RoomInfo("lobby", 1, await store.last_seq(lobby), True)
        assert await store.get_session(b"s" * 32, 0) is not None

        # space returns: the same store writes again, nothing to restart
        assert await store.set_max_page_count(1 << 30) == 1 << 30
        assert (await store.append(msg(lobby, u0, 99_999, "x" * 500))).seq == await store.last_seq(lobby)
        assert (await store.create_user("late", "h")).name == "late"
        assert (await store.join_room(people[5].id, "after", max_rooms=1000))[1]


async def test_opening_a_full_database_writes_nothing(tmp_path):
    path = tmp_path / "chorus.db"
    async with open_store(path, synchronous="NORMAL") as store:
        (u0, *_), lobby = await populate(store)
    watcher = sqlite3.connect(path)
    (version,) = watcher.execute("PRAGMA data_version").fetchone()  # changes when another connection commits
    async with open_store(path, synchronous="NORMAL", max_page_count=1) as store:
        assert watcher.execute("PRAGMA data_version").fetchone() == (version,)
        assert [m.seq for m in (await store.messages_after(lobby, 0, 10))[0]] == [1]
        await until_refused(lambda i: store.append(msg(lobby, u0, 10 + i, "x" * 500)))
        await store.set_max_page_count(1 << 30)
        assert (await store.append(msg(lobby, u0, 9, "x"))).duplicate is False
    watcher.close()


async def test_open_failures_are_store_errors(tmp_path):
    for path in (tmp_path, tmp_path / "missing" / "chorus.db"):  # a directory; a file in a missing directory
        with pytest.raises(StoreError, match="cannot open") as info:
            async with open_store(path):
                pass
        assert isinstance(info.value.__cause__, OSError)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 1000)
    with pytest.raises(StoreError, match="cannot open") as info:
        async with open_store(garbage):
            pass
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


# -- a real full disk (tmpfs) ----------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs; yields (its path, resize(bytes)). Skips where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                       check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        # Not a missing service: mounting needs root (or CAP_SYS_ADMIN); the max_page_count tests cover the rest.
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the full-disk tests above use max_page_count instead")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True, capture_output=True,
                       timeout=10)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


async def test_a_real_full_disk(small_disk):
    mount, resize = small_disk
    path = mount / "chorus.db"
    async with open_store(path, synchronous="NORMAL", wal_checkpoint_bytes=256 << 10) as store:
        (u0, u1, u2), lobby = await populate(store)
        stored = 1 + await until_refused(lambda i: store.append(msg(lobby, u0, 10 + i, "x" * 1000)), most=10_000)
        assert stored > 100
        fill(mount / "filler")  # whatever a refused write left allocated in the WAL is the last space there is
        for op in (lambda: store.create_user("new", "h"), lambda: store.join_room(u1.id, "new", max_rooms=9),
                   lambda: store.direct(u1.id, u2.id), lambda: store.add_session(b"t" * 32, u1.id, 1),
                   lambda: store.append(msg(lobby, u0, 5, "x" * 1000))):
            try:
                await op()  # it may fit in that space: fine
            except StoreError as exc:  # but never a raw sqlite3 error
                assert_refused(exc)
        stored = await store.last_seq(lobby)
        page, _ = await store.messages_before(lobby, 0, 5)
        assert page[-1].seq == stored
    # closed on a full disk (its last checkpoint fails, so -wal and -shm stay), then started again on it
    async with open_store(path, synchronous="NORMAL", wal_checkpoint_bytes=256 << 10) as store:
        assert await store.last_seq(lobby) == stored and (await store.get_user("u1")).id == u1.id
        await until_refused(lambda i: store.append(msg(lobby, u0, 20_000 + i, "x" * 1000)))
        resize(16 << 20)  # space returns: the running store writes again
        assert (await store.append(msg(lobby, u0, 30_000, "x" * 1000))).seq == await store.last_seq(lobby)
        assert (await store.join_room(u1.id, "new2", max_rooms=9))[1]


def fill(path) -> None:
    """Write ``path`` until the file system has no byte left."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


# -- the WAL stays bounded -------------------------------------------------------------------------------------------

def wal_bytes(path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


async def test_a_checkpoint_step_resets_a_wal_past_the_threshold(tmp_path, mock_clock):
    # mock_clock never moves by itself: the checkpointer's once-a-second step never comes
    threshold = 512 << 10
    path = tmp_path / "chorus.db"
    async with open_store(path, synchronous="NORMAL", wal_checkpoint_bytes=threshold) as store:
        (u0, *_), lobby = await populate(store)
        async with store._checkpoint_lock:  # no step while the WAL grows (reaches in: nothing public pauses it)
            i = 0
            while wal_bytes(path) < threshold // 2:
                i += 1
                await store.append(msg(lobby, u0, 10 + i, "x" * 1000))
            below = wal_bytes(path)
        await store._checkpoint()  # the checkpointer's step, driven here
        assert wal_bytes(path) == below and store.statistics()["wal_resets"] == 0  # copied back, kept
        async with store._checkpoint_lock:
            while wal_bytes(path) < threshold:
                i += 1
                await store.append(msg(lobby, u0, 10 + i, "x" * 1000))
            assert wal_bytes(path) < 2 * threshold
        await store._checkpoint()  # (or the checkpointer, woken by the committer, got the lock first)
        assert store.statistics()["wal_resets"] == 1
        i += 1
        await store.append(msg(lobby, u0, 10 + i, "x" * 1000))  # the next commit starts the file afresh
        assert 0 < wal_bytes(path) < 64 << 10
        page, more = await store.messages_after(lobby, 0, 10_000)
        assert [m.seq for m in page] == list(range(1, i + 2)) and not more
    async with open_store(path) as store:
        assert await store.last_seq(lobby) == i + 1


async def test_the_wal_stays_bounded_under_load(tmp_path, mock_clock):
    # No once-a-second step (mock_clock): only the committer wakes the checkpointer, or waits for it.
    threshold = 128 << 10
    path = tmp_path / "chorus.db"
    async with open_store(path, synchronous="NORMAL", wal_checkpoint_bytes=threshold) as store:
        people, lobby = await populate(store, users=8)
        peak = 0

        async def sender(user):
            nonlocal peak
            for i in range(100):
                await store.append(msg(lobby, user, 10 + i, "x" * 1000))
                peak = max(peak, wal_bytes(path))

        async with trio.open_nursery() as nursery:
            for user in people:
                nursery.start_soon(sender, user)
        stats = store.statistics()
        assert await store.last_seq(lobby) == 801
    # ~20 MiB of WAL written in all; batches of at most 8 messages write well under 128 KiB
    assert stats["wal_resets"] >= 10, stats
    assert peak < 2 * threshold + (128 << 10), peak


def test_the_stated_bound():
    assert (WAL_CHECKPOINT_BYTES, WAL_MAX_BYTES) == (16 << 20, 32 << 20)


# -- private files ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(path) -> dict[str, int]:
    return {suffix: stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) for suffix in ("", "-wal", "-shm")
            if os.path.exists(f"{path}{suffix}")}


async def test_database_files_are_private(tmp_path):
    path = tmp_path / "chorus.db"
    with umask(0o022):
        async with open_store(path) as store:
            (u0, *_), lobby = await populate(store)
            assert modes(path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        # files an older version left world-readable are made private on open
        old = tmp_path / "old.db"
        raw = sqlite3.connect(old)
        raw.execute("PRAGMA journal_mode = WAL")
        raw.execute("CREATE TABLE t(x)")
        assert modes(old)[""] == 0o644
        async with open_store(old) as store:
            assert modes(old) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        raw.close()
