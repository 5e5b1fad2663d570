"""Protocol versions (spec §6): negotiation, and frames that exist only from version 2 on.

How this works. The sans-IO half drives client and server ``proto.Connection`` pairs with no event loop:
HELLO offers a range, WELCOME picks one, both sides record it in ``Connection.version``, and a frame type
newer than it does not exist on that connection, both ways (sending raises ``LocalProtocolError``,
receiving is ``UNKNOWN_FRAME_TYPE`` judged from the header, as a version 1 peer would answer). The server
half puts a version 1 connection and a version 2 client in the same room on a real server: only the
version 2 one gets MEMBERSHIP, the version 1 one never sees a frame of version 2 (its own version 1
``Connection`` would refuse it), and a LIST_CONVERSATIONS on it is a protocol error.
"""
from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from chorus import proto
from chorus.proto import CLIENT, SERVER, Connection, ErrorCode, FrameType, State
from chorus.proto._state import TRANSITIONS

NEWEST, OLDEST = proto.PROTOCOL_VERSION, proto.MIN_PROTOCOL_VERSION
V2_FRAMES = [t for t in FrameType if t.version == 2]
#: The frames of a later version, each as sent by the side that may send it.
V2_EXAMPLES = {
    FrameType.REGISTER_INVITE: (CLIENT, proto.RegisterInvite("dora", "password1", "q3Vd8JmT0xLbWn2Zk9aPgA",
                                                             request_id=2)),
    FrameType.LIST_CONVERSATIONS: (CLIENT, proto.ListConversations(request_id=3)),
    FrameType.CONVERSATION_LIST: (SERVER, proto.ConversationList(
        (proto.ConversationInfo(proto.Conversation.direct("bob"), 5, 1764250000000, 5, 3),), request_id=3)),
    FrameType.MEMBERSHIP: (SERVER, proto.Membership("general", "bob", proto.MembershipChange.JOINED)),
    FrameType.NODES: (SERVER, proto.Nodes((proto.NodeInfo("n1", "10.0.0.1", 7420, 7421, 1200, False),))),
    FrameType.CHANGE_PASSWORD: (CLIENT, proto.ChangePassword("password1", "password2", request_id=4)),
    FrameType.LOGOUT_ALL: (CLIENT, proto.LogoutAll(request_id=5)),
    FrameType.LIST_SESSIONS: (CLIENT, proto.ListSessions(request_id=6)),
    FrameType.SESSION_LIST: (SERVER, proto.SessionList(
        (proto.SessionInfo(7, 1764250000000, 1764336400000, True),), request_id=6)),
    FrameType.REVOKE_SESSION: (CLIENT, proto.RevokeSession(7, request_id=8)),
    FrameType.EVENTS: (SERVER, proto.Events(proto.Conversation.room("general"), (proto.ConvEvent(
        43, 1764250010000, proto.EventKind.KICK, "alice", "dave", 0, 0, proto.RoomRole.MEMBER, "spam"),))),
    FrameType.KICK: (CLIENT, proto.Kick("general", "dave", "spam", request_id=9)),
    FrameType.BAN: (CLIENT, proto.Ban("general", "dave", 0, "", request_id=10)),
    FrameType.UNBAN: (CLIENT, proto.Unban("general", "dave", request_id=11)),
    FrameType.MUTE: (CLIENT, proto.Mute("general", "bob", 1764253600000, "cool down", request_id=12)),
    FrameType.UNMUTE: (CLIENT, proto.Unmute("general", "bob", request_id=13)),
    FrameType.DELETE_MESSAGE: (CLIENT, proto.DeleteMessage(proto.Conversation.direct("bob"), 4, request_id=14)),
    FrameType.SET_TOPIC: (CLIENT, proto.SetTopic("general", "Welcome ☕", request_id=15)),
    FrameType.SET_ROLE: (CLIENT, proto.SetRole("general", "bob", proto.RoomRole.OWNER, request_id=16)),
    FrameType.CREATE_ROOM: (CLIENT, proto.CreateRoom("team", True, request_id=17)),
    FrameType.INVITE: (CLIENT, proto.Invite("team", "bob", request_id=18)),
    FrameType.GET_ROOM: (CLIENT, proto.GetRoom("team", request_id=19)),
    FrameType.ROOM_DETAILS: (SERVER, proto.RoomDetails("team", "", True, (proto.RoomMember(
        "alice", proto.RoomRole.OWNER, proto.Status.ONLINE, False, 0),), (proto.BanInfo("eve", 0),), request_id=19)),
    FrameType.EDIT_MESSAGE: (CLIENT, proto.EditMessage(proto.Conversation.room("general"), 4, "fixed", request_id=20)),
    FrameType.REACT: (CLIENT, proto.React(proto.Conversation.direct("bob"), 4, "👍", True, request_id=21)),
    FrameType.SEND_ACTION: (CLIENT, proto.SendAction(proto.Conversation.room("general"), 7, "waves", request_id=22)),
    FrameType.SET_DISPLAY_NAME: (CLIENT, proto.SetDisplayName("Zoë Martín", request_id=23)),
    FrameType.GET_USERS: (CLIENT, proto.GetUsers(("zoe", "bob"), request_id=24)),
    FrameType.USER_LIST: (SERVER, proto.UserList((proto.UserInfo("zoe", "Zoë Martín"), proto.UserInfo("bob", "")),
                                                 request_id=24)),
}


