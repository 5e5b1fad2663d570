"""The slash commands of ``chorus``: what a typed line means, /help, and tab completion.

How this works. ``parse`` turns a typed line into a ``Command`` or a ``Text``
without side effects, so the interactive client (``_tui.py``) decides what to
do and the rules here can be tested without a terminal. A line starting with
"/" is a command (a unique prefix is enough: "/j" is /join; IRC's names are
aliases: /part and /close are /leave, /s is /switch); "//" sends a line that
starts with "/"; anything else is text for the current conversation.
Conversations are written as in the library: "#room" or "@user" (spec/PROTOCOL.md
§3.6); a bare name means a room where a room is expected.
"""
from __future__ import annotations

import re
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
    "leave": Spec("/leave [#room|@user]", "leave a room, or close a direct conversation (also /part, /close); "
                  "the current one if none is named", "convs"),
    "switch": Spec("/switch #room|@user|N", "send plain text to another room, person, or number N in the status bar "
                   "(Alt-N too)", "convs"),
    "query": Spec("/query USER [text]", "open a direct conversation with USER and switch to it", "users"),
    "rooms": Spec("/rooms", "list the rooms on the server"),
    "who": Spec("/who [#room]", "who is in the current room, online or not; on a version 2 server with roles, mutes, "
                "bans and the topic (also /roles)", "joined"),
    "msg": Spec("/msg USER text", "send a direct message (/switch @USER to keep talking)", "users"),
    "history": Spec("/history [N]", "show N (default 20) older messages here, oldest first; repeat to page further "
                    "back"),
    "me": Spec("/me action", "send an action, shown as: * you action"),
    "edit": Spec("/edit N text", "replace the text of your message #N (the number after each message)"),
    "delete": Spec("/delete N", "delete message #N: your own, or any as a moderator of the room"),
    "react": Spec("/react N emoji", "react to message #N (an emoji or a word, e.g. 👍 or +1)"),
    "unreact": Spec("/unreact N emoji", "take back your reaction to message #N"),
    "topic": Spec("/topic [text]", "set the current room's topic (moderators, owner); with no text, show it"),
    "create": Spec("/create #room [--private]", "create a room you own and switch to it; --private: invite-only "
                   "and unlisted"),
    "invite": Spec("/invite USER", "add USER to the current room (the way into a private one)", "users"),
    "kick": Spec("/kick USER [reason]", "remove USER from the current room; they may join again", "users"),
    "ban": Spec("/ban USER [DURATION] [reason]", "remove USER and keep them out for DURATION (30m, 2h, 7d; none: "
                "until /unban)", "users"),
    "unban": Spec("/unban USER", "let a banned user join again", "users"),
    "mute": Spec("/mute USER [DURATION] [reason]", "refuse USER's messages here for DURATION (none: until /unmute)",
                 "users"),
    "unmute": Spec("/unmute USER", "let a muted user talk again", "users"),
    "op": Spec("/op USER", "make USER a moderator of the current room (the owner only)", "users"),
    "deop": Spec("/deop USER", "make a moderator a plain member again (the owner only)", "users"),
    "owner": Spec("/owner USER", "hand the current room over to USER; you become a moderator", "users"),
    "nick": Spec("/nick [Display Name]", "set the name shown beside your login (version 2); none: clear it"),
    "passwd": Spec("/passwd", "change your password (typed without echo); your other sessions are logged out"),
    "sessions": Spec("/sessions", "list your sessions (devices and logins), numbered for /revoke"),
    "revoke": Spec("/revoke N", "log out session N of the last /sessions list"),
    "logout-all": Spec("/logout-all", "log out every session, this one too, and quit"),
    "help": Spec("/help [command]", "list the commands, or explain one", "commands"),
    "quit": Spec("/quit", "leave chorus (Ctrl-D and Ctrl-C do too)"),
}
#: Other names for commands (IRC's habits); an alias wins over a prefix ("/s" is /switch, not ambiguous).
ALIASES = {"part": "leave", "close": "leave", "s": "switch", "roles": "who"}
DEFAULT_HISTORY = 20
#: Most messages one /history shows (fetched in as many pages as WELCOME's ``max_page`` requires).
MAX_HISTORY = 1000
#: The page size to assume before WELCOME says (``max_page``, spec §5.2): the server's default.
DEFAULT_PAGE = 100


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
    if word in ALIASES:
        return ALIASES[word]
    matches = [name for name in COMMANDS if word and name.startswith(word)]
    matches += [alias for alias, name in ALIASES.items() if word and alias.startswith(word) and name not in matches]
    if len({ALIASES.get(m, m) for m in matches}) == 1:
        return ALIASES.get(matches[0], matches[0])
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


