"""Failure is local at the connection boundary (issue 9): each bad peer costs only itself.

Every test has an honest client beside the attack and asserts it keeps chatting.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import resource
import secrets
import socket

import pytest
import trio
import trio.testing

from chorus import proto
from chorus.proto import CloseReason, ErrorCode
from rawclient import RawClient, alice_and_bob_in_lobby
from chorus.server import _admission, _app
from chorus.server._conn import TICK_CLOSED
from chorus.server._store import StoreError
from chorus.server._transport import open_listener

LOBBY = proto.Conversation.room("lobby")


async def honest_pair(port: int, source: str | None = None) -> tuple[RawClient, RawClient]:
    return await alice_and_bob_in_lobby(await RawClient.connect(port, source=source),
                                        await RawClient.connect(port, source=source))


async def still_chatting(alice: RawClient, bob: RawClient, msg_id: int) -> None:
    ack = await alice.request(proto.Send, LOBBY, msg_id, f"still here {msg_id}")
    assert isinstance(ack, proto.Ack), ack
    got = await bob.next_of(proto.Message)
    assert (got.seq, got.body) == (ack.seq, f"still here {msg_id}")


# -- a bug or a store error costs one request or one connection --------------------------------------------

async def test_a_bug_in_a_request_costs_that_connection_only(server, monkeypatch, caplog):
    alice, bob = await honest_pair(server.port)
    mallory = await RawClient.connect(server.port)
    await mallory.register("mallory")

    async def broken(*args):
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(server.store, "messages_before", broken)  # a bug: nothing real raises this any more
    await mallory.request(proto.Join, "lobby")
    await mallory.send(proto.History(LOBBY, proto.Direction.BEFORE, 2**63, 10, request_id=77))
    events = await mallory.drain_until_closed()
    errors = [e for e in events if isinstance(e, proto.Error)]
    assert errors and errors[-1].code == ErrorCode.INTERNAL and errors[-1].request_id == 77
    assert proto.Bye(CloseReason.PROTOCOL_ERROR) in events
    assert sum("internal error" in r.getMessage() for r in caplog.records) == 1  # logged once, with traceback
    assert any(r.exc_info for r in caplog.records if "internal error" in r.getMessage())
    await still_chatting(alice, bob, 1)
    fresh = await RawClient.connect(server.port)  # and the server still accepts
    await fresh.register("fresh")


async def test_a_store_error_is_server_busy_and_the_connection_stays(server, monkeypatch):
    alice, bob = await honest_pair(server.port)

    async def full(*args):
        raise StoreError("database or disk is full", retry_after_ms=1500)

    monkeypatch.setattr(server.store, "members", full)  # a full disk, for this one request
    reply = await alice.request(proto.Members, "lobby")
    assert isinstance(reply, proto.Error) and reply.code == ErrorCode.SERVER_BUSY
    assert reply.retry_after_ms == 1500
    monkeypatch.undo()
    assert isinstance(await alice.request(proto.Members, "lobby"), proto.MemberList)
    await still_chatting(alice, bob, 1)


# -- slots per address ------------------------------------------------------------------------------------

async def test_one_address_cannot_take_every_slot(start_server):
    server = await start_server(max_connections_per_address=3)
    hoarders = [await RawClient.connect(server.port, hello=False) for _ in range(3)]
    refused = await RawClient.connect(server.port, hello=False)
    events = await refused.drain_until_closed()
    assert isinstance(events[0], proto.Error) and events[0].code == ErrorCode.TOO_MANY_CONNECTIONS
    assert "per address" in events[0].message and events[1] == proto.Bye(CloseReason.SERVER_FULL)
    alice, bob = await honest_pair(server.port, source="127.0.0.2")  # another address still gets in
    await still_chatting(alice, bob, 1)
    await hoarders[0].stream.aclose()
    for _ in range(100):  # the slot comes back once the server has seen the close
        if server.admission.held_by("127.0.0.1") < 3:
            break
        await trio.sleep(0.01)
    again = await RawClient.connect(server.port)
    assert isinstance(await again.request(proto.Ping, 1), proto.Pong)


def test_open_file_budget_raises_the_soft_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft == hard and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        budget = _admission.open_file_budget()
        new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert new_soft == new_hard or new_hard == resource.RLIM_INFINITY
        assert budget == new_soft - _admission.RESERVED_FDS
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_admission_counts_per_address_and_in_total():
    slots = _admission.Admission(total_limit=3, per_address=2)
    assert slots.acquire("a") is None and slots.acquire("a") is None
    assert "per address" in slots.acquire("a")
    assert slots.acquire("b") is None
    assert slots.acquire("c") == "server full"
    slots.release("a")
    assert slots.acquire("c") is None and slots.total == 3 and slots.held_by("a") == 1


async def test_accept_waits_out_a_full_file_table_with_one_log_line(caplog, autojump_clock):
    listener = open_listener("127.0.0.1", 0)
    clients = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", listener.port))
            clients.append(sock)
        lowest_free = os.dup(0)  # the kernel hands out the lowest free descriptor
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no room for one more descriptor
        with trio.move_on_after(5):  # virtual seconds: 50 refused attempts
            await listener.accept()
            pytest.fail("accept succeeded without a free descriptor")
        assert listener.out_of_files >= 10
        warnings = [r for r in caplog.records if "accept" in r.getMessage()]
        assert len(warnings) == 1 and not warnings[0].exc_info
        assert errno.errorcode[errno.EMFILE] in warnings[0].getMessage()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        stream = await listener.accept()  # descriptors are back: the waiting connection is taken
        await stream.aclose(linger_s=0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for sock in clients:
            sock.close()
        await listener.aclose()


# -- every frame costs budget -------------------------------------------------------------------------------

async def test_an_unsolicited_pong_is_a_protocol_error(server):
    alice, bob = await honest_pair(server.port)
    flooder = await RawClient.connect(server.port)  # PONG is legal before auth, so no login needed
    await flooder.send(proto.Pong(12345))
    events = await flooder.drain_until_closed()
    assert events[0].code == ErrorCode.INVALID_REQUEST and events[1] == proto.Bye(CloseReason.PROTOCOL_ERROR)
    await still_chatting(alice, bob, 1)


async def test_a_pong_answering_our_ping_is_fine(start_server):
    server = await start_server(ping_interval_s=0.2)
    client = await RawClient.connect(server.port)
    await client.register("alice")
    ping = await client.next_of(proto.Ping)  # the server pings a silent client
    await client.send(ping.response())
    await client.send(ping.response())  # answering the same PING twice is not
    events = await client.drain_until_closed()
    assert [e for e in events if isinstance(e, proto.Error)][0].code == ErrorCode.INVALID_REQUEST


async def test_a_started_frame_must_be_finished_in_time(start_server):
    server = await start_server(frame_timeout_s=0.3)
    alice, bob = await honest_pair(server.port)
    dribbler = await RawClient.connect(server.port)
    await dribbler.register("dribbler")
    frame = dribbler.conn.send(proto.Ping(1, request_id=9))
    await dribbler.send_raw(frame[:-1])  # everything but the last byte, which never comes
    events = await dribbler.drain_until_closed()
    errors = [e for e in events if isinstance(e, proto.Error)]
    assert errors[0].code == ErrorCode.MALFORMED_FRAME and "not finished" in errors[0].message
    await still_chatting(alice, bob, 1)


# -- closing delivers the last frames ---------------------------------------------------------------------

async def test_rate_limited_clients_get_their_bye_despite_unread_input(start_server):
    server = await start_server(rate_per_s=5, rate_burst=5, max_rate_violations=3)
    alice, bob = await honest_pair(server.port, source="127.0.0.2")
    flood = b"".join(proto.encode(proto.Ping(i, request_id=i + 1)) for i in range(2000))
    byes = 0

    async def flooder():
        nonlocal byes
        client = await RawClient.connect(server.port)
        try:
            await client.send_raw(flood)  # far more than the limit, all unread by the server when it closes
        except trio.BrokenResourceError:
            pass
        events = await client.drain_until_closed()
        byes += proto.Bye(CloseReason.RATE_LIMITED) in events

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(flooder)
    assert byes == 20
    await still_chatting(alice, bob, 1)


async def test_shutdown_acts_on_every_send_already_read(start_server):
    server = await start_server(max_inflight_sends=2,  # the reader stops with SENDs left in its buffer
                                rate_burst=1000, user_send_burst=1000)
    alice, bob = await honest_pair(server.port)
    sends = b"".join(alice.conn.send(proto.Send(LOBBY, i, f"m{i}", request_id=i)) for i in range(1, 101))
    await alice.send_raw(sends)
    first = await alice.next_of(proto.Ack)  # the server is reading them now
    server.shutdown()
    events = await alice.drain_until_closed()
    acks = {e.client_msg_id for e in events if isinstance(e, proto.Ack)} | {first.client_msg_id}
    assert acks == set(range(1, 101))
    assert proto.Bye(CloseReason.SHUTDOWN) in events


# -- deadlines spread ---------------------------------------------------------------------------------------

class _Due:
    """A connection whose deadline has passed: its tick begins a close (once)."""

    next_check = float("-inf")

    def __init__(self, closed: list):
        self.closed = closed
        self.done = False

    def tick(self, now: float, may_ping: bool = True) -> int:
        if self.done:
            return 0
        self.done = True
        self.closed.append(now)
        return TICK_CLOSED


async def test_mass_deadlines_are_closed_a_bounded_number_per_sweep(make_config, autojump_clock):
    closed: list[float] = []
    server = _app.Server.__new__(_app.Server)
    server.config = make_config()
    server.connections = {_Due(closed) for _ in range(450)}
    with trio.move_on_after(5):
        await server.watch_connections()
    assert len(closed) == 450
    per_sweep: dict[float, int] = {}
    for stamp in closed:
        per_sweep[stamp] = per_sweep.get(stamp, 0) + 1
    assert max(per_sweep.values()) == _app._CLOSES_PER_TICK
    assert len(per_sweep) == -(-450 // _app._CLOSES_PER_TICK)  # the backlog is taken in quick steps
    stamps = sorted(per_sweep)
    assert max(b - a for a, b in itertools.pairwise(stamps)) <= _app._BACKLOG_PERIOD_S + 1e-9


# -- logs -----------------------------------------------------------------------------------------------------

async def test_client_text_cannot_forge_log_lines(server, caplog):
    caplog.set_level(logging.INFO)
    client = await RawClient.connect(server.port)
    await client.send(proto.Error(ErrorCode.INTERNAL, 0, "oops\n2026-11-29 INFO chorus.conn: forged\x1b[31m"))
    assert isinstance(await client.request(proto.Ping, 1), proto.Pong)
    lines = [r.getMessage() for r in caplog.records if "sent ERROR" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "\x1b" not in lines[0] and "\\x0a" in lines[0]


# -- replies the config allows are sent -------------------------------------------------------------------

async def test_a_page_larger_than_one_mib_goes_out_when_the_config_allows_it(start_server):
    server = await start_server(max_body_bytes=20000, max_frame_bytes=2_005_937, rate_per_s=10_000,
                                rate_burst=10_000, user_send_rate_per_s=10_000, user_send_burst=10_000)
    alice, bob = await honest_pair(server.port)
    for i in range(1, 101):
        ack = await alice.request(proto.Send, LOBBY, i, secrets.token_hex(9990))  # incompressible, 19980 bytes
        assert isinstance(ack, proto.Ack), ack
        assert (await bob.next_of(proto.Message)).seq == ack.seq
    page = await alice.request(proto.History, LOBBY, proto.Direction.BEFORE, 0, 100)
    assert isinstance(page, proto.HistoryPage) and len(page.messages) == 100
    await still_chatting(alice, bob, 101)


async def test_the_data_dir_and_database_are_private(server, make_config):
    config = server.config
    assert (os.stat(config.data_dir).st_mode & 0o777) == 0o700
    assert (os.stat(config.db_path).st_mode & 0o777) == 0o600


async def test_a_full_disk_at_start_does_not_stop_the_session_purge(start_server, monkeypatch, caplog):
    from chorus.server import _store

    async def full(self, now_ms):
        raise _store.StoreError("database or disk is full")

    monkeypatch.setattr(_store.Store, "purge_sessions", full)  # the purge runs first thing at start
    server = await start_server()
    alice, bob = await honest_pair(server.port)
    await still_chatting(alice, bob, 1)
    assert any("purge postponed" in r.getMessage() for r in caplog.records)


async def test_an_address_reconnecting_in_a_loop_is_turned_away_at_the_door(start_server):
    server = await start_server(connection_burst_per_address=3, connections_per_s_per_address=0.01)
    for _ in range(3):
        client = await RawClient.connect(server.port)  # each closes at once: slots are not what runs out
        await client.stream.aclose()
    refused = await RawClient.connect(server.port, hello=False)
    events = await refused.drain_until_closed()
    assert events[0].code == ErrorCode.TOO_MANY_CONNECTIONS and "new connections" in events[0].message
    assert server.statistics()["refused_sockets"] == 1
    alice, bob = await honest_pair(server.port, source="127.0.0.2")
    await still_chatting(alice, bob, 1)