def welcome(version: int) -> proto.Welcome:
    return proto.Welcome(version, "chorus", 1 << 20, 4096, 15000, 50, 100, 100, 100, request_id=1)


def _exchange(conns: dict, steps: list) -> dict:
    for sender, event in steps:
        receiver = conns[SERVER if sender is CLIENT else CLIENT]
        receiver.receive_data(conns[sender].send(event))
        assert receiver.next_event() == event
    return conns


def unauthenticated(min_version: int, max_version: int) -> dict:
    """A client/server pair through HELLO(min, max) and the WELCOME the server picks."""
    conns = _exchange({CLIENT: Connection(CLIENT), SERVER: Connection(SERVER)}, [
        (CLIENT, proto.Hello(min_version, max_version, "test", request_id=1)),
        (SERVER, welcome(proto.negotiate(min_version, max_version))),
    ])
    assert conns[CLIENT].state is conns[SERVER].state is State.UNAUTHENTICATED
    return conns


def authenticated(min_version: int, max_version: int) -> dict:
    """A client/server pair through HELLO(min, max), the WELCOME the server picks, LOGIN and AUTH_OK."""
    conns = _exchange(unauthenticated(min_version, max_version), [
        (CLIENT, proto.Login("alice", "password1", request_id=2)),
        (SERVER, proto.AuthOk("alice", "t" * 43, 0, request_id=2)),
    ])
    assert conns[CLIENT].state is conns[SERVER].state is State.AUTHENTICATED
    return conns


def legal_pair(min_version: int, max_version: int, sender, ftype: FrameType) -> dict:
    """``authenticated``, or ``unauthenticated`` for a frame legal only before AUTH_OK (REGISTER_INVITE)."""
    if ftype in TRANSITIONS.get((State.AUTHENTICATED, sender), {}):
        return authenticated(min_version, max_version)
    assert ftype in TRANSITIONS[State.UNAUTHENTICATED, sender], ftype
    return unauthenticated(min_version, max_version)


# --- the table ---------------------------------------------------------------------------------------------------

