"""The terminal client and the script commands with protocol version 2's conversation events (issues 12 and 13):
moderation, edits, reactions and actions in words, the moderation commands, registration by invite.

First the pieces without a terminal (how each event reads, how a page of history folds edits and reactions into
its messages, that paging back goes on past a page of events only), then the real program in a pseudo-terminal
against a real server process (tests/chorusproc.py), with library clients as the other users.
"""
# The fixtures `server` and `spawn` come from chorusproc by import; the tests name them as parameters.
# ruff: noqa: F401, F811
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys

import pytest
import trio
from pexpect.popen_spawn import PopenSpawn

from chorus import proto
from chorus.client import Page, open_client
from chorus.client._commands import UsageError, completions, duration_s, parse, seq_args, user_args
from chorus.client._render import Renderer, event_words, json_line
from chorus.client._tui import Tui
from chorus.proto import EventKind, RoomRole
from chorusproc import EXPECT_TIMEOUT_S, REPO, ServerProcess, chorus_env, server, spawn

LOBBY = proto.Conversation.room("lobby")
TODAY = datetime.date.today()
TS = int(datetime.datetime.combine(TODAY, datetime.time(9, 5)).timestamp() * 1000)
PASSWORD = "alice-secret-pw"


def ev(seq: int, kind: EventKind, actor: str = "carol", target: str = "", target_seq: int = 0, until_ms: int = 0,
       role: RoomRole = RoomRole.MEMBER, text: str = "") -> proto.ConvEvent:
    return proto.ConvEvent(seq, TS, kind, actor, target, target_seq, until_ms, role, text)


# -- pieces -------------------------------------------------------------------------------------------
def test_each_event_in_words_with_the_operator_named_and_controls_neutralised():
    until = int(datetime.datetime.combine(TODAY, datetime.time(14, 30)).timestamp() * 1000)
    said = {kind: event_words(LOBBY, e, TODAY) for kind, e in [
        ("kick", ev(5, EventKind.KICK, target="bob", text="spam")),
        ("ban", ev(5, EventKind.BAN, target="bob", until_ms=until)),
        ("ban forever", ev(5, EventKind.BAN, actor="", target="bob", text="abuse")),
        ("unban", ev(5, EventKind.UNBAN, target="bob")),
        ("mute", ev(5, EventKind.MUTE, target="bob", text="calm down")),
        ("unmute", ev(5, EventKind.UNMUTE, target="bob")),
        ("delete", ev(5, EventKind.DELETE, target="bob", target_seq=3)),
        ("delete own", ev(5, EventKind.DELETE, actor="bob", target="bob", target_seq=3)),
        ("topic", ev(5, EventKind.TOPIC, text="Release \x1b[2J day\u202e")),
        ("no topic", ev(5, EventKind.TOPIC, actor="")),
        ("role", ev(5, EventKind.ROLE, target="bob", role=RoomRole.MODERATOR)),
        ("owner", ev(5, EventKind.ROLE, actor="", target="bob", role=RoomRole.OWNER)),
        ("invite", ev(5, EventKind.INVITE, target="bob")),
        ("edit", ev(5, EventKind.EDIT, actor="bob", target="bob", target_seq=3, text="fixed\ntypo")),
        ("react", ev(5, EventKind.REACT, target="bob", target_seq=3, text="👩‍💻")),
        ("unreact", ev(5, EventKind.UNREACT, target="bob", target_seq=3, text="+1")),
    ]}
    assert said == {
        "kick": "carol removed bob from #lobby: spam",
        "ban": "carol banned bob from #lobby until 14:30",
        "ban forever": "the operator banned bob from #lobby until unbanned: abuse",
        "unban": "carol lifted the ban on bob in #lobby",
        "mute": "carol muted bob in #lobby until unmuted: calm down",
        "unmute": "carol unmuted bob in #lobby",
        "delete": "carol deleted #3 (bob's message)",
        "delete own": "bob deleted #3",
        "topic": "carol set the topic: Release \ufffd[2J day\ufffd",
        "no topic": "the operator cleared the topic",
        "role": "carol made bob a moderator of #lobby",
        "owner": "the operator made bob the owner of #lobby",
        "invite": "carol added bob to #lobby",
        "edit": "bob edited #3: fixed⏎typo",
        "react": "carol reacted 👩‍💻 to #3",
        "unreact": "carol took back +1 from #3",
    }
    r = Renderer("alice", colour=False, seqs=True)
    assert r.event(LOBBY, ev(7, EventKind.KICK, target="bob")) == "  09:05 #lobby   -- carol removed bob from #lobby"
    coloured = Renderer("alice", colour=True).event(LOBBY, ev(7, EventKind.TOPIC, text="\x1b]0;x\x07"))
    assert "\x1b" not in re.sub(r"\x1b\[[0-9;]*m", "", coloured)  # colours only: the topic's OSC is neutralised
    # Messages carry their seq (what /edit, /delete and /react name), marks and reactions after the text.
    msg = proto.Message(LOBBY, 12, TS, "bob", 1, "hello")
    assert r.message(msg) == "  09:05 #lobby   <bob> hello  #12"
    assert r.message(msg, edited=True, reactions="👍 2, 🎉") == (
        "  09:05 #lobby   <bob> hello  (edited)  [👍 2, 🎉]  #12")
    assert r.message(msg, deleted_by="carol") == "  09:05 #lobby   <bob> (message deleted by carol)  #12"
    assert r.message(msg, deleted_by="") == "  09:05 #lobby   <bob> (message deleted by the operator)  #12"
    assert Renderer("alice", colour=False).message(msg) == "  09:05 #lobby   <bob> hello"  # scripts: no seq


