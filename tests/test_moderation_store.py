"""Roles, moderation and private rooms in the Store port (spec §9.15), against both stores: SQLite (a real file in
tmp_path) and PostgreSQL (a fresh database per test), through test_store.py's ``backend`` and ``store`` fixtures.

What is checked is what the store promises the session: the creator owns a room and joiners are members; each action's
permission rules (server/_moderation.py) with nothing stored when they refuse; events take the conversation's next
seq, gapless with the messages around them; a deleted message becomes a DELETED event at its seq (its text gone from
every page) and its SEND's retry is still a duplicate; bans, mutes, private rooms and invitations; what ROOM_DETAILS
shows to whom; the operator's tools: an account disabled until a time (a server-wide ban), one-time invite codes.
"""
from __future__ import annotations

import pytest

from chorus.proto import BanInfo, ConvKind, ErrorCode, EventKind, RoomInfo, RoomRole, StoredMessage
from chorus.server._invites import InviteInvalid, code_hash, new_code
from chorus.server._moderation import TOMBSTONE_BODY, Moderation, Refused, Unchanged, now_ms
from chorus.server._ports import ConvRow, NameTaken, RoomExists, TooManyRooms
import test_store
from test_store import make_users, msg

#: test_store.py's fixtures, here too: each test runs on SQLite and on PostgreSQL. (Bound by assignment, not
#: imported by name, so that the tests' ``store`` parameters do not read as redefinitions of an unused import.)
backend, store = test_store.backend, test_store.store

MEMBER, MODERATOR, OWNER = RoomRole.MEMBER, RoomRole.MODERATOR, RoomRole.OWNER


async def room(store, creator, name="lobby", *, private=None, members=()):
    """Room ``name`` created by ``creator`` (its owner), joined by ``members``: its conversation id."""
    conv_id, created = await store.join_room(creator.id, name, max_rooms=100, private=private)
    assert created
    for user in members:
        assert await store.join_room(user.id, name, max_rooms=100) == (conv_id, True)
    return conv_id


async def act(store, kind, conv_id, actor, target=None, **fields):
    """``actor`` (None: the operator) does ``kind`` to ``target`` in ``conv_id``: what the store applied."""
    return await store.moderate(Moderation(kind, conv_id, None if actor is None else actor.id,
                                           None if target is None else target.id, **fields))


async def refused(store, code, kind, conv_id, actor, target=None, **fields):
    """The action is refused with ``code`` and stores nothing: the conversation's seq and its room stay as they were."""
    before = (await store.last_seq(conv_id), await store.members(conv_id), await store.messages_after(conv_id, 0, 100))
    with pytest.raises(Refused) as info:
        await act(store, kind, conv_id, actor, target, **fields)
    assert info.value.code == code, info.value
    after = (await store.last_seq(conv_id), await store.members(conv_id), await store.messages_after(conv_id, 0, 100))
    assert after == before
    return info.value


async def roles(store, conv_id, viewer):
    _, _, members, _ = await store.room_details(conv_id, viewer.id)
    return {name: role for _, name, role, _ in members}


async def entries(store, conv_id):
    page, has_more = await store.messages_after(conv_id, 0, 1000)
    assert not has_more
    return page


# -- roles ------------------------------------------------------------------------------------------------------------

