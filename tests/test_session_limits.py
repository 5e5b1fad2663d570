"""Budgets that span connections, each tried with an honest client beside it (spec §9.1, §9.2, §9.8, §9.11).

Login throttling and the hashing queue, SENDs per user, rooms created per user, registrations per address,
closed registration, presence debouncing, LOGOUT across connections, JOIN's first push, and a failing store
leaving no half-done session. Real sockets on loopback; attackers and honest users come from different
addresses of 127/8. Timed tests use pytest-trio's ``mock_clock`` (time moves only when the test jumps it),
so a back-off of 1 s is exactly 1 s whatever the machine's load.
"""
from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from chorus import proto
from chorus.proto import CloseReason, ErrorCode
from rawclient import RawClient
from chorus.server._auth import Busy, HashQueue
from chorus.server._ratelimit import Backoff, BucketTable
from chorus.server._store import StoreError

LOBBY = proto.Conversation.room("lobby")
PASSWORD = "correct horse"
#: Nothing times out or PINGs while a test holds the mock clock still or jumps it by hand.
NO_DEADLINES = {"ping_interval_s": 10_000, "handshake_timeout_s": 10_000, "auth_timeout_s": 10_000,
                "frame_timeout_s": 10_000, "throttle_delay_s": 0}  # refusals come at once: no sleep to jump
UNLIMITED = {"rate_per_s": 100_000, "rate_burst": 100_000, "user_send_rate_per_s": 100_000, "user_send_burst": 100_000}


