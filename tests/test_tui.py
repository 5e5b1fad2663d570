"""The interactive ``chorus`` client: its pieces without a terminal, then the real program in a
pseudo-terminal (pexpect) against a real server process, with a library client as the other user."""
# The fixtures `server` and `spawn` come from chorusproc by import; the tests name them as parameters.
# ruff: noqa: F401, F811
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
from chorus.client import Disconnected, Reconnected, ServerError, open_client
from chorus.client._commands import MAX_HISTORY, Command, Text, UsageError, completions, help_lines, history_count, \
    parse
from chorus.client._config_dir import SessionStore, config_dir
from chorus.client._login import LoginError, _ask_password, _refusal, choose_user, parse_server, parse_servers
from chorus.client._render import Renderer, cells, mentions, one_line, use_colour, wrap
from chorus.client._rules import password_problem
from chorus.client._tui import Tui
from chorus.proto import ErrorCode
from chorusproc import ServerProcess, Terminal, server, spawn

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
    assert history_count("250") == 250  # more than a page: fetched in several, shown as one block
    for bad in ("x", "0", str(MAX_HISTORY + 1)):
        with pytest.raises(UsageError):
            history_count(bad)
    assert history_count("", 10) == 10 and history_count("40", 40) == 40
    with pytest.raises(UsageError, match="1 to 40 messages"):
        history_count("41", 40)
    # IRC's names: aliases win over prefixes, and a prefix of several commands is refused, never guessed.
    assert parse("/part") == Command("leave", "") and parse("/close @bob") == Command("leave", "@bob")
    assert parse("/s 2") == Command("switch", "2") and parse("/query bob hi") == Command("query", "bob hi")
    with pytest.raises(UsageError, match="ambiguous: /query, /quit"):
        parse("/q")
    assert any("/history [N]" in line for line in help_lines())
    assert help_lines("/who") == help_lines("who")


def test_tab_completion():
    sources = dict(rooms=("lobby", "dev", "random"), joined=("lobby",), users=("bob", "bea"),
                   convs=("#lobby", "@bob"))
    assert completions("/jo", **sources) == [("/join", -3)]
    assert {c for c, _ in completions("/", **sources)} >= {"/join", "/help", "/quit", "/history"}
    assert completions("/join #r", **sources) == [("#random", -2)]
    assert completions("/join d", **sources) == [("#dev", -1)]
    assert completions("/leave ", **sources) == [("#lobby", 0), ("@bob", 0)]
    assert completions("/msg b", **sources) == [("bea", -1), ("bob", -1)]
    assert completions("/switch @", **sources) == [("@bob", -1)]
    assert completions("/s", **sources) == [("/switch", -2), ("/sessions", -2)]  # not the alias /s itself
    assert completions("hello /jo", **sources) == []
    # Names anywhere in the line: a message's first word is addressed ("bob: "), later ones are plain names.
    assert completions("b", **sources) == [("bea: ", -1), ("bob: ", -1)]
    assert completions("ask bo", **sources) == [("bob", -2)]
    assert completions("/msg bob ask bo", **sources) == [("bob", -2)]
    assert completions("/me waves at be", **sources) == [("bea", -2)]
    assert completions("ping @b", **sources) == [("@bea", -2), ("@bob", -2)]
    assert completions("see #d", **sources) == [("#dev", -2)]
    assert completions("ask x", **sources) == [] and completions("ask ", **sources) == []


def test_render_lines():
    today = datetime.date.today()
    ts = int(datetime.datetime.combine(today, datetime.time(9, 5)).timestamp() * 1000)
    r = Renderer("alice", colour=False)
    mine = proto.Message(LOBBY, 1, ts, "alice", 7, "hi bob")
    theirs = proto.Message(LOBBY, 2, ts, "bob", 8, "hi\nthere\x1b[2J")
    assert r.message(mine) == "> 09:05 #lobby   <alice> hi bob"
    assert r.message(theirs) == "  09:05 #lobby   <bob> hi⏎there\ufffd[2J"  # one line, no escape sequence
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


FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # 👨‍👩‍👧: three emoji joined by ZWJ
PERSIAN = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # می‌خواهم: ZWNJ keeps می apart from خواهم


