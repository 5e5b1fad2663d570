"""The real ``chorus-server`` process, given each operator mistake from issue 9 item 14: one line on stderr
naming the thing and the fix, exit status 2 for a usage error and 1 for what the machine refuses, never a
traceback or the usage block, and it never starts serving."""
from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chorusproc import REPO
from chorus.server._store import SCHEMA_VERSION

#: The server must refuse before it serves, in well under a second; generous for two shared cores.
TIMEOUT_S = 30


def chorus_server(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (``python -m chorus.server`` if it is not installed) in ``cwd``."""
    script = Path(sys.executable).parent / "chorus-server"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "chorus.server"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The one line the mistake printed, after checking everything around it."""
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stdout == ""  # never got as far as "Chorus listening on"
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith("chorus-server: error: "), result.stderr
    return result.stderr.removeprefix("chorus-server: error: ").rstrip("\n")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on, the way a second chorus-server would find it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- usage errors: exit status 2 ------------------------------------------------------------------------

def test_port_out_of_range(tmp_path):
    line = error_line(chorus_server(tmp_path, "--port", "99999"), 2)
    assert line == "--port: must be 0..65535 (0 picks a free port), not 99999"


def test_unknown_log_level(tmp_path):
    line = error_line(chorus_server(tmp_path, "--log-level", "LOUD"), 2)
    assert line == '--log-level: must be one of DEBUG, INFO, WARNING, ERROR, not "LOUD"'


def test_a_string_where_the_file_needs_an_integer(tmp_path):
    (tmp_path / "chorus.toml").write_text('port = "x"\n')
    line = error_line(chorus_server(tmp_path, "--config", "chorus.toml"), 2)
    assert line == 'chorus.toml: port: expected an integer, got "x"'


def test_a_misspelt_key_gets_the_right_one(tmp_path):
    (tmp_path / "chorus.toml").write_text("ws-port = 7421\n")
    line = error_line(chorus_server(tmp_path, "--config", "chorus.toml"), 2)
    assert line == "chorus.toml: unknown option ws-port (did you mean ws_port?)"


def test_a_toml_syntax_error_names_file_and_line(tmp_path):
    (tmp_path / "chorus.toml").write_text("port = 7420\nhost = 127.0.0.1\n")  # an unquoted string
    line = error_line(chorus_server(tmp_path, "--config", "chorus.toml"), 2)
    assert line.startswith("chorus.toml: not valid TOML: ") and "line 2" in line


def test_an_unknown_flag_gets_a_suggestion_not_the_usage_block(tmp_path):
    line = error_line(chorus_server(tmp_path, "--ws_port", "7421"), 2)
    assert line == "unrecognized arguments: --ws_port 7421 (did you mean --ws-port?)"


def test_replies_that_could_not_be_encoded_are_refused_at_start(tmp_path):
    line = error_line(chorus_server(tmp_path, "--max-body-bytes", "20000"), 2)
    assert "--max-body-bytes" in line and "--max-page" in line and "raise --max-frame-bytes to" in line
    line = error_line(chorus_server(tmp_path, "--max-page", "70000"), 2)
    assert line.startswith("--max-page: must be at most 1000")


# --- what the machine refuses: exit status 1 --------------------------------------------------------------

def test_port_in_use(tmp_path, busy_port):
    line = error_line(chorus_server(tmp_path, "--port", str(busy_port)), 1)
    assert line == f"port {busy_port} is in use (another chorus-server?); pick another with --port"


def test_websocket_port_in_use(tmp_path, busy_port):
    line = error_line(chorus_server(tmp_path, "--port", "0", "--ws-port", str(busy_port)), 1)
    assert line == f"WebSocket port {busy_port} is in use (another chorus-server?); pick another with --ws-port"


def test_data_dir_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    line = error_line(chorus_server(tmp_path, "--port", "0", "--data-dir", "data"), 1)
    assert line == "data dir data is a file, not a directory; choose another --data-dir"


def test_data_dir_under_a_file(tmp_path):
    """Fails for every user, root included."""
    (tmp_path / "file").write_text("")
    line = error_line(chorus_server(tmp_path, "--port", "0", "--data-dir", "file/data"), 1)
    assert line == "data dir file/data lies under a file, not a directory; choose another --data-dir"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes, so a 0500 directory is writable for it; "
                                               "test_data_dir_under_a_file covers an unusable data dir instead")