async def connect_from(port: int, source: str) -> RawClient:
    """A client whose socket is bound to ``source`` (any 127.x.y.z is loopback), past HELLO."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    client = RawClient(trio.SocketStream(sock))
    await client.send(proto.Hello(1, 1, "limits-test"))
    assert isinstance(await client.next(), proto.Welcome)
    return client


async def until(condition, timeout_s: float = 10.0) -> None:
    """Wait for server state the test cannot be told about (real clock only)."""
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.002)


async def login(client: RawClient, name: str, password: str = PASSWORD):
    return await client.request(proto.Login, name, password)


async def in_lobby(port: int, name: str, source: str = "127.0.0.1", *, register: bool = True) -> RawClient:
    client = await connect_from(port, source)
    if register:
        await client.register(name)
    else:
        assert isinstance(await login(client, name), proto.AuthOk)
    await client.go_live()
    assert isinstance(await client.request(proto.Join, "lobby"), proto.Joined)
    return client


# -- logins -------------------------------------------------------------------------------------------------------

async def test_failed_logins_back_off_per_name_without_hashing(start_server, mock_clock, caplog):
    server = await start_server(login_free_failures=3, login_backoff_max_s=8, **NO_DEADLINES)
    caplog.set_level(logging.INFO, "chorus.session")
    honest = await connect_from(server.port, "127.0.0.2")
    await honest.register("alice")
    attacker = await connect_from(server.port, "127.0.0.3")
    hashed = server.passwords.hashed
    for _ in range(3):
        assert (await login(attacker, "alice", "wrong password")).code == ErrorCode.AUTH_FAILED
    for wait_s in (1, 2, 4, 8, 8):  # doubling from the 3rd failure on, up to login_backoff_max_s
        refused = await login(attacker, "alice", "wrong password")
        assert refused.code == ErrorCode.RATE_LIMITED
        assert wait_s * 1000 <= refused.retry_after_ms <= wait_s * 1000 + 1
        mock_clock.jump(refused.retry_after_ms / 1000)
        assert (await login(attacker, "alice", "wrong password")).code == ErrorCode.AUTH_FAILED
    assert server.passwords.hashed - hashed == 8  # the refused attempts cost no hash

    # The name is throttled from every address (RESUME is not), so alice waits too, then gets in.
    second = await connect_from(server.port, "127.0.0.4")
    refused = await login(second, "alice")
    assert refused.code == ErrorCode.RATE_LIMITED
    mock_clock.jump(refused.retry_after_ms / 1000)
    assert isinstance(await login(second, "alice"), proto.AuthOk)
    third = await connect_from(server.port, "127.0.0.5")  # the name starts over after a success
    assert (await login(third, "alice", "wrong again")).code == ErrorCode.AUTH_FAILED
    assert isinstance(await honest.request(proto.Ping, 1), proto.Pong)

    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("login failed")]
    assert len(failures) == 9
    assert all("peer=127.0.0." in line and "user=alice" in line for line in failures)
    assert not any("wrong" in r.getMessage() for r in caplog.records)  # never the password


async def test_failed_logins_back_off_per_address_across_names(start_server, mock_clock, caplog):
    server = await start_server(login_free_failures=3, login_backoff_max_s=300, **NO_DEADLINES)
    caplog.set_level(logging.INFO, "chorus.session")
    setup = await connect_from(server.port, "127.0.0.2")
    await setup.register("bob")
    attacker = await connect_from(server.port, "127.0.0.3")
    names = ["n1", "n2", "evil\nuser=root"]  # an impossible name costs no hash but counts
    for name in names:
        assert (await login(attacker, name, "secret password")).code == ErrorCode.AUTH_FAILED
    refused = await login(attacker, "n4", "secret password")  # a new name, the same address
    assert refused.code == ErrorCode.RATE_LIMITED and 1000 <= refused.retry_after_ms <= 1001
    # An honest user from another address is not held up, and may use a name the attacker tried.
    honest = await connect_from(server.port, "127.0.0.2")
    assert isinstance(await login(honest, "bob"), proto.AuthOk)
    # The attacker's own successful login does not wash its address clean.
    other = await connect_from(server.port, "127.0.0.3")
    mock_clock.jump(1.001)
    assert isinstance(await login(other, "bob"), proto.AuthOk)
    assert (await login(attacker, "n5", "secret password")).code == ErrorCode.AUTH_FAILED
    assert (await login(attacker, "n6", "secret password")).code == ErrorCode.RATE_LIMITED

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("login failed")]
    assert any("user=evil\\x0auser=root" in line for line in lines)  # escaped: no forged log line
    assert not any("\n" in line for line in lines)
    assert not any("secret" in r.getMessage() for r in caplog.records)


async def test_one_address_holds_one_hashing_slot_and_others_go_first(start_server):
    # Hashes slow enough (~15 ms) that the attacker's twenty take longer than the honest login's store writes.
    server = await start_server(login_free_failures=1000, max_pending_hashes=8, argon2_memory_kib=16384)
    setup = await connect_from(server.port, "127.0.0.2")
    await setup.register("alice")
    attackers = [await connect_from(server.port, "127.0.0.3") for _ in range(20)]
    honest = await connect_from(server.port, "127.0.0.2")
    hashes = server.budgets.hashes
    # Every hashing thread busy (a fault injected on the private limiter: no cheap real way to hold them),
    # so the queue's order is visible.
    limiter = server.passwords._limiter
    holders = [object() for _ in range(int(limiter.total_tokens))]  # every hashing thread
    for holder in holders:
        await limiter.acquire_on_behalf_of(holder)
    replies: list[str] = []

    async def attack(client, i):
        reply = await login(client, f"victim{i}", "wrong password")
        assert reply.code == ErrorCode.AUTH_FAILED
        replies.append("attacker")

    async def log_in():
        assert isinstance(await login(honest, "alice"), proto.AuthOk)
        replies.append("honest")

    async with trio.open_nursery() as nursery:
        for i, client in enumerate(attackers):
            nursery.start_soon(attack, client, i)
        await until(lambda: hashes.statistics()["queued"] == 20)
        assert hashes.pending == 1  # one address, one hash admitted; 19 wait behind it
        nursery.start_soon(log_in)
        await until(lambda: hashes.pending == 2)
        for holder in holders:
            limiter.release_on_behalf_of(holder)
    assert replies.index("honest") <= 2, replies  # beside the attacker's first hash, not behind all 20


async def test_hashing_queue_is_bounded_and_answers_busy_at_once(start_server):
    server = await start_server(max_pending_hashes=2, login_free_failures=1000)
    limiter = server.passwords._limiter  # both hashing threads held, as above
    holders = [object() for _ in range(int(limiter.total_tokens))]  # every hashing thread
    for holder in holders:
        await limiter.acquire_on_behalf_of(holder)
    first = await connect_from(server.port, "127.0.0.3")
    second = await connect_from(server.port, "127.0.0.4")
    late = await connect_from(server.port, "127.0.0.5")
    registering = await connect_from(server.port, "127.0.0.6")
    for client in (first, second):
        await client.send(proto.Login("nobody", "wrong password", request_id=7))
    await until(lambda: server.budgets.hashes.pending == 2)
    busy = await login(late, "nobody", "wrong password")
    assert busy.code == ErrorCode.SERVER_BUSY and busy.retry_after_ms >= 100
    busy = await registering.request(proto.Register, "carol", PASSWORD)
    assert busy.code == ErrorCode.SERVER_BUSY and busy.retry_after_ms >= 100
    for holder in holders:
        limiter.release_on_behalf_of(holder)
    for client in (first, second):
        assert (await client.next_of(proto.Error)).code == ErrorCode.AUTH_FAILED
    assert (await login(late, "nobody", "wrong password")).code == ErrorCode.AUTH_FAILED  # same connection
    assert isinstance(await registering.request(proto.Register, "carol", PASSWORD), proto.AuthOk)


async def test_login_flood_from_one_address_does_not_starve_another(start_server):
    """The issue's attack at small scale: many connections guessing at once; an honest login stays prompt."""
    server = await start_server(argon2_time_cost=1, argon2_memory_kib=8192, login_free_failures=5)
    setup = await connect_from(server.port, "127.0.0.2")
    await setup.register("alice")
    attackers = [await connect_from(server.port, "127.0.0.3") for _ in range(40)]
    answers: dict[ErrorCode, int] = {}
    stop = trio.Event()

    async def guess(client, i):
        n = 0
        while not stop.is_set():
            n += 1
            reply = await login(client, f"user{i}x{n}", "wrong password")
            answers[reply.code] = answers.get(reply.code, 0) + 1
            if reply.code == ErrorCode.RATE_LIMITED:
                await trio.sleep(0.05)  # stay under the per-connection frame rate, keep guessing

    async with trio.open_nursery() as nursery:
        for i, client in enumerate(attackers):
            nursery.start_soon(guess, client, i)
        await until(lambda: sum(answers.values()) >= 100)
        for _ in range(3):
            honest = await connect_from(server.port, "127.0.0.2")
            start = trio.current_time()
            assert isinstance(await login(honest, "alice"), proto.AuthOk)
            assert trio.current_time() - start < 1.0
        stop.set()
    assert answers.get(ErrorCode.RATE_LIMITED, 0) > answers.get(ErrorCode.AUTH_FAILED, 0)
    # Five free failures, then one after each back-off (1, 2, 4 ... s): a handful during the test.
    assert answers.get(ErrorCode.AUTH_FAILED, 0) <= 10


