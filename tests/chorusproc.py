"""Real processes for the terminal-client tests: a ``python -m chorus.server`` and ``chorus`` in a pseudo-terminal.

The server runs on a free port with its data in the test's tmp_path and can be
killed (SIGKILL) and started again on the same port and data. ``Terminal``
drives ``python -m chorus.client`` with pexpect; its blocking ``expect`` runs in a
worker thread so that a library client in the same Trio test keeps running.
Everything the program printed is kept (``text()`` without escape sequences)
for assertions about the whole screen history, e.g. "no Traceback".
"""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import trio

REPO = Path(__file__).resolve().parent.parent
EXPECT_TIMEOUT_S = 20  # generous: two cores shared with other work
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


class ServerProcess:
    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.args = args  # more chorus-server flags, e.g. "--max-page", "4"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start (or start again, on the same port); returns once it listens."""
        cmd = [sys.executable, "-m", "chorus.server", "--port", str(self.port), "--data-dir", str(self.data_dir),
               "--argon2-time-cost", "1", "--argon2-memory-kib", "1024", *self.args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("Chorus listening on"), line
        self.port = int(line.split()[3].split(":")[-1].rstrip(","))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def chorus_env(config_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env.update(XDG_CONFIG_HOME=str(config_home), NO_COLOR="1", TERM="xterm", LANG="C.UTF-8",
               PROMPT_TOOLKIT_NO_CPR="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


class Terminal:
    """``chorus ARGS`` in a pseudo-terminal."""

    def __init__(self, args: list[str], env: dict[str, str], columns: int = 200):
        self.log = io.StringIO()
        self.child = pexpect.spawn(sys.executable, ["-m", "chorus.client", *args], cwd=str(REPO), env=env,
                                   encoding="utf-8", dimensions=(40, columns), timeout=EXPECT_TIMEOUT_S)
        self.child.logfile_read = self.log

    async def expect(self, text: str) -> str:
        """Wait for ``text`` (literal) in the output; returns what came before it."""
        await trio.to_thread.run_sync(self.child.expect_exact, text)
        return self.child.before

    async def expect_re(self, pattern: str) -> re.Match:
        await trio.to_thread.run_sync(self.child.expect, pattern)
        return self.child.match

    def type(self, text: str) -> None:
        self.child.send(text)

    def line(self, text: str) -> None:
        self.child.send(text + "\r")

    def text(self) -> str:
        """Everything printed so far, escape sequences removed."""
        return _ANSI.sub("", self.log.getvalue())

    def pause(self) -> None:
        os.kill(self.child.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.child.pid, signal.SIGCONT)

    async def wait_exit(self) -> int:
        await trio.to_thread.run_sync(self.child.expect, pexpect.EOF)
        self.child.close()
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            os.kill(self.child.pid, signal.SIGCONT)
            self.child.terminate(force=True)
        self.child.close(force=True)


# Fixtures for the modules that drive these processes (imported there by name, so pytest finds them).
@pytest.fixture
def server(tmp_path):
    """A ``python -m chorus.server`` process (this name overrides conftest's in-process server where imported)."""
    s = ServerProcess(tmp_path / "data")
    s.start()
    yield s
    s.kill()


@pytest.fixture
def spawn(tmp_path):
    """``spawn(*args, columns=200, **env)`` → a ``Terminal`` running ``chorus ARGS``, closed after the test."""
    opened: list[Terminal] = []

    def start(*args: str, columns: int = 200, **env: str) -> Terminal:
        t = Terminal(list(args), chorus_env(tmp_path / "config", **env), columns=columns)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()