async def test_the_creator_owns_the_room_and_joiners_are_members(store):
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    lobby = await room(store, alice, members=[bob])
    assert await roles(store, lobby, alice) == {"alice": OWNER, "bob": MEMBER}
    # A rejoin changes nothing; CREATE_ROOM of a taken name is refused, for a member too, and creates nothing.
    assert await store.join_room(bob.id, "lobby", max_rooms=100) == (lobby, False)
    for user in (carol, alice):
        with pytest.raises(RoomExists):
            await store.join_room(user.id, "lobby", max_rooms=100, private=False)
    assert await roles(store, lobby, alice) == {"alice": OWNER, "bob": MEMBER}
    # CREATE_ROOM counts against the room limit like a JOIN that creates.
    with pytest.raises(TooManyRooms):
        await store.join_room(carol.id, "other", max_rooms=0, private=True)
    assert await store.room("other", create=False) is None
    # A room from before roles (made without a JOIN) has no owner: its first member is a member.
    old = await store.room("old", create=True)
    assert await store.join_room(carol.id, "old", max_rooms=100) == (old, True)
    assert await roles(store, old, carol) == {"carol": MEMBER}
    await refused(store, ErrorCode.FORBIDDEN, EventKind.TOPIC, old, carol, text="mine")
    # The operator names an owner.
    await act(store, EventKind.ROLE, old, None, carol, role=OWNER)
    assert await roles(store, old, carol) == {"carol": OWNER}


async def test_who_may_kick_whom(store):
    owner, mod, mod2, bob, carol, dave = await make_users(store, "owner", "mod", "mod2", "bob", "carol", "dave")
    lobby = await room(store, owner, members=[mod, mod2, bob, carol])
    for user in (mod, mod2):
        await act(store, EventKind.ROLE, lobby, owner, user, role=MODERATOR)
    assert await roles(store, lobby, bob) == {
        "owner": OWNER, "mod": MODERATOR, "mod2": MODERATOR, "bob": MEMBER, "carol": MEMBER}
    # a member kicks no one; a moderator neither the owner nor another moderator (nor itself)
    await refused(store, ErrorCode.FORBIDDEN, EventKind.KICK, lobby, bob, carol)
    for target in (owner, mod2, mod):
        await refused(store, ErrorCode.FORBIDDEN, EventKind.KICK, lobby, mod, target)
    # not in the room: the actor (NOT_MEMBER), the target (NOT_FOUND)
    await refused(store, ErrorCode.NOT_MEMBER, EventKind.KICK, lobby, dave, bob)
    await refused(store, ErrorCode.NOT_FOUND, EventKind.KICK, lobby, mod, dave)
    # a moderator kicks a member; the owner kicks a moderator
    seq = await store.last_seq(lobby)
    applied = await act(store, EventKind.KICK, lobby, mod, bob, text="spam")
    assert applied.removed_id == bob.id and applied.conv_id == lobby
    assert (applied.event.seq, applied.event.kind, applied.event.actor, applied.event.target, applied.event.text) == (
        seq + 1, EventKind.KICK, "mod", "bob", "spam")
    assert (await act(store, EventKind.KICK, lobby, owner, mod2)).removed_id == mod2.id
    assert not await store.is_member(bob.id, lobby) and not await store.is_member(mod2.id, lobby)
    assert await store.last_seq(lobby) == seq + 2
    # a kicked user may come back to a public room, as a member
    assert await store.join_room(mod2.id, "lobby", max_rooms=100) == (lobby, True)
    assert (await roles(store, lobby, owner))["mod2"] == MEMBER


async def test_only_the_owner_gives_roles_and_handing_over_demotes_the_old_owner(store):
    owner, mod, bob, carol = await make_users(store, "owner", "mod", "bob", "carol")
    lobby = await room(store, owner, members=[mod, bob])
    await act(store, EventKind.ROLE, lobby, owner, mod, role=MODERATOR)
    await refused(store, ErrorCode.FORBIDDEN, EventKind.ROLE, lobby, mod, bob, role=MODERATOR)
    await refused(store, ErrorCode.FORBIDDEN, EventKind.ROLE, lobby, bob, bob, role=MODERATOR)
    await refused(store, ErrorCode.FORBIDDEN, EventKind.ROLE, lobby, owner, owner, role=MEMBER)
    await refused(store, ErrorCode.NOT_FOUND, EventKind.ROLE, lobby, owner, carol, role=MODERATOR)
    applied = await act(store, EventKind.ROLE, lobby, owner, bob, role=OWNER)
    assert (applied.event.kind, applied.event.target, applied.event.role) == (EventKind.ROLE, "bob", OWNER)
    assert await roles(store, lobby, bob) == {"owner": MODERATOR, "mod": MODERATOR, "bob": OWNER}
    # the old owner is a moderator now: it may no longer give roles, nor kick its peer
    await refused(store, ErrorCode.FORBIDDEN, EventKind.ROLE, lobby, owner, mod, role=MEMBER)
    await refused(store, ErrorCode.FORBIDDEN, EventKind.KICK, lobby, owner, mod)
    await act(store, EventKind.ROLE, lobby, bob, owner, role=MEMBER)
    assert (await roles(store, lobby, bob))["owner"] == MEMBER