# -- per-user and per-address budgets ------------------------------------------------------------------------------

async def test_send_rate_is_per_user_across_connections(start_server):
    server = await start_server(user_send_rate_per_s=1, user_send_burst=6)
    alice = [await in_lobby(server.port, "alice")]
    alice += [await in_lobby(server.port, "alice", register=False) for _ in range(2)]
    bob = await in_lobby(server.port, "bob")
    replies = [await conn.request(proto.Send, LOBBY, 10 * i + k, "spam") for i, conn in enumerate(alice)
               for k in range(3)]
    acked = [r for r in replies if isinstance(r, proto.Ack)]
    refused = [r for r in replies if isinstance(r, proto.Error)]
    assert 6 <= len(acked) <= 7 and len(acked) + len(refused) == 9  # at most one token refilled meanwhile
    assert all(r.code == ErrorCode.RATE_LIMITED and 0 < r.retry_after_ms <= 1001 for r in refused)
    for i in range(5):  # bob, in the same room, is not held up by alice's budget
        ack = await bob.request(proto.Send, LOBBY, 100 + i, f"hello {i}")
        assert isinstance(ack, proto.Ack)
        while (await alice[2].next_of(proto.Message)).seq != ack.seq:
            pass  # alice's own accepted messages come first
    assert isinstance(await alice[0].request(proto.Ping, 1), proto.Pong)  # refused, never closed