def test_grapheme_clusters_are_kept_and_controls_still_neutralised():
    """ZWJ and ZWNJ are format characters (not "printable"), but inside a grapheme cluster they are part of the
    text: 👨‍👩‍👧 must not become 👨�👩�👧. A C0/C1 control or a bidi override is always a cluster of its own
    (UAX #29) and is still replaced."""
    for text in (FAMILY, PERSIAN, "\u0915\u094d\u200d\u0937",  # Devanagari half-form with ZWJ
                 "\u2764\ufe0f", "e\u0301", "\U0001F44B\U0001F3FD",  # ❤️ (VS16), é (combining), 👋🏽
                 "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"):  # Scotland's flag
        assert one_line(f"hi {text} there") == f"hi {text} there", ascii(text)
    assert cells(FAMILY) == 2 and cells("\u2764\ufe0f") == 2 and cells("e\u0301") == 1 and cells("表") == 2
    # Bidi embeddings, overrides and isolates (Trojan Source), C0, C1 and DEL: never reach the terminal.
    for control in ("\u202e", "\u202a", "\u2066", "\u2069", "\x1b", "\x07", "\x9b", "\x7f", "\x00"):
        assert one_line(f"a{control}b") == "a\ufffdb", ascii(control)
        assert one_line(f"{FAMILY}{control}") == f"{FAMILY}\ufffd", ascii(control)
    assert one_line("\u200dlone") == "\ufffdlone"  # a joiner joining nothing is not text
    assert one_line("a\r\nb\u2028c") == "a⏎b⏎c"
    r = Renderer("alice", colour=False)
    line = r.message(proto.Message(LOBBY, 1, 1_700_000_000_000, "bob", 1, f"{FAMILY} {PERSIAN} \u202eevil"))
    assert line.endswith(f"<bob> {FAMILY} {PERSIAN} \ufffdevil")


def test_long_messages_wrap_at_words_under_the_text_column():
    today = datetime.date.today()
    ts = int(datetime.datetime.combine(today, datetime.time(9, 5)).timestamp() * 1000)
    r = Renderer("alice", colour=False)
    body = "the quick brown fox jumps over the lazy dog " * 3 + FAMILY + " " + "x" * 50
    lines = r.message(proto.Message(LOBBY, 1, ts, "bob", 1, body), width=60).split("\n")
    head = "  09:05 #lobby   <bob> "
    assert lines[0].startswith(head + "the quick")
    assert all(cells(line) <= 60 for line in lines), lines
    assert all(line.startswith(" " * len(head)) and line[len(head)] != " " for line in lines[1:]), lines
    words = [w for line in lines for w in line[len(head):].split()]
    pieces = [w for w in words if set(w) == {"x"}]
    assert [w for w in words if set(w) != {"x"}] == body.split()[:-1]  # no word split...
    assert "".join(pieces) == "x" * 50 and len(pieces) > 1  # ...unless longer than the line
    assert FAMILY in "".join(lines)
    # A short message, or no width (a pipe): one line, as before.
    assert "\n" not in r.message(proto.Message(LOBBY, 2, ts, "bob", 2, "short"), width=60)
    assert "\n" not in r.message(proto.Message(LOBBY, 3, ts, "bob", 3, body))
    # Where the first line has little room left, a word that fits on a line of its own goes there, whole.
    assert wrap("a fairly long message", 4, 20) == ["a", "fairly long message"]
    assert wrap("ab cdefghijklmnop q", 4, 6) == ["ab c", "defghi", "jklmno", "p q"]  # longer than a line: split
    assert wrap(f"{FAMILY}{FAMILY}{FAMILY}", 3, 4) == [FAMILY, FAMILY + FAMILY]  # between clusters, never inside
    pending = r.message(proto.Message(LOBBY, 0, ts - 86_400_000, "alice", 5, "a fairly long message typed"),
                        pending=True, width=40).split("\n")
    assert pending[0].endswith("<alice> a") and pending[1:] == [" " * 20 + "fairly long message",
                                                                " " * 20 + "typed  (pending)"]
    # Status and error lines wrap the same way, under their text.
    assert r.error("cannot join #No_Capitals: room names are lowercase", width=30).split("\n") == [
        "!! cannot join #No_Capitals:", "   room names are lowercase"]
    assert r.info("short", width=30) == "-- short" and "\n" not in r.info("x " * 40)
    # On a narrow terminal the indent is at most half the width, so there is room for the words.
    narrow = r.message(proto.Message(LOBBY, 4, ts, "bob", 4, body), width=30).split("\n")
    assert all(cells(line) <= 30 for line in narrow)
    assert all(line.startswith(" " * 15) and line[15] != " " for line in narrow[1:]), narrow


