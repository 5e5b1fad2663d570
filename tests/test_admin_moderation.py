"""chorus-admin's moderation (issue 12): server-wide and per-room bans, message deletion, topics and roles, against
the SQLite file of a running server, felt by live connections within a second (server/_adminactions.py).

The console script runs in another process (``admin`` from tests/test_admin_cli.py); the connections are raw,
version 2 ones (tests/test_accounts.py), so each test sees the events as a client would: the operator's are the ones
whose actor is "".
"""
from __future__ import annotations

import json

import trio

from chorus import proto
from chorus.proto import ErrorCode, EventKind
from test_accounts import NO_DEADLINES, connect, register
from test_admin_cli import DEADLINE_S, PASSWORD, admin, closed_with, data_dir

LOBBY = proto.Conversation.room("lobby")


async def in_lobby(port: int, *names: str):
    clients = []
    for name in names:
        raw, _ = await register(port, name)
        assert isinstance(await raw.request(proto.Join, "lobby"), proto.Joined)
        clients.append(raw)
    return clients


async def operator_event(raw) -> proto.ConvEvent:
    with trio.fail_after(DEADLINE_S):
        push = await raw.next_of(proto.Events)
    (event,) = push.events
    assert event.actor == "", event  # the operator
    return event


async def test_a_server_wide_ban_closes_connections_and_refuses_logins_until_removed(start_server):
    server = await start_server(**NO_DEADLINES)
    (alice,) = await in_lobby(server.port, "alice")
    await admin("--data-dir", data_dir(server), "bans", "add", "alice", "--for", "2h")
    assert await closed_with(alice) == proto.CloseReason.LOGGED_OUT
    again = await connect(server.port)
    refused = await again.request(proto.Login, "alice", PASSWORD)
    assert (refused.code, refused.message) == (ErrorCode.AUTH_FAILED, "account disabled")
    listed = json.loads((await admin("--data-dir", data_dir(server), "--json", "bans", "list")).stdout)
    assert [(row["user"], row["room"]) for row in listed] == [("alice", "(server)")]
    assert listed[0]["until"] != "never"
    await admin("--data-dir", data_dir(server), "bans", "remove", "alice")
    assert isinstance(await again.request(proto.Login, "alice", PASSWORD), proto.AuthOk)
    not_banned = await admin("--data-dir", data_dir(server), "bans", "remove", "alice", check=False)
    assert not_banned.returncode == 1 and b"not banned" in not_banned.stderr


async def test_a_server_wide_ban_ends_by_itself(start_server):
    server = await start_server(**NO_DEADLINES)
    user = await server.store.create_user("carol", "irrelevant")
    await server.store.set_disabled(user.id, True, until_ms=1)  # a ban that ended long ago
    assert not (await server.store.get_user("carol")).disabled
    await server.store.set_disabled(user.id, True)
    assert (await server.store.get_user("carol")).disabled


