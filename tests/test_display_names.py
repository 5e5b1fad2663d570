"""Display names (issue 13, protocol version 2, spec §9.17): Unicode names beside the ASCII login name, none looking
like another user's name, over real sockets; the store's side on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest

from chorus import proto
from chorus.proto import ErrorCode
from chorus.server._displaynames import DisplayNameRefused, normalized, skeleton
from test_accounts import NO_DEADLINES, register
from test_moderation import ok, refused
import test_store
from test_store import make_users

backend, store = test_store.backend, test_store.store


@pytest.mark.parametrize("text", ["", "Zoë", "Alice 🌸", "李雷", "رضا‌ها", "👨‍👩‍👧 family"])
def test_names_people_use_are_kept(text):
    assert normalized(text) == text


@pytest.mark.parametrize("text", [" alice", "alice ", "a\u202eb", "x\x07", "line\nbreak", "🌸", "x" * 33])
def test_controls_overrides_spaces_at_the_ends_and_empty_skeletons_are_refused(text):
    with pytest.raises(DisplayNameRefused):
        normalized(text)


def test_look_alikes_share_a_skeleton():
    assert {skeleton(t) for t in ["alice", "ALICE", "аlice", "a.l.i.c.e", "a1ice", "Alice!"]} == {"alice"}
    assert skeleton("alicia") != skeleton("alice")


async def test_set_and_get_display_names_and_no_impersonation(start_server):
    server = await start_server(**NO_DEADLINES)
    alice, _ = await register(server.port, "alice")
    mallory, _ = await register(server.port, "mallory")
    await ok(alice, proto.SetDisplayName, "Alice 🌸")
    for fake in ("аlice", "ALICE", "a1ice", "Alice 🌼"):  # Cyrillic а; the skeleton of alice's name or display name
        denied = await refused(mallory, ErrorCode.INVALID_NAME, proto.SetDisplayName, fake)
        assert "looks like alice" in denied.message
    await refused(mallory, ErrorCode.INVALID_NAME, proto.SetDisplayName, "bad\u202ename")
    await ok(mallory, proto.SetDisplayName, "Mallory")
    listed = await alice.request(proto.GetUsers, ("mallory", "nobody", "alice"))
    assert listed.users == (proto.UserInfo("mallory", "Mallory"), proto.UserInfo("alice", "Alice 🌸"))
    await ok(alice, proto.SetDisplayName, "")  # cleared: the name is free again
    await ok(mallory, proto.SetDisplayName, "Alicia")
    assert (await alice.request(proto.GetUsers, ("alice",))).users == (proto.UserInfo("alice", ""),)


async def test_the_store_refuses_a_display_name_like_another_one(store):
    alice, bob = await make_users(store, "alice", "bob")
    await store.set_display_name(alice.id, "Zoë")
    with pytest.raises(DisplayNameRefused):
        await store.set_display_name(bob.id, "ZOË")
    with pytest.raises(DisplayNameRefused):
        await store.set_display_name(bob.id, "Alice")  # alice's login name
    await store.set_display_name(bob.id, "Bob the builder")
    assert await store.display_names(["bob", "alice", "x"]) == [proto.UserInfo("bob", "Bob the builder"),
                                                               proto.UserInfo("alice", "Zoë")]


async def test_the_client_library_sets_and_reads_display_names(start_server):
    from chorus import client

    server = await start_server(**NO_DEADLINES)
    async with client.open_client("127.0.0.1", server.port, username="dora", password="correct horse",
                                  register=True) as dora:
        await dora.set_display_name("Dora ✨")
        assert await dora.display_names(["dora", "ghost"]) == {"dora": "Dora ✨"}
