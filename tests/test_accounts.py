"""A user's own account (issue 12, version 2, spec §9.1): CHANGE_PASSWORD, LOGOUT_ALL, LIST_SESSIONS, REVOKE_SESSION.

How this works. Real servers (conftest ``start_server``) and raw connections (tests/rawclient.py) that offer
version 2 in their HELLO, so each test sees the exact frames: the device whose session is revoked gets BYE
LOGGED_OUT and its token is refused (INVALID_TOKEN) on RESUME; the one that asked keeps its token unless it asked
to lose it. The client library's methods are checked at the end, the Redis user-event encoding that carries the
revocations to the other nodes without Redis, and the cluster itself in tests/test_cluster.py.
"""
from __future__ import annotations

import trio

from chorus import proto
from chorus.proto import CloseReason, ErrorCode
from chorus.server._auth import token_hash
from rawclient import RawClient

PASSWORD = "correct horse"
NEW_PASSWORD = "battery staple"
#: No pings or deadlines that a slow test machine could trip over.
NO_DEADLINES = {"ping_interval_s": 10_000, "handshake_timeout_s": 10_000, "auth_timeout_s": 10_000}


async def connect(port: int, *, version: int = 2, source: str | None = None) -> RawClient:
    """A raw connection that negotiated ``version`` (RawClient's own HELLO offers version 1 only)."""
    raw = await RawClient.connect(port, hello=False, source=source)
    await raw.send(proto.Hello(1, version, "accounts-test"))
    welcome = await raw.next()
    assert isinstance(welcome, proto.Welcome) and welcome.version == version
    return raw


async def login(port: int, name: str, password: str = PASSWORD, **kwargs) -> tuple[RawClient, proto.AuthOk]:
    raw = await connect(port, **kwargs)
    reply = await raw.request(proto.Login, name, password)
    assert isinstance(reply, proto.AuthOk), reply
    await raw.go_live()
    return raw, reply


async def register(port: int, name: str) -> tuple[RawClient, proto.AuthOk]:
    raw = await connect(port)
    reply = await raw.register(name)
    await raw.go_live()
    return raw, reply


async def closed_logged_out(raw: RawClient) -> None:
    """``raw``'s connection ends with BYE LOGGED_OUT (whatever came before it), then EOF."""
    with trio.fail_after(10):
        events = await raw.drain_until_closed()
    byes = [e for e in events if isinstance(e, proto.Bye)]
    assert [b.reason for b in byes] == [CloseReason.LOGGED_OUT], events
    assert isinstance(events[-1], proto.ConnectionClosed)


async def resume(port: int, token: str):
    raw = await connect(port)
    try:
        return await raw.request(proto.Resume, token)
    finally:
        await raw.stream.aclose()


async def still_open(raw: RawClient) -> None:
    assert isinstance(await raw.request(proto.Ping, 5), proto.Pong)


# --- CHANGE_PASSWORD ---------------------------------------------------------------------------------------------

async def test_change_password_revokes_the_other_devices_and_keeps_this_one(start_server):
    server = await start_server(**NO_DEADLINES)
    phone, phone_auth = await register(server.port, "alice")
    laptop, laptop_auth = await login(server.port, "alice")
    bob, bob_auth = await register(server.port, "bob")

    assert isinstance(await phone.request(proto.ChangePassword, PASSWORD, NEW_PASSWORD), proto.Ok)
    await closed_logged_out(laptop)
    refused = await resume(server.port, laptop_auth.token)
    assert (type(refused), refused.code) == (proto.Error, ErrorCode.INVALID_TOKEN)

    await still_open(phone)  # this connection goes on, and its token stays valid
    assert isinstance(await resume(server.port, phone_auth.token), proto.AuthOk)
    await still_open(bob)  # another user's sessions are not touched
    assert isinstance(await resume(server.port, bob_auth.token), proto.AuthOk)

    old = await connect(server.port)
    assert (await old.request(proto.Login, "alice", PASSWORD)).code == ErrorCode.AUTH_FAILED
    assert isinstance(await old.request(proto.Login, "alice", NEW_PASSWORD), proto.AuthOk)