async def test_moderation_is_for_rooms(store):
    alice, bob = await make_users(store, "alice", "bob")
    dm = await store.direct(alice.id, bob.id)
    await refused(store, ErrorCode.INVALID_REQUEST, EventKind.KICK, dm, alice, bob)
    await refused(store, ErrorCode.INVALID_REQUEST, EventKind.TOPIC, dm, alice, text="ours")
    with pytest.raises(Refused) as info:
        await act(store, EventKind.KICK, 10**9, alice, bob)
    assert info.value.code == ErrorCode.NOT_FOUND


# -- events and seqs --------------------------------------------------------------------------------------------------

async def test_events_take_gapless_seqs_between_messages(store):
    alice, bob = await make_users(store, "alice", "bob")
    lobby = await room(store, alice, members=[bob])
    first = await store.append(msg(lobby, bob, 1))
    topic = await act(store, EventKind.TOPIC, lobby, alice, text="Welcome ✓")
    second = await store.append(msg(lobby, alice, 1))
    mute = await act(store, EventKind.MUTE, lobby, alice, bob, until_ms=0, text="calm down")
    third = await store.append(msg(lobby, bob, 2))
    assert [first.seq, topic.event.seq, second.seq, mute.event.seq, third.seq] == [1, 2, 3, 4, 5]
    assert await store.last_seq(lobby) == 5
    page = await entries(store, lobby)
    assert [e.seq for e in page] == [1, 2, 3, 4, 5]
    assert page[1] == topic.event and page[3] == mute.event
    assert isinstance(page[0], StoredMessage) and page[0].body == "bob-1"
    assert (page[1].kind, page[1].actor, page[1].text) == (EventKind.TOPIC, "alice", "Welcome ✓")
    # pages of either direction count both, in seq order, with has_more
    assert await store.messages_after(lobby, 1, 2) == (page[1:3], True)
    assert await store.messages_after(lobby, 3, 2) == (page[3:5], False)
    assert await store.messages_before(lobby, 0, 2) == (page[3:5], True)
    assert await store.messages_before(lobby, 4, 3) == (page[0:3], False)
    assert await store.messages_before(lobby, 2**64 - 1, 1) == (page[4:5], True)
    assert (await store.room_details(lobby, bob.id))[0] == "Welcome ✓"


