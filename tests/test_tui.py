"""The interactive ``chorus`` client: its pieces without a terminal, then the real program in a
pseudo-terminal (pexpect) against a real server process, with a library client as the other user."""
from __future__ import annotations

import datetime
import os
import re
import stat
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from chorus import proto
from chorus.client import ServerError, open_client
from chorus.client._commands import Command, Text, UsageError, completions, help_lines, history_count, parse
from chorus.client._config_dir import SessionStore, config_dir
from chorus.client._login import LoginError, _ask_password, _refusal, choose_user, parse_server, parse_servers
from chorus.client._render import Renderer, one_line, use_colour
from chorus.client._rules import password_problem
from chorus.client._tui import Tui
from chorus.proto import ErrorCode
from chorusproc import ServerProcess, Terminal, chorus_env

PASSWORD = "alice-secret-pw"
LOBBY = proto.Conversation.room("lobby")


# -- pieces -------------------------------------------------------------------------------------------
def test_parse_lines():
    assert parse("   ") is None
    assert parse("hello /there") == Text("hello /there")
    assert parse("//etc/passwd is a path") == Text("/etc/passwd is a path")
    assert parse("/join #lobby") == Command("join", "#lobby")
    assert parse("/J  #lobby ") == Command("join", "#lobby")  # a unique prefix, any case
    assert parse("/msg bob hi there") == Command("msg", "bob hi there")
    with pytest.raises(UsageError, match="unknown command /frob"):
        parse("/frob")
    with pytest.raises(UsageError, match="ambiguous"):
        parse("/h")  # history or help
    assert history_count("") == 20 and history_count("5") == 5
    for bad in ("x", "0", "101"):
        with pytest.raises(UsageError):
            history_count(bad)
    assert history_count("", 10) == 10 and history_count("40", 40) == 40  # WELCOME's max_page bounds N
    with pytest.raises(UsageError, match="1 to 40 messages"):
        history_count("41", 40)
    assert any("/history [N]" in line for line in help_lines())
    assert help_lines("/who") == help_lines("who")


def test_tab_completion():
    sources = dict(rooms=("lobby", "dev", "random"), joined=("lobby",), users=("bob", "bea"),
                   convs=("#lobby", "@bob"))
    assert completions("/jo", **sources) == [("/join", -3)]
    assert {c for c, _ in completions("/", **sources)} >= {"/join", "/help", "/quit", "/history"}
    assert completions("/join #r", **sources) == [("#random", -2)]
    assert completions("/join d", **sources) == [("#dev", -1)]
    assert completions("/leave ", **sources) == [("#lobby", 0)]
    assert completions("/msg b", **sources) == [("bea", -1), ("bob", -1)]
    assert completions("/switch @", **sources) == [("@bob", -1)]
    assert completions("/msg bob te", **sources) == []  # only the first argument completes
    assert completions("hello /jo", **sources) == []


def test_render_lines():
    today = datetime.date.today()
    ts = int(datetime.datetime.combine(today, datetime.time(9, 5)).timestamp() * 1000)
    r = Renderer("alice", colour=False)
    mine = proto.Message(LOBBY, 1, ts, "alice", 7, "hi bob")
    theirs = proto.Message(LOBBY, 2, ts, "bob", 8, "hi\nalice\x1b[2J")
    assert r.message(mine) == "> 09:05 #lobby   <alice> hi bob"
    assert r.message(theirs) == "  09:05 #lobby   <bob> hi⏎alice\ufffd[2J"  # one line, no escape sequence
    assert r.message(proto.Message(LOBBY, 3, ts, "bob", 9, "/me waves")) == "  09:05 #lobby   * bob waves"
    assert r.message(mine, pending=True) == "~ 09:05 #lobby   <alice> hi bob  (pending)"
    dm = proto.Message(proto.Conversation.direct("bob"), 1, ts, "bob", 1, "psst")
    assert r.message(dm) == "  09:05 @bob     <bob> psst"
    yesterday = proto.Message(LOBBY, 4, ts - 86_400_000, "bob", 10, "old")
    assert (today - datetime.timedelta(days=1)).isoformat() in r.message(yesterday)
    assert "\x1b" not in r.message(mine) + r.info("x") + r.error("y")
    assert r.error("bad") == "!! bad" and r.info("note") == "-- note"
    coloured = Renderer("alice", colour=True)
    assert "\x1b[" in coloured.message(mine) and "\x1b[" in coloured.error("bad")
    assert one_line("a\tb") == "a b"


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_colours_only_on_a_terminal_without_no_color():
    assert use_colour(_Stream(True), {"TERM": "xterm"})
    assert not use_colour(_Stream(False), {"TERM": "xterm"})
    assert not use_colour(_Stream(True), {"TERM": "xterm", "NO_COLOR": "1"})
    assert not use_colour(_Stream(True), {"TERM": "dumb"})
    assert use_colour(_Stream(True), {"NO_COLOR": ""})  # the convention: set *and* non-empty


