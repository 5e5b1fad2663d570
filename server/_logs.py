"""Client text in log lines: escaped and clipped, so a peer cannot forge log lines or flood the log."""
from __future__ import annotations

_MAX_CHARS = 64


def safe(text: object, limit: int = _MAX_CHARS) -> str:
    """``text`` as a single printable line: control and non-ASCII characters escaped, at most ``limit`` chars."""
    value = str(text)
    clipped = value[:limit]
    escaped = clipped.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in escaped)
    return escaped + ("..." if len(value) > limit else "")