async def test_a_room_ban_by_the_operator_removes_the_user_and_keeps_them_out(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await in_lobby(server.port, "alice", "bob")
    await admin("--data-dir", data_dir(server), "bans", "add", "bob", "--room", "lobby", "--reason", "spam")
    ban = await operator_event(alice)
    assert (ban.kind, ban.target, ban.text, ban.until_ms) == (EventKind.BAN, "bob", "spam", 0)
    with trio.fail_after(DEADLINE_S):
        while isinstance(await bob.request(proto.Members, "lobby"), proto.MemberList):
            await trio.sleep(0.05)  # polling the server's state: the operator's action lands within a second
    denied = await bob.request(proto.Join, "lobby")
    assert (denied.code, "banned" in denied.message) == (ErrorCode.FORBIDDEN, True)
    await admin("--data-dir", data_dir(server), "bans", "remove", "bob", "--room", "lobby")
    assert (await operator_event(alice)).kind == EventKind.UNBAN
    assert isinstance(await bob.request(proto.Join, "lobby"), proto.Joined)


async def test_the_operator_deletes_a_message_sets_the_topic_and_names_an_owner(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, bob = await in_lobby(server.port, "alice", "bob")
    said = await bob.request(proto.Send, LOBBY, 1, "something illegal")
    await admin("--data-dir", data_dir(server), "messages", "delete", "lobby", str(said.seq))
    deleted = await operator_event(alice)
    assert (deleted.kind, deleted.target_seq, deleted.target) == (EventKind.DELETE, said.seq, "bob")
    page = await alice.request(proto.History, LOBBY, proto.Direction.BEFORE, 0, 50)
    events, page = page.events, await alice.next_of(proto.HistoryPage)
    assert page.messages == () and {e.kind for e in events} == {EventKind.DELETED, EventKind.DELETE}

    await admin("--data-dir", data_dir(server), "rooms", "set-topic", "lobby", "Be kind")
    assert (await operator_event(alice)).text == "Be kind"
    await admin("--data-dir", data_dir(server), "rooms", "set-role", "lobby", "bob", "owner")
    role = await operator_event(alice)
    assert (role.kind, role.target, role.role) == (EventKind.ROLE, "bob", proto.RoomRole.OWNER)
    shown = json.loads((await admin("--data-dir", data_dir(server), "--json", "rooms", "show", "lobby")).stdout)
    assert shown["topic"] == "Be kind"
    assert {m["name"]: m["role"] for m in shown["members"]} == {"alice": "moderator", "bob": "owner"}
    missing = await admin("--data-dir", data_dir(server), "messages", "delete", "lobby", "999", check=False)
    assert missing.returncode == 1 and b"no message 999" in missing.stderr
    bad = await admin("--data-dir", data_dir(server), "bans", "add", "bob", "--for", "soon", check=False)
    assert bad.returncode == 2


async def test_registration_by_invite_takes_one_code_per_account(start_server):
    from chorus import client

    server = await start_server(registration="invite", **NO_DEADLINES)
    made = await admin("--data-dir", data_dir(server), "--json", "invites", "create", "--count", "2", "--for", "1d")
    first, second = [row["code"] for row in json.loads(made.stdout)]
    plain = await connect(server.port)
    refused = await plain.request(proto.Register, "mallory", PASSWORD)
    assert (refused.code, "invite" in refused.message) == (ErrorCode.INVALID_REQUEST, True)
    wrong = await plain.request(proto.RegisterInvite, "mallory", PASSWORD, "not-a-code")
    assert wrong.code == ErrorCode.AUTH_FAILED
    hashed = server.passwords.hashed
    ok = await plain.request(proto.RegisterInvite, "dora", PASSWORD, first)
    assert isinstance(ok, proto.AuthOk)
    again = await connect(server.port)
    used = await again.request(proto.RegisterInvite, "eve", PASSWORD, first)  # one account per code
    assert (used.code, used.message) == (ErrorCode.AUTH_FAILED, "invite code unknown, used or expired")
    assert server.passwords.hashed - hashed == 1  # no hash spent on a code that cannot work
    async with client.open_client("127.0.0.1", server.port, username="fred", password=PASSWORD, register=True,
                                  invite=second) as fred:
        assert fred.username == "fred"
    listed = json.loads((await admin("--data-dir", data_dir(server), "--json", "invites", "list")).stdout)
    assert sorted(row["used_by"] for row in listed) == ["dora", "fred"]
    spare = json.loads((await admin("--data-dir", data_dir(server), "--json", "invites", "create")).stdout)
    assert len(spare) == 1
    listed = json.loads((await admin("--data-dir", data_dir(server), "--json", "invites", "list")).stdout)
    await admin("--data-dir", data_dir(server), "invites", "revoke", str(listed[-1]["id"]))
    gone = await again.request(proto.RegisterInvite, "gail", PASSWORD, spare[0]["code"])
    assert gone.code == ErrorCode.AUTH_FAILED


async def test_backup_copies_the_live_database_to_a_private_file(start_server, tmp_path):
    import sqlite3
    import stat

    server = await start_server(**NO_DEADLINES)
    (alice,) = await in_lobby(server.port, "alice")
    for i in range(1, 11):
        assert isinstance(await alice.request(proto.Send, LOBBY, i, f"message {i}"), proto.Ack)
    dest = tmp_path / "copy.db"
    await admin("--data-dir", data_dir(server), "backup", str(dest))
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    copy = sqlite3.connect(dest)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT count(*) FROM messages").fetchone() == (10,)
    finally:
        copy.close()
    assert isinstance(await alice.request(proto.Send, LOBBY, 99, "still writing"), proto.Ack)
    again = await admin("--data-dir", data_dir(server), "backup", str(dest), check=False)
    assert again.returncode == 1 and b"exists" in again.stderr