def test_a_message_naming_you_is_marked():
    r = Renderer("alice", colour=False)
    ts = 1_700_000_000_000
    for body in ("hey @alice", "alice: lunch?", "ALICE!", "is (alice) there", "thanks alice."):
        assert mentions(body, "alice") and r.message(proto.Message(LOBBY, 1, ts, "bob", 1, body)).startswith("! ")
    for body in ("malice", "alice-bot says hi", "mail alice@example.org", "alice_2", "@alicex", "alice.b"):
        assert not mentions(body, "alice"), body
    assert r.message(proto.Message(LOBBY, 1, ts, "alice", 1, "I am alice")).startswith("> ")  # not by yourself
    coloured = Renderer("alice", colour=True).message(proto.Message(LOBBY, 1, ts, "bob", 1, "x " * 40 + "alice"),
                                                      width=50)
    assert all("\x1b[1;7m" in line and not line.startswith(" \x1b[1;7m") for line in coloured.split("\n"))


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


async def test_status_and_prompt_show_unread_counts_and_numbers_stay():
    lines = []
    tui = Tui(_StubClient(), Renderer("alice", colour=False), terminal=False, out=lines.append)
    dev, bob = proto.Conversation.room("dev"), proto.Conversation.direct("bob")
    tui._open(dev)
    tui._open(LOBBY)
    tui.current = dev
    ts = 1_700_000_000_000
    tui._show(proto.Message(LOBBY, 1, ts, "bob", 1, "printed while catching up"))
    tui._live = True  # the start's backlog is on screen: not unread; what comes later elsewhere is
    tui._show(proto.Message(LOBBY, 2, ts, "bob", 2, "m2"))
    tui._show(proto.Message(LOBBY, 3, ts, "bob", 3, "m3"))
    tui._show(proto.Message(LOBBY, 3, ts, "bob", 3, "m3"))  # already printed (by a recap): not twice
    tui._show(proto.Message(bob, 1, ts, "bob", 9, "psst"))
    tui._show(proto.Message(dev, 1, ts, "bob", 10, "here"))
    tui.refresh()
    assert tui.status == "[1:#dev] 2:#lobby(2) 3:@bob(1)"
    assert tui.prompt_text == "#dev (#lobby 2, @bob 1)> "
    assert sum("m3" in line for line in lines) == 1
    tui.on_line("/switch 2")
    assert tui.current == LOBBY and tui.prompt_text == "#lobby (@bob 1)> "
    tui.on_line("/switch #nowhere")
    assert lines[-1] == "!! you are not in #nowhere; /join #nowhere first"
    # Closing one frees its number for the next; the others keep theirs (/switch 3 still means @bob).
    tui._close(LOBBY)
    assert tui.current == dev and tui.numbers == {dev: 1, bob: 3}
    tui._open(proto.Conversation.room("new"))
    tui._open(proto.Conversation.room("newer"))
    assert tui.numbers == {dev: 1, bob: 3, proto.Conversation.room("new"): 2, proto.Conversation.room("newer"): 4}
    tui.on_line("/switch 3")
    assert tui.current == bob
    tui.on_line("/switch 5")
    assert lines[-1] == "!! no conversation number 5; the status bar numbers them (1, 2, 3, 4)"
    tui.on_line("/part")  # in a direct conversation: closes it (the server keeps it)
    assert lines[-1] == "-- closed @bob; now talking in #dev" and bob not in tui.numbers
    tui.connected = False
    tui.refresh()
    assert tui.prompt_text.startswith("[offline] ") and tui.status.startswith("reconnecting… | ")


