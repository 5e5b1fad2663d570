"""How ``chorus`` shows messages: one line each, for people or for scripts (spec/PROTOCOL.md §5.18, §9.3).

How this works. Every message becomes one line (newlines in a body are shown as
"⏎" so a line is a message, and a message can never fake another line):

    > 12:04 #lobby   <alice> hi bob          "> " marks the user's own messages
      12:04 #lobby   <bob> hi alice
      12:05 #lobby   * bob waves             a body starting "/me " is an action
    ~ 12:06 #lobby   <alice> still there?    "~ " = typed while offline, not yet acknowledged
      12:07 @bob     <bob> psst              a direct conversation shows the partner
    -- reconnecting…                         status lines start "-- ", errors "!! "

Text is cut into grapheme clusters (Unicode UAX #29, by ``wcwidth``) before
anything is neutralised, so the joiners and selectors that belong to a cluster
stay in it: 👨‍👩‍👧 (three emoji joined by U+200D), ❤️ (U+FE0F), Persian and Indic
words that need U+200C. A cluster never contains a C0/C1 control or a bidi
embedding/override/isolate (UAX #29 makes each its own cluster), and those are
shown as "\ufffd": an ESC cannot drive the terminal, and U+202E cannot reorder
the line so that text appears to say what it does not.

In a terminal, ``Renderer.message(width=...)`` wraps a long message at word
boundaries, measuring each cluster's width in cells, and indents the following
lines under the text column (where the body begins), so a message stays one
visually separate block; a word is split only if it is longer than a line.

A message from someone else that names you (``@you`` or ``you`` as a word) is
marked "! " in the gutter and its body highlighted; the client rings the bell.

Times are local HH:MM, with the date in front for another day. Colours (ANSI
SGR) only when asked for: ``use_colour`` decides from the NO_COLOR convention
(https://no-color.org), TERM=dumb and whether the output is a terminal. For
scripts, ``json_line`` gives one JSON object per message.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import re
import zlib

import wcwidth

from chorus import proto

_RESET = "\x1b[0m"
_DIM, _BOLD, _RED, _GREEN, _YELLOW, _CYAN = "\x1b[2m", "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m"
_MENTION = "\x1b[1;7m"  # bold reverse: visible in any colour scheme
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


#: Format characters kept inside a grapheme cluster: they join or select, they cannot move the cursor or
#: reorder text. U+200D (ZWJ: emoji sequences, Indic conjuncts), U+200C (ZWNJ: Persian, Indic), and the tag
#: characters of subdivision flags (🏴 + tags + cancel tag). Variation selectors are marks (Mn) and printable.
_JOINERS = frozenset("\u200c\u200d") | frozenset(map(chr, range(0xE0020, 0xE0080)))
_LINE_BREAKS = frozenset("\n\r\u2028\u2029\x85")


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters made visible, so it stays one line and cannot
    drive the terminal; grapheme clusters (with their joiners) are kept whole."""
    if text.isprintable():
        return text
    return "".join(map(_cluster, wcwidth.iter_graphemes(text)))


def _cluster(cluster: str) -> str:
    if cluster.isprintable():
        return cluster
    if all(ch in _LINE_BREAKS for ch in cluster):  # "\r\n" is one cluster
        return "⏎"
    if cluster == "\t":
        return " "
    if len(cluster) > 1 and cluster[0].isprintable():
        # A base with joiners; anything else unprintable in it (there should be none) is replaced.
        return "".join(ch if ch.isprintable() or ch in _JOINERS else "\ufffd" for ch in cluster)
    return "\ufffd" * len(cluster)  # escape sequences and bidi controls in a body must not act


def cells(text: str) -> int:
    """Terminal cells ``text`` takes, cluster by cluster (escape sequences take none)."""
    return max(0, wcwidth.width(text))


def wrap(text: str, first: int, rest: int) -> list[str]:
    """``text`` in lines of at most ``first`` cells (the first line), then ``rest`` cells each, broken at spaces. A
    word longer than ``rest`` (and only such a word) is broken, between grapheme clusters."""
    lines: list[str] = []
    line, room = "", first
    for space, word in re.findall(r"( *)([^ ]+)", text):
        size, gap = cells(word), (len(space) if line else 0)
        if gap + size <= room:
            line, room = line + (space if line else "") + word, room - gap - size
        elif size <= rest:  # it fits on a line of its own
            lines.append(line)
            line, room = word, rest - size
        else:
            if line and room > gap:
                line, room = line + space, room - gap
            elif line:
                lines.append(line)
                line, room = "", rest
            for cluster in wcwidth.iter_graphemes(word):
                if cells(cluster) > room and line:
                    lines.append(line)
                    line, room = "", rest
                line, room = line + cluster, room - cells(cluster)
    lines.append(line)
    return lines


@functools.lru_cache(maxsize=64)
def _mention_pattern(me: str) -> re.Pattern[str]:
    # Not inside a longer name or an address: "alice-bot", "alice.b", "alice@example.org"; "alice." ends a sentence.
    return re.compile(rf"(?<![\w@.-])@?{re.escape(me)}(?![\w@-]|\.\w)", re.IGNORECASE)


def mentions(body: str, me: str) -> bool:
    """Whether ``body`` names ``me``: "@me" or "me" as a word ("me-bot" and "meg" do not)."""
    return bool(me) and _mention_pattern(me).search(body) is not None


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

    def message(self, msg: proto.Message, *, pending: bool = False, today: datetime.date | None = None,
                width: int | None = None) -> str:
        """The line for ``msg``; ``pending`` marks one typed offline and not yet acknowledged. With ``width``
        (a terminal's columns) a long message is word-wrapped, the lines after the first indented under the
        text column."""
        own = msg.sender == self.me
        named = not own and mentions(msg.body, self.me)
        conv = str(msg.conv).ljust(_CONV_WIDTH)
        if is_action(msg.body):
            lead, body = f"* {self._name(msg.sender)} ", one_line(msg.body[len(_ACTION):])
        else:
            lead, body = f"<{self._name(msg.sender)}> ", one_line(msg.body)
        head = f"{self._c(_DIM, clock(msg.ts_ms, today))} {self._c(_CYAN, conv)} {lead}"
        if self.gutter:
            head = ("~ " if pending else "! " if named else "> " if own else "  ") + head
        suffix, indent = ("  (pending)" if pending else ""), 0
        if width is None or cells(head) + cells(body + suffix) <= width:
            texts = [body + suffix]
        else:
            indent = min(cells(head), width // 2)
            texts = wrap(body + suffix, width - cells(head), width - indent)
        if named:  # the text only, not the indent under it
            texts = [self._c(_MENTION, text) for text in texts]
        if pending:
            texts[-1] = texts[-1].removesuffix("(pending)") + self._c(_DIM, "(pending)")
        return "\n".join([head + texts[0], *(" " * indent + text for text in texts[1:])])

    def info(self, text: str, width: int | None = None) -> str:
        return self._c(_YELLOW, _block("-- ", one_line(text), width))

    def error(self, text: str, width: int | None = None) -> str:
        return self._c(_BOLD + _RED, _block("!! ", one_line(text), width))


def _block(mark: str, text: str, width: int | None) -> str:
    """``mark`` and ``text``, word-wrapped to ``width`` with the lines after the first under the text."""
    if width is None or cells(mark) + cells(text) <= width:
        return mark + text
    lines = wrap(text, width - cells(mark), width - cells(mark))
    return "\n".join([mark + lines[0], *(" " * cells(mark) + line for line in lines[1:])])