async def test_a_deleted_message_leaves_a_tombstone_at_its_seq_and_its_retry_stays_a_duplicate(store):
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    lobby = await room(store, alice, members=[bob, carol])
    secret = await store.append(msg(lobby, bob, 7, "my secret words"))
    other = await store.append(msg(lobby, carol, 1, "carol's words"))
    # a member deletes only its own messages; nothing else is a message to delete
    await refused(store, ErrorCode.FORBIDDEN, EventKind.DELETE, lobby, carol, target_seq=secret.seq)
    topic = await act(store, EventKind.TOPIC, lobby, alice, text="t")
    for seq in (topic.event.seq, 99):
        await refused(store, ErrorCode.NOT_FOUND, EventKind.DELETE, lobby, alice, target_seq=seq)
    applied = await act(store, EventKind.DELETE, lobby, bob, target_seq=secret.seq)
    tombstone, delete = applied.tombstone, applied.event
    assert (tombstone.seq, tombstone.ts_ms, tombstone.kind, tombstone.actor, tombstone.target) == (
        secret.seq, secret.ts_ms, EventKind.DELETED, "bob", "bob")
    assert (delete.seq, delete.kind, delete.actor, delete.target, delete.target_seq) == (
        topic.event.seq + 1, EventKind.DELETE, "bob", "bob", secret.seq)
    page = await entries(store, lobby)
    assert [e.seq for e in page] == [1, 2, 3, 4] and page[0] == tombstone and page[3] == delete
    for before in (0, 2, 5):
        older, _ = await store.messages_before(lobby, before, 10)
        assert older[0] == tombstone
    assert "secret" not in repr(page)
    # deleted once: a second DELETE finds no message there
    await refused(store, ErrorCode.NOT_FOUND, EventKind.DELETE, lobby, alice, target_seq=secret.seq)
    # the SEND's retry is still a duplicate (its seq, no new one), with the text gone
    retry = await store.append(msg(lobby, bob, 7, "my secret words"))
    assert retry.duplicate and retry.seq == secret.seq and "secret" not in retry.body
    assert retry.body == TOMBSTONE_BODY and await store.last_seq(lobby) == 4
    # a moderator deletes anyone's message; the tombstone names who deleted and whose it was
    applied = await act(store, EventKind.DELETE, lobby, alice, target_seq=other.seq)
    assert (applied.tombstone.actor, applied.tombstone.target, applied.event.target) == ("alice", "carol", "carol")
    # in a direct conversation, each deletes their own messages only
    dm = await store.direct(bob.id, carol.id)
    mine = await store.append(msg(dm, carol, 2, "direct words"))
    await refused(store, ErrorCode.FORBIDDEN, EventKind.DELETE, dm, bob, target_seq=mine.seq)
    applied = await act(store, EventKind.DELETE, dm, carol, target_seq=mine.seq)
    assert applied.conv.kind == ConvKind.DIRECT
    assert [e.kind for e in await entries(store, dm)] == [EventKind.DELETED, EventKind.DELETE]


async def test_a_conversation_whose_newest_entry_is_an_event_lists_with_the_events_time(store):
    alice, bob = await make_users(store, "alice", "bob")
    quiet, busy = await room(store, alice, "quiet"), await room(store, alice, "busy", members=[bob])
    await store.append(msg(quiet, alice, 1, ts_ms=2000))
    await store.append(msg(busy, bob, 1, ts_ms=1000))
    topic = await act(store, EventKind.TOPIC, busy, alice, text="news")
    listed = await store.conversation_list(alice.id, 10)
    assert [(c.conv.name, c.last_seq, c.last_ts_ms) for c in listed] == [
        ("busy", 2, topic.event.ts_ms), ("quiet", 1, 2000)]


# -- bans, mutes, private rooms ---------------------------------------------------------------------------------------