#: A duration: a number and a unit (seconds, minutes, hours, days, weeks), as /ban and /mute take it.
_DURATION = re.compile(r"([1-9][0-9]{0,5})([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def duration_s(word: str) -> int | None:
    """Seconds in "30m", "2h", "7d"...; None if ``word`` is no duration."""
    found = _DURATION.fullmatch(word.lower())
    return int(found[1]) * _UNIT_S[found[2]] if found else None


def user_args(args: str, usage: str, *, duration: bool = False, reason: bool = False) -> tuple[str, int, str]:
    """(user, seconds or 0 for none, reason) of "/ban USER [DURATION] [reason]" and the like. Raises ``UsageError``."""
    user, _, rest = args.partition(" ")
    user, rest = user.removeprefix("@"), rest.strip()
    if not user or (rest and not (duration or reason)):
        raise UsageError(f"usage: {usage}")
    seconds = 0
    if duration and rest:
        first, _, after = rest.partition(" ")
        if (found := duration_s(first)) is not None:
            seconds, rest = found, after.strip()
    return user, seconds, rest


def seq_args(args: str, usage: str, *, text: bool) -> tuple[int, str]:
    """(N, the rest) of "/edit N text", "/react N emoji" ("#N" too); the rest is required when ``text``. Raises
    ``UsageError``."""
    word, _, rest = args.partition(" ")
    word, rest = word.removeprefix("#"), rest.strip()
    if not word.isdigit() or not 1 <= int(word) < 2**63 or bool(rest) != text:
        raise UsageError(f"usage: {usage}")
    return int(word), rest


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
    user names, ``convs`` "#room"/"@user" strings.

    A command's name, then its first argument by what it takes; any other word, anywhere in the line:
    "#..." a room, "@..." a person, else a person's name ("bob: " at the start of a message, IRC's habit)."""
    if before_cursor.startswith("/") and not before_cursor.startswith("//"):
        if " " not in before_cursor:
            word = before_cursor[1:].lower()
            names = (*COMMANDS, *(alias for alias in ALIASES if len(alias) > 1))  # not "/s" beside "/switch"
            return [("/" + name, -len(before_cursor)) for name in names if name.startswith(word)]
        head, rest = before_cursor[1:].split(" ", 1)
        if " " not in rest:  # the first argument completes to what the command takes
            try:
                spec = COMMANDS[resolve(head)]
            except UsageError:
                return []
            kinds = {"rooms": ["#" + r for r in rooms], "joined": ["#" + r for r in joined], "convs": list(convs),
                     "users": list(users), "commands": list(COMMANDS)}
            if spec.completes is not None:
                return _matching(rest, kinds[spec.completes])
    word = before_cursor.rsplit(" ", 1)[-1]
    if word.startswith("#"):
        return _matching(word, ["#" + r for r in rooms])
    if word.startswith("@"):
        return _matching(word, ["@" + u for u in users])
    if not word:
        return []
    found = _matching(word, list(users))
    if word == before_cursor:  # the first word of a message: addressed to someone, as on IRC
        return [(name + ": ", start) for name, start in found]
    return found


def _matching(word: str, candidates: Iterable[str]) -> list[tuple[str, int]]:
    """The candidates ``word`` begins (or begins without its "#"/"@", when it has none), sorted."""
    bare = word.lstrip("#@")
    return [(c, -len(word)) for c in sorted(set(candidates))
            if c.startswith(word) or (word == bare and c.lstrip("#@").startswith(bare))]