async def test_reading_on_another_device_clears_the_unread_count():
    tui = Tui(_StubClient(), Renderer("alice", colour=False), terminal=False, out=lambda line: None)
    dev = proto.Conversation.room("dev")
    tui._open(dev)
    tui._open(LOBBY)
    tui.current, tui._live = dev, True
    for seq in (1, 2, 3):
        tui._show(proto.Message(LOBBY, seq, 1_700_000_000_000, "bob", seq, f"m{seq}"))
    tui._receipt(proto.Receipt(LOBBY, "bob", proto.ReceiptKind.READ, 3))  # bob's reading is not ours
    tui._receipt(proto.Receipt(LOBBY, "alice", proto.ReceiptKind.DELIVERED, 3))
    tui._receipt(proto.Receipt(LOBBY, "alice", proto.ReceiptKind.READ, 2))  # not everything on screen
    assert tui.unread == {LOBBY: 3}
    tui._receipt(proto.Receipt(LOBBY, "alice", proto.ReceiptKind.READ, 3))
    assert tui.unread == {} and tui._read_marked[LOBBY] == 3  # and this client will not send READ 3 again


async def test_typing_notices_only_where_the_server_knows_us(nursery):
    stub = _StubClient()
    tui = Tui(stub, Renderer("alice", colour=False), terminal=False, out=lambda line: None)
    tui._nursery = nursery
    tui._open(LOBBY)
    for conv in (proto.Conversation.room("elsewhere"), proto.Conversation.direct("stranger"), LOBBY):
        tui.current = conv
        tui.on_keystroke("h")
        tui.on_keystroke("hi")  # at most one notice per few seconds
        tui.on_keystroke("/join")  # commands are not chat
    await trio.testing.wait_all_tasks_blocked()
    assert stub.typed == [LOBBY]


# -- the real program in a terminal ---------------------------------------------------------------------


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


async def action_from(c, actor: str) -> proto.Events:
    """The next ACTION event ``c`` receives from ``actor``."""
    with trio.fail_after(20):
        async for event in c.events():
            if isinstance(event, proto.Events) and (event.events[0].kind, event.events[0].actor) == (
                    proto.EventKind.ACTION, actor):
                return event
    raise AssertionError("event stream ended")


async def start_alice(spawn, server, *, colour: bool = False, columns: int = 200) -> Terminal:
    env = {"CHORUS_PASSWORD": PASSWORD} if colour is False else {"CHORUS_PASSWORD": PASSWORD, "NO_COLOR": ""}
    t = spawn("--server", server.address, "--user", "alice", "--register", columns=columns, **env)
    await t.expect("logged in as alice")
    return t


async def alice_in_lobby(spawn, server, **kwargs) -> Terminal:
    """alice's terminal, registered, logged in and in #lobby."""
    t = await start_alice(spawn, server, **kwargs)
    t.line("/join #lobby")
    await t.expect("joined #lobby")
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


@pytest.fixture
def small_pages(tmp_path):
    """A server whose HISTORY pages hold 4 messages: /history N pages several times for one block."""
    s = ServerProcess(tmp_path / "data", "--max-page", "4")
    s.start()
    yield s
    s.kill()


async def test_join_shows_the_last_messages_and_history_pages_back_in_order(spawn, small_pages):
    server = small_pages
    async with other_user(server) as bob:
        for i in range(1, 26):
            await bob.send("#lobby", f"old {i:02d}")
        t = await start_alice(spawn, server)
        t.line("/join #lobby")
        await t.expect("joined #lobby (2 members, 25 messages so far)")
        await t.expect("#lobby: the last 10 messages; /history shows older ones")  # in 3 pages of 4
        for i in range(16, 26):
            await t.expect(f"<bob> old {i:02d}")
        t.line("/history 12")
        await t.expect("#lobby history, messages 4 to 15:")
        t.line("/history 10")
        await t.expect("#lobby history, messages 1 to 3:")
        await t.expect("that is the beginning of #lobby")
        t.line("/history")
        await t.expect("no older messages in #lobby")
        await bob.send("#lobby", "new 26")
        await t.expect("<bob> new 26")
        screen = t.text()
        # Each block oldest first, however many pages it took; nothing twice.
        assert [int(n) for n in re.findall(r"<bob> (?:old|new) (\d\d)", screen)] == (
            list(range(16, 26)) + list(range(4, 16)) + list(range(1, 4)) + [26])