def test_every_frame_type_has_a_version_this_implementation_speaks():
    assert (OLDEST, NEWEST) == (1, 2)
    assert all(OLDEST <= t.version <= NEWEST for t in FrameType)
    assert {t.version for t in FrameType} == set(range(OLDEST, NEWEST + 1))  # every version adds something
    assert V2_FRAMES == [FrameType.REGISTER_INVITE,
                         FrameType.LIST_CONVERSATIONS, FrameType.CONVERSATION_LIST, FrameType.MEMBERSHIP,
                         FrameType.NODES, FrameType.CHANGE_PASSWORD, FrameType.LOGOUT_ALL, FrameType.LIST_SESSIONS,
                         FrameType.SESSION_LIST, FrameType.REVOKE_SESSION,
                         FrameType.EVENTS, FrameType.KICK, FrameType.BAN, FrameType.UNBAN, FrameType.MUTE,
                         FrameType.UNMUTE, FrameType.DELETE_MESSAGE, FrameType.SET_TOPIC, FrameType.SET_ROLE,
                         FrameType.CREATE_ROOM, FrameType.INVITE, FrameType.GET_ROOM, FrameType.ROOM_DETAILS,
                         FrameType.EDIT_MESSAGE, FrameType.REACT, FrameType.SEND_ACTION,
                         FrameType.SET_DISPLAY_NAME, FrameType.GET_USERS, FrameType.USER_LIST]
    assert set(V2_EXAMPLES) == set(V2_FRAMES)


def test_the_frames_that_negotiate_are_in_every_version():
    """HELLO, WELCOME, ERROR and BYE never change (spec §6.2): they are version 1."""
    for ftype in (FrameType.HELLO, FrameType.WELCOME, FrameType.ERROR, FrameType.BYE):
        assert ftype.version == 1


@pytest.mark.parametrize("offered, chosen", [
    ((1, 1), 1), ((1, 2), 2), ((2, 2), 2), ((0, 2), 2), ((0, 1), 1), ((1, 9), NEWEST), ((2, 0xFFFF), NEWEST),
    ((0, 0), None), ((3, 4), None), ((2, 1), None), ((NEWEST + 1, 0xFFFF), None),
])
def test_negotiate_picks_the_highest_common_version(offered, chosen):
    assert proto.negotiate(*offered) == chosen


# --- negotiation through the state machine ---------------------------------------------------------------------------

@pytest.mark.parametrize("offered", [(1, 1), (1, 2), (0, 2), (2, 2), (1, 7)])
def test_both_sides_record_the_version_welcome_chose(offered):
    conns = authenticated(*offered)
    assert conns[CLIENT].version == conns[SERVER].version == proto.negotiate(*offered)


def test_before_welcome_a_connection_is_at_the_oldest_version():
    client, server = Connection(CLIENT), Connection(SERVER)
    assert client.version == server.version == OLDEST
    server.receive_data(client.send(proto.Hello(1, 2, "test")))
    server.next_event()
    assert client.version == server.version == OLDEST  # HELLO offers; only WELCOME chooses
    client.receive_data(server.send(welcome(2)))
    assert client.next_event() == welcome(2)
    assert client.version == server.version == 2


@pytest.mark.parametrize("offered, chosen", [((1, 1), 2), ((2, 2), 1), ((1, 2), 3), ((1, 2), 0)])
def test_a_welcome_outside_the_offered_range_is_unsupported_version(offered, chosen):
    server = Connection(SERVER)
    client = Connection(CLIENT)
    server.receive_data(client.send(proto.Hello(*offered, "test")))
    server.next_event()
    with pytest.raises(proto.LocalProtocolError) as info:  # our server will not send it...
        server.send(welcome(chosen))
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert server.state is State.NEGOTIATING and server.version == OLDEST
    client.receive_data(proto.encode(welcome(chosen)))  # ...and a client refuses it from another (spec §6.1 step 3)
    with pytest.raises(proto.RemoteProtocolError) as info:
        client.next_event()
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert "\n" not in str(info.value) and str(info.value).startswith("WELCOME chose version")


def test_the_version_cannot_be_set_to_one_this_implementation_does_not_speak():
    conn = Connection(CLIENT)
    for bad in (0, NEWEST + 1):
        with pytest.raises(ValueError):
            conn.version = bad


# --- frames of a later version, both ways ------------------------------------------------------------------------

