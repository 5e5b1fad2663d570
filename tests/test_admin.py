"""The admin listener (issue 12, "Observability"): /metrics, /healthz, /readyz on their own port, and the log lines.

Real sockets on port 0 throughout: the server reports the admin port it bound (``server.admin_port``), scrapes are
parsed with prometheus_client's own text parser, and every counter checked is moved by real traffic first.
"""
from __future__ import annotations

import io
import json
import logging
import socket

import h11
import trio
from prometheus_client.parser import text_string_to_metric_families

from chorus import proto
from chorus.proto import CloseReason, ErrorCode
from chorus.server._logs import JsonFormatter, RepeatFilter, configure
from rawclient import RawClient, alice_and_bob_in_lobby

LOBBY = proto.Conversation.room("lobby")
SECRET = "correct horse battery"


async def http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as it is to the admin port; (status, body) of the response, read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        client = h11.Connection(h11.CLIENT)
        method = b"HEAD" if request.startswith(b"HEAD ") else b"GET"  # h11 reads a response to HEAD without a body
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))  # only to read a response
        status, body = 0, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return status, body


async def get(port: int, path: str) -> tuple[int, bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n".encode())


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, body = await get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


async def test_counters_move_with_real_traffic(start_server):
    server = await start_server(admin_port=0)
    assert server.admin_port and server.admin_port not in (server.port, server.ws_port)
    before = await scrape(server.admin_port)
    alice, bob = await alice_and_bob_in_lobby(await RawClient.connect(server.port),
                                              await RawClient.connect(server.port))
    mallory = await RawClient.connect(server.port)
    failed = await mallory.request(proto.Login, "alice", "wrong password")
    assert isinstance(failed, proto.Error) and failed.code == ErrorCode.AUTH_FAILED
    stranger = await RawClient.connect(server.port, hello=False)
    ack = await alice.request(proto.Send, LOBBY, 1, "hello, bob")
    assert isinstance(ack, proto.Ack)
    assert (await bob.next_of(proto.Message)).body == "hello, bob"
    await bob.send(proto.Bye(CloseReason.CLIENT_QUIT))
    await bob.drain_until_closed()
    while len(server.connections) > 3:  # bob's close is counted once its handler returns
        await trio.testing.wait_all_tasks_blocked()

    after = await scrape(server.admin_port)
    assert value(before, "chorus_auth_total", method="register", outcome="success") == 0
    assert value(after, "chorus_auth_total", method="register", outcome="success") == 2
    assert value(after, "chorus_auth_total", method="password", outcome="failure") == 1
    assert value(after, "chorus_auth_total", method="password", outcome="success") == 0
    assert value(after, "chorus_messages_stored_total") == 1
    assert value(after, "chorus_deliveries_total") == 2  # to bob, and to alice's own connection
    assert value(after, "chorus_frames_in_total", type="SEND") == 1
    assert value(after, "chorus_frames_in_total", type="LOGIN") == 1
    assert value(after, "chorus_frames_in_total", type="HELLO") == 3
    assert value(after, "chorus_frames_out_total", type="ACK") == 1
    assert value(after, "chorus_frames_out_total", type="MESSAGE") == 2
    assert value(after, "chorus_frames_out_total", type="WELCOME") == 3
    assert value(after, "chorus_closes_total", reason="CLIENT_QUIT") == 1
    assert value(after, "chorus_closes_total", reason="SLOW_CONSUMER") == 0
    assert value(after, "chorus_connections", transport="tcp", state="authenticated") == 1
    assert value(after, "chorus_connections", transport="tcp", state="unauthenticated") == 1
    assert value(after, "chorus_connections", transport="tcp", state="handshake") == 1
    assert value(after, "chorus_connections", transport="websocket", state="authenticated") == 0
    assert value(after, "chorus_commit_batch_size_count") >= 1
    assert value(after, "chorus_commit_batch_size_bucket", le="+Inf") == value(after, "chorus_commit_batch_size_count")
    assert value(after, "chorus_commit_seconds_count") >= 1
    assert value(after, "chorus_commit_seconds_sum") > 0
    assert value(after, "chorus_store_errors_total") == 0
    assert value(after, "chorus_broker_info", mode="local", node_id="") == 1
    assert value(after, "chorus_draining") == 0
    await stranger.stream.aclose()


async def test_rate_limit_refusals_and_closes_are_counted(start_server):
    server = await start_server(admin_port=0, rate_per_s=5, rate_burst=5, max_rate_violations=3)
    flooder = await RawClient.connect(server.port)
    await flooder.send_raw(b"".join(proto.encode(proto.Ping(i, request_id=i + 1)) for i in range(50)))
    events = await flooder.drain_until_closed()
    assert proto.Bye(CloseReason.RATE_LIMITED) in events
    while server.connections:
        await trio.testing.wait_all_tasks_blocked()
    samples = await scrape(server.admin_port)
    assert value(samples, "chorus_rate_limited_total", kind="frames") == 4  # 3 violations allowed, the 4th closes
    assert value(samples, "chorus_closes_total", reason="RATE_LIMITED") == 1


async def test_health_and_readiness(start_server, monkeypatch):
    server = await start_server(admin_port=0)
    assert await get(server.admin_port, "/healthz") == (200, b"ok\n")
    assert await get(server.admin_port, "/readyz") == (200, b"ready\n")
    status, _ = await http(server.admin_port, b"HEAD /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert status == 200
    assert (await get(server.admin_port, "/nothing"))[0] == 404
    assert (await http(server.admin_port, b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"))[0] == 405

    async def unreachable(user_id):
        raise OSError("database is gone")

    with monkeypatch.context() as patched:  # the store does not answer its cheap query
        patched.setattr(server.store, "get_user_by_id", unreachable)
        status, body = await get(server.admin_port, "/readyz")
    assert (status, body) == (503, b"not ready: store: OSError: database is gone\n")
    assert (await get(server.admin_port, "/healthz"))[0] == 200  # alive all the same
    assert (await get(server.admin_port, "/readyz"))[0] == 200


async def test_not_ready_while_the_store_refuses_writes(start_server):
    server = await start_server(admin_port=0)
    alice, bob = await alice_and_bob_in_lobby(await RawClient.connect(server.port),
                                              await RawClient.connect(server.port))
    # SQLite refuses every write (SQLITE_READONLY) and still serves reads, as a read-only disk would.
    await server.store._run(lambda conn: conn.execute("PRAGMA query_only = 1"))
    refused = await alice.request(proto.Send, LOBBY, 1, "lost?")
    assert isinstance(refused, proto.Error) and refused.code == ErrorCode.SERVER_BUSY
    status, body = await get(server.admin_port, "/readyz")
    assert (status, body) == (503, b"not ready: store refusing requests\n")
    samples = await scrape(server.admin_port)
    assert value(samples, "chorus_store_errors_total") >= 1
    assert value(samples, "chorus_store_failed_batches_total") == 1


async def test_not_ready_while_draining(start_server, monkeypatch):
    server = await start_server(admin_port=0, shutdown_grace_s=60)
    alice, bob = await alice_and_bob_in_lobby(await RawClient.connect(server.port),
                                              await RawClient.connect(server.port))
    queued = trio.Event()
    append_nowait = server.store.append_nowait

    def noting(*args):
        append_nowait(*args)
        queued.set()

    monkeypatch.setattr(server.store, "append_nowait", noting)
    limiter = server.store._limiter  # the committer's connection: held, so alice's SEND waits for its commit
    await limiter.acquire()
    try:
        await alice.send(proto.Send(LOBBY, 1, "in flight", request_id=99))
        await queued.wait()
        server.shutdown()  # the drain waits for alice's SEND (within the grace), the admin port stays up
        assert await get(server.admin_port, "/readyz") == (503, b"not ready: draining (shutting down)\n")
        assert value(await scrape(server.admin_port), "chorus_draining") == 1
    finally:
        limiter.release()
    assert (await alice.next_of(proto.Ack)).client_msg_id == 1


async def test_bad_http_is_refused_and_costs_nothing(start_server):
    server = await start_server(admin_port=0)
    assert (await http(server.admin_port, b"NOT HTTP AT ALL\r\n\r\n"))[0] == 400
    assert (await http(server.admin_port, b"GET /metrics HTTP/1.1\r\n" + b"x-pad: " + b"a" * 20000 + b"\r\n\r\n"))[0] \
        == 431
    async with await trio.open_tcp_stream("127.0.0.1", server.admin_port):
        pass  # connected and left without a word
    samples = await scrape(server.admin_port)  # still serving, and none of it was a Chorus connection
    assert sum(v for (name, _), v in samples.items() if name == "chorus_connections") == 0
    assert sum(v for (name, _), v in samples.items() if name == "chorus_closes_total") == 0
    assert value(samples, "chorus_sockets") == 0


async def test_admin_port_is_off_unless_configured(server):
    assert server.admin_port is None


# -- logs ----------------------------------------------------------------------------------------------------

async def test_json_log_lines_carry_events_and_no_secrets(start_server):
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    chorus = logging.getLogger("chorus")
    chorus.addHandler(handler)
    level = chorus.level
    chorus.setLevel(logging.INFO)
    try:
        server = await start_server()
        alice = await RawClient.connect(server.port)
        auth = await alice.register("alice", SECRET)
        await alice.request(proto.Join, "lobby")
        await alice.request(proto.Leave, "lobby")
        again = await RawClient.connect(server.port)
        assert isinstance(await again.request(proto.Resume, auth.token), proto.AuthOk)
        mallory = await RawClient.connect(server.port)
        wrong = await mallory.request(proto.Login, "alice\n2024 INFO forged", SECRET + "!")
        assert isinstance(wrong, proto.Error)
    finally:
        chorus.removeHandler(handler)
        chorus.setLevel(level)
    text = buffer.getvalue()
    assert SECRET not in text and auth.token not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    events = {line.get("event"): line for line in lines}
    assert events["register"]["user"] == "alice"
    assert events["join"]["room"] == events["leave"]["room"] == "lobby"
    failed = events["login_failed"]
    assert failed["level"] == "WARNING" and failed["address"] == "127.0.0.1"
    assert failed["user"] == "alice\\x0a2024 INFO forged"  # escaped: one line, no forged record


def test_configure_writes_json_lines_and_rate_limits_repeats():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    try:
        configure("INFO", True, buffer)
        flood = logging.getLogger("chorus.test")
        for i in range(1000):
            flood.warning("login failed peer=%s", i)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert len(lines) == RepeatFilter().burst
    assert lines[0]["message"] == "login failed peer=0" and lines[0]["logger"] == "chorus.test"


def test_the_repeat_filter_reports_what_it_suppressed():
    repeat = RepeatFilter(burst=2, period_s=10)

    def record(at: float) -> logging.LogRecord:
        rec = logging.LogRecord("chorus.x", logging.INFO, "", 0, "same %s", (1,), None)
        rec.created = at
        return rec

    assert [repeat.filter(record(t)) for t in (0, 1, 2, 3)] == [True, True, False, False]
    later = record(11)
    assert repeat.filter(later) and later.suppressed == 2


def test_a_taken_admin_port_is_one_line_before_start(make_config):
    from chorus.server.__main__ import preflight

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        problem = preflight(make_config(admin_port=port))
    assert problem == f"port {port} is in use (another chorus-server?); pick another with --admin-port"