def test_data_dir_not_writable(tmp_path):
    (tmp_path / "data").mkdir(mode=0o500)
    try:
        line = error_line(chorus_server(tmp_path, "--port", "0", "--data-dir", "data"), 1)
    finally:
        (tmp_path / "data").chmod(0o700)  # so pytest can clean up
    assert line == "data dir data is not writable by this user; fix its permissions or choose another --data-dir"


def test_unresolvable_host(tmp_path):
    line = error_line(chorus_server(tmp_path, "--port", "0", "--host", "no-such-host.invalid"), 1)
    assert line.startswith("host no-such-host.invalid cannot be resolved (")
    assert line.endswith("give --host an IP address or a name this machine resolves")


def test_host_of_another_machine(tmp_path):
    # 192.0.2.0/24 is reserved for documentation (RFC 5737): never an address of this machine.
    line = error_line(chorus_server(tmp_path, "--port", "0", "--host", "192.0.2.1"), 1)
    assert line == ("host 192.0.2.1 is not an address of this machine; give --host one of its addresses, or "
                    "0.0.0.0 for every interface")


def test_database_newer_than_the_server(tmp_path):
    (tmp_path / "data").mkdir(mode=0o700)
    with sqlite3.connect(tmp_path / "data" / "chorus.db") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    line = error_line(chorus_server(tmp_path, "--port", "0", "--data-dir", "data"), 1)
    assert f"schema version {SCHEMA_VERSION + 1} is newer than this server's" in line
    assert line.endswith("run a newer chorus-server, or choose another --data-dir")


def test_database_that_is_not_a_database(tmp_path):
    (tmp_path / "data").mkdir(mode=0o700)
    (tmp_path / "data" / "chorus.db").write_bytes(b"this is not SQLite " * 100)
    line = error_line(chorus_server(tmp_path, "--port", "0", "--data-dir", "data"), 1)
    assert "data/chorus.db" in line and "not a database" in line and line.endswith("--data-dir")


# --- the boundary: only startup failures become one line; a bug keeps its traceback ----------------------

def run_with_serve(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``chorus-server --data-dir data ARGS`` with ``serve`` replaced (as bench/chorus_server.py does) by ``body``."""
    program = f"""
import errno, sys, types
import trio
import chorus.server.__main__ as entry

async def serve(config, *, task_status=trio.TASK_STATUS_IGNORED):
    async with trio.open_nursery():  # serve's nurseries wrap what crosses them in groups
{body}

entry.serve = serve
sys.exit(entry.main(["--data-dir", "data", *sys.argv[1:]]))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", program, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_bind_failure_inside_serve_is_one_line(tmp_path):
    """A port taken between the preflight check and serve's own bind still gives one line."""
    port, ws_port = free_port(), free_port()
    fail = '        raise OSError(errno.EADDRINUSE, "Address already in use")'
    assert error_line(run_with_serve(tmp_path, fail, "--port", str(port)), 1) == \
        f"port {port} is in use (another chorus-server?); pick another with --port"
    # With the bridge on, either listener may have lost the race: the line names both.
    assert error_line(run_with_serve(tmp_path, fail, "--port", str(port), "--ws-port", str(ws_port)), 1) == \
        f"port {port} or WebSocket port {ws_port} is in use (another chorus-server?); pick another with --port or " \
        f"--ws-port"


def test_a_bug_before_start_keeps_its_traceback(tmp_path):
    result = run_with_serve(tmp_path, "        1 / 0", "--port", "0")
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_an_error_after_start_is_not_taken_for_an_operator_mistake(tmp_path):
    """The same OSError once serving is a bug in the server, not a busy port: traceback, not the one line."""
    result = run_with_serve(tmp_path, "        task_status.started(types.SimpleNamespace(port=1, ws_port=None))\n"
                                      '        raise OSError(errno.EADDRINUSE, "Address already in use")',
                            "--port", "0")
    assert result.stdout.startswith("Chorus listening on")
    assert result.returncode == 1 and "Traceback" in result.stderr and "chorus-server: error" not in result.stderr
