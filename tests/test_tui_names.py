"""Display names in the terminal client (issue 13, spec/PROTOCOL.md §9.17): /nick, and "Display Name (login)" on
messages and in /who. The pieces without a terminal first, then the real program in a pseudo-terminal against a
real server process (tests/chorusproc.py), with a library client as the other user."""
# The fixtures `server` and `spawn` come from chorusproc by import; the tests name them as parameters.
# ruff: noqa: F401, F811
from __future__ import annotations

import re

from chorus import proto
from chorus.client._render import Renderer
from chorus.client._tui import Tui
from chorusproc import server, spawn
from test_tui import LOBBY, alice_in_lobby, message_from, other_user


def test_a_display_name_is_shown_beside_the_login_and_neutralised():
    r = Renderer("alice", colour=False)
    ts = 1_700_000_000_000
    assert r.message(proto.Message(LOBBY, 1, ts, "bob", 1, "hi")).endswith("<bob> hi")  # none known: the login
    r.names["bob"] = "Bob \u202eevil\x1b[2J\nx"  # what a server should refuse; shown harmless all the same
    line = r.message(proto.Message(LOBBY, 1, ts, "bob", 1, "hi"))
    assert line.endswith("<Bob \ufffdevil\ufffd[2J⏎x (bob)> hi"), line
    assert "\x1b" not in line and "\u202e" not in line
    r.names["alice"] = "Alice 🌸"
    assert r.message(proto.Message(LOBBY, 2, ts, "alice", 2, "/me waves")).endswith("* Alice 🌸 (alice) waves")
    assert r.person("carol") == "carol"


class _Version1:
    username = "alice"
    version = 1
    connected = True


async def test_nick_on_a_version_1_server_says_it_needs_version_2():
    lines: list[str] = []
    tui = Tui(_Version1(), Renderer("alice", colour=False), terminal=False, out=lines.append)  # type: ignore[arg-type]
    tui.on_line("/nick Alice")
    assert lines == ["!! /nick needs a server that speaks protocol version 2; this one speaks version 1"]
    assert tui._queued == 0  # nothing was sent


async def test_nick_sets_and_clears_refuses_look_alikes_and_peers_show_by_display_name(spawn, server):
    async with other_user(server) as bob:
        await bob.set_display_name("Bobby Tables")
        t = await alice_in_lobby(spawn, server)
        t.line("/nick Bob")  # bob's login, in other letters: the server's reason is the one line said
        await t.expect("!! cannot set your display name: ")
        await t.expect("looks like bob")
        t.line("/nick Alice Liddell")
        await t.expect("-- you are Alice Liddell (alice) now")
        t.line("hello")
        assert (await message_from(bob, "alice")).body == "hello"
        await t.expect("<Alice Liddell (alice)> hello")
        assert await bob.display_names(["alice"]) == {"alice": "Alice Liddell"}

        await bob.send("#lobby", "hi from bob")
        await t.expect("<Bobby Tables (bob)> hi from bob")
        t.line("/who")
        found = await t.expect_re(r"-- #lobby: [^\n]*\n")
        assert "Bobby Tables (bob) (" in found[0] and "Alice Liddell (alice) (" in found[0], found[0]

        t.line("/nick")  # no argument: cleared
        await t.expect("-- your display name is cleared")
        t.line("plain again")
        assert (await message_from(bob, "alice")).body == "plain again"
        await t.expect("<alice> plain again")
        assert await bob.display_names(["alice"]) == {"alice": ""}
        t.line("/quit")
        assert await t.wait_exit() == 0
        screen = t.text()
        assert "Traceback" not in screen
        assert len([line for line in screen.splitlines() if "!!" in line]) == 1
        assert not re.search(r"<Bobby Tables \(bob\)> hello", screen)
