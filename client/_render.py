"""How ``chorus`` shows messages: one line each, for people or for scripts (spec/PROTOCOL.md §5.18, §9.3).

How this works. Every message becomes one line (newlines in a body are shown as
"⏎" so a line is a message, and a message can never fake another line):

    > 12:04 #lobby   <alice> hi bob          "> " marks the user's own messages
      12:04 #lobby   <bob> hi alice
      12:05 #lobby   * bob waves             a body starting "/me " is an action
    ~ 12:06 #lobby   <alice> still there?    "~ " = typed while offline, not yet acknowledged
      12:07 @bob     <bob> psst              a direct conversation shows the partner
    -- reconnecting…                         status lines start "-- ", errors "!! "

Times are local HH:MM, with the date in front for another day. Colours (ANSI
SGR) only when asked for: ``use_colour`` decides from the NO_COLOR convention
(https://no-color.org), TERM=dumb and whether the output is a terminal. For
scripts, ``json_line`` gives one JSON object per message.
"""
from __future__ import annotations

import datetime
import json
import os
import zlib

from chorus import proto

_RESET = "\x1b[0m"
_DIM, _BOLD, _RED, _GREEN, _YELLOW, _CYAN = "\x1b[2m", "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m"
#: Colours for other people's names, picked by a stable hash so a name keeps its colour.
_NAME_COLOURS = ("\x1b[34m", "\x1b[35m", "\x1b[33m", "\x1b[36m", "\x1b[94m", "\x1b[95m", "\x1b[93m", "\x1b[96m")
_ACTION = "/me "
_CONV_WIDTH = 8


def use_colour(stream, environ=os.environ) -> bool:
    """Colours on ``stream``: a terminal, TERM not "dumb", and NO_COLOR unset or empty."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def is_action(body: str) -> bool:
    return body.startswith(_ACTION)


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters made visible, so it stays one line."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append(" ")
        elif not ch.isprintable():
            out.append("\ufffd")  # escape sequences in a body must not drive the terminal
        else:
            out.append(ch)
    return "".join(out)


def clock(ts_ms: int, today: datetime.date | None = None) -> str:
    """Local "HH:MM", or "YYYY-MM-DD HH:MM" for another day than ``today``."""
    when = datetime.datetime.fromtimestamp(ts_ms / 1000)
    if when.date() == (today or datetime.date.today()):
        return when.strftime("%H:%M")
    return when.strftime("%Y-%m-%d %H:%M")


def json_line(msg: proto.Message) -> str:
    """One message as a JSON object on one line (for ``chorus tail --json``)."""
    return json.dumps({
        "conv": str(msg.conv),
        "seq": msg.seq,
        "ts_ms": msg.ts_ms,
        "time": datetime.datetime.fromtimestamp(msg.ts_ms / 1000, datetime.timezone.utc).isoformat(),
        "sender": msg.sender,
        "body": msg.body,
        "client_msg_id": msg.client_msg_id,
    }, ensure_ascii=False)


class Renderer:
    """Formats lines for the user ``me``; ``colour`` turns ANSI colours on."""

    def __init__(self, me: str, *, colour: bool, gutter: bool = True):
        self.me = me
        self.colour = colour
        self.gutter = gutter  # the 2-character own/pending mark in front; off for `chorus tail`

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colour else text

    def _name(self, name: str) -> str:
        if name == self.me:
            return self._c(_BOLD + _GREEN, name)
        return self._c(_NAME_COLOURS[zlib.crc32(name.encode()) % len(_NAME_COLOURS)], name)

    def message(self, msg: proto.Message, *, pending: bool = False, today: datetime.date | None = None) -> str:
        """The line for ``msg``; ``pending`` marks one typed offline and not yet acknowledged."""
        own = msg.sender == self.me
        conv = str(msg.conv).ljust(_CONV_WIDTH)
        if is_action(msg.body):
            text = f"* {self._name(msg.sender)} {one_line(msg.body[len(_ACTION):])}"
        else:
            text = f"<{self._name(msg.sender)}> {one_line(msg.body)}"
        line = f"{self._c(_DIM, clock(msg.ts_ms, today))} {self._c(_CYAN, conv)} {text}"
        if pending:
            line = f"{line}  {self._c(_DIM, '(pending)')}"
        if not self.gutter:
            return line
        return ("~ " if pending else "> " if own else "  ") + line

    def info(self, text: str) -> str:
        return self._c(_YELLOW, f"-- {one_line(text)}")

    def error(self, text: str) -> str:
        return self._c(_BOLD + _RED, f"!! {one_line(text)}")