@pytest.mark.parametrize("ftype", V2_FRAMES, ids=lambda t: t.name)
def test_a_version_1_connection_never_sends_a_version_2_frame(ftype):
    sender_role, event = V2_EXAMPLES[ftype]
    conns = legal_pair(1, 1, sender_role, ftype)  # in a state where version 2 would allow it
    state = conns[sender_role].state
    with pytest.raises(proto.LocalProtocolError) as info:
        conns[sender_role].send(event)
    assert info.value.code is ErrorCode.UNKNOWN_FRAME_TYPE
    assert str(info.value) == f"{ftype.name} is version 2; this connection speaks version 1"
    assert conns[sender_role].state is state  # nothing happened: the connection goes on


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("ftype", V2_FRAMES, ids=lambda t: t.name)
def test_a_version_1_connection_refuses_a_version_2_frame_from_its_header(ftype, bytewise):
    """As a peer that only knows version 1 would: UNKNOWN_FRAME_TYPE, before any body byte is read."""
    sender_role, event = V2_EXAMPLES[ftype]
    receiver = legal_pair(1, 1, sender_role, ftype)[SERVER if sender_role is CLIENT else CLIENT]
    header = proto.encode(event)[:proto.HEADER_BYTES]
    chunks = [header[i:i + 1] for i in range(len(header))] if bytewise else [header]
    for chunk in chunks[:-1]:
        receiver.receive_data(chunk)
        assert receiver.next_event() is proto.NEED_DATA
    receiver.receive_data(chunks[-1])
    with pytest.raises(proto.RemoteProtocolError) as info:
        receiver.next_event()
    assert info.value.code is ErrorCode.UNKNOWN_FRAME_TYPE
    assert str(info.value) == (f"unknown frame type 0x{int(ftype):02x} ({ftype.name} is version 2; "
                               f"this connection speaks version 1)")


@pytest.mark.parametrize("ftype", V2_FRAMES, ids=lambda t: t.name)
def test_a_version_2_connection_exchanges_version_2_frames(ftype):
    sender_role, event = V2_EXAMPLES[ftype]
    conns = legal_pair(1, 2, sender_role, ftype)
    receiver = conns[SERVER if sender_role is CLIENT else CLIENT]
    receiver.receive_data(conns[sender_role].send(event))
    assert receiver.next_event() == event