def test_json_lines_carry_the_kind_and_every_field_of_an_event():
    message = json.loads(json_line(proto.Message(LOBBY, 3, TS, "bob", 7, "hi")))
    assert (message["kind"], message["seq"], message["sender"], message["body"]) == ("message", 3, "bob", "hi")
    action = json.loads(json_line(proto.Events(LOBBY, (ev(4, EventKind.ACTION, actor="bob", text="waves"),))))
    assert (action["kind"], action["seq"], action["sender"], action["body"]) == ("action", 4, "bob", "waves")
    edit = json.loads(json_line(proto.Events(LOBBY, (ev(5, EventKind.EDIT, "bob", "bob", 3, text="hi!"),))))
    assert edit == {"kind": "event", "event": "edit", "conv": "#lobby", "seq": 5, "ts_ms": TS, "time": edit["time"],
                    "actor": "bob", "target": "bob", "target_seq": 3, "text": "hi!", "until_ms": 0, "role": "member"}
    react = json.loads(json_line(proto.Events(LOBBY, (ev(6, EventKind.REACT, "", "bob", 3, text="👍"),))))
    assert (react["event"], react["actor"], react["text"], react["target_seq"]) == ("react", "", "👍", 3)


def test_moderation_command_arguments():
    assert duration_s("30m") == 1800 and duration_s("2h") == 7200 and duration_s("7D") == 604_800
    assert duration_s("spam") is None and duration_s("0h") is None and duration_s("5") is None
    assert user_args("@bob 2h flooding the room", "u", duration=True, reason=True) == ("bob", 7200, "flooding the room")
    assert user_args("bob flooding", "u", duration=True, reason=True) == ("bob", 0, "flooding")
    assert user_args("bob", "u", duration=True, reason=True) == ("bob", 0, "")
    assert user_args("bob 2h", "u", reason=True) == ("bob", 0, "2h")  # /kick takes no duration: it is the reason
    with pytest.raises(UsageError, match="usage: /op USER"):
        user_args("bob extra", "/op USER")
    with pytest.raises(UsageError):
        user_args("", "/op USER")
    assert seq_args("#12 new text", "u", text=True) == (12, "new text") and seq_args("3", "u", text=False) == (3, "")
    for bad, text in (("x hi", True), ("0 hi", True), ("12", True), ("12 extra", False), (str(2**64), False)):
        with pytest.raises(UsageError):
            seq_args(bad, "u", text=text)
    assert parse("/roles") == parse("/who")
    sources = dict(rooms=("lobby",), joined=("lobby",), users=("bob", "bea"), convs=("#lobby",))
    for command in ("kick", "ban", "unban", "mute", "unmute", "op", "deop", "owner", "invite"):
        assert completions(f"/{command} bo", **sources) == [("bob", -2)], command


class _Pages:
    """A client whose HISTORY answers from a list of entries, in pages of at most ``size``."""

    username = "alice"
    version = 2
    connected = True

    def __init__(self, entries: list, size: int):
        self.entries = entries
        self.size = size
        self.welcome = None
        self.asked: list[int | None] = []

    async def history(self, conv, *, before=None, limit=0):
        self.asked.append(before)
        older = [e for e in self.entries if before is None or e.seq < before]
        page = older[-min(limit or self.size, self.size):]
        messages = tuple(e for e in page if isinstance(e, proto.StoredMessage))
        events = tuple(e for e in page if isinstance(e, proto.ConvEvent))
        return Page(conv, messages, events, has_more=len(older) > len(page))