async def test_room_creation_is_limited_per_user(start_server):
    server = await start_server(rooms_created_per_hour=2)
    alice = await connect_from(server.port, "127.0.0.1")
    await alice.register("alice")
    bob = await connect_from(server.port, "127.0.0.1")
    await bob.register("bob")
    assert isinstance(await bob.request(proto.Join, "bobs"), proto.Joined)
    for room in ("r1", "r2"):
        assert isinstance(await alice.request(proto.Join, room), proto.Joined)
    refused = await alice.request(proto.Join, "r3")
    assert refused.code == ErrorCode.RATE_LIMITED and refused.retry_after_ms > 1_000_000  # a token per 30 min
    assert isinstance(await alice.request(proto.Join, "bobs"), proto.Joined)  # joining is not creating
    assert isinstance(await alice.request(proto.Join, "r1"), proto.Joined)
    assert isinstance(await bob.request(proto.Join, "r3"), proto.Joined)  # bob's own budget
    rooms = await alice.request(proto.ListRooms)
    assert {r.name for r in rooms.rooms} == {"bobs", "r1", "r2", "r3"}


async def test_registrations_are_limited_per_address(start_server):
    server = await start_server(registrations_per_hour=2)
    taken = await connect_from(server.port, "127.0.0.3")
    await taken.register("u1")
    for _ in range(3):  # refused registrations cost nothing
        assert (await (await connect_from(server.port, "127.0.0.3")).request(
            proto.Register, "u1", PASSWORD)).code == ErrorCode.USERNAME_TAKEN
    await (await connect_from(server.port, "127.0.0.3")).register("u2")
    third = await connect_from(server.port, "127.0.0.3")
    refused = await third.request(proto.Register, "u3", PASSWORD)
    assert refused.code == ErrorCode.RATE_LIMITED and refused.retry_after_ms > 1_000_000
    assert isinstance(await login(third, "u1"), proto.AuthOk)  # logging in is not registering
    elsewhere = await connect_from(server.port, "127.0.0.4")
    await elsewhere.register("u3")


async def test_closed_registration(start_server):
    server = await start_server(registration="closed")
    await server.store.create_user("alice", await server.passwords.hash(PASSWORD))  # made by an operator
    c = await connect_from(server.port, "127.0.0.1")
    refused = await c.request(proto.Register, "mallory", PASSWORD)
    assert refused.code == ErrorCode.INVALID_REQUEST and "closed" in refused.message
    assert isinstance(await login(c, "alice"), proto.AuthOk)  # the same connection, still usable


# -- presence, logout, join ------------------------------------------------------------------------------------

