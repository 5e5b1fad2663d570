"""``chorus send`` and ``chorus tail`` as a shell script uses them: real processes, pipes, a real server."""
# The fixtures `server` and `spawn` come from chorusproc by import; the tests name them as parameters.
# ruff: noqa: F401, F811
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pexpect.popen_spawn import PopenSpawn

from chorusproc import EXPECT_TIMEOUT_S, REPO, chorus_env, server

PASSWORD = "carol-secret-pw"



@pytest.fixture
def chorus(tmp_path, server):
    """``chorus(*args, input=..., **env)`` → CompletedProcess, as carol on the test server."""

    def run(*args: str, input: str | None = None, user: str = "carol", **env: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "chorus.client", "--server", server.address, "--user", user, *args]
        return subprocess.run(command, cwd=REPO, env=chorus_env(tmp_path / "config", **env), input=input or "",
                              capture_output=True, text=True, timeout=60)

    return run


@pytest.fixture
def tails(tmp_path, server):
    started: list[PopenSpawn] = []

    def start(*args: str, **env: str) -> PopenSpawn:
        # Pipes, not a terminal: what a script sees.
        command = [sys.executable, "-m", "chorus.client", "--server", server.address, "--user", "carol", "tail", *args]
        p = PopenSpawn(command, cwd=str(REPO), env=chorus_env(tmp_path / "config", NO_COLOR="", **env),
                       encoding="utf-8", timeout=EXPECT_TIMEOUT_S)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait()