async def test_server_restart_reconnects_catches_up_and_sends_what_was_typed_offline(spawn, server):
    async with other_user(server) as bob:
        t = await alice_in_lobby(spawn, server)
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
        assert re.search(r"> \d\d:\d\d #lobby +<alice> typed while offline  #\d+\n", screen)  # acknowledged
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
        t = await alice_in_lobby(spawn, server)
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
        got = await action_from(bob, "alice")  # an ACTION (version 2), not a "/me" message
        assert (got.conv, got.events[0].text) == (proto.Conversation.direct("alice"), "waves")
        await t.expect("* alice waves")
        t.line("/who #lobby")
        await t.expect("#lobby: bob (owner, online), alice (online)")  # roles first (bob made the room)
        t.line("/leave #dev")
        await t.expect("left #dev")
        t.line("/rooms")
        await t.expect("#lobby  2 members")
        t.type("half a thought\x03")  # Ctrl-C quits too, cleanly
        assert await t.wait_exit() == 0
        assert "Traceback" not in t.text()


async def test_emoji_and_scripts_stay_whole_and_long_messages_wrap_under_the_text(spawn, server):
    async with other_user(server) as bob:
        t = await alice_in_lobby(spawn, server, columns=60)
        await bob.send("#lobby", f"family {FAMILY} and {PERSIAN} but \u202eevil\x1b[2J")
        await t.expect(f"family {FAMILY} and {PERSIAN} but \ufffdevil\ufffd[2J")  # joiners kept, controls not
        long = " ".join(f"word{i:02d}" for i in range(30))
        await bob.send("#lobby", long)
        await t.expect("word29")
        await bob.send("#lobby", "done")
        await t.expect("<bob> done")
        lines = t.text().splitlines()
        first = next(i for i, line in enumerate(lines) if "<bob> word00" in line)
        start = re.search(r"  \d\d:\d\d #lobby", lines[first]).start()  # after the prompt it was printed over
        end = next(i for i, line in enumerate(lines) if "<bob> done" in line)
        block = [lines[first][start:], *lines[first + 1:end]]
        indent = block[0].index("word00")
        assert indent == len("  00:00 #lobby   <bob> ")
        assert all(len(line) <= 60 for line in block), block
        assert all(line.startswith((" " * indent + "word", " " * indent + "#")) for line in block[1:]), block
        *words, seq = " ".join(block).split()[3:]
        assert len(block) == 7 and " ".join(words) == long and seq == "#2"  # every word whole, in order; its seq
        assert "\u202e" not in t.log.getvalue() and "\x1b[2J" not in t.log.getvalue()


async def test_stable_numbers_alt_n_part_query_and_names_completed_anywhere(spawn, server):
    async with other_user(server) as bob:
        t = await start_alice(spawn, server)
        for room in ("lobby", "dev"):
            t.line(f"/join #{room}")
            await t.expect(f"joined #{room}")
        await bob.send("@alice", "psst")
        await t.expect_re(r"@bob +<bob> psst")  # @bob is number 3
        t.line("/part #dev")
        await t.expect("left #dev")
        t.line("/join #zed")  # takes the free number 2; @bob keeps 3
        await t.expect("joined #zed")
        t.type("\x1b3")  # Alt-3
        await t.expect("now talking in @bob")
        t.line("/switch 2")
        await t.expect("now talking in #zed")
        t.type("\x1b1")
        await t.expect("now talking in #lobby")
        t.type("thanks b\t")  # a name completes anywhere in the line
        await t.expect("ob")
        t.line("!")
        got = await message_from(bob, "alice")
        assert (got.conv, got.body) == (LOBBY, "thanks bob!")
        t.line("/query bob still there?")  # opens (here: returns to) the direct conversation and sends
        await t.expect("now talking in @bob")
        got = await message_from(bob, "alice")
        assert (got.conv, got.body) == (proto.Conversation.direct("alice"), "still there?")
        t.line("/close")
        await t.expect("closed @bob; now talking in #lobby")
        t.line("/switch 3")
        await t.expect("!! no conversation number 3; the status bar numbers them (1, 2)")
        await bob.send("@alice", "back")  # a new message opens it again, with the lowest free number
        await t.expect_re(r"@bob +<bob> back")
        t.type("\x1b3")
        await t.expect("now talking in @bob")
        assert "Traceback" not in t.text()