async def test_a_ban_removes_and_keeps_out_until_unban_and_an_expired_one_does_not(store):
    owner, mod, bob, carol = await make_users(store, "owner", "mod", "bob", "carol")
    lobby = await room(store, owner, members=[mod, bob])
    await act(store, EventKind.ROLE, lobby, owner, mod, role=MODERATOR)
    await refused(store, ErrorCode.FORBIDDEN, EventKind.BAN, lobby, bob, carol)
    await refused(store, ErrorCode.FORBIDDEN, EventKind.BAN, lobby, mod, owner)
    await refused(store, ErrorCode.NOT_FOUND, EventKind.UNBAN, lobby, mod, bob)  # not banned
    applied = await act(store, EventKind.BAN, lobby, mod, bob, text="spam")
    assert applied.removed_id == bob.id and (applied.event.kind, applied.event.until_ms) == (EventKind.BAN, 0)
    assert not await store.is_member(bob.id, lobby)
    with pytest.raises(Refused) as info:
        await store.join_room(bob.id, "lobby", max_rooms=100)
    assert info.value.code == ErrorCode.FORBIDDEN
    # a pre-emptive ban of a non-member; INVITE of a banned user is refused too
    assert (await act(store, EventKind.BAN, lobby, mod, carol, until_ms=now_ms() + 3_600_000)).removed_id is None
    await refused(store, ErrorCode.FORBIDDEN, EventKind.INVITE, lobby, mod, carol)
    with pytest.raises(Refused):
        await store.join_room(carol.id, "lobby", max_rooms=100)
    assert await store.members(lobby) == [(mod.id, "mod"), (owner.id, "owner")]
    await act(store, EventKind.UNBAN, lobby, mod, bob)
    assert await store.join_room(bob.id, "lobby", max_rooms=100) == (lobby, True)
    # a ban whose until_ms has passed holds no more: it can be neither lifted nor felt
    await act(store, EventKind.BAN, lobby, owner, carol, until_ms=now_ms() - 1)
    await refused(store, ErrorCode.NOT_FOUND, EventKind.UNBAN, lobby, owner, carol)
    assert await store.join_room(carol.id, "lobby", max_rooms=100) == (lobby, True)
    kinds = [e.kind for e in await entries(store, lobby) if not isinstance(e, StoredMessage)]
    assert kinds == [EventKind.ROLE, EventKind.BAN, EventKind.BAN, EventKind.UNBAN, EventKind.BAN]


async def test_private_rooms_are_hidden_and_invite_only(store):
    owner, mod, bob, carol = await make_users(store, "owner", "mod", "bob", "carol")
    hidden = await room(store, owner, "hidden", private=True)
    public = await room(store, carol, "public", private=False)
    assert await store.list_rooms(bob.id, 100) == [RoomInfo("public", 1, 0, False)]
    assert await store.list_rooms(owner.id, 100) == [RoomInfo("hidden", 1, 0, True), RoomInfo("public", 1, 0, False)]
    with pytest.raises(Refused) as info:
        await store.join_room(bob.id, "hidden", max_rooms=100)
    assert info.value.code == ErrorCode.FORBIDDEN and await store.members(hidden) == [(owner.id, "owner")]
    # a member invites no one; a moderator or the owner does, and the invited user is a member who sees the room
    applied = await act(store, EventKind.INVITE, hidden, owner, mod)
    assert applied.added_id == mod.id and applied.event.target == "mod"
    await refused(store, ErrorCode.FORBIDDEN, EventKind.INVITE, hidden, mod, bob)
    await act(store, EventKind.ROLE, hidden, owner, mod, role=MODERATOR)
    await act(store, EventKind.INVITE, hidden, mod, bob)
    await refused(store, ErrorCode.INVALID_REQUEST, EventKind.INVITE, hidden, mod, bob)  # already in
    assert (await roles(store, hidden, bob))["bob"] == MEMBER
    assert await store.list_rooms(bob.id, 100) == [RoomInfo("hidden", 3, 3, True), RoomInfo("public", 1, 0, False)]
    assert await store.list_rooms(carol.id, 100) == [RoomInfo("public", 1, 0, True)]
    details = await store.room_details(hidden, bob.id)
    assert details[1] is True and (await store.room_details(public, carol.id))[1] is False
    # INVITE counts against the invited user's room limit
    with pytest.raises(TooManyRooms):
        await act(store, EventKind.INVITE, hidden, owner, carol, max_rooms=1)
    assert not await store.is_member(carol.id, hidden)