def test_a_version_2_frame_is_refused_before_welcome_even_by_a_version_2_peer():
    server = Connection(SERVER)
    server.receive_data(proto.encode(proto.ListConversations(request_id=1)))
    with pytest.raises(proto.RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.UNKNOWN_FRAME_TYPE


def test_decode_knows_every_version():
    """The stateless decoder (tools, the spec's examples) reads frames of any version."""
    for _, event in V2_EXAMPLES.values():
        assert proto.decode(proto.encode(event)) == event


def test_version_1_frames_are_unchanged_on_a_version_2_connection():
    """Version 2 only adds frames (spec §6.3): a version 1 frame has the same bytes on either connection."""
    old, new = authenticated(1, 1), authenticated(1, 2)
    for event in (proto.Join("general", request_id=5), proto.Ping(7, request_id=6),
                  proto.Send(proto.Conversation.direct("bob"), 9, "hé", request_id=7)):
        assert old[CLIENT].send(event) == new[CLIENT].send(event) == proto.encode(event)


# --- error codes of a later version (spec §7.1) -----------------------------------------------------------------

def test_a_version_1_connection_is_never_sent_an_error_code_of_version_2():
    """FORBIDDEN is version 2: a version 1 connection gets INVALID_REQUEST, a code it knows; no other code changes."""
    assert proto.ERROR_CODE_VERSION == {ErrorCode.FORBIDDEN: 2}
    assert proto.error_code_for(ErrorCode.FORBIDDEN, 1) is ErrorCode.INVALID_REQUEST
    assert proto.error_code_for(ErrorCode.FORBIDDEN, 2) is ErrorCode.FORBIDDEN
    for code in ErrorCode:
        if code is not ErrorCode.FORBIDDEN:
            assert proto.error_code_for(code, OLDEST) is proto.error_code_for(code, NEWEST) is code


# --- events check themselves -------------------------------------------------------------------------------------

def test_the_new_events_check_their_fields_when_made():
    with pytest.raises(proto.LocalProtocolError, match=r"^Membership\.user: 33 bytes > 32$"):
        proto.Membership("general", "x" * 33, proto.MembershipChange.LEFT)
    with pytest.raises(proto.LocalProtocolError, match=r"^Membership\.change: 3 is not a MembershipChange$"):
        proto.Membership("general", "bob", 3)
    with pytest.raises(proto.LocalProtocolError, match=r"^ConversationInfo\.read_seq: -1 is not in"):
        proto.ConversationInfo(proto.Conversation.room("general"), 1, 1, 1, -1)
    with pytest.raises(proto.LocalProtocolError, match=r"^ConversationList\.conversations\[1\]: expected"):
        info = proto.ConversationInfo(proto.Conversation.room("general"), 1, 1, 1, 1)
        proto.ConversationList((info, "general"))
    info = proto.ConversationInfo(proto.Conversation.room("general"), 42, 1, 40, 38)
    assert info.unread == 4 and dataclasses.replace(info, read_seq=50).unread == 0


# --- a real server --------------------------------------------------------------------------------------------------

PASSWORD = "password-1"


def open_user(port: int, name: str, **kwargs):
    from chorus import client

    options = dict(username=name, password=PASSWORD, register=True, backoff_base_s=0.05)
    options.update(kwargs)
    return client.open_client("127.0.0.1", port, **options)


async def test_the_client_library_negotiates_the_newest_version_or_the_one_it_is_told(server):
    async with open_user(server.port, "alice") as new, open_user(server.port, "bob", max_protocol_version=1) as old:
        assert (new.version, old.version) == (NEWEST, 1)
        with pytest.raises(proto.LocalProtocolError) as info:  # refused before it is written (spec §6.3)
            await old.conversations()
        assert info.value.code is ErrorCode.UNKNOWN_FRAME_TYPE
        assert [r.name for r in await old.rooms()] == []  # the connection goes on


async def test_list_conversations_gives_a_second_device_every_thread_and_its_unread_count(server):
    room = proto.Conversation.room("lobby")
    async with open_user(server.port, "alice") as alice, open_user(server.port, "bob") as bob:
        await alice.join("lobby")
        await alice.join("quiet")  # no message yet: listed last, with zeros
        await bob.join("lobby")
        for body in ("one", "two", "three"):
            await bob.send("#lobby", body)
        await bob.send("@alice", "psst")  # a direct conversation: alice never opened it herself
        await alice.mark_read("#lobby", 1)
        await alice.ping()  # a connection's frames are handled in order: the READ is stored by the PONG
        async with open_user(server.port, "alice", register=False) as phone:  # a fresh device
            listed = await phone.conversations()
    assert [info.conv for info in listed] == [proto.Conversation.direct("bob"), room,
                                              proto.Conversation.room("quiet")]
    dm, lobby, quiet = listed
    assert (dm.last_seq, dm.read_seq, dm.unread) == (1, 0, 1)
    assert (lobby.last_seq, lobby.read_seq, lobby.unread) == (3, 1, 2)
    assert dm.last_ts_ms >= lobby.last_ts_ms > 0  # the direct message is the newest
    assert (quiet.last_seq, quiet.last_ts_ms, quiet.delivered_seq, quiet.read_seq) == (0, 0, 0, 0)


async def test_membership_reaches_version_2_connections_and_never_a_version_1_one(server):
    """A version 1 connection and a version 2 client in one room (spec §5.39, §6.3): when dave joins and leaves,
    the version 2 client hears both; the version 1 connection hears nothing of it. Its own version 1 Connection
    would raise UNKNOWN_FRAME_TYPE on any version 2 frame, so everything it reads is a version 1 frame."""
    import trio
    from rawclient import RawClient

    joined, left = proto.MembershipChange.JOINED, proto.MembershipChange.LEFT
    old = await RawClient.connect(server.port)  # HELLO(1, 1): a client that only knows version 1
    await old.send(proto.Register("olga", PASSWORD, request_id=old.rid()))
    assert isinstance(await old.next(), proto.AuthOk)
    await old.send(proto.Join("lobby", request_id=old.rid()))
    assert isinstance(await old.next_of(proto.Joined), proto.Joined)
    async with open_user(server.port, "vera") as vera, open_user(server.port, "dave") as dave:
        await vera.join("lobby")
        await dave.join("lobby")
        await dave.join("lobby")  # already in: no news
        await dave.leave("lobby")
        await dave.join("lobby")
        assert await next_membership(vera) == proto.Membership("lobby", "dave", joined)
        assert await next_membership(vera) == proto.Membership("lobby", "dave", left)
        assert await next_membership(vera) == proto.Membership("lobby", "dave", joined)
        await vera.send("#lobby", "after")  # the version 1 connection reads on to this message...
        own = await events_until_message(dave)
        assert own[-1].body == "after" and not [e for e in own if isinstance(e, proto.Membership)]  # none of its own
    seen = []
    with trio.fail_after(10):
        while not seen or not isinstance(seen[-1], proto.Message):
            seen.append(await old.next())  # ...and would raise RemoteProtocolError on a version 2 frame
    assert old.conn.version == 1
    assert all(type(event).FRAME.version == 1 for event in seen), seen
    assert not any(isinstance(event, proto.Membership) for event in seen)
    await old.stream.aclose()


async def events_until_message(c, timeout_s: float = 10) -> list:
    """Every event of ``c`` up to and including the next MESSAGE."""
    import trio

    seen = []
    with trio.fail_after(timeout_s):
        async for event in c.events():
            seen.append(event)
            if isinstance(event, proto.Message):
                return seen
    raise AssertionError(f"event stream ended after {seen}")


async def next_membership(c, timeout_s: float = 10) -> proto.Membership:
    import trio

    with trio.fail_after(timeout_s):
        async for event in c.events():
            if isinstance(event, proto.Membership):
                return event
    raise AssertionError("event stream ended before a MEMBERSHIP")


async def test_a_version_1_connection_sending_list_conversations_gets_a_protocol_error(server):
    """What a server that knows only version 1 would answer: UNKNOWN_FRAME_TYPE, BYE, close (spec §6.3)."""
    from rawclient import RawClient

    raw = await RawClient.connect(server.port)  # HELLO(1, 1)
    assert raw.conn.version == 1
    await raw.send(proto.Register("zed", PASSWORD, request_id=raw.rid()))
    assert isinstance(await raw.next(), proto.AuthOk)
    await raw.send_raw(proto.encode(proto.ListConversations(request_id=raw.rid())))  # its own Connection refuses
    error = await raw.next()
    assert (type(error), error.code, error.request_id) == (proto.Error, ErrorCode.UNKNOWN_FRAME_TYPE, 0)
    assert error.message == ("unknown frame type 0x17 (LIST_CONVERSATIONS is version 2; "
                             "this connection speaks version 1)")
    bye = await raw.next()
    assert (type(bye), bye.reason) == (proto.Bye, proto.CloseReason.PROTOCOL_ERROR)
    assert isinstance(await raw.next(), proto.ConnectionClosed)


# --- schema versions (server/_store.py ``_MIGRATIONS``) ---------------------------------------------------------------

def _version_1_database(path) -> None:
    """A database as version 1 of the schema made it (``_MIGRATIONS[0]`` is that DDL, as shipped), with data."""
    from chorus.server import _store

    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(_store._MIGRATIONS[0])
    conn.executescript("""
        INSERT INTO users(id, name, password_hash) VALUES (1, 'alice', 'h1'), (2, 'bob', 'h2');
        INSERT INTO sessions(token_hash, user_id, expires_at_ms) VALUES (x'01', 1, 10), (x'02', 2, 99999999999999);
        INSERT INTO conversations(id, kind, name, last_seq) VALUES (1, 1, 'lobby', 2);
        INSERT INTO conversations(id, kind, user_lo, user_hi, last_seq) VALUES (2, 2, 1, 2, 1);
        INSERT INTO memberships(user_id, conv_id) VALUES (1, 1), (2, 1);
        INSERT INTO messages VALUES (1, 1, 1000, 2, 7, 'hi'), (1, 2, 2000, 2, 8, 'there'), (2, 1, 3000, 2, 9, 'dm');
        INSERT INTO cursors(user_id, conv_id, delivered_seq, read_seq) VALUES (1, 1, 2, 1);
        PRAGMA user_version = 1;
    """)
    conn.close()


def _schema(path) -> tuple[int, set[str]]:
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        conn.close()
    return version, names


async def test_a_version_1_database_is_migrated_at_open_and_keeps_its_data(tmp_path):
    from chorus.server import _store

    path = tmp_path / "v1.db"
    _version_1_database(path)
    assert _schema(path) == (1, _schema(path)[1]) and "sessions_expiry" not in _schema(path)[1]
    assert _store.SCHEMA_VERSION == len(_store._MIGRATIONS) >= 4  # steps 2-4 are checked below
    async with _store.open_store(path) as store:
        assert await store.purge_sessions(now_ms=1000) == 1  # the step's index at work
        assert not (await store.get_user("bob")).disabled  # step 3: existing accounts stay enabled
        assert (await store.get_session(b"\x02", 1000)).username == "bob"
        # step 4: the tokens kept have an id each, and no creation or last use known
        [bobs] = await store.list_sessions(2, 1000)
        assert (bobs.token_hash, bobs.created_ms, bobs.last_used_ms) == (b"\x02", 0, 0) and bobs.id >= 1
        listed = await store.conversation_list(1, 1000)
        assert listed == [
            proto.ConversationInfo(proto.Conversation.direct("bob"), 1, 3000, 0, 0),
            proto.ConversationInfo(proto.Conversation.room("lobby"), 2, 2000, 2, 1),
        ]
        messages, has_more = await store.messages_after(1, 0, 10)
        assert [m.body for m in messages] == ["hi", "there"] and not has_more
    assert _schema(path)[0] == _store.SCHEMA_VERSION and {"sessions_expiry", "sessions_user"} <= _schema(path)[1]
    async with _store.open_store(path) as store:  # opening a current database changes nothing
        assert await store.last_seq(1) == 2
    assert _schema(path)[0] == _store.SCHEMA_VERSION


async def test_a_migration_that_fails_leaves_the_database_at_its_version(tmp_path, monkeypatch):
    """All steps run in one transaction: a step that fails rolls back the ones before it (and the version)."""
    from chorus.server import _store

    path = tmp_path / "v1.db"
    _version_1_database(path)
    steps = _store._MIGRATIONS + ("CREATE INDEX extra ON sessions(user_id)", "CREATE TABLE broken (")
    monkeypatch.setattr(_store, "_MIGRATIONS", steps)
    monkeypatch.setattr(_store, "SCHEMA_VERSION", len(steps))
    with pytest.raises(sqlite3.OperationalError, match="incomplete input"):  # the broken step
        async with _store.open_store(path):
            pass
    version, indexes = _schema(path)
    assert version == 1 and not {"sessions_expiry", "extra"} & indexes


async def test_a_new_database_gets_every_step(tmp_path):
    from chorus.server import _store

    async with _store.open_store(tmp_path / "new.db"):
        pass
    version, indexes = _schema(tmp_path / "new.db")
    assert version == _store.SCHEMA_VERSION and "sessions_expiry" in indexes


def test_list_conversations_runs_on_keys(tmp_path):
    """The query behind LIST_CONVERSATIONS scans no table: every join is a key lookup."""
    import sqlite3

    from chorus.server import _store

    path = tmp_path / "plan.db"
    _version_1_database(path)
    conn = sqlite3.connect(path)
    try:
        for step in _store._MIGRATIONS[1:]:
            conn.executescript(step)
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT * FROM ({_store._CONVERSATIONS}) v"
            " LEFT JOIN messages m ON m.conv_id = v.id AND m.seq = v.last_seq"
            " LEFT JOIN cursors k ON k.user_id = :u AND k.conv_id = v.id", {"u": 1}).fetchall()
    finally:
        conn.close()
    scans = [row[-1] for row in plan if row[-1].startswith("SCAN") and row[-1] != "SCAN v"]  # v: the union itself
    assert scans == [], plan
