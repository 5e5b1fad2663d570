"""The process's memory policy (server/_memory.py, issue 14): what the collector walks, what closed connections
leave behind, and what malloc keeps after a password hash. No timing: the bench measures the pauses
(``python -m bench --scenarios gc``)."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import trio

from chorus.server._store import open_store
from chorus.server._memory import FREEZE_GROWTH, RECLAIM_MIN, RECLAIM_QUIET_S, GcPolicy


class _Server:
    def __init__(self) -> None:
        self.connections: set[object] = set()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def policy():
    policy = GcPolicy(_Server())  # type: ignore[arg-type]
    yield policy
    policy.pauses.remove()
    gc.unfreeze()


def _tracked(obj: object) -> bool:
    """Whether a collection would walk ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_freeze_takes_survivors_out_of_every_collection(policy):
    survivor = _Cycle()
    assert _tracked(survivor)
    policy.freeze()
    assert not _tracked(survivor)
    assert gc.get_freeze_count() > 0
    later = _Cycle()
    assert _tracked(later)  # made after the freeze: collected as usual until the next one


def test_freeze_collects_garbage_first(policy):
    """A cycle already dead when the policy freezes is collected, not frozen for ever."""
    collected: list = []
    gc.collect()
    garbage = _Cycle()
    ref = weakref.ref(garbage, collected.append)
    del garbage
    policy.freeze()
    assert ref() is None and collected


def test_a_burst_of_connections_triggers_a_freeze(policy):
    server = policy.server
    assert not policy.check()  # nothing grew, no collection was slow
    server.connections.update(object() for _ in range(FREEZE_GROWTH - 1))
    assert not policy.check()
    server.connections.add(object())
    freezes = policy.freezes
    assert policy.check() and policy.freezes == freezes + 1
    assert not policy.check()  # measured from the last freeze


def test_a_slow_collection_triggers_a_freeze(policy):
    policy.pauses.slow = True
    assert policy.check()
    assert not policy.pauses.slow


def test_the_start_up_freeze_only_policy_never_freezes_again(policy):
    startup = GcPolicy(_Server(), active=False)  # type: ignore[arg-type]
    try:
        startup.server.connections.update(object() for _ in range(FREEZE_GROWTH))
        startup.pauses.slow = True
        assert not startup.check()
    finally:
        startup.pauses.remove()


def test_every_collection_is_timed(policy):
    before = list(policy.pauses.count)
    gc.collect(0)
    gc.collect(2)
    assert policy.pauses.count[0] == before[0] + 1
    assert policy.pauses.count[2] == before[2] + 1
    stats = policy.statistics()
    assert stats["window_collections"] >= 2 and stats["max_pause_ms"][2] > 0
    policy.pauses.reset_window()
    assert policy.statistics()["window_collections"] == 0


_FROZEN_PROBE = """
import gc, sys, tempfile, weakref
import trio
sys.path.insert(0, "tests")
from rawclient import RawClient
from wsclient import WsClient
from chorus import proto
from chorus.server import Config, serve

async def main(transport):
    config = Config.from_dict({"host": "127.0.0.1", "port": 0, "ws_port": 0, "data_dir": tempfile.mkdtemp(),
                               "argon2_time_cost": 1, "argon2_memory_kib": 1024})
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, config)
        clients = []
        for i in range(5):
            client = await (RawClient.connect(server.port) if transport == "tcp" else WsClient.connect(server.ws_port))
            await client.send(proto.Register(f"gone{i}", "password123", request_id=client.rid()))
            assert isinstance(await client.next_of(proto.AuthOk, proto.Error), proto.AuthOk)
            await client.send(proto.Join("lobby", request_id=client.rid()))
            await client.next_of(proto.Joined)
            clients.append(client)
        conns = [weakref.ref(conn) for conn in server.connections]
        assert len(conns) == 5
        gc.collect()
        gc.freeze()  # as GcPolicy does after a burst of logins: the live connections are now frozen
        for client in clients:
            await client.stream.aclose()
        with trio.fail_after(10):
            while server.connections:
                await trio.sleep(0.01)
            # The handler tasks finish (the WebSocket bridge's a little later); a collection walks only what is
            # not frozen, so a frozen cycle would survive every one of them and this would time out.
            while any(ref() is not None for ref in conns):
                gc.collect()
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

trio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
def test_closed_connections_are_freed_from_the_frozen_generation(transport):
    """A frozen cycle is never collected: a closed connection must be freed by reference counting alone.

    In a fresh interpreter (a real server, real sockets), so that nothing else a long test run keeps in the
    frozen generation can hold a connection."""
    proc = subprocess.run([sys.executable, "-c", _FROZEN_PROBE, transport], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


_MALLOC_PROBE = """
import sys, threading
import argon2
from chorus.server._memory import tune_malloc
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
if sys.argv[1] == "tuned" and not tune_malloc():
    sys.exit(3)  # no glibc: nothing to tune