async def test_offline_is_debounced(start_server, nursery, mock_clock):
    server = await start_server(presence_offline_delay_s=30, **NO_DEADLINES)
    alice = await in_lobby(server.port, "alice")
    bob = await in_lobby(server.port, "bob")

    # bob drops and is back within the delay: nobody hears of it.
    await bob.send(proto.Bye(CloseReason.CLIENT_QUIT))
    await bob.drain_until_closed()
    await until_closed(server, 1)
    members = await alice.request(proto.Members, "lobby")
    assert proto.MemberInfo("bob", proto.Status.ONLINE) in members.members  # as announced
    mock_clock.jump(29)
    bob = await in_lobby(server.port, "bob", register=False)
    mock_clock.jump(10)
    ack = await bob.request(proto.Send, LOBBY, 1, "still here")
    while True:
        event = await alice.next()
        assert not isinstance(event, proto.Presence), event
        if isinstance(event, proto.Message) and event.seq == ack.seq:
            break

    # bob leaves for good: OFFLINE once the delay is over, not before.
    await bob.send(proto.Bye(CloseReason.CLIENT_QUIT))
    await bob.drain_until_closed()
    await until_closed(server, 1)
    mock_clock.jump(29)
    assert isinstance(await alice.request(proto.Ping, 2), proto.Pong)
    mock_clock.jump(1)
    assert await alice.next() == proto.Presence("bob", proto.Status.OFFLINE)
    members = await alice.request(proto.Members, "lobby")
    assert proto.MemberInfo("bob", proto.Status.OFFLINE) in members.members
    await in_lobby(server.port, "bob", register=False)  # and a real return is announced
    assert await alice.next_of(proto.Presence) == proto.Presence("bob", proto.Status.ONLINE)


async def until_closed(server, connections: int) -> None:
    """Wait until the server holds ``connections`` connections (a closed one is gone from the broker)."""
    while len(server.connections) != connections:
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()


async def test_logout_ends_every_connection_of_that_token(start_server):
    server = await start_server()
    first = await connect_from(server.port, "127.0.0.1")
    auth = await first.register("alice")
    same_token = await connect_from(server.port, "127.0.0.1")
    assert isinstance(await same_token.request(proto.Resume, auth.token), proto.AuthOk)
    other_token = await connect_from(server.port, "127.0.0.1")
    assert isinstance(await login(other_token, "alice"), proto.AuthOk)
    await first.send(proto.Logout(request_id=first.rid()))
    for client in (first, same_token):
        events = await client.drain_until_closed()
        assert proto.Bye(CloseReason.LOGGED_OUT) in events
    assert isinstance(await other_token.request(proto.Ping, 1), proto.Pong)  # another device stays
    again = await connect_from(server.port, "127.0.0.1")
    assert (await again.request(proto.Resume, auth.token)).code == ErrorCode.INVALID_TOKEN


async def test_join_pushes_nothing_up_to_joined_last_seq_before_joined(start_server):
    server = await start_server(**UNLIMITED)
    senders = []
    for name in ("alice", "carol"):
        senders.append(await connect_from(server.port, "127.0.0.1"))
        await senders[-1].register(name)
    bob = await connect_from(server.port, "127.0.0.1")
    await bob.register("bob")
    await bob.go_live()

    async def keep_sending(client, conv, base, acked, sending, stop):
        n = 0
        while not stop.is_set():  # one at a time, so commits keep landing while bob joins
            n += 1
            acked.append((await client.request(proto.Send, conv, base + n, "x")).seq)
            sending.set()

    for round_ in range(15):
        room = f"race{round_}"
        conv = proto.Conversation.room(room)
        for sender in senders:
            await sender.request(proto.Join, room)
        sending, stop = trio.Event(), trio.Event()
        acked: list[int] = []
        async with trio.open_nursery() as nursery:
            for i, sender in enumerate(senders):
                nursery.start_soon(keep_sending, sender, conv, 1_000_000 * (round_ + 1) + 100_000 * i, acked,
                                   sending, stop)
            await sending.wait()
            rid = bob.rid()
            await bob.send(proto.Join(room, request_id=rid))
            while True:
                event = await bob.next()
                assert not isinstance(event, proto.Message), f"round {round_}: {event} before JOINED"
                if isinstance(event, proto.Joined):
                    break
            last = event.last_seq
            for _ in range(5):  # live after JOINED, from last_seq + 1 on
                message = await bob.next_of(proto.Message)
                assert message.seq == last + 1, f"round {round_}: gap after {last}"
                last = message.seq
            stop.set()
        while last < max(acked):
            message = await bob.next_of(proto.Message)
            assert message.seq == last + 1, f"round {round_}: gap after {last}"
            last = message.seq


# -- a failing store leaves nothing half done --------------------------------------------------------------------

