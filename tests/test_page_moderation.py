"""The page's roles, moderation menu and private rooms (issue 12, spec §9.15) in headless Chromium
(tests/pagekit.py), beside version 2 TCP users (tests/test_page.py's Peer) on a real server and SQLite file.

What is checked is what a person sees and what the server then holds: badges and muted marks from ROOM_DETAILS,
the member menu offering only what the server would allow (and the server agreeing), refusals as notices, the
delete control and its tombstone, the topic, private rooms with their lock, and the slash commands."""
from __future__ import annotations

import time

import pytest

from chorus import proto
from chorus.proto import ErrorCode, RoomRole
from pagekit import DESKTOP, Page, in_chromium, on_trio
from test_page import LOBBY, UNLIMITED, Peer, carol_in_lobby, url

pytestmark = pytest.mark.timeout(120)


def menu_items(page, user: str) -> list[str]:
    """The labels of ``user``'s menu in the member list ([] when there is no menu)."""
    return page.eval_on_selector_all(f'.member[data-user="{user}"] .menu-item', "ns => ns.map(n => n.textContent)")


def wait_menu(page, user: str, items: list[str]) -> None:
    """Wait until ``user``'s menu offers exactly ``items`` (the details are fetched in the background)."""
    page.wait_for_function("([user, items]) => JSON.stringify([...document.querySelectorAll("
                           "`.member[data-user='${user}'] .menu-item`)].map(n => n.textContent))"
                           " === JSON.stringify(items)", arg=[user, items])


def choose(page, user: str, item: str) -> None:
    """Open ``user``'s menu with the mouse and pick ``item``."""
    page.click(f'.member[data-user="{user}"] summary')
    page.click(f'.member[data-user="{user}"] .menu-item:text-is("{item}")')


async def refused_code(peer: Peer, event_cls, *args) -> ErrorCode | None:
    reply = await peer.raw.request(event_cls, *args)
    return reply.code if isinstance(reply, proto.Error) else None


async def details(peer: Peer, room: str) -> proto.RoomDetails:
    reply = await peer.raw.request(proto.GetRoom, room)
    assert isinstance(reply, proto.RoomDetails), reply
    return reply