async def test_a_mention_is_marked_and_rings_the_bell(spawn, server):
    async with other_user(server) as bob:
        t = await alice_in_lobby(spawn, server)
        await bob.send("#lobby", "nothing for anyone")
        await t.expect("<bob> nothing for anyone")
        assert "\x07" not in t.log.getvalue()
        await bob.send("#lobby", "@alice have a look")
        await t.expect("<bob> @alice have a look")
        await bob.send("#lobby", "malice is not a mention")
        await t.expect("<bob> malice is not a mention")
        screen = t.text()
        assert re.search(r"(^|>)! \d\d:\d\d #lobby +<bob> @alice have a look", screen, re.M)
        assert re.search(r"(^|>)  \d\d:\d\d #lobby +<bob> malice is not a mention", screen, re.M)
        assert t.log.getvalue().count("\x07") == 1


async def test_ctrl_d_at_the_password_prompt_and_three_wrong_passwords(spawn, server):
    async with other_user(server, "alice"):  # alice exists, with another password
        pass
    t = spawn("--server", server.address, "--user", "alice")
    await t.expect("Password for alice: ")
    t.type("\x04")
    assert await t.wait_exit() == 1
    assert "!! no password given" in t.text() and "Traceback" not in t.text()

    t = spawn("--server", server.address, "--user", "alice")
    for _ in range(3):
        await t.expect("Password for alice: ")
        t.line("not the password")
    await t.expect("if there is no account alice on " + server.address + " yet, --register creates it")
    assert await t.wait_exit() == 1
    assert t.text().count("wrong user name or password") == 3 and "Traceback" not in t.text()


async def test_a_server_that_is_down_is_said_before_asking_for_a_password(spawn, server):
    server.kill()
    t = spawn("--server", server.address, "--user", "alice")
    await t.expect(f"!! cannot reach {server.address}")
    assert await t.wait_exit() == 1
    assert "Password" not in t.text() and "Traceback" not in t.text()


async def test_ctrl_c_with_unsent_messages_asks_first(spawn, server):
    t = await alice_in_lobby(spawn, server)
    server.kill()
    await t.expect("reconnecting")
    t.line("one")
    await t.expect("(pending)")
    t.type("\x03")
    await t.expect("1 message not sent yet (the server is away): quit anyway and lose it? Ctrl-C again")
    t.line("two")  # typing on keeps the session (and the question is asked again)
    await t.expect("<alice> two  (pending)")
    t.type("\x03")
    await t.expect("2 messages not sent yet")
    assert t.child.isalive()
    t.type("\x03")
    assert await t.wait_exit() == 0
    assert "!! 2 message(s) not sent" in t.text() and "Traceback" not in t.text()


async def test_passwd_sessions_revoke_and_logout_all(spawn, server, tmp_path):
    new_password = "brand-new-secret"
    t = await start_alice(spawn, server)
    async with open_client("127.0.0.1", server.port, username="alice", password=PASSWORD,
                           reconnect=False) as phone:
        t.line("/sessions")
        await t.expect("2 sessions, oldest first (/revoke N logs one out):")
        await t.expect_re(r"1  started \d\d:\d\d, last used \d\d:\d\d  \(this one\)")
        await t.expect_re(r"2  started \d\d:\d\d, last used \d\d:\d\d\r?\n")
        t.line("/revoke 1")
        await t.expect("!! that is this session: /quit leaves it, /logout-all ends every one")
        t.line("/revoke 2")
        await t.expect("session 2 logged out")
        with trio.fail_after(20):
            async for _event in phone.events():  # the phone's connection is closed for good
                pass
        assert not phone.connected

    async def passwd(*answers: tuple[str, str]) -> None:
        """/passwd, answering each question (the text it waits for, then the answer)."""
        t.line("/passwd")
        for question, answer in answers:
            await t.expect(question)
            t.line(answer)

    new_questions = (("New password (", new_password), ("New password again:", new_password))
    await passwd(("Current password:", "not-my-password"), *new_questions)
    await t.expect("!! wrong password; not changed")
    await passwd(("Current password:", PASSWORD), ("New password (", "short"), ("!! passwords are", new_password),
                 ("New password again:", new_password))
    await t.expect("-- password changed; your other sessions are logged out")
    t.line("/passwd")
    await t.expect("Current password:")
    t.type("\x03")  # Ctrl-C cancels the questions, and does not quit
    await t.expect("-- password not changed")
    t.type("\x1b[A")  # the up arrow recalls the last line typed: "/passwd", never an answer
    await t.expect("/passwd")
    t.line("")
    await t.expect("Current password:")
    t.type("\x03")
    await t.expect("-- password not changed")
    for secret in (PASSWORD, new_password, "not-my-password", "short", "*****"):
        assert secret not in t.log.getvalue(), secret  # never echoed, not even as stars
    async with open_client("127.0.0.1", server.port, username="alice", password=new_password):
        pass  # the new password works

    t.line("/logout-all")
    await t.expect("logged out everywhere")
    assert await t.wait_exit() == 0, t.text()[-6000:]
    assert not (tmp_path / "config" / "chorus" / "sessions" / f"127.0.0.1_{server.port}" / "alice").exists()
    assert "Traceback" not in t.text()
    with pytest.raises(ServerError):
        async with open_client("127.0.0.1", server.port, username="alice", password=PASSWORD, reconnect=False):
            pass  # the old password is gone


