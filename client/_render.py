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

Version 2 conversations also hold events at their own seqs (spec §3.15, §9.15, §9.16). An ACTION is the
message "* alice waves"; a DELETED tombstone stands where its message was, "<bob> (message deleted by carol)";
the others are one line in words after the time and conversation, e.g. "-- carol removed bob from #lobby: spam",
"-- alice edited #12: new text", "-- alice reacted 👍 to #12" (``event_words``); an actor "" is "the
operator". With ``seqs`` (the interactive client) each message ends with its seq, "#12": the number /edit,
/delete and /react take, and that edits and reactions name.

A message from someone else that names you (``@you`` or ``you`` as a word) is
marked "! " in the gutter and its body highlighted; the client rings the bell.

Times are local HH:MM, with the date in front for another day. Colours (ANSI
SGR) only when asked for: ``use_colour`` decides from the NO_COLOR convention
(https://no-color.org), TERM=dumb and whether the output is a terminal. For
scripts, ``json_line`` gives one JSON object per message or event (``kind``: "message", "action" or "event").
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
from chorus.proto import EventKind

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


def _time_fields(ts_ms: int) -> dict:
    return {"ts_ms": ts_ms, "time": datetime.datetime.fromtimestamp(ts_ms / 1000, datetime.timezone.utc).isoformat()}


def json_line(item: proto.Message | proto.Events) -> str:
    """A message, or the one event of an EVENTS, as a JSON object on one line (for ``chorus tail --json``).
    Every line has ``kind``: "message" (sender, body, client_msg_id), "action" (the same; body without "/me "),
    or "event" (``event``: its EventKind in lower case, e.g. "edit", "react", "kick"; actor ("" is the
    operator), target, target_seq, text, until_ms and role)."""
    if isinstance(item, proto.Message):
        return json.dumps({"kind": "message", "conv": str(item.conv), "seq": item.seq, **_time_fields(item.ts_ms),
                           "sender": item.sender, "body": item.body, "client_msg_id": item.client_msg_id},
                          ensure_ascii=False)
    (ev,) = item.events
    if ev.kind == EventKind.ACTION:
        return json.dumps({"kind": "action", "conv": str(item.conv), "seq": ev.seq, **_time_fields(ev.ts_ms),
                           "sender": ev.actor, "body": ev.text, "client_msg_id": 0}, ensure_ascii=False)
    return json.dumps({"kind": "event", "event": ev.kind.name.lower(), "conv": str(item.conv), "seq": ev.seq,
                       **_time_fields(ev.ts_ms), "actor": ev.actor, "target": ev.target, "target_seq": ev.target_seq,
                       "text": ev.text, "until_ms": ev.until_ms, "role": ev.role.name.lower()}, ensure_ascii=False)


def who(name: str) -> str:
    """An event's actor or target for people: "" is the server's operator (spec §9.15)."""
    return one_line(name) if name else "the operator"


_ROLE_WORDS = {proto.RoomRole.OWNER: "the owner", proto.RoomRole.MODERATOR: "a moderator",
               proto.RoomRole.MEMBER: "a member"}


def event_words(conv: proto.Conversation, ev: proto.ConvEvent, today: datetime.date | None = None) -> str:
    """What ``ev`` (not an ACTION or a DELETED tombstone: those are shown as messages) says, in words, on one
    line; client text in it neutralised as in messages."""
    text = one_line(ev.text)
    until = f" until {clock(ev.until_ms, today)}" if ev.until_ms else ""
    words = _EVENT_WORDS.get(ev.kind, "{actor}: {kind} {target}{reason}")
    if ev.kind == EventKind.TOPIC and not text:
        words = "{actor} cleared the topic"
    return words.format(
        actor=who(ev.actor), target=who(ev.target), conv=conv, text=text, reason=f": {text}" if text else "",
        seq=ev.seq, target_seq=ev.target_seq, kind=ev.kind.name.lower(), role=_ROLE_WORDS.get(ev.role, ""),
        banned=until or " until unbanned", muted=until or " until unmuted",
        whose="" if ev.actor == ev.target else f" ({who(ev.target)}'s message)")


#: How each event reads (``event_words``); the fields are neutralised client text.
_EVENT_WORDS = {
    EventKind.KICK: "{actor} removed {target} from {conv}{reason}",
    EventKind.BAN: "{actor} banned {target} from {conv}{banned}{reason}",
    EventKind.UNBAN: "{actor} lifted the ban on {target} in {conv}",
    EventKind.MUTE: "{actor} muted {target} in {conv}{muted}{reason}",
    EventKind.UNMUTE: "{actor} unmuted {target} in {conv}",
    EventKind.DELETE: "{actor} deleted #{target_seq}{whose}",
    EventKind.DELETED: "#{seq}: {target}'s message, deleted by {actor}",
    EventKind.TOPIC: "{actor} set the topic: {text}",
    EventKind.ROLE: "{actor} made {target} {role} of {conv}",
    EventKind.INVITE: "{actor} added {target} to {conv}",
    EventKind.EDIT: "{actor} edited #{target_seq}: {text}",
    EventKind.REACT: "{actor} reacted {text} to #{target_seq}",
    EventKind.UNREACT: "{actor} took back {text} from #{target_seq}",
    EventKind.ACTION: "* {actor} {text}",
}


def action_message(conv: proto.Conversation, ev: proto.ConvEvent) -> proto.Message:
    """An ACTION event as the message it is, with the "/me " body ``Renderer.message`` shows as "* alice waves"."""
    return proto.Message(conv, ev.seq, ev.ts_ms, ev.actor, 0, _ACTION + ev.text)


class Renderer:
    """Formats lines for the user ``me``; ``colour`` turns ANSI colours on."""

    def __init__(self, me: str, *, colour: bool, gutter: bool = True, seqs: bool = False):
        self.me = me
        self.colour = colour
        self.gutter = gutter  # the 2-character own/pending mark in front; off for `chorus tail`
        self.seqs = seqs  # "#12" after each message: what /edit, /delete and /react name
        #: login → display name (version 2, spec §9.17), as the interactive client learnt them: a sender with one
        #: is shown "Display Name (login)", the display name neutralised like any client text.
        self.names: dict[str, str] = {}

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colour else text

    def person(self, name: str) -> str:
        """``name`` for people: "Display Name (login)" when it has a display name, else the login."""
        display = self.names.get(name)
        return f"{one_line(display)} ({name})" if display else name

    def _name(self, name: str) -> str:
        if name == self.me:
            return self._c(_BOLD + _GREEN, self.person(name))
        return self._c(_NAME_COLOURS[zlib.crc32(name.encode()) % len(_NAME_COLOURS)], self.person(name))

    def message(self, msg: proto.Message, *, pending: bool = False, today: datetime.date | None = None,
                width: int | None = None, edited: bool = False, reactions: str = "",
                deleted_by: str | None = None) -> str:
        """The line for ``msg``; ``pending`` marks one typed offline and not yet acknowledged; ``edited`` and
        ``reactions`` (e.g. "👍 2") follow the text; ``deleted_by`` (an actor) shows a tombstone instead of the
        text. With ``width`` (a terminal's columns) a long message is word-wrapped, the lines after the first
        indented under the text column."""
        own = msg.sender == self.me
        named = not own and deleted_by is None and mentions(msg.body, self.me)
        conv = str(msg.conv).ljust(_CONV_WIDTH)
        if deleted_by is not None:
            by = "" if deleted_by == msg.sender else f" by {who(deleted_by)}"
            lead, body = f"<{self._name(msg.sender)}> ", f"(message deleted{by})"
        elif is_action(msg.body):
            lead, body = f"* {self._name(msg.sender)} ", one_line(msg.body[len(_ACTION):])
        else:
            lead, body = f"<{self._name(msg.sender)}> ", one_line(msg.body)
        head = f"{self._c(_DIM, clock(msg.ts_ms, today))} {self._c(_CYAN, conv)} {lead}"
        if self.gutter:
            head = ("~ " if pending else "! " if named else "> " if own else "  ") + head
        notes = [note for note in ("(edited)" if edited else "", f"[{one_line(reactions)}]" if reactions else "",
                                   f"#{msg.seq}" if self.seqs and msg.seq else "", "(pending)" if pending else "")
                 if note]
        suffix, indent = "".join("  " + note for note in notes), 0
        if width is None or cells(head) + cells(body + suffix) <= width:
            texts = [body + suffix]
        else:
            indent = min(cells(head), width // 2)
            texts = wrap(body + suffix, width - cells(head), width - indent)
        if named:  # the text only, not the indent under it
            texts = [self._c(_MENTION, text) for text in texts]
        tail = "  ".join(notes)
        if tail and texts[-1].endswith(tail):  # the notes are dim (when they stayed together on the last line)
            texts[-1] = texts[-1].removesuffix(tail) + self._c(_DIM, tail)
        return "\n".join([head + texts[0], *(" " * indent + text for text in texts[1:])])

    def event(self, conv: proto.Conversation, ev: proto.ConvEvent, *, today: datetime.date | None = None,
              width: int | None = None) -> str:
        """The line for an event that is not a message (``event_words``), after its time and conversation."""
        head = f"{self._c(_DIM, clock(ev.ts_ms, today))} {self._c(_CYAN, str(conv).ljust(_CONV_WIDTH))} "
        if self.gutter:
            head = "  " + head
        text = "-- " + event_words(conv, ev, today)
        if width is not None and cells(head) + cells(text) > width:
            indent = min(cells(head) + 3, width // 2)
            lines = wrap(text, width - cells(head), width - indent)
            text = "\n".join([lines[0], *(" " * indent + line for line in lines[1:])])
        return head + self._c(_YELLOW, text)

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
