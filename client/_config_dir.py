"""Where ``chorus`` remembers session tokens (spec/PROTOCOL.md §5.5 RESUME, §9.1).

How this works. A token is as good as a password for 30 days, so each one lives
in its own file, readable by the owner only (0600), inside a 0700 directory:

    $XDG_CONFIG_HOME/chorus/sessions/<host>_<port>/<user>     (default ~/.config/chorus)

One file per (server, user) rather than one JSON file for all: two ``chorus``
processes sharing a config directory (two terminals, a script and a terminal)
never read-modify-write the same file, and a write is atomic (a temporary file
created 0600, then renamed over the old one), so a reader never sees half a
token. User names follow the protocol's naming rule (``_rules.is_user_name``,
§9.1), which allows no "/" and no leading ".", so they are safe file names;
anything else is refused rather than escaped.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ._rules import is_user_name


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/chorus``, or ``~/.config/chorus`` when that is unset or not absolute."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "chorus"


class SessionStore:
    """Saved session tokens for one server (``host``, ``port``)."""

    def __init__(self, host: str, port: int, root: Path | None = None):
        server = re.sub(r"[^A-Za-z0-9.-]", "_", host) + f"_{port}"
        self.dir = (root or config_dir()) / "sessions" / server

    def path(self, user: str) -> Path:
        """The token file of ``user``. Raises ``ValueError`` for a name that is not a valid user name."""
        if not is_user_name(user):
            raise ValueError(f"not a valid user name: {user!r}")
        return self.dir / user

    def load(self, user: str) -> str | None:
        """The saved token of ``user``, or None."""
        try:
            token = self.path(user).read_text(encoding="ascii").strip()
        except (OSError, UnicodeError, ValueError):
            return None
        return token or None

    def save(self, user: str, token: str) -> None:
        """Store ``token`` for ``user`` (mode 0600). Raises ``OSError`` if the directory is not writable."""
        path = self.path(user)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{user}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask and ignored for an old file
            os.write(fd, token.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def forget(self, user: str) -> None:
        """Delete the saved token of ``user`` (no error if there is none)."""
        try:
            self.path(user).unlink()
        except (FileNotFoundError, ValueError):
            pass

    def users(self) -> list[str]:
        """Users with a saved token on this server, sorted."""
        try:
            return sorted(p.name for p in self.dir.iterdir() if is_user_name(p.name) and p.is_file())
        except OSError:
            return []