async def test_history_pages_back_past_a_page_of_events_only_and_folds_edits_and_reactions():
    stored = [proto.StoredMessage(1, TS, "bob", 1, "first"), proto.StoredMessage(2, TS, "bob", 2, "second, fixed")]
    events = [ev(3, EventKind.EDIT, "bob", "bob", 2, text="second, fixed"),
              ev(4, EventKind.REACT, "carol", "bob", 1, text="👍"),
              ev(5, EventKind.REACT, "dave", "bob", 1, text="👍"),
              ev(6, EventKind.REACT, "dave", "bob", 2, text="🎉"),
              ev(7, EventKind.UNREACT, "dave", "bob", 2, text="🎉"),
              ev(8, EventKind.ACTION, "carol", text="waves"), ev(9, EventKind.DELETED, "carol", "bob"),
              ev(10, EventKind.DELETE, "carol", "bob", 9), ev(11, EventKind.TOPIC, "", text="news"),
              ev(12, EventKind.KICK, "carol", "eve", text="spam"), ev(13, EventKind.MUTE, "carol", "eve"),
              ev(14, EventKind.UNMUTE, "carol", "eve"), ev(15, EventKind.INVITE, "carol", "eve")]
    client = _Pages([*stored, *events], size=4)
    lines: list[str] = []
    tui = Tui(client, Renderer("alice", colour=False, seqs=True), terminal=False, out=lines.append)
    tui.current = LOBBY
    await tui._history(LOBBY, 20)
    # Pages of 4 from the newest: 12-15 and 8-11 hold no message at all; paging went on to the beginning.
    assert client.asked == [None, 12, 8, 4]
    assert lines == [
        "-- #lobby history, messages 1 to 15:",
        "  09:05 #lobby   <bob> first  [👍 2]  #1",
        "  09:05 #lobby   <bob> second, fixed  (edited)  #2",
        "  09:05 #lobby   * carol waves  #8",
        "  09:05 #lobby   <bob> (message deleted by carol)  #9",
        "  09:05 #lobby   -- the operator set the topic: news",
        "  09:05 #lobby   -- carol removed eve from #lobby: spam",
        "  09:05 #lobby   -- carol muted eve in #lobby until unmuted",
        "  09:05 #lobby   -- carol unmuted eve in #lobby",
        "  09:05 #lobby   -- carol added eve to #lobby",
        "-- that is the beginning of #lobby",
    ]
    assert tui.topics == {"lobby": "news"}
    # An edit or reaction of a message outside the block is a line of its own.
    lines.clear()
    tui._print_block(LOBBY, [ev(20, EventKind.EDIT, "bob", "bob", 2, text="again"),
                             ev(21, EventKind.REACT, "carol", "bob", 2, text="🎉")])
    assert lines == ["  09:05 #lobby   -- bob edited #2: again", "  09:05 #lobby   -- carol reacted 🎉 to #2"]


async def test_live_events_are_shown_once_and_a_kick_of_oneself_closes_the_room():
    lines: list[str] = []
    client = _Pages([], size=4)
    client.last_seq = {}
    tui = Tui(client, Renderer("alice", colour=False, seqs=True), terminal=False, out=lines.append)
    tui._open(LOBBY)
    tui.current, tui._live = LOBBY, True
    tui._show_event(LOBBY, ev(4, EventKind.ACTION, "bob", text="waves at alice"))
    tui._show_event(LOBBY, ev(4, EventKind.ACTION, "bob", text="waves at alice"))  # a recap printed it: not twice
    tui._show_event(LOBBY, ev(5, EventKind.TOPIC, "bob", text="hi"))
    assert lines == ["! 09:05 #lobby   * bob waves at alice  #4", "  09:05 #lobby   -- bob set the topic: hi"]
    assert tui.topics["lobby"] == "hi" and tui.printed[LOBBY] == 5 and tui.shown[LOBBY] == 5
    tui._show_event(LOBBY, ev(6, EventKind.KICK, "bob", "alice", text="bye"))
    assert lines[-2:] == ["  09:05 #lobby   -- bob removed alice from #lobby: bye", "-- you are no longer in #lobby"]
    assert LOBBY not in tui.numbers and tui.current is None and "lobby" not in tui.joined


class _Sender:
    """A client that records what is sent, speaking protocol ``version``."""

    username = "alice"
    welcome = None
    connected = True

    def __init__(self, version: int):
        self.version = version
        self.sent: list[tuple[str, str]] = []

    async def send(self, conv, body, *, client_msg_id):
        self.sent.append(("send", body))

    async def send_action(self, conv, body, *, client_msg_id):
        self.sent.append(("send_action", body))


