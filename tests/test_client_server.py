"""The client library against the real server over loopback (SQLite in tmp_path).

Connection loss is made with a small TCP proxy between a client and the server,
which the test can take down (cut every connection, refuse new ones) or make
swallow everything the server says; so these tests need nothing from the
server's internals.
"""
from __future__ import annotations

import pytest
import trio
import trio.testing

from chorus import client
from chorus import proto
from rawclient import RawClient
from chorus.server import serve

PASSWORD = "password-1"
ROOM = proto.Conversation.room("lobby")


class Proxy:
    """Forwards loopback connections to ``target_port``; ``down()``/``up()``; ``swallow_downstream``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port: int | None = None
        self.accepting = True
        self.swallow_downstream = False  # drop what the server sends (it still gets what the client sends)
        self._streams: set = set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        if not self.accepting:
            await downstream.aclose()
            return
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        pair = (downstream, upstream)
        self._streams.update(pair)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, downstream, upstream, False, pair)
            nursery.start_soon(self._pump, upstream, downstream, True, pair)

    async def _pump(self, source, sink, from_server: bool, pair) -> None:
        try:
            while data := await source.receive_some(65536):
                if not (from_server and self.swallow_downstream):
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for stream in pair:
                self._streams.discard(stream)
                await stream.aclose()

    async def down(self) -> None:
        self.accepting = False
        for stream in list(self._streams):
            await stream.aclose()

    def up(self) -> None:
        self.accepting = True
        self.swallow_downstream = False


def open_user(port: int, name: str, **kwargs):
    options = dict(username=name, password=PASSWORD, register=True, backoff_base_s=0.05)
    options.update(kwargs)
    return client.open_client("127.0.0.1", port, **options)


async def messages(c: client.Client, n: int, *, timeout_s: float = 10) -> list[proto.Message]:
    """The next ``n`` messages from the event stream (other events skipped)."""
    found = []
    with trio.fail_after(timeout_s):
        async for event in c.events():
            if isinstance(event, proto.Message):
                found.append(event)
                if len(found) == n:
                    return found
    raise AssertionError(f"event stream ended after {found}")


async def next_of(c: client.Client, kind: type, *, timeout_s: float = 10):
    with trio.fail_after(timeout_s):
        async for event in c.events():
            if isinstance(event, kind):
                return event
    raise AssertionError(f"event stream ended before a {kind.__name__}")


async def test_two_users_chat_in_a_room_and_by_direct_message(server):
    async with open_user(server.port, "alice") as alice, open_user(server.port, "bob") as bob:
        assert (await alice.join("lobby")).members == 1
        assert (await bob.join("#lobby")).members == 2
        ack = await alice.send("#lobby", "hello bob")
        assert (ack.seq, ack.duplicate) == (1, False)
        [got] = await messages(bob, 1)
        assert (got.conv, got.seq, got.sender, got.body) == (ROOM, 1, "alice", "hello bob")
        assert (await messages(alice, 1))[0] == got  # the sender's own copy

        dm = await bob.send("@alice", "psst")
        [to_alice] = await messages(alice, 1)
        assert (to_alice.conv, to_alice.seq, to_alice.sender) == (proto.Conversation.direct("bob"), dm.seq, "bob")
        [own] = await messages(bob, 1)
        assert own.conv == proto.Conversation.direct("alice") and own.body == "psst"

        assert alice.last_seq == {ROOM: 1, proto.Conversation.direct("bob"): 1}
        assert [m.body for m in (await alice.history("#lobby")).messages] == ["hello bob"]
        assert {m.user: m.status for m in await alice.members("lobby")} == {
            "alice": proto.Status.ONLINE, "bob": proto.Status.ONLINE}
        assert [(r.name, r.joined) for r in await bob.rooms()] == [("lobby", True)]
        with pytest.raises(client.ServerError) as info:
            await alice.send("@nobody", "hi")
        assert info.value.code == proto.ErrorCode.NOT_FOUND
        assert await alice.ping() < 1


async def test_idempotent_retry_returns_the_same_seq_and_delivers_once(server):
    async with open_user(server.port, "alice") as alice, open_user(server.port, "bob") as bob:
        await alice.join("lobby")
        await bob.join("lobby")
        first = await alice.send("#lobby", "once", client_msg_id=123)
        retry = await alice.send("#lobby", "once", client_msg_id=123)
        assert (retry.seq, retry.ts_ms, retry.duplicate) == (first.seq, first.ts_ms, True)
        await alice.send("#lobby", "twice")
        assert [(m.seq, m.body) for m in await messages(bob, 2)] == [(1, "once"), (2, "twice")]


async def test_reconnect_catches_up_and_a_send_whose_ack_was_lost_is_stored_once(server, nursery):
    proxy = Proxy(server.port)
    await nursery.start(proxy.run)
    async with open_user(proxy.port, "alice") as alice, open_user(server.port, "bob") as bob:
        await alice.join("lobby")
        await bob.join("lobby")
        await bob.send("#lobby", "before")
        assert [m.seq for m in await messages(alice, 1)] == [1]

        # The server stores alice's message, but its MESSAGE and ACK never reach her.
        proxy.swallow_downstream = True
        acks = []
        async with trio.open_nursery() as sending:
            async def send():
                acks.append(await alice.send("#lobby", "mine"))

            sending.start_soon(send)
            [stored] = [m for m in await messages(bob, 2) if m.body == "mine"]
            await proxy.down()
            assert isinstance(await next_of(alice, client.Disconnected), client.Disconnected)
            # While alice is away: room messages and a direct message she must catch up on.
            for i in range(3):
                await bob.send("#lobby", f"missed {i}")
            await bob.send("@alice", "missed dm")
            proxy.up()
        assert (acks[0].seq, acks[0].duplicate) == (stored.seq, True)
        # Caught up with no gap and nothing twice: her own message (stored before the cut, so paged
        # like the others), what she missed, and the direct conversation bob started meanwhile.
        got = await messages(alice, 5)
        assert [(m.seq, m.body) for m in got if m.conv == ROOM] == [
            (2, "mine"), (3, "missed 0"), (4, "missed 1"), (5, "missed 2")]
        assert [(m.conv, m.body) for m in got if m.conv != ROOM] == [(proto.Conversation.direct("bob"), "missed dm")]
        assert alice.statistics().reconnects == 1


async def test_reconnect_delivers_every_message_in_order_exactly_once(server, nursery):
    proxy = Proxy(server.port)
    await nursery.start(proxy.run)
    async with open_user(proxy.port, "alice") as alice, open_user(server.port, "bob") as bob:
        await alice.join("lobby")
        await bob.join("lobby")
        await bob.send("#lobby", "m1")
        assert [m.seq for m in await messages(alice, 1)] == [1]
        await proxy.down()
        await next_of(alice, client.Disconnected)
        for i in range(2, 5):
            await bob.send("#lobby", f"m{i}")
        await bob.send("@alice", "dm1")
        pending = []
        async with trio.open_nursery() as sending:
            async def send():
                pending.append(await alice.send("#lobby", "m5 from alice"))  # waits in the outbox

            sending.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            proxy.up()
        assert (pending[0].seq, pending[0].duplicate) == (5, False)
        got = await messages(alice, 5)
        room = [(m.seq, m.body) for m in got if m.conv == ROOM]
        assert room == [(2, "m2"), (3, "m3"), (4, "m4"), (5, "m5 from alice")]
        assert [(m.conv, m.body) for m in got if m.conv != ROOM] == [(proto.Conversation.direct("bob"), "dm1")]
        await alice.send("#lobby", "m6")
        assert [(m.seq, m.body) for m in await messages(alice, 1)] == [(6, "m6")]
        assert alice.statistics().reconnects == 1


async def test_slow_consumer_misses_nothing(server):
    async with open_user(server.port, "alice", event_buffer=3) as alice, open_user(server.port, "bob") as bob:
        await alice.join("lobby")
        await bob.join("lobby")
        for i in range(1, 31):
            await bob.send("#lobby", f"m{i}")
        assert await alice.ping() < 5  # replies still flow while nobody reads the events
        assert [m.seq for m in await messages(alice, 30)] == list(range(1, 31))
        assert alice.statistics().messages_refetched >= 27


async def test_pacing_keeps_a_burst_of_sends_within_the_rate_limit(start_server):
    # The per-connection rate is what WELCOME announces and the client paces by; the per-user send
    # budget is not announced (the client retries on RATE_LIMITED, off here), so it is out of the way.
    server = await start_server(rate_per_s=200, rate_burst=20, user_send_burst=1000)
    async with open_user(server.port, "alice", retry_rate_limited=False) as alice:
        await alice.join("lobby")
        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(alice.send, "#lobby", f"m{i}")
        page = await alice.history("#lobby", limit=100)
        assert len(page.messages) == 60
        assert alice.connected


async def test_graceful_restart_goaway_reconnect_and_outbox(make_config, nursery):
    config = make_config(reconnect_hint_ms=200, shutdown_grace_s=1.0)
    stopped = trio.Event()

    async def serve_once(config, *, task_status):
        try:
            await serve(config, task_status=task_status)
        finally:
            stopped.set()

    first = await nursery.start(serve_once, config)
    async with open_user(first.port, "alice") as alice, open_user(first.port, "bob") as bob:
        await alice.join("lobby")
        await bob.join("lobby")
        first.shutdown()
        goaway = await next_of(alice, proto.GoAway)
        assert goaway.reason == proto.CloseReason.SHUTDOWN and goaway.reconnect_after_ms == 200
        assert (await next_of(alice, client.Disconnected)).reason == proto.CloseReason.SHUTDOWN
        await stopped.wait()
        acks = []
        async with trio.open_nursery() as sending:
            async def send():
                acks.append(await alice.send("#lobby", "after the restart"))

            sending.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            await nursery.start(serve, make_config(port=first.port))
        assert acks[0].seq == 1
        [got] = await messages(bob, 1)
        assert got.body == "after the restart"
        await next_of(alice, client.Reconnected)


async def test_logout_revokes_the_token(server):
    tokens = []
    async with open_user(server.port, "alice", on_token=tokens.append) as alice:
        await alice.logout()
        assert alice.token is None and not alice.connected
        with pytest.raises(client.ConnectionLost):
            await alice.rooms()
    with pytest.raises(client.ServerError) as info:
        async with client.open_client("127.0.0.1", server.port, token=tokens[0]):
            pass  # pragma: no cover
    assert info.value.code == proto.ErrorCode.INVALID_TOKEN
    # With the password as well, a refused token falls back to LOGIN.
    async with client.open_client("127.0.0.1", server.port, token=tokens[0], username="alice",
                                  password=PASSWORD, on_token=tokens.append) as alice:
        assert alice.token == tokens[-1] != tokens[0]


async def test_login_waits_out_the_back_off_a_guesser_caused(start_server, caplog):
    caplog.set_level("INFO", logger="chorus.client")
    server = await start_server(login_free_failures=0)
    async with open_user(server.port, "alice"):
        pass
    guesser = await RawClient.connect(server.port, source="127.0.0.2")
    refusal = await guesser.request(proto.Login, "alice", "wrong password")
    assert refusal.code == proto.ErrorCode.AUTH_FAILED  # alice's name now waits a second
    async with open_user(server.port, "alice", register=False) as alice:  # the real alice gets in anyway
        assert alice.connected and alice.username == "alice"
    assert any("LOGIN refused (RATE_LIMITED)" in r.getMessage() for r in caplog.records)