async def test_a_mute_shows_in_the_users_conversations_until_unmute(store):
    owner, bob = await make_users(store, "owner", "bob")
    lobby = await room(store, owner, members=[bob])
    await refused(store, ErrorCode.FORBIDDEN, EventKind.MUTE, lobby, bob, owner)
    await refused(store, ErrorCode.NOT_FOUND, EventKind.UNMUTE, lobby, owner, bob)
    until = now_ms() + 60_000
    applied = await act(store, EventKind.MUTE, lobby, owner, bob, until_ms=until, text="calm")
    assert (applied.event.kind, applied.event.until_ms, applied.event.text) == (EventKind.MUTE, until, "calm")
    assert await store.conversations(bob.id) == [ConvRow(lobby, ConvKind.ROOM, "lobby", 1, None, until)]
    assert (await store.conversations(owner.id))[0].muted_until_ms is None
    _, _, members, _ = await store.room_details(lobby, owner.id)
    assert [(name, mute) for _, name, _, mute in members] == [("bob", until), ("owner", None)]
    await act(store, EventKind.MUTE, lobby, owner, bob, until_ms=0)  # again, without expiry
    assert (await store.conversations(bob.id))[0].muted_until_ms == 0
    await act(store, EventKind.UNMUTE, lobby, owner, bob)
    assert await store.conversations(bob.id) == [ConvRow(lobby, ConvKind.ROOM, "lobby", 3, None, None)]
    await refused(store, ErrorCode.NOT_FOUND, EventKind.UNMUTE, lobby, owner, bob)


async def test_room_details_show_bans_to_moderators_only(store):
    owner, mod, bob, carol = await make_users(store, "owner", "mod", "bob", "carol")
    lobby = await room(store, owner, members=[mod, bob])
    await act(store, EventKind.ROLE, lobby, owner, mod, role=MODERATOR)
    await act(store, EventKind.TOPIC, lobby, mod, text="rules")
    await act(store, EventKind.BAN, lobby, mod, carol, until_ms=0)
    await act(store, EventKind.BAN, lobby, mod, bob, until_ms=now_ms() - 1)  # over already: not listed
    for viewer in (owner, mod):
        topic, private, members, bans = await store.room_details(lobby, viewer.id)
        assert (topic, private, [b.user for b in bans], [b.until_ms for b in bans]) == ("rules", False, ["carol"], [0])
        assert [(uid, name, role) for uid, name, role, _ in members] == [
            (mod.id, "mod", MODERATOR), (owner.id, "owner", OWNER)]
    await store.join_room(bob.id, "lobby", max_rooms=100)
    assert await store.room_details(lobby, bob.id) == ("rules", False, [
        (bob.id, "bob", MEMBER, None), (mod.id, "mod", MODERATOR, None), (owner.id, "owner", OWNER, None)], [])
    assert (await store.room_details(lobby, carol.id))[3] == []  # not even a member
    assert await store.room_bans(lobby) == [BanInfo("carol", 0)]  # the operator's view


async def test_deleting_a_room_takes_its_events_and_sanctions_with_it(store):
    owner, bob = await make_users(store, "owner", "bob")
    lobby = await room(store, owner, members=[bob])
    await store.append(msg(lobby, bob, 1))
    await act(store, EventKind.MUTE, lobby, owner, bob)
    await act(store, EventKind.BAN, lobby, owner, bob)
    assert await store.delete_room("lobby") == lobby
    # a room of the same name is a new one (SQLite may even reuse the id): no events, no ban, no mute
    again = await room(store, owner, members=[bob])
    assert await entries(store, again) == [] and await store.last_seq(again) == 0
    assert (await store.conversations(bob.id))[0].muted_until_ms is None


async def test_a_server_wide_ban_disables_the_account_until_it_ends(store):
    alice, bob = await make_users(store, "alice", "bob")
    await store.add_session(b"\x01" * 32, alice.id, 2**62)
    until = now_ms() + 60_000
    assert await store.set_disabled(alice.id, True, until_ms=until)
    for row in (await store.get_user("alice"), await store.get_user_by_id(alice.id), (await store.list_users())[0]):
        assert (row.name, row.disabled, row.disabled_until_ms) == ("alice", True, until)
    assert (await store.get_session(b"\x01" * 32, now_ms=0)).disabled
    # over already: the account reads as enabled; enabling clears the time
    assert await store.set_disabled(alice.id, True, until_ms=now_ms() - 1)
    assert not (await store.get_user("alice")).disabled and not (await store.get_session(b"\x01" * 32, 0)).disabled
    assert await store.set_disabled(alice.id, True)  # until an operator enables it
    assert (await store.get_user("alice")).disabled
    assert await store.set_disabled(alice.id, False, until_ms=until)
    assert (await store.get_user("alice")).disabled_until_ms == 0 and not (await store.get_user("bob")).disabled