hasher = argon2.PasswordHasher(time_cost=1, memory_cost=19456, parallelism=1)  # chorus-server's 19 MiB
hasher.hash("warm up")
before = rss_kb()
worker = threading.Thread(target=lambda: [hasher.hash("password") for _ in range(4)])  # as in the hashing threads
worker.start()
worker.join()
print(rss_kb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and tunes glibc's malloc")
def test_malloc_tuning_returns_argon2s_buffers_when_a_hash_ends():
    """glibc keeps a worker thread's freed 19 MiB hash buffer in its arena; tune_malloc has it unmapped."""
    grown = {}
    for variant in ("default", "tuned"):
        proc = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, variant], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode == 3:
            pytest.skip("not glibc")
        assert proc.returncode == 0, proc.stderr
        grown[variant] = int(proc.stdout)
    assert grown["tuned"] < 4096 < 16384 < grown["default"], grown  # KiB: one hash buffer is 19,456


def test_a_quiet_server_reclaims_what_a_storm_left_frozen(policy):
    """Cyclic garbage frozen in flight is freed once connections stop arriving after many opened."""
    server, now = policy.server, 1000.0
    leaked = _Cycle()
    ref = weakref.ref(leaked)
    policy.freeze()  # frozen while alive (in flight)...
    del leaked  # ...then dead in a cycle: no collection sees it
    gc.collect()
    assert ref() is not None
    for _ in range(RECLAIM_MIN // FREEZE_GROWTH):  # a storm: connections open, the policy freezes as they do
        server.connections.update(object() for _ in range(FREEZE_GROWTH))
        policy.check(now)
        now += 0.1
    assert ref() is not None and policy.reclaims == 0
    server.connections.clear()  # most of them are gone again
    policy.check(now + RECLAIM_QUIET_S - 1)
    assert policy.reclaims == 0  # not yet quiet long enough
    policy.check(now + RECLAIM_QUIET_S + 1)
    assert policy.reclaims == 1 and ref() is None
    policy.check(now + 2 * RECLAIM_QUIET_S)
    assert policy.reclaims == 1  # nothing opened since: no second pause


async def test_an_exception_from_the_stores_thread_leaves_no_cycle(tmp_path):
    """An error raised in a store's worker thread reaches the task without a reference cycle, so a freeze cannot
    catch one in flight and keep it for ever (the store's LookupError when a JOIN creates a room, for one)."""
    async with open_store(tmp_path / "chorus.db") as store:
        user = await store.create_user("joiner", "hash")
        await trio.sleep(0)
        gc.collect()
        gc.disable()  # from here only reference counting frees anything
        try:
            with pytest.raises(LookupError) as raised:
                await store.join_room(user.id, "nosuchroom", max_rooms=10, create=False)
            assert "worker thread" in "".join(raised.value.__notes__)  # where it came from, as text
            del raised
            assert gc.collect() == 0
        finally:
            gc.enable()