async def test_read_cursor_follows_what_was_shown_in_the_current_conversation(spawn, server):
    async with other_user(server) as bob:
        t = await alice_in_lobby(spawn, server)
        await bob.join("dev")
        t.line("/join #dev")
        await t.expect("joined #dev")  # the current conversation now
        for i in (1, 2):
            await bob.send("#dev", f"in dev {i}")
        for i in (1, 2, 3):
            await bob.send("#lobby", f"in lobby {i}")
        await t.expect("<bob> in lobby 3")

        async def alices_cursor(room: str) -> proto.CursorInfo:
            (mine,) = [c for c in await bob.cursors(f"#{room}") if c.user == "alice"]
            return mine

        async def wait_for(room: str, delivered: int, read: int) -> None:
            with trio.fail_after(10):  # the client marks once a second
                while (c := await alices_cursor(room)) and (c.delivered_seq, c.read_seq) != (delivered, read):
                    await trio.sleep(0.1)

        await wait_for("dev", delivered=2, read=2)  # shown while #dev was current: read
        await wait_for("lobby", delivered=3, read=0)  # shown, but while elsewhere: not read yet
        t.line("/switch #lobby")
        await t.expect("now talking in #lobby")
        await wait_for("lobby", delivered=3, read=3)


async def test_after_a_password_change_the_library_logs_in_again_with_the_new_one(server):
    """The library keeps the password to LOGIN when its token is refused on a reconnect: after change_password it
    must be the new one (the terminal's /passwd relies on it)."""
    new_password = "brand-new-secret"
    async with open_client("127.0.0.1", server.port, username="carol", password="carol-old-pw", register=True,
                           backoff_cap_s=0.2) as carol:
        await carol.change_password("carol-old-pw", new_password)
        carol.token = "a token the server never issued"
        server.kill()  # the reconnect RESUMEs with that token, is refused, and logs in with the password
        await trio.to_thread.run_sync(server.start)
        with trio.fail_after(20):
            async for event in carol.events():
                if isinstance(event, Reconnected):
                    break
                assert not isinstance(event, Disconnected) or event.will_reconnect, event
        assert carol.connected and carol.token != "a token the server never issued"


async def test_a_new_start_numbers_direct_conversations_and_keeps_what_was_not_read_unread(spawn, server):
    async with other_user(server) as bob:
        t = await start_alice(spawn, server)
        await bob.join("zoo")
        for room in ("zoo", "lobby"):  # #lobby is the current one, #zoo elsewhere
            t.line(f"/join #{room}")
            await t.expect(f"joined #{room}")
        await bob.send("#zoo", "zoo 1")
        await bob.send("#zoo", "zoo 2")
        await bob.send("@alice", "psst")
        await t.expect_re(r"@bob +<bob> psst")
        t.line("/quit")  # shown (DELIVERED) but not read: #zoo and @bob were never the current conversation
        assert await t.wait_exit() == 0

        again = spawn("--server", server.address, "--user", "alice")
        await again.expect("logged in as alice; in #lobby, #zoo")
        # Unread (in the prompt) from the server's cursors, not from the screen. (prompt_toolkit redraws only what
        # changed, so the prompt's start, "#lobby", may come in pieces.)
        await again.expect("(#zoo 2, @bob 1)>")
        again.line("/switch 3")  # @bob is numbered although nothing new came from him
        await again.expect("now talking in @bob")
        await again.expect("<bob> psst")  # nothing of it on screen yet: the recap
        assert "Traceback" not in again.text()