def test_session_store_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert config_dir() == tmp_path / "cfg" / "chorus"
    store = SessionStore("127.0.0.1", 7420)
    assert store.load("alice") is None and store.users() == []
    store.path("alice").parent.mkdir(parents=True)
    store.path("alice").write_text("old")
    os.chmod(store.path("alice"), 0o644)
    store.save("alice", "tok-1")
    assert store.load("alice") == "tok-1"
    assert stat.S_IMODE(os.stat(store.path("alice")).st_mode) == 0o600
    assert store.users() == ["alice"]
    assert SessionStore("127.0.0.1", 7421).load("alice") is None  # per server
    store.forget("alice")
    store.forget("alice")
    assert store.load("alice") is None
    with pytest.raises(ValueError):
        store.path("../evil")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/path")  # the XDG spec says: ignore it
    assert config_dir() == __import__("pathlib").Path.home() / ".config" / "chorus"


def test_parse_server():
    assert parse_server("example.org") == ("example.org", 7420)
    assert parse_server("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_server("[::1]:9000") == ("::1", 9000)
    for bad in ("host:", "host:x", ":80", "[::1", "h:99999", f"h:{proto.MAX_PORT + 1}", "h:0"):
        with pytest.raises(ValueError):
            parse_server(bad)
    assert parse_server(f"h:{proto.MAX_PORT}") == ("h", proto.MAX_PORT)


def test_parse_servers_takes_the_nodes_of_a_cluster():
    assert parse_servers("a:7420, b:7421,c") == [("a", 7420), ("b", 7421), ("c", 7420)]
    assert parse_servers("example.org") == [("example.org", 7420)]
    for bad in (",", "a:1,b:", ""):
        with pytest.raises(ValueError):
            parse_servers(bad)


def test_what_the_client_says_about_names_and_passwords_follows_the_protocol_constants(monkeypatch, tmp_path):
    """Change the rules in chorus.proto and every check and sentence of the terminal client follows (STYLE.md §20)."""
    for name, value in (("NAME_PATTERN", "[a-z]{1,3}"), ("NAME_RULE", "1-3 letters"), ("MIN_PASSWORD_BYTES", 12),
                        ("MAX_PASSWORD_BYTES", 20), ("PASSWORD_RULE", "12 to 20 bytes")):
        monkeypatch.setattr(proto, name, value)
    store = SessionStore("127.0.0.1", 7420, root=tmp_path)
    assert choose_user("abc", store, interactive=False) == "abc"
    for bad in ("abcd", "ab1"):
        with pytest.raises(LoginError) as refused:
            choose_user(bad, store, interactive=False)
        assert str(refused.value) == f"{bad!r} is not a user name: 1-3 letters"
        with pytest.raises(ValueError):
            store.path(bad)  # the token files use the same rule
    assert password_problem("x" * 11, register=True) == "passwords are 12 to 20 bytes"
    assert password_problem("x" * 11, register=False) is None  # a login may try; the server answers
    assert password_problem("é" * 11, register=False) == "passwords are 12 to 20 bytes"  # 22 bytes: not on the wire
    assert password_problem("x" * 12, register=True) is None
    assert _refusal(ServerError(ErrorCode.WEAK_PASSWORD, "server's words"), "abc") == "passwords are 12 to 20 bytes"
    assert _refusal(ServerError(ErrorCode.INVALID_NAME, "server's words"), "abc") == "user names are 1-3 letters"

    prompts, answers = [], iter(["short", "long enough pw", "long enough pw"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or next(answers))
    assert _ask_password("abc", register=True) == "long enough pw"
    assert prompts[0] == "Choose a password for abc (12 to 20 bytes): "  # asked again after "short"
    assert len(prompts) == 3


def test_the_client_copies_no_rule_by_hand():
    """The rules live in chorus.proto; client/ words them from there (a literal copy would drift unnoticed)."""
    copies = [re.escape(text) for text in (
        proto.NAME_RULE, proto.PASSWORD_RULE, f"{proto.MIN_PASSWORD_BYTES} to {proto.MAX_PASSWORD_BYTES}",
        f"1-{proto.MAX_NAME_BYTES}", "[a-z0-9", str(proto.MAX_PORT), f"< {proto.MAX_PORT + 1}")]
    source = Path(proto.__file__).resolve().parent.parent / "client"
    found = [(path.name, m[0]) for path in sorted(source.glob("*.py"))
             for m in re.finditer("|".join(copies), path.read_text(encoding="utf-8"))]
    assert found == []


class _StubClient:
    username = "alice"
    welcome = None
    connected = True

    def __init__(self):
        self.typed = []

    async def typing(self, conv):
        self.typed.append(conv)


async def test_status_and_prompt_show_unread_counts():
    lines = []
    tui = Tui(_StubClient(), Renderer("alice", colour=False), terminal=False, out=lines.append)
    tui.joined = {"lobby", "dev"}
    tui.current = proto.Conversation.room("dev")
    ts = 1_700_000_000_000
    for seq in (1, 2):
        tui._show(proto.Message(LOBBY, seq, ts, "bob", seq, f"m{seq}"))
    tui._show(proto.Message(proto.Conversation.direct("bob"), 1, ts, "bob", 9, "psst"))
    tui._show(proto.Message(proto.Conversation.room("dev"), 1, ts, "bob", 10, "here"))
    tui.refresh()
    assert tui.status == "[1:#dev] 2:#lobby(2) 3:@bob(1)"
    assert tui.prompt_text == "#dev (#lobby 2, @bob 1)> "
    tui.on_line("/switch 2")
    assert tui.current == LOBBY and tui.prompt_text == "#lobby (@bob 1)> "
    tui.on_line("/switch #nowhere")
    assert lines[-1] == "!! you are not in #nowhere; /join #nowhere first"
    tui.connected = False
    tui.refresh()
    assert tui.prompt_text.startswith("[offline] ") and tui.status.startswith("reconnecting… | ")


async def test_typing_notices_only_where_the_server_knows_us(nursery):
    stub = _StubClient()
    tui = Tui(stub, Renderer("alice", colour=False), terminal=False, out=lambda line: None)
    tui._nursery = nursery
    tui.joined = {"lobby"}
    for conv in (proto.Conversation.room("elsewhere"), proto.Conversation.direct("stranger"), LOBBY):
        tui.current = conv
        tui.on_keystroke("h")
        tui.on_keystroke("hi")  # at most one notice per few seconds
        tui.on_keystroke("/join")  # commands are not chat
    await trio.testing.wait_all_tasks_blocked()
    assert stub.typed == [LOBBY]


# -- the real program in a terminal ---------------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    s = ServerProcess(tmp_path / "data")
    s.start()
    yield s
    s.kill()


@pytest.fixture
def spawn(tmp_path):
    opened: list[Terminal] = []

    def start(*args: str, **env: str) -> Terminal:
        t = Terminal(list(args), chorus_env(tmp_path / "config", **env))
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


@asynccontextmanager
async def other_user(server: ServerProcess, name: str = "bob"):
    async with open_client("127.0.0.1", server.port, username=name, password=f"{name}-password", register=True,
                           backoff_cap_s=0.5, request_timeout_s=20) as c:
        await c.join("lobby")
        yield c


async def message_from(c, sender: str) -> proto.Message:
    """The next message ``c`` receives from ``sender``."""
    with trio.fail_after(20):
        async for event in c.events():
            if isinstance(event, proto.Message) and event.sender == sender:
                return event
    raise AssertionError("event stream ended")


async def start_alice(spawn, server, *, colour: bool = False) -> Terminal:
    env = {"CHORUS_PASSWORD": PASSWORD} if colour is False else {"CHORUS_PASSWORD": PASSWORD, "NO_COLOR": ""}
    t = spawn("--server", server.address, "--user", "alice", "--register", **env)
    await t.expect("logged in as alice")
    return t


async def test_register_chat_and_a_half_typed_line_survives_incoming(spawn, server, tmp_path):
    t = spawn("--server", server.address, "--user", "alice", "--register")
    await t.expect("Choose a password for alice")
    t.line(PASSWORD)
    await t.expect("Type it again")
    t.line(PASSWORD)
    await t.expect("logged in as alice")
    t.line("/join #lobby")
    await t.expect("joined #lobby")
    async with other_user(server) as bob:
        t.line("hello bob")
        assert (await message_from(bob, "alice")).body == "hello bob"
        await t.expect("<alice> hello bob")

        t.type("half-typed li")  # no Enter
        await t.expect("li")  # echoed (perhaps in pieces): the line is in the input buffer
        await bob.send("#lobby", "incoming from bob")
        await t.expect("<bob> incoming from bob")
        await t.expect("half-typed li")  # the input line is drawn again below the new message
        t.line("ne")
        got = await message_from(bob, "alice")
        assert got.body == "half-typed line" and got.conv == LOBBY
        await t.expect("<alice> half-typed line")
        t.line("/quit")
        assert await t.wait_exit() == 0
        screen = t.text()
        assert PASSWORD not in screen  # never echoed
        assert re.search(r"> \d\d:\d\d #lobby +<alice> hello bob", screen)  # own messages are marked
        assert re.search(r"  \d\d:\d\d #lobby +<bob> incoming from bob", screen)
        assert not re.search(r"> \d\d:\d\d #lobby +<bob>", screen)
        assert "Traceback" not in screen

        token_file = tmp_path / "config" / "chorus" / "sessions" / f"127.0.0.1_{server.port}" / "alice"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert PASSWORD not in token_file.read_text()

        # The next start resumes with the saved token, and shows only what came while away.
        await bob.send("#lobby", "while you were away")
        t2 = spawn("--server", server.address, "--user", "alice")
        await t2.expect("logged in as alice; in #lobby")
        await t2.expect("<bob> while you were away")
        assert "Password" not in t2.text() and "incoming from bob" not in t2.text()
        t2.line("back again")
        assert (await message_from(bob, "alice")).body == "back again"


async def test_history_pages_back_by_cursor(spawn, server):
    async with other_user(server) as bob:
        for i in range(1, 26):
            await bob.send("#lobby", f"old {i:02d}")
        t = await start_alice(spawn, server)
        t.line("/join #lobby")
        await t.expect("joined #lobby")
        t.line("/history 10")
        await t.expect("#lobby history, messages 16 to 25:")
        for i in range(16, 26):
            await t.expect(f"<bob> old {i:02d}")
        t.line("/history 10")
        await t.expect("messages 6 to 15:")
        for i in range(6, 16):
            await t.expect(f"<bob> old {i:02d}")
        t.line("/history 10")
        await t.expect("messages 1 to 5:")
        await t.expect("<bob> old 05")
        await t.expect("that is the beginning of #lobby")
        t.line("/history")
        await t.expect("no older messages in #lobby")
        screen = t.text()
        assert [int(n) for n in re.findall(r"<bob> old (\d\d)", screen)] == (
            list(range(16, 26)) + list(range(6, 16)) + list(range(1, 6)))


async def test_server_restart_reconnects_catches_up_and_sends_what_was_typed_offline(spawn, server):
    async with other_user(server) as bob:
        t = await start_alice(spawn, server)
        t.line("/join #lobby")
        await t.expect("joined #lobby")
        await bob.send("#lobby", "before the restart")
        await t.expect("<bob> before the restart")

        server.kill()
        await t.expect("reconnecting")
        t.line("typed while offline")
        await t.expect("(pending)")
        # Keep alice away while the server comes back and bob talks: she must catch up on reconnect.
        t.pause()
        await trio.to_thread.run_sync(server.start)
        await bob.send("#lobby", "missed 1")
        await bob.send("#lobby", "missed 2")
        t.resume()
        await t.expect("<bob> missed 1")
        await t.expect("<bob> missed 2")
        got = await message_from(bob, "alice")
        assert got.body == "typed while offline"
        await bob.send("#lobby", "all done")
        await t.expect("<bob> all done")
        screen = t.text()
        assert re.search(r"~ \d\d:\d\d #lobby +<alice> typed while offline  \(pending\)", screen)
        assert re.search(r"> \d\d:\d\d #lobby +<alice> typed while offline\n", screen)  # acknowledged
        assert "reconnected; caught up 2 message(s)" in screen
        for body in ("before the restart", "missed 1", "missed 2", "all done"):
            assert screen.count(f"<bob> {body}") == 1, body  # in order (expects above), once each
        page = await bob.history("#lobby")
        assert [m.body for m in page.messages] == [
            "before the restart", "missed 1", "missed 2", "typed while offline", "all done"]
        assert "Traceback" not in screen


async def test_bad_commands_and_server_errors_are_one_line(spawn, server):
    t = await start_alice(spawn, server, colour=True)
    t.line("/frobnicate now")
    await t.expect("!! unknown command /frobnicate (try /help)")
    t.line("hello?")
    await t.expect("!! you are in no room: /join #room first, or /msg USER text")
    t.line("/join #No_Capitals")
    await t.expect("!! cannot join #No_Capitals: room names are")
    t.line("/msg nobody hi")
    await t.expect("!! not sent: there is no user nobody")
    t.line("/h")
    await t.expect("!! /h is ambiguous: /history, /help")
    t.line("/help")
    await t.expect("/history [N]")
    t.type("\x04")  # Ctrl-D on an empty line quits
    assert await t.wait_exit() == 0
    screen = t.text()
    assert "Traceback" not in screen
    errors = [line for line in screen.splitlines() if "!!" in line]
    assert len(errors) == 5, errors  # one line each
    assert "\x1b[1m\x1b[31m!! unknown command" in t.log.getvalue()  # red on a terminal without NO_COLOR


async def test_direct_messages_switching_and_tab_completion(spawn, server):
    async with other_user(server) as bob:
        t = await start_alice(spawn, server)
        t.line("/join #lobby")
        await t.expect("joined #lobby")
        t.line("/join #dev")
        await t.expect("joined #dev")
        await bob.send("#lobby", "ping in lobby")
        await t.expect("<bob> ping in lobby")
        await t.expect("(#lobby 1)>")  # unread count in the prompt
        await bob.send("@alice", "psst")
        await t.expect_re(r"@bob +<bob> psst")
        t.line("/msg bob hi back")
        got = await message_from(bob, "alice")
        assert (got.conv, got.body) == (proto.Conversation.direct("alice"), "hi back")
        t.type("/swi\t")
        await t.expect("tch")  # completed to /switch (the screen may redraw just the new part)
        t.type(" @b\t")
        await t.expect("ob")  # completed to @bob
        t.line("")
        await t.expect("now talking in @bob")
        t.line("/me waves")
        got = await message_from(bob, "alice")
        assert (got.conv, got.body) == (proto.Conversation.direct("alice"), "/me waves")
        await t.expect("* alice waves")
        t.line("/who #lobby")
        await t.expect("#lobby: alice (online), bob (online)")
        t.line("/leave #dev")
        await t.expect("left #dev")
        t.line("/rooms")
        await t.expect("#lobby  2 members")
        t.type("half a thought\x03")  # Ctrl-C quits too, cleanly
        assert await t.wait_exit() == 0
        assert "Traceback" not in t.text()