@pytest.mark.parametrize("version, sent", [(2, ("send_action", "waves")), (1, ("send", "/me waves"))])
async def test_me_is_an_action_on_version_2_and_the_me_convention_on_version_1(version, sent):
    client = _Sender(version)
    tui = Tui(client, Renderer("alice", colour=False), terminal=False, out=lambda line: None)
    tui.current = LOBBY
    tui.on_line("/me waves")
    (op,) = [tui._ops_recv.receive_nowait()]
    await op()
    assert client.sent == [sent] and not tui.pending


# -- the real program in a terminal ---------------------------------------------------------------------


async def next_event(c, kind: EventKind, actor: str) -> proto.ConvEvent:
    with trio.fail_after(20):
        async for item in c.events():
            if isinstance(item, proto.Events) and (item.events[0].kind, item.events[0].actor) == (kind, actor):
                return item.events[0]
    raise AssertionError("event stream ended")


async def test_moderation_commands_and_events_in_the_terminal(spawn, server):
    async with open_client("127.0.0.1", server.port, username="bob", password="bob-password", register=True,
                           request_timeout_s=20) as bob, \
            open_client("127.0.0.1", server.port, username="carol", password="carol-password", register=True,
                        request_timeout_s=20) as carol:
        t = spawn("--server", server.address, "--user", "alice", "--register", CHORUS_PASSWORD=PASSWORD)
        await t.expect("logged in as alice")
        t.line("/create #crew --private")
        await t.expect("created private room #crew (1 member, no messages yet)")
        t.line("/invite bob")
        await t.expect("-- alice added bob to #crew")
        t.line("/invite carol")
        await t.expect("-- alice added carol to #crew")
        t.line("/topic Release day")
        await t.expect("-- alice set the topic: Release day")
        ack = await bob.send("#crew", "helo all")
        await t.expect(f"<bob> helo all  #{ack.seq}")
        t.line(f"/react {ack.seq} 👍")
        await t.expect(f"-- alice reacted 👍 to #{ack.seq}")
        await bob.edit_message("#crew", ack.seq, "hello all")
        await t.expect(f"-- bob edited #{ack.seq}: hello all")
        t.line(f"/edit {ack.seq} not mine")
        await t.expect(f"!! cannot edit #{ack.seq}: ")  # FORBIDDEN, whatever the sender's role
        await bob.send_action("#crew", "waves")
        await t.expect("* bob waves  #")
        t.line("/me waves back")
        got = await next_event(bob, EventKind.ACTION, "alice")  # an ACTION on version 2, not a "/me" message
        assert (got.actor, got.text) == ("alice", "waves back")
        await t.expect("* alice waves back  #")
        t.line("/op bob")
        await t.expect("-- alice made bob a moderator of #crew")
        t.line("/mute carol 30m too loud")
        await t.expect_re(r"-- alice muted carol in #crew until \d\d:\d\d: too loud")
        t.line("/roles")
        await t.expect_re(r"#crew \(private\): alice \(owner, online\), bob \(moderator, online\), "
                          r"carol \(online, muted until \d\d:\d\d\)")
        await t.expect("topic: Release day")
        t.line("/unmute carol")
        await t.expect("-- alice unmuted carol in #crew")
        bad = await carol.send("#crew", "sorry")
        await t.expect(f"<carol> sorry  #{bad.seq}")
        t.line(f"/delete {bad.seq}")
        await t.expect(f"-- alice deleted #{bad.seq} (carol's message)")
        t.line("/kick carol spam")
        await t.expect("-- alice removed carol from #crew: spam")
        t.line("/ban carol 2h")
        await t.expect_re(r"-- alice banned carol from #crew until \d\d:\d\d")
        t.line("/owner bob")
        await t.expect("-- alice made bob the owner of #crew")
        t.line("/op carol")  # only the owner sets roles: alice is a moderator now
        await t.expect("!! cannot op carol: ")
        t.line("/topic")
        await t.expect("topic of #crew: Release day")
        await bob.kick("crew", "alice", "handing over")
        await t.expect("-- bob removed alice from #crew: handing over")
        await t.expect("you are no longer in #crew")
        t.line("/kick bob")
        await t.expect("!! /kick acts on the current room: /switch #room first")
        t.line("/quit")
        assert await t.wait_exit() == 0
        screen = t.text()
        assert "Traceback" not in screen
        assert len([line for line in screen.splitlines() if "!!" in line]) == 3  # each refusal one line

        # A new start catches up on what happened while away (the kick, then bob's invitation); /history shows the
        # room's record, the edit and the reaction folded into the message.
        await bob.invite("crew", "alice")
        t2 = spawn("--server", server.address, "--user", "alice")
        await t2.expect("logged in as alice")
        await t2.expect("-- bob added alice to #crew")
        await t2.expect("you are in #crew now")
        t2.line("/switch #crew")
        await t2.expect("now talking in #crew")
        t2.line("/history 40")
        await t2.expect(f"<bob> hello all  (edited)  [👍]  #{ack.seq}")
        await t2.expect(f"<carol> (message deleted by alice)  #{bad.seq}")
        await t2.expect("that is the beginning of #crew")
        assert f"-- alice deleted #{bad.seq}" not in t2.text()  # the tombstone says it
        assert "topic: Release day" in t2.text().split("now talking in #crew")[1].splitlines()[0] or \
            "topic of #crew: Release day" in t2.text()  # shown the first time we talk there (at start, or on /switch)


