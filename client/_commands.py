"""The slash commands of ``chorus``: what a typed line means, /help, and tab completion.

How this works. ``parse`` turns a typed line into a ``Command`` or a ``Text``
without side effects, so the interactive client (``_tui.py``) decides what to
do and the rules here can be tested without a terminal. A line starting with
"/" is a command (a unique prefix is enough: "/j" is /join); "//" sends a line
that starts with "/"; anything else is text for the current conversation.
Conversations are written as in the library: "#room" or "@user" (spec/PROTOCOL.md
§3.6); a bare name means a room where a room is expected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


class UsageError(Exception):
    """A command was typed wrongly; the message says how to type it."""


@dataclass(frozen=True)
class Spec:
    usage: str
    help: str
    completes: str | None = None  # what the first argument completes to: rooms, joined, convs, users, commands


COMMANDS: dict[str, Spec] = {
    "join": Spec("/join #room", "join (or create) a room and switch to it", "rooms"),
    "leave": Spec("/leave [#room]", "leave the current room, or the one named", "joined"),
    "switch": Spec("/switch #room|@user|N", "send plain text to another room, person, or number N in the status bar",
                   "convs"),
    "rooms": Spec("/rooms", "list the rooms on the server"),
    "who": Spec("/who [#room]", "who is in the current room, online or not", "joined"),
    "msg": Spec("/msg USER text", "send a direct message (/switch @USER to keep talking)", "users"),
    "history": Spec("/history [N]", "show N (default 20) older messages here; repeat to page further back"),
    "me": Spec("/me action", "send an action, shown as: * you action"),
    "help": Spec("/help [command]", "list the commands, or explain one", "commands"),
    "quit": Spec("/quit", "leave chorus (Ctrl-D and Ctrl-C do too)"),
}
DEFAULT_HISTORY = 20
#: Most messages one /history may ask for before WELCOME says (``max_page``, spec §5.2): the server's default.
MAX_HISTORY = 100


@dataclass(frozen=True)
class Command:
    name: str  # a key of COMMANDS
    args: str  # the rest of the line, stripped


@dataclass(frozen=True)
class Text:
    body: str


def parse(line: str) -> Command | Text | None:
    """What ``line`` means; None for a blank line. Raises ``UsageError`` for an unknown command."""
    if not line.strip():
        return None
    if line.startswith("//"):
        return Text(line[1:])
    if not line.startswith("/"):
        return Text(line)
    word, _, rest = line[1:].partition(" ")
    return Command(resolve(word), rest.strip())


def resolve(word: str) -> str:
    """The command ``word`` names, exactly or by a unique prefix. Raises ``UsageError``."""
    word = word.lower()
    if word in COMMANDS:
        return word
    matches = [name for name in COMMANDS if word and name.startswith(word)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"/{word} is ambiguous: " + ", ".join("/" + m for m in matches))
    raise UsageError(f"unknown command /{word} (try /help)")


def room_arg(args: str, usage: str) -> str:
    """The room named by ``args`` ("#room" or "room"), without "#". Raises ``UsageError``."""
    words = args.split()
    if len(words) != 1 or words[0] in ("#", "@") or words[0].startswith("@"):
        raise UsageError(f"usage: {usage}")
    return words[0].removeprefix("#")


def history_count(args: str, most: int = MAX_HISTORY) -> int:
    """N of ``/history [N]``, at most ``most`` (the server's page size). Raises ``UsageError``."""
    if not args:
        return min(DEFAULT_HISTORY, most)
    try:
        n = int(args)
    except ValueError:
        raise UsageError(f"usage: {COMMANDS['history'].usage}") from None
    if not 1 <= n <= most:
        raise UsageError(f"/history shows 1 to {most} messages at a time")
    return n


def msg_args(args: str) -> tuple[str, str]:
    """(user, text) of ``/msg USER text``. Raises ``UsageError``."""
    user, _, text = args.partition(" ")
    user = user.removeprefix("@")
    if not user or not text.strip():
        raise UsageError(f"usage: {COMMANDS['msg'].usage}")
    return user, text


def help_lines(topic: str = "") -> list[str]:
    """/help: every command, or one. Raises ``UsageError`` for an unknown topic."""
    if topic:
        spec = COMMANDS[resolve(topic.removeprefix("/"))]
        return [f"{spec.usage}  {spec.help}"]
    width = max(len(s.usage) for s in COMMANDS.values())
    lines = [f"{s.usage.ljust(width)}  {s.help}" for s in COMMANDS.values()]
    lines.append("Plain text goes to the current room; //text sends a line starting with /. Tab completes.")
    return lines


def completions(before_cursor: str, *, rooms: Iterable[str], joined: Iterable[str], users: Iterable[str],
                convs: Iterable[str]) -> list[tuple[str, int]]:
    """Tab completion for the text left of the cursor: (replacement, start) pairs, start <= 0 counting
    back from the cursor over the word being replaced. ``rooms``/``joined`` are room names, ``users``
    user names, ``convs`` "#room"/"@user" strings."""
    if not before_cursor.startswith("/") or before_cursor.startswith("//"):
        return []
    if " " not in before_cursor:
        word = before_cursor[1:].lower()
        return [("/" + name, -len(before_cursor)) for name in COMMANDS if name.startswith(word)]
    head, rest = before_cursor[1:].split(" ", 1)
    if " " in rest:  # only the first argument completes
        return []
    try:
        spec = COMMANDS[resolve(head)]
    except UsageError:
        return []
    candidates: Iterable[str]
    if spec.completes == "rooms":
        candidates = ["#" + r for r in rooms]
    elif spec.completes == "joined":
        candidates = ["#" + r for r in joined]
    elif spec.completes == "convs":
        candidates = convs
    elif spec.completes == "users":
        candidates = users
    elif spec.completes == "commands":
        candidates = COMMANDS
    else:
        return []
    word = rest
    bare = word.lstrip("#@")
    found = []
    for c in sorted(set(candidates)):
        if c.startswith(word) or (word == bare and c.lstrip("#@").startswith(bare)):
            found.append((c, -len(word)))
    return found
