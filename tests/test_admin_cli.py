"""chorus-admin (server/_admin_cli.py) as an operator runs it: the real console script in another process, against
the SQLite file a running server uses; its changes reach live connections within a second (server/_adminactions.py).
"""
from __future__ import annotations

import json
import os
import sys

import trio

from chorus import proto
from rawclient import RawClient, alice_and_bob_in_lobby

PASSWORD = "correct horse"
#: The server polls once a second; a change must reach live connections well within this.
DEADLINE_S = 5


async def admin(*args: str, password: str | None = None, check: bool = True) -> trio.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "CHORUS_PASSWORD"}
    if password is not None:
        env["CHORUS_PASSWORD"] = password
    result = await trio.run_process([sys.executable, "-m", "chorus.server._admin_cli", *args], capture_stdout=True,
                                    capture_stderr=True, check=False, env=env, stdin=b"")
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result


def data_dir(server) -> str:
    return server.config.data_dir


async def closed_with(client: RawClient) -> proto.CloseReason | None:
    """Wait (bounded) for the server to end the connection; the BYE reason it gave."""
    with trio.fail_after(DEADLINE_S):
        events = await client.drain_until_closed()
    return next((e.reason for e in events if isinstance(e, proto.Bye)), None)


async def login(port: int, name: str, password: str = PASSWORD):
    client = await RawClient.connect(port)
    return await client.request(proto.Login, name, password)


async def resume(port: int, token: str):
    client = await RawClient.connect(port)
    return await client.request(proto.Resume, token)


async def test_disable_closes_live_connections_and_refuses_login_until_enabled(server):
    alice = await RawClient.connect(server.port)
    token = (await alice.register("alice", PASSWORD)).token
    await alice.go_live()
    await admin("--data-dir", data_dir(server), "users", "disable", "alice")
    assert await closed_with(alice) == proto.CloseReason.LOGGED_OUT
    for reply in (await login(server.port, "alice"), await resume(server.port, token)):
        assert isinstance(reply, proto.Error) and reply.code == proto.ErrorCode.AUTH_FAILED, reply
        assert reply.message == "account disabled"
    wrong = await login(server.port, "alice", "wrong password")  # disabled is told only with the password
    assert isinstance(wrong, proto.Error) and wrong.message != "account disabled"
    taken = await RawClient.connect(server.port)
    reply = await taken.request(proto.Register, "alice", PASSWORD)
    assert isinstance(reply, proto.Error) and reply.code == proto.ErrorCode.USERNAME_TAKEN
    listed = json.loads((await admin("--data-dir", data_dir(server), "--json", "users", "list")).stdout)
    assert listed == [{"name": "alice", "id": 1, "status": "disabled"}]

    await admin("--data-dir", data_dir(server), "users", "enable", "alice")
    assert isinstance(await login(server.port, "alice"), proto.AuthOk)
    assert isinstance(await resume(server.port, token), proto.AuthOk)


async def test_revoke_sessions_and_reset_password(server):
    alice = await RawClient.connect(server.port)
    token = (await alice.register("alice", PASSWORD)).token
    await admin("--data-dir", data_dir(server), "users", "revoke-sessions", "alice")
    assert await closed_with(alice) == proto.CloseReason.LOGGED_OUT
    reply = await resume(server.port, token)
    assert isinstance(reply, proto.Error) and reply.code == proto.ErrorCode.INVALID_TOKEN

    second = await RawClient.connect(server.port)
    assert isinstance(await second.request(proto.Login, "alice", PASSWORD), proto.AuthOk)
    result = await admin("--data-dir", data_dir(server), "users", "reset-password", "alice", password="new secret")
    assert result.stdout.decode().strip() == "password reset: alice (1 sessions revoked)"
    assert await closed_with(second) == proto.CloseReason.LOGGED_OUT
    old = await login(server.port, "alice", PASSWORD)
    assert isinstance(old, proto.Error) and old.code == proto.ErrorCode.AUTH_FAILED
    assert isinstance(await login(server.port, "alice", "new secret"), proto.AuthOk)


async def test_create_then_login(server):
    result = await admin("--data-dir", data_dir(server), "users", "create", "carol", password="carol's secret")
    assert result.stdout.decode().strip() == "created: carol"
    assert isinstance(await login(server.port, "carol", "carol's secret"), proto.AuthOk)
    short = await admin("--data-dir", data_dir(server), "users", "create", "dave", password="short", check=False)
    assert short.returncode == 1
    assert short.stderr.decode() == f"chorus-admin: error: passwords are {proto.PASSWORD_RULE} (this one is 5)\n"


async def test_rooms_list_and_delete_unsubscribes_members(server):
    alice, bob = await alice_and_bob_in_lobby(*[await RawClient.connect(server.port) for _ in range(2)])
    lobby = proto.Conversation.room("lobby")
    assert isinstance(await alice.request(proto.Send, lobby, 1, "hello"), proto.Ack)
    text = (await admin("--data-dir", data_dir(server), "rooms", "list")).stdout.decode()
    assert text.splitlines() == ["NAME   MEMBERS  MESSAGES", "lobby        2         1"]

    await admin("--data-dir", data_dir(server), "rooms", "delete", "lobby")
    listed = json.loads((await admin("--data-dir", data_dir(server), "--json", "rooms", "list")).stdout)
    assert listed == []
    # The server applies the deletion at its next poll: until then a SEND may still be taken (and fail in the store).
    with trio.fail_after(DEADLINE_S):
        client_msg_id = 2
        while True:
            reply = await bob.request(proto.Send, lobby, client_msg_id, "still here?")
            if isinstance(reply, proto.Error) and reply.code == proto.ErrorCode.NOT_MEMBER:
                break
            client_msg_id += 1
            await trio.sleep(0.05)
    reply = await alice.request(proto.Members, "lobby")
    assert isinstance(reply, proto.Error), reply


async def test_operator_mistakes_are_one_line(server, tmp_path):
    unknown = await admin("--data-dir", data_dir(server), "users", "disable", "nobody", check=False)
    assert (unknown.returncode, unknown.stderr.decode()) == (1, "chorus-admin: error: no user 'nobody'\n")
    missing = await admin("--data-dir", str(tmp_path / "elsewhere"), "users", "list", check=False)
    assert missing.returncode == 1 and missing.stderr.decode().count("\n") == 1
    unreachable = await admin("--store", "postgresql://admin:hunter2@127.0.0.1:1/chorus", "users", "list",
                              check=False)
    err = unreachable.stderr.decode()
    assert unreachable.returncode == 1 and err.startswith("chorus-admin: error: cannot open ") and err.count("\n") == 1
    assert "hunter2" not in err and "Traceback" not in err
    usage = await admin("users", "frobnicate", check=False)
    assert usage.returncode == 2 and usage.stderr.decode().count("\n") == 1


async def test_against_postgresql(tmp_path):
    from test_store import pg_database

    with pg_database() as url:
        created = await admin("--store", url, "users", "create", "alice", password=PASSWORD)
        assert created.stdout.decode().strip() == "created: alice"
        await admin("--store", url, "users", "disable", "alice")
        listed = json.loads((await admin("--store", url, "--json", "users", "list")).stdout)
        assert listed == [{"name": "alice", "id": 1, "status": "disabled"}]