async def test_a_wrong_old_password_is_auth_failed_and_counts_toward_the_login_back_off(start_server):
    # The refusals come at once (throttle_delay_s), well inside the 1 s the third attempt must wait.
    server = await start_server(login_free_failures=2, login_backoff_max_s=60, throttle_delay_s=0.01, **NO_DEADLINES)
    alice, _ = await register(server.port, "alice")
    hashed = server.passwords.hashed
    for _ in range(2):
        refused = await alice.request(proto.ChangePassword, "not my password", NEW_PASSWORD)
        assert (type(refused), refused.code) == (proto.Error, ErrorCode.AUTH_FAILED)
    assert server.passwords.hashed - hashed == 2  # checked with argon2, through the hashing queue
    # Two failures for the name "alice": the third attempt backs off, a LOGIN as alice from elsewhere too.
    refused = await alice.request(proto.ChangePassword, PASSWORD, NEW_PASSWORD)
    assert (refused.code, refused.retry_after_ms > 0) == (ErrorCode.RATE_LIMITED, True)
    elsewhere = await connect(server.port, source="127.0.0.2")
    assert (await elsewhere.request(proto.Login, "alice", PASSWORD)).code == ErrorCode.RATE_LIMITED
    assert server.passwords.hashed - hashed == 2  # refused unchecked
    assert server.counters.auth["password", False] >= 2
    await still_open(alice)  # request-level errors: the connection stays


