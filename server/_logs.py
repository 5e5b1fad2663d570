"""The server's log lines: client text escaped and clipped, JSON lines on request, volume bounded under attack.

- ``safe``: client text in a log line, escaped and clipped, so a peer cannot forge log lines or flood the log.
- ``episode``: True at most once per ``EPISODE_S`` per (kind, key): a limit hit is logged once per episode,
  not once per refused frame.
- ``RepeatFilter``: at most ``burst`` lines of one kind (logger and format string) per ``period_s``; the rest are
  counted and the next line that passes says how many were suppressed. So a flood of failed logins from many
  addresses costs a few lines a second, whatever their number.
- ``JsonFormatter``: one JSON object per line (``time``, ``level``, ``logger``, ``message``, and the structured
  fields a call passes with ``extra=``), for ``--log-json``.
- ``configure``: the process's logging (``chorus-server``): level, format, the repeat filter.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["EPISODE_S", "JsonFormatter", "RepeatFilter", "configure", "episode", "safe"]

_MAX_CHARS = 64
#: A limit hit by the same key within this long after the last logged one belongs to the same episode.
EPISODE_S = 60.0
#: Episodes remembered at most; past it the oldest half is forgotten (an attacker with many addresses gets
#: a line per address again, still bounded by ``RepeatFilter``).
_MAX_EPISODES = 10_000
_episodes: dict[tuple[str, str], float] = {}
#: The attributes every LogRecord has; anything else was passed with ``extra=`` and is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def safe(text: object, limit: int = _MAX_CHARS) -> str:
    """``text`` as a single printable line: control and non-ASCII characters escaped, at most ``limit`` chars."""
    value = str(text)
    clipped = value[:limit]
    escaped = clipped.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in escaped)
    return escaped + ("..." if len(value) > limit else "")


def episode(kind: str, key: str, now: float | None = None) -> bool:
    """True when a hit of limit ``kind`` by ``key`` (an address, a user) begins an episode worth one log line."""
    now = time.monotonic() if now is None else now
    last = _episodes.get((kind, key))
    if last is not None and now - last < EPISODE_S:
        return False
    if len(_episodes) >= _MAX_EPISODES:
        for old in sorted(_episodes, key=_episodes.__getitem__)[: _MAX_EPISODES // 2]:
            del _episodes[old]
    _episodes[kind, key] = now
    return True


class RepeatFilter(logging.Filter):
    """At most ``burst`` records per (logger, format string) per ``period_s``; counts the ones it drops."""

    def __init__(self, burst: int = 20, period_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.period_s = period_s
        self._windows: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = record.created
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.period_s:
            dropped = int(window[2]) if window is not None else 0
            if len(self._windows) > 1000:
                self._windows.clear()
            self._windows[key] = [now, 1, 0]
            if dropped:
                record.suppressed = dropped
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        suppressed = getattr(record, "suppressed", 0)
        return text + (f" ({suppressed} similar lines suppressed before this one)" if suppressed else "")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, then the ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{created}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in entry:
                entry[name] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


def configure(level: str, json_lines: bool, stream: TextIO | None = None) -> logging.Handler:
    """Log to ``stream`` (stderr) at ``level``, as text or JSON lines, through a ``RepeatFilter``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return handler