async def read_only(server, on: bool) -> None:
    """SQLite refuses every write (``PRAGMA query_only`` on the store's writing connection): a real refusal."""
    await server.store._run(lambda conn: conn.execute(f"PRAGMA query_only = {int(on)}"))


async def test_login_and_register_on_a_refusing_store_stay_unauthenticated(start_server):
    server = await start_server(registrations_per_hour=3)
    alice = await in_lobby(server.port, "alice")
    bob = await connect_from(server.port, "127.0.0.1")
    await bob.register("bob")
    await bob.request(proto.Join, "lobby")
    await bob.send(proto.Bye(CloseReason.CLIENT_QUIT))
    await bob.drain_until_closed()
    assert await alice.next_of(proto.Presence) == proto.Presence("bob", proto.Status.OFFLINE)
    await read_only(server, True)
    bob = await connect_from(server.port, "127.0.0.1")
    busy = await login(bob, "bob")  # the password is right; storing the session is refused
    assert busy.code == ErrorCode.SERVER_BUSY and busy.retry_after_ms > 0
    carol = await connect_from(server.port, "127.0.0.1")
    assert (await carol.request(proto.Register, "carol", PASSWORD)).code == ErrorCode.SERVER_BUSY
    assert not server.broker.connections_of(2) and len(server.broker.connections_of(1)) == 1
    assert isinstance(await alice.request(proto.Ping, 1), proto.Pong)
    await read_only(server, False)
    assert isinstance(await login(bob, "bob"), proto.AuthOk)  # the same connection, unauthenticated till now
    await carol.register("carol")  # the third: the refused one was not charged
    presences = []
    ack = await bob.request(proto.Send, LOBBY, 1, "back")
    while True:
        event = await alice.next()
        if isinstance(event, proto.Presence):
            presences.append(event)
        if isinstance(event, proto.Message) and event.seq == ack.seq:
            break
    assert presences == [proto.Presence("bob", proto.Status.ONLINE)]  # once: the refused login said nothing


async def test_join_and_first_direct_message_on_a_refusing_store(start_server):
    server = await start_server(rooms_created_per_hour=1)
    alice = await connect_from(server.port, "127.0.0.1")
    await alice.register("alice")
    await alice.go_live()
    bob = await connect_from(server.port, "127.0.0.1")
    await bob.register("bob")
    await bob.go_live()
    await read_only(server, True)
    assert (await alice.request(proto.Join, "new")).code == ErrorCode.SERVER_BUSY
    busy = await alice.request(proto.Send, proto.Conversation.direct("bob"), 1, "hi")
    assert busy.code == ErrorCode.SERVER_BUSY  # not INTERNAL: the connection stays
    assert server.broker.connections_of(1)[0].session.convs == {}  # nothing subscribed, nothing half made
    await read_only(server, False)
    assert isinstance(await alice.request(proto.Join, "new"), proto.Joined)  # the refused room cost no budget
    ack = await alice.request(proto.Send, proto.Conversation.direct("bob"), 1, "hi")
    assert (await bob.next_of(proto.Message)).seq == ack.seq == 1


async def test_join_whose_last_seq_read_fails_leaves_no_subscription(start_server, monkeypatch):
    server = await start_server()
    alice = await in_lobby(server.port, "alice")
    bob = await connect_from(server.port, "127.0.0.1")
    await bob.register("bob")
    await bob.go_live()

    # A failing read on the store's reading connection cannot be provoked cheaply (query_only and a full
    # disk refuse writes only): this one store method is made to fail.
    async def failing_last_seq(conv_id):
        raise StoreError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(server.store, "last_seq", failing_last_seq)
        assert (await bob.request(proto.Join, "lobby")).code == ErrorCode.SERVER_BUSY
        conv_id = next(iter(server.broker.connections_of(1)[0].session.convs))
        assert [c.session.username for c in server.broker.fanout.subscribers(conv_id)] == ["alice"]
    joined = await bob.request(proto.Join, "lobby")  # the membership was stored; the retry subscribes
    assert isinstance(joined, proto.Joined)
    ack = await alice.request(proto.Send, LOBBY, 1, "welcome")
    assert (await bob.next_of(proto.Message)).seq == ack.seq