async def test_registration_by_invite(spawn, tmp_path):
    server = ServerProcess(tmp_path / "data", "--registration", "invite")
    server.start()
    try:
        made = await trio.run_process(
            [sys.executable, "-m", "chorus.server._admin_cli", "--data-dir", str(tmp_path / "data"), "--json",
             "invites", "create", "--count", "2"], capture_stdout=True, capture_stderr=True)
        first, second = [row["code"] for row in json.loads(made.stdout)]
        t = spawn("--server", server.address, "--user", "alice", "--register", CHORUS_PASSWORD=PASSWORD)
        await t.expect("registration on this server is by invite: ask its operator for a code and add --invite CODE")
        assert await t.wait_exit() == 1
        t = spawn("--server", server.address, "--user", "alice", "--register", "--invite", "not-a-code",
                  CHORUS_PASSWORD=PASSWORD)
        await t.expect("the invite code is unknown, used or expired")
        assert await t.wait_exit() == 1
        t = spawn("--server", server.address, "--user", "alice", "--register", "--invite", first,
                  CHORUS_PASSWORD=PASSWORD)
        await t.expect("logged in as alice")
        t.line("/quit")
        assert await t.wait_exit() == 0
        # CHORUS_INVITE, for a script.
        result = await trio.run_process(
            [sys.executable, "-m", "chorus.client", "--server", server.address, "--user", "dora", "--register",
             "send", "--create", "#news", "hi"], cwd=REPO, capture_stdout=True, capture_stderr=True, check=False,
            env=chorus_env(tmp_path / "config", CHORUS_PASSWORD=PASSWORD, CHORUS_INVITE=second))
        assert result.returncode == 0, result.stderr
    finally:
        server.kill()


def test_send_action_and_tail_json_with_kinds_edits_and_reactions(tmp_path, server):
    def chorus(*args: str, user: str = "carol") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "chorus.client", "--server", server.address, "--user", user,
                               *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                              env=chorus_env(tmp_path / "config", CHORUS_PASSWORD=PASSWORD))

    assert chorus("--register", "send", "--create", "#news", "first").returncode == 0
    assert chorus("send", "--action", "#news", "waves").returncode == 0

    async def react_and_edit():
        async with open_client("127.0.0.1", server.port, username="carol", password=PASSWORD) as carol:
            await carol.react("#news", 1, "👍")
            await carol.edit_message("#news", 1, "first!")

    trio.run(react_and_edit)
    for as_json in (True, False):
        command = [sys.executable, "-m", "chorus.client", "--server", server.address, "--user", "carol", "tail",
                   "#news", "--since", "0", *(["--json"] if as_json else [])]
        tail = PopenSpawn(command, cwd=str(REPO), env=chorus_env(tmp_path / "config"), encoding="utf-8",
                          timeout=EXPECT_TIMEOUT_S)
        try:
            tail.expect_exact("chorus: following #news (Ctrl-C to stop)\n")
            lines = tail.before.splitlines()
        finally:
            tail.proc.kill()
            tail.proc.wait()
        if as_json:
            got = [json.loads(line) for line in lines]
            assert [(m["kind"], m["seq"], m.get("event"), m.get("body") or m.get("text")) for m in got] == [
                ("message", 1, None, "first!"), ("action", 2, None, "waves"), ("event", 3, "react", "👍"),
                ("event", 4, "edit", "first!")]
            assert got[2]["target_seq"] == got[3]["target_seq"] == 1 and got[1]["sender"] == "carol"
        else:
            assert [re.sub(r"^\d\d:\d\d #news +", "", line) for line in lines] == [
                "<carol> first!", "* carol waves", "-- carol reacted 👍 to #1", "-- carol edited #1: first!"]