def json_lines(p: PopenSpawn, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        p.expect("\n")
        assert p.before.startswith("{"), p.before
        out.append(json.loads(p.before))
    return out


def test_send_then_tail_json_with_since_and_follow(chorus, tails, tmp_path, server):
    done = chorus("--register", "send", "--create", "#news", "first", "second", CHORUS_PASSWORD=PASSWORD)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    token = tmp_path / "config" / "chorus" / "sessions" / f"127.0.0.1_{server.port}" / "carol"
    assert token.stat().st_mode & 0o777 == 0o600
    # The saved session is enough from now on: no password in the environment.
    assert chorus("send", "news", "third").returncode == 0

    tail = tails("#news", "--since", "0", "--json")
    got = json_lines(tail, 3)
    assert [(m["seq"], m["sender"], m["body"], m["conv"]) for m in got] == [
        (1, "carol", "first", "#news"), (2, "carol", "second", "#news"), (3, "carol", "third", "#news")]
    assert all(isinstance(m["ts_ms"], int) and m["time"].endswith("+00:00") for m in got)
    tail.expect_exact("chorus: following #news (Ctrl-C to stop)\n")  # on stderr (merged here): now live

    # It keeps following: new messages, also from stdin lines, arrive in order.
    assert chorus("send", "#news", input="fourth\n\nfifth\n").returncode == 0
    assert [m["body"] for m in json_lines(tail, 2)] == ["fourth", "fifth"]
    assert chorus("--register", "send", "#news", "from dave", user="dave", CHORUS_PASSWORD="dave-secret-pw"
                  ).returncode == 0
    (m,) = json_lines(tail, 1)
    assert (m["seq"], m["sender"], m["body"]) == (6, "dave", "from dave")


def test_tail_plain_lines_since_a_seq_without_colour_on_a_pipe(chorus, tails):
    assert chorus("--register", "send", "--create", "#news", "one", "two", "three", "/me waves",
                  CHORUS_PASSWORD=PASSWORD).returncode == 0
    tail = tails("#news", "--since", "2")
    tail.expect("\n")
    assert re.fullmatch(r"\d\d:\d\d #news +<carol> three", tail.before), tail.before
    tail.expect("\n")
    assert re.fullmatch(r"\d\d:\d\d #news +\* carol waves", tail.before), tail.before
    tail.expect_exact("chorus: following #news (Ctrl-C to stop)\n")
    # --last 0: only new messages are printed.
    live = tails("#news", "--last", "0")
    live.expect_exact("chorus: following #news (Ctrl-C to stop)\n")
    assert live.before == ""
    assert chorus("send", "#news", "newest").returncode == 0
    live.expect("\n")
    assert live.before.endswith("<carol> newest") and "\x1b" not in live.before
    tail.expect("\n")
    assert tail.before.endswith("<carol> newest")


def test_tail_of_a_direct_conversation(chorus, tails):
    assert chorus("--register", "send", "--create", "#x", "hi", user="dave", CHORUS_PASSWORD="dave-secret-pw"
                  ).returncode == 0
    assert chorus("--register", "send", "@dave", "psst dave", CHORUS_PASSWORD=PASSWORD).returncode == 0
    tail = tails("@dave", "--since", "0", "--json")
    (m,) = json_lines(tail, 1)
    assert (m["conv"], m["sender"], m["body"]) == ("@dave", "carol", "psst dave")
    tail.expect_exact("chorus: following @dave (Ctrl-C to stop)\n")
    assert chorus("send", "@carol", "hi carol", user="dave").returncode == 0
    (m,) = json_lines(tail, 1)
    assert (m["conv"], m["sender"], m["body"]) == ("@dave", "dave", "hi carol")


def test_errors_are_one_line_on_stderr(chorus, tmp_path):
    no_creds = chorus("send", "#news", "hi")
    assert no_creds.returncode == 1 and no_creds.stdout == ""
    assert no_creds.stderr.startswith("!! no saved session for carol") and no_creds.stderr.count("\n") == 1
    bad_room = chorus("--register", "send", "--create", "#Bad", "hi", CHORUS_PASSWORD=PASSWORD)
    assert bad_room.returncode == 1 and bad_room.stderr.startswith("!! cannot join #Bad: room names are")
    wrong = chorus("send", "#news", "hi", user="dave", CHORUS_PASSWORD="not-the-password")
    assert (wrong.returncode, wrong.stderr) == (1, "!! wrong user name or password\n")
    for result in (no_creds, bad_room, wrong):
        assert "Traceback" not in result.stderr


def test_register_of_a_taken_name_and_an_unreachable_server(tmp_path, server):
    env = chorus_env(tmp_path / "config-a", CHORUS_PASSWORD=PASSWORD)
    base = [sys.executable, "-m", "chorus.client", "--user", "erin"]
    ok = subprocess.run([*base, "--server", server.address, "--register", "send", "--create", "#a", "hi"], env=env,
                        cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0
    elsewhere = chorus_env(tmp_path / "config-b", CHORUS_PASSWORD=PASSWORD)  # no saved token there
    taken = subprocess.run([*base, "--server", server.address, "--register", "send", "#a", "hi"], env=elsewhere,
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (taken.returncode, taken.stderr) == (
        1, "!! the name erin is taken; to log in as erin, leave out --register\n")
    server.kill()
    down = subprocess.run([*base, "--server", server.address, "send", "#a", "hi"], env=elsewhere, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and down.stderr.startswith(f"!! cannot reach {server.address}")
    assert "Traceback" not in taken.stderr + down.stderr


def test_entry_points():
    help_text = subprocess.run([sys.executable, "-m", "chorus.client", "--help"], cwd=REPO, capture_output=True,
                               text=True)
    assert help_text.returncode == 0 and "CHORUS_PASSWORD" in help_text.stdout and "tail" in help_text.stdout
    script = Path(sys.executable).parent / "chorus"
    if not script.exists():
        pytest.skip("the chorus console script is not installed (pip install -e .)")
    tail_help = subprocess.run([str(script), "tail", "--help"], capture_output=True, text=True)
    assert tail_help.returncode == 0 and "--since SEQ" in tail_help.stdout and "--json" in tail_help.stdout
    usage = subprocess.run([str(script), "tail"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_interactive_client_reads_lines_from_a_pipe(tmp_path, server, chorus):
    assert chorus("--register", "send", "--create", "#pipe", "already here", CHORUS_PASSWORD=PASSWORD).returncode == 0
    # A terminal is covered in test_tui.py; this is the path without one (no prompt, no status bar).
    result = subprocess.run([sys.executable, "-m", "chorus.client", "--server", server.address, "--user", "carol"],
                            input="/join #pipe\nfrom a pipe\n/who\n", env=chorus_env(tmp_path / "config"),
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^> \d\d:\d\d #pipe +<carol> from a pipe  #2$", result.stdout, re.M), result.stdout
    assert "#pipe: carol (owner, online)" in result.stdout and "\x1b" not in result.stdout


def test_send_refuses_a_room_that_does_not_exist_unless_create(chorus, tails):
    assert chorus("--register", "send", "--create", "#lobby", "hello", CHORUS_PASSWORD=PASSWORD).returncode == 0
    typo = chorus("send", "#lobyy", "hello?")
    assert (typo.returncode, typo.stdout) == (1, "")
    assert typo.stderr == "!! there is no room #lobyy on this server (did you mean #lobby? --create makes it)\n"
    nothing_like_it = chorus("send", "#zzz", "hello?")
    assert nothing_like_it.stderr == "!! there is no room #zzz on this server (--create makes it)\n"
    assert chorus("tail", "#lobyy").stderr.startswith("!! there is no room #lobyy")  # tail refuses it too
    # Nothing was created by the refusals; --create does create it.
    tail = tails("#lobyy", "--create", "--json")
    tail.expect_exact("chorus: following #lobyy (Ctrl-C to stop)\n")
    assert chorus("send", "#lobyy", "now it exists").returncode == 0
    (m,) = json_lines(tail, 1)
    assert (m["seq"], m["body"]) == (1, "now it exists")


def test_tail_shows_the_last_messages_then_follows(chorus, tails):
    bodies = [f"m{i:02d}" for i in range(1, 31)]
    assert chorus("--register", "send", "--create", "#busy", *bodies, CHORUS_PASSWORD=PASSWORD).returncode == 0
    tail = tails("#busy", "--json")  # the default: the last 20
    assert [m["body"] for m in json_lines(tail, 20)] == bodies[10:]
    tail.expect_exact("chorus: following #busy (Ctrl-C to stop)\n")
    assert tail.before == ""
    three = tails("#busy", "--last", "3")
    for body in bodies[-3:]:
        three.expect("\n")
        assert three.before.endswith(f"<carol> {body}"), three.before
    three.expect_exact("chorus: following #busy (Ctrl-C to stop)\n")
    assert chorus("send", "#busy", "live one").returncode == 0
    assert [m["body"] for m in json_lines(tail, 1)] == ["live one"]
    three.expect("\n")
    assert three.before.endswith("<carol> live one")
    both = chorus("tail", "#busy", "--last", "3", "--since", "5")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert chorus("tail", "#busy", "--last", "-1").returncode == 2