async def test_badges_and_a_menu_that_offers_only_what_the_role_allows(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", "lobby", version=2)  # the room's creator: its owner
    dave = await Peer.open(server.port, "dave", "lobby", version=2)
    said = await dave.say("#lobby", "buy cheap watches")

    async def bob_sets_role(user: str, role: RoomRole) -> None:
        assert isinstance(await bob.raw.request(proto.SetRole, "lobby", user, role), proto.Ok)

    def steps(browser):
        page = carol_in_lobby(browser, server, DESKTOP)
        page.click("#members-button")
        page.wait_for_selector('.member[data-user="bob"] .role.owner >> text=owner')
        # A member may only message the others: no moderation offered, no delete control on dave's message.
        wait_menu(page, "dave", ["Message"])
        assert menu_items(page, "bob") == ["Message"] and menu_items(page, "carol") == []
        assert page.query_selector(f'.message[data-seq="{said}"] .delete-message') is None
        assert page.is_hidden("#topic")  # no topic, and not a moderator: nothing to show
        # A command the server refuses: its reason as a notice, nothing else changes.
        page.say("/kick dave")
        page.wait_for_selector("#notice >> text=Refused:")

        on_trio(bob_sets_role, "carol", RoomRole.MODERATOR)  # the ROLE event refreshes the details
        page.wait_for_selector('.member[data-user="carol"] .role.mod')
        wait_menu(page, "dave", ["Message", "Kick", "Ban…", "Mute…"])
        assert menu_items(page, "bob") == ["Message"]  # the owner outranks a moderator

        # Mute for an hour with a reason, from the menu's dialog.
        choose(page, "dave", "Mute…")
        page.select_option("#moderate-duration", label="1 hour")
        page.fill("#moderate-text", "calm down")
        page.click("#moderate-ok")
        page.wait_for_selector('.member[data-user="dave"] .muted >> text=muted')
        page.wait_for_selector(".message.event .body >> text=muted dave until")
        assert on_trio(refused_code, dave, proto.Send, LOBBY, 7, "still here") == ErrorCode.FORBIDDEN
        muted = on_trio(details, bob, "lobby").members
        until = next(m.muted_until_ms for m in muted if m.user == "dave")
        assert abs(until - (time.time() + 3600) * 1000) < 60_000, until

        # Unmute with the keyboard alone: the menu's button, then its item.
        wait_menu(page, "dave", ["Message", "Kick", "Ban…", "Unmute"])
        page.focus('.member[data-user="dave"] summary')
        page.keyboard.press("Enter")
        page.focus('.member[data-user="dave"] .menu-item:text-is("Unmute")')
        page.keyboard.press("Enter")
        page.wait_for_selector('.member[data-user="dave"] .muted', state="detached")
        assert on_trio(refused_code, dave, proto.Send, LOBBY, 8, "thank you") is None

        # A moderator deletes anyone's message: a control on hover, a confirmation, then the tombstone.
        page.click("#members-button")  # the list lies over the messages' right side
        page.hover(f'.message[data-seq="{said}"]')
        page.click(f'.message[data-seq="{said}"] .delete-message')
        page.wait_for_selector("#moderate-title >> text=Delete dave's message?")
        page.click("#moderate-ok")
        page.wait_for_selector(f'.message[data-seq="{said}"].deleted >> text=(message deleted)')

        # The topic under the title; a moderator edits it there.
        page.wait_for_selector("#topic:not([disabled]) >> text=Set a topic")
        page.click("#topic")
        page.fill("#moderate-text", "Be kind")
        page.click("#moderate-ok")
        page.wait_for_selector("#topic >> text=Be kind")
        assert on_trio(details, bob, "lobby").topic == "Be kind"

        # Ban for good from the menu: dave leaves the list and cannot come back.
        page.click("#members-button")
        choose(page, "dave", "Ban…")
        page.select_option("#moderate-duration", label="forever")
        page.fill("#moderate-text", "spam")
        page.click("#moderate-ok")
        page.wait_for_selector('.member[data-user="dave"]', state="detached")
        assert on_trio(refused_code, dave, proto.Join, "lobby") == ErrorCode.FORBIDDEN
        assert on_trio(details, bob, "lobby").bans == (proto.BanInfo("dave", 0),)
        # Moderators see the bans under the members, each with Unban.
        page.wait_for_selector('#bans .banned[data-user="dave"] >> text=for good')
        page.click('#bans .banned[data-user="dave"] .unban')
        page.wait_for_selector("#bans", state="hidden")
        assert on_trio(details, bob, "lobby").bans == ()

        # Demoted: the menu shrinks back, and the topic is text again.
        on_trio(bob_sets_role, "carol", RoomRole.MEMBER)
        page.wait_for_selector('.member[data-user="carol"] .role', state="detached")
        wait_menu(page, "bob", ["Message"])
        page.wait_for_selector("#topic[disabled] >> text=Be kind")
        page.assert_no_errors()

    await in_chromium(steps)


async def test_private_room_invite_owner_menu_commands_and_being_kicked(start_server):
    server = await start_server(ws_port=0, **UNLIMITED)
    bob = await Peer.open(server.port, "bob", version=2)

    def steps(browser):
        page = Page(browser.new_context(viewport=DESKTOP), url(server))
        page.enter("carol")
        page.join("lobby")
        page.say("/create #team private")
        page.wait_for_function("() => document.getElementById('title').textContent === '#team'")
        assert page.room_button("#team").eval_on_selector(".room-name", "n => 'private' in n.dataset")
        assert not page.room_button("#lobby").eval_on_selector(".room-name", "n => 'private' in n.dataset")
        rooms = on_trio(bob.raw.request, proto.ListRooms).rooms
        assert [r.name for r in rooms] == ["lobby"]  # not listed to others
        assert on_trio(refused_code, bob, proto.Join, "team") == ErrorCode.FORBIDDEN

        page.reload()  # the lock again, from the details asked for after login (the conversation list has no flag)
        page.wait_live()
        page.wait_for_selector('#rooms .room-name[data-private]:text-is("#team")')
        page.say("/invite bob")
        page.wait_for_selector("#notice >> text=bob is in #team now.")
        page.click("#members-button")
        page.wait_for_selector('.member[data-user="carol"] .role.owner')
        # The owner's menu: the moderation items and the roles.
        wait_menu(page, "bob", ["Message", "Kick", "Ban…", "Mute…", "Make moderator", "Make owner"])
        choose(page, "bob", "Make moderator")
        page.wait_for_selector('.member[data-user="bob"] .role.mod')
        wait_menu(page, "bob", ["Message", "Kick", "Ban…", "Mute…", "Make member", "Make owner"])
        page.say("/deop bob")
        page.wait_for_selector('.member[data-user="bob"] .role', state="detached")
        page.say("/op @bob")
        page.wait_for_selector('.member[data-user="bob"] .role.mod')

        page.say("/mute bob 2h too loud")
        page.wait_for_selector('.member[data-user="bob"] .muted')
        page.wait_for_selector(".message.event .body >> text=: too loud")
        page.say("/unmute bob")
        page.wait_for_selector('.member[data-user="bob"] .muted', state="detached")
        page.say("/topic Planning only")
        page.wait_for_selector("#topic >> text=Planning only")
        page.say("/ban")
        page.wait_for_selector("#notice >> text=Usage: /ban user [DURATION] [reason]")
        assert page.input_value("#message-input") == "/ban"  # kept, to be corrected

        # Her own message has a delete control too.
        page.click("#members-button")
        page.say("a note to self")
        note = ".message.mine:not([data-seq='']):has-text('a note to self')"  # sent, not pending
        page.hover(note)
        page.click(f"{note} .delete-message")
        page.click("#moderate-ok")
        page.wait_for_selector(".message.deleted >> text=(message deleted)")

        # Handing the room over: carol is a moderator now, and bob, its owner, removes her.
        page.click("#members-button")
        choose(page, "bob", "Make owner")
        page.wait_for_selector('.member[data-user="bob"] .role.owner')
        page.wait_for_selector('.member[data-user="carol"] .role.mod')
        wait_menu(page, "bob", ["Message"])
        assert isinstance(on_trio(bob.raw.request, proto.Kick, "team", "carol", "done here"), proto.Ok)
        page.wait_for_selector('#rooms .room-name:text-is("#team")', state="detached")
        page.wait_for_selector("#notice >> text=#team: bob removed carol from the room: done here")
        page.assert_no_errors()

    await in_chromium(steps)