async def test_an_invite_code_makes_one_account_and_only_while_usable(store):
    good, late, spare = (code_hash(new_code()) for _ in range(3))
    await store.add_invites([good, spare], 0)
    await store.add_invites([late], now_ms() - 1)  # expired already
    assert [await store.invite_usable(h) for h in (good, late, spare, b"\0" * 32)] == [True, False, True, False]
    alice = await store.create_user("alice", "h", invite=good)
    assert not await store.invite_usable(good)
    for name, code in (("bob", good), ("bob", late), ("bob", b"\0" * 32)):  # used, expired, unknown: no account
        with pytest.raises(InviteInvalid):
            await store.create_user(name, "h", invite=code)
    assert await store.get_user("bob") is None
    with pytest.raises(NameTaken):  # a taken name spends no code
        await store.create_user("alice", "h", invite=spare)
    assert await store.invite_usable(spare)
    rows = await store.list_invites()
    assert [(r.used_by, r.expires_ms == 0) for r in rows] == [("alice", True), (None, True), (None, False)]
    assert await store.revoke_invite(rows[1].id) and not await store.revoke_invite(rows[0].id)  # a used one stays
    assert [r.id for r in await store.list_invites()] == [rows[0].id, rows[2].id] and alice.name == "alice"


async def test_edits_reactions_and_actions_share_the_seq_and_keep_their_rules(store):
    alice, bob = await make_users(store, "alice", "bob")
    lobby = await room(store, alice, members=[bob])
    said = await store.append(msg(lobby, bob, 1, "helo"))
    await refused(store, ErrorCode.FORBIDDEN, EventKind.EDIT, lobby, alice, target_seq=said.seq, text="x")
    edit = await act(store, EventKind.EDIT, lobby, bob, target_seq=said.seq, text="hello")
    assert (edit.event.seq, edit.event.target, edit.event.text) == (said.seq + 1, "bob", "hello")
    react = await act(store, EventKind.REACT, lobby, alice, target_seq=said.seq, text="👍")
    assert react.event.seq == said.seq + 2
    with pytest.raises(Unchanged):
        await act(store, EventKind.REACT, lobby, alice, target_seq=said.seq, text="👍")
    await act(store, EventKind.UNREACT, lobby, alice, target_seq=said.seq, text="👍")
    with pytest.raises(Unchanged):
        await act(store, EventKind.UNREACT, lobby, alice, target_seq=said.seq, text="👍")
    action = await act(store, EventKind.ACTION, lobby, alice, text="waves", client_msg_id=2**64 - 1)
    again = await act(store, EventKind.ACTION, lobby, alice, text="waves", client_msg_id=2**64 - 1)
    assert (again.event.seq, again.duplicate, action.duplicate) == (action.event.seq, True, False)
    page = await entries(store, lobby)
    assert [type(e).__name__ for e in page] == ["StoredMessage", "ConvEvent", "ConvEvent", "ConvEvent", "ConvEvent"]
    assert page[0].body == "hello" and page[-1].kind == EventKind.ACTION and page[-1].text == "waves"
    assert [e.seq for e in page] == list(range(1, action.event.seq + 1))
    await act(store, EventKind.DELETE, lobby, alice, target_seq=action.event.seq)  # an action deletes like a message
    assert (await entries(store, lobby))[action.event.seq - 1].kind == EventKind.DELETED