async def test_a_weak_new_password_is_refused_and_nothing_changes(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, _ = await register(server.port, "alice")
    laptop, _ = await login(server.port, "alice")
    hashed = server.passwords.hashed
    refused = await alice.request(proto.ChangePassword, PASSWORD, "short")
    assert (type(refused), refused.code) == (proto.Error, ErrorCode.WEAK_PASSWORD)
    assert proto.PASSWORD_RULE in refused.message
    assert server.passwords.hashed == hashed  # no hash spent
    await still_open(laptop)  # no session revoked
    other, _ = await login(server.port, "alice", PASSWORD)  # the password is the old one
    await other.stream.aclose()


# --- LOGOUT_ALL -----------------------------------------------------------------------------------------------------

async def test_logout_all_closes_every_connection_of_the_user_and_revokes_every_token(start_server):
    server = await start_server(**NO_DEADLINES)
    phone, phone_auth = await register(server.port, "alice")
    laptop, laptop_auth = await login(server.port, "alice")
    tablet, tablet_auth = await login(server.port, "alice")
    bob, _ = await register(server.port, "bob")
    await laptop.send(proto.LogoutAll(request_id=laptop.rid()))
    for raw in (laptop, phone, tablet):
        await closed_logged_out(raw)
    for auth in (phone_auth, laptop_auth, tablet_auth):
        assert (await resume(server.port, auth.token)).code == ErrorCode.INVALID_TOKEN
    await still_open(bob)


# --- LIST_SESSIONS, REVOKE_SESSION -------------------------------------------------------------------------------

async def test_the_session_list_marks_the_current_one_and_shows_no_secret(start_server):
    server = await start_server(**NO_DEADLINES)
    before = proto_now_ms()
    phone, phone_auth = await register(server.port, "alice")
    laptop, laptop_auth = await login(server.port, "alice")
    bob, _ = await register(server.port, "bob")

    from_phone = await phone.request(proto.ListSessions)
    assert isinstance(from_phone, proto.SessionList)
    assert [s.current for s in from_phone.sessions] == [True, False]  # oldest first: the phone registered first
    from_laptop = await laptop.request(proto.ListSessions)
    assert [s.current for s in from_laptop.sessions] == [False, True]
    assert [s.session_id for s in from_phone.sessions] == [s.session_id for s in from_laptop.sessions]
    assert len({s.session_id for s in from_phone.sessions}) == 2
    for info in from_phone.sessions:
        assert before <= info.created_ms <= info.last_used_ms <= proto_now_ms()
    wire = proto.encode(from_phone)
    for auth in (phone_auth, laptop_auth):
        assert auth.token.encode() not in wire and token_hash(auth.token) not in wire
    assert len((await bob.request(proto.ListSessions)).sessions) == 1  # bob sees only his own

    # A RESUME is a use of its session: its last_used_ms moves, its created_ms stays.
    await laptop.stream.aclose()
    again = await connect(server.port)
    assert isinstance(await again.request(proto.Resume, laptop_auth.token), proto.AuthOk)
    resumed = (await again.request(proto.ListSessions)).sessions[1]
    assert resumed.current and resumed.created_ms == from_phone.sessions[1].created_ms
    assert resumed.last_used_ms >= from_phone.sessions[1].last_used_ms


async def test_revoke_one_session_by_id(start_server):
    server = await start_server(**NO_DEADLINES)
    phone, phone_auth = await register(server.port, "alice")
    laptop, laptop_auth = await login(server.port, "alice")
    bob, _ = await register(server.port, "bob")
    mine, theirs = (await phone.request(proto.ListSessions)).sessions
    [bobs] = (await bob.request(proto.ListSessions)).sessions

    assert isinstance(await phone.request(proto.RevokeSession, theirs.session_id), proto.Ok)
    await closed_logged_out(laptop)
    assert (await resume(server.port, laptop_auth.token)).code == ErrorCode.INVALID_TOKEN
    assert [s.session_id for s in (await phone.request(proto.ListSessions)).sessions] == [mine.session_id]

    for unknown in (theirs.session_id, bobs.session_id, 2**64 - 1):  # gone, someone else's, never issued
        refused = await phone.request(proto.RevokeSession, unknown)
        assert (type(refused), refused.code) == (proto.Error, ErrorCode.NOT_FOUND)
    await still_open(bob)

    # The current one: OK, then this connection ends as after LOGOUT.
    rid = phone.rid()
    await phone.send(proto.RevokeSession(mine.session_id, request_id=rid))
    with trio.fail_after(10):
        events = await phone.drain_until_closed()
    assert [type(e) for e in events] == [proto.Ok, proto.Bye, proto.ConnectionClosed] and events[0].request_id == rid
    assert events[1].reason == CloseReason.LOGGED_OUT
    assert (await resume(server.port, phone_auth.token)).code == ErrorCode.INVALID_TOKEN


# --- version 1 ---------------------------------------------------------------------------------------------------

async def test_a_version_1_connection_sending_change_password_gets_a_protocol_error(server):
    """As for any version 2 frame (spec §6.3): UNKNOWN_FRAME_TYPE, BYE, close; and the password stays."""
    raw = await RawClient.connect(server.port)  # HELLO(1, 1)
    assert raw.conn.version == 1
    await raw.register("zed")
    await raw.send_raw(proto.encode(proto.ChangePassword(PASSWORD, NEW_PASSWORD, request_id=raw.rid())))
    error = await raw.next()
    assert (type(error), error.code) == (proto.Error, ErrorCode.UNKNOWN_FRAME_TYPE)
    bye = await raw.next()
    assert (type(bye), bye.reason) == (proto.Bye, CloseReason.PROTOCOL_ERROR)
    again = await connect(server.port)
    assert isinstance(await again.request(proto.Login, "zed", PASSWORD), proto.AuthOk)


# --- the client library --------------------------------------------------------------------------------------------

async def test_the_client_library_changes_lists_revokes_and_logs_out_everywhere(start_server):
    from chorus import client

    server = await start_server(**NO_DEADLINES)
    options = dict(username="alice", password=PASSWORD, register=True, backoff_base_s=0.05)
    async with client.open_client("127.0.0.1", server.port, **options) as phone:
        laptop, laptop_auth = await login(server.port, "alice")
        sessions = await phone.sessions()
        assert [s.current for s in sessions] == [True, False]
        await phone.revoke_session(sessions[1].session_id)
        await closed_logged_out(laptop)
        laptop, _ = await login(server.port, "alice")
        await phone.change_password(PASSWORD, NEW_PASSWORD)
        await closed_logged_out(laptop)
        assert len(await phone.sessions()) == 1
        tablet, _ = await login(server.port, "alice", NEW_PASSWORD)
        await phone.logout_all()
        await closed_logged_out(tablet)
        assert phone.token is None
    assert (await resume(server.port, laptop_auth.token)).code == ErrorCode.INVALID_TOKEN


# --- across nodes ------------------------------------------------------------------------------------------------

def test_the_redis_broker_carries_every_user_event():
    """The revocations reach the user's connections on other nodes as user events (server/_redisbroker.py)."""
    from chorus.server._ports import ConvRow, MemberJoined, MemberLeft, SessionsRevoked, TokenRevoked
    from chorus.server._redisbroker import _decode_user_event, _encode_user_event

    for event in (MemberJoined(1, ConvRow(2, proto.ConvKind.ROOM, "lobby", 3, None)), MemberLeft(1, 2),
                  TokenRevoked(1, b"\x01" * 32), SessionsRevoked(1, b"\x02" * 32), SessionsRevoked(1, None)):
        assert _decode_user_event(_encode_user_event(event)) == event


def proto_now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000