# -- the mechanisms alone ------------------------------------------------------------------------------------------

def test_backoff_doubles_forgets_and_stays_bounded():
    backoff = Backoff(2, 10, window_s=100, max_entries=50)
    assert [backoff.delay_s(n) for n in range(7)] == [0, 0, 1, 2, 4, 8, 10]
    for at in (0.0, 0.0, 10.0):
        backoff.failed("a", at)
    assert backoff.wait_s("a", 10.5) == 1.5  # 2 s after the third failure
    backoff.undo("a")  # the third was a success after all: 1 s after the second
    assert backoff.wait_s("a", 0.5) == 0.5 and backoff.wait_s("a", 10.5) == 0.0
    assert backoff.wait_s("a", 100.0) == 0.0 and len(backoff) == 0  # quiet for the window: forgotten
    for i in range(1000):  # rotating keys cannot grow the table
        backoff.failed(f"k{i}", float(i))
    assert len(backoff) == 50 and backoff.wait_s("k999", 999.0) == 0.0


def test_bucket_table_refuses_with_a_retry_and_stays_bounded():
    table = BucketTable(2.0, 3, max_entries=100)
    assert [table.take("u", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert table.take("u", 0.0) == pytest.approx(0.5)
    table.give_back("u")
    assert table.take("u", 0.0) == 0.0
    for i in range(10_000):
        table.take(i, 1000.0 + i / 1000)
    assert len(table) <= 100


async def test_hash_queue_one_per_address_refusing_long_waits():
    queue = HashQueue(2, max_wait_s=0.12, threads=2)  # the pace starts at 0.05 s a hash: two may wait behind one
    release = trio.Event()
    entered: list[str] = []
    busy: list[str] = []

    async def hash_(address, tag):
        try:
            async with queue.slot(address):
                entered.append(tag)
                await release.wait()
        except Busy as exc:
            assert exc.retry_after_s >= 0.1
            busy.append(tag)

    async with trio.open_nursery() as nursery:
        for tag in ("a1", "a2", "a3", "a4"):
            nursery.start_soon(hash_, "10.0.0.1", tag)
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hash_, "10.0.0.2", "b1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hash_, "10.0.0.3", "c1")
        await trio.testing.wait_all_tasks_blocked()
        assert (entered, busy, queue.pending) == (["a1", "b1"], ["a4", "c1"], 2)
        release.set()
    assert entered == ["a1", "b1", "a2", "a3"] and queue.pending == 0 and not queue.statistics()["addresses"]


async def test_a_throttled_guesser_gets_at_most_one_refusal_a_second(start_server, autojump_clock):
    # The clock jumps whenever every task waits (threads hashing included): no deadline may fire meanwhile.
    server = await start_server(**{**NO_DEADLINES, "throttle_delay_s": 1.0})
    guesser = await connect_from(server.port, "127.0.0.3")
    for _ in range(12):  # an address that has guessed wrong many times: back-off at its 300 s cap
        server.budgets.login_by_address.failed("127.0.0.3", trio.current_time())
    honest = await connect_from(server.port, "127.0.0.2")
    start = trio.current_time()
    rids = [guesser.rid() for _ in range(5)]
    await guesser.send_raw(b"".join(guesser.conn.send(proto.Login("alice", "guess", request_id=r)) for r in rids))
    assert isinstance(await honest.request(proto.Ping, 1), proto.Pong)  # an honest user is served meanwhile
    for _ in rids:
        refused = await guesser.next_of(proto.Error)
        assert refused.code == ErrorCode.RATE_LIMITED and refused.retry_after_ms > 1000
    # Virtual seconds: the guesser waited a second per refusal, on its own connection, costing us nothing.
    assert trio.current_time() - start >= 5 * server.config.throttle_delay_s
    assert server.passwords.hashed == 0
