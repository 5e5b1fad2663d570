"""The interactive ``chorus`` client: a chat in a terminal (spec/PROTOCOL.md §9).

How this works. Two threads, one owner of the state:

- The Trio thread owns everything: the library ``Client``, the conversations,
  unread counts, pending messages. Its tasks are: ``_events`` (prints each
  message and connection change as it arrives), ``_worker`` (does what typed
  lines ask of the server, one at a time, in the order typed), ``_mark_loop``
  (tells the server, once a second, how far we have shown each conversation:
  DELIVERED, §9.6, so the next start shows only what is new; and how far we
  have read: READ, for what was printed while that conversation was the
  current one, so the page and other devices count the same unread messages)
  and ``_tick``.
- A worker thread runs prompt_toolkit on its own asyncio loop for the whole
  session (``_PromptThread``). Each finished line is handed to the Trio thread
  with ``trio.from_thread.run_sync``. Output goes through ``patch_stdout``: a
  ``print`` from the Trio thread is queued to the prompt's loop, which erases
  the input line, prints above it and draws it again, so a half-typed line is
  never garbled. One long-lived loop (rather than one ``prompt()`` per line)
  means the printer never targets a loop that has just closed.

Starting: live delivery begins with a SYNC (§9.5) that lists each joined room
(and, on a version 2 server, each direct conversation: CONVERSATIONS, §5.37)
from the user's DELIVERED cursor, but at most STARTUP_BACKLOG messages back,
so a start shows what came while away without flooding the screen; what an
earlier session showed but nobody read (the READ cursor is behind) starts as
unread. It is the first job of ``_worker``, so the prompt is up at once.

The prompt shows where plain text goes, unread counts elsewhere and
"[offline]"; the bottom toolbar (drawn by prompt_toolkit when the terminal
answers cursor-position requests) numbers every conversation for /switch N and
Alt-N. A conversation keeps its number while it is open; a new one takes the
lowest free number, so joining never renumbers the others.

What is on screen is not news: a message counts as unread only when it
arrives live in another conversation (the start's backlog, recaps and
/history pages do not). Joining a room, or switching to a conversation with
nothing of it on screen, first shows its last RECENT messages (a recap, from
HISTORY §5.19); a live message the recap already printed is not printed again
(``printed``). /history N fetches as many pages as N needs and prints them as
one block, oldest first.

Quitting (Ctrl-C, Ctrl-D, /quit) with messages not yet acknowledged asks
first; a second request quits.

Accounts (spec §5.41-§5.45): /passwd asks three questions on the input line
with echo off (``secret``: the answers are never printed, never kept in the
input history, never completed, and send no typing notice); Ctrl-C cancels.
/sessions numbers the user's sessions for /revoke N; /logout-all ends every
session and forgets the saved token.

Version 2's conversation events (spec §9.15, §9.16) arrive in the event stream
in seq order with the messages, live and on catch-up: ``_show_event`` prints an
ACTION as a message and the others in words (``_render.event_words``), and
follows what concerns us (the topic; our own removal, which closes the room; an
invitation, which opens it). A page of history (recap, /history) is printed by
``_print_block``, which folds the page's edits and reactions into the messages
they concern. Paging back counts entries (``Page.entries``), events included,
so a page of events only does not end it. The moderation commands act on the
current room, /edit, /delete and /react on the message whose seq is shown after
it (``Renderer(seqs=True)``); what they do comes back as an event everyone
sees, and a refusal (FORBIDDEN...) is one line.

Display names (version 2, spec §9.17): /nick sets or clears ours; a sender of a live message, or a member
listed by /who, is asked about once a session (GET_USERS, before the line is printed), and shown "Display Name
(login)" by the renderer, the display name neutralised like any client text; pages of history use what is known.

Lines are handled at once, in the Trio thread, when typed: text gets its
client_msg_id then (so a retry after a reconnect reuses it, §9.4), and while
offline it is printed as pending. Work that needs the server goes to a
queue that ``_worker`` runs in order, so "/join #x" then "hello" sends hello
to #x after the join. A send that times out while the server is away is
retried with the same id until it is acknowledged; the library already re-sends
its outbox after reconnecting (and catches up by seq without duplicates,
§9.5); this module only shows it happening.

Limits come from the protocol, never from here: a message's size and /history's
N from WELCOME (max_body_bytes, max_page), typing notices from
proto.TYPING_INTERVAL_S and TYPING_SHOW_S (§9.9).

When stdin is not a terminal, lines are read plainly from stdin and there is
no status bar: ``printf '/join #x\\nhello\\n' | chorus`` works.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from chorus import proto
from chorus.proto import ConvKind, ErrorCode, EventKind

from ._client import Client
from ._commands import COMMANDS, DEFAULT_PAGE, Command, Text, UsageError, completions, help_lines, history_count, \
    msg_args, parse, room_arg, seq_args, user_args
from ._errors import ConnectionLost, ServerError
from ._events import Disconnected, Reconnected
from ._render import Renderer, action_message, clock, mentions
from ._rules import password_problem

#: At start, a room shows at most this many messages that arrived since we last looked; /history shows more.
STARTUP_BACKLOG = 30
#: Joining a room, or switching to a conversation with nothing of it on screen, shows its last RECENT messages.
RECENT = 10
_QUEUE_LIMIT = 1000  # lines waiting for the server; more is refused (a paste of a whole file, say)
_QUIT_GRACE_S = 5.0  # on /quit, time given to lines still waiting for the server
_MARK_INTERVAL_S = 1.0
#: /passwd's questions, in order; the prompt while it asks.
_SECRET_PROMPTS = ("Current password: ", "New password ({rule}): ", "New password again: ")


def describe(exc: BaseException) -> str:
    """One readable sentence for an error from the library."""
    if isinstance(exc, ServerError):
        return exc.message or exc.code.name.replace("_", " ").lower()
    if isinstance(exc, trio.TooSlowError):
        return "the server did not answer in time"
    return str(exc) or type(exc).__name__


def conv_arg(text: str, usage: str) -> proto.Conversation:
    """"#room", "@user" or a bare room name. Raises ``UsageError`` (saying ``usage``)."""
    text = text.strip()
    if text.startswith("@") and len(text) > 1 and " " not in text:
        return proto.Conversation.direct(text[1:])
    name = text.removeprefix("#")
    if not name or " " in name or name.startswith("@"):
        raise UsageError(f"usage: {usage}")
    return proto.Conversation.room(name)


@dataclass
class _Pending:
    conv: proto.Conversation
    body: str
    client_msg_id: int
    action: bool = False  # /me: SEND_ACTION on version 2, "/me " + body on version 1


Entry = proto.StoredMessage | proto.ConvEvent
#: Events shown as messages: at the seq of the message they are (spec §3.15).
_MESSAGE_LIKE = (EventKind.ACTION, EventKind.DELETED)
#: /op, /deop, /owner: the role each gives.
_ROLES = {"op": proto.RoomRole.MODERATOR, "deop": proto.RoomRole.MEMBER, "owner": proto.RoomRole.OWNER}
#: Commands that act on the current room (version 2, spec §9.15).
_ROOM_COMMANDS = ("kick", "ban", "unban", "mute", "unmute", "op", "deop", "owner", "invite", "topic")


def _reactions(counts: dict[str, set[str]]) -> str:
    """ "👍 2, 🎉" for a message's reactions (who left each), in the order they came."""
    return ", ".join(r if len(users) == 1 else f"{r} {len(users)}" for r, users in counts.items() if users)


class Tui:
    """One interactive session on a connected ``client``; ``await run()`` until the user quits."""

    def __init__(self, client: Client, renderer: Renderer, *, terminal: bool, out: Callable[[str], None] = print,
                 forget_session: Callable[[], None] | None = None):
        self.client = client
        self.me = client.username or ""
        self.r = renderer
        self.terminal = terminal
        self._print = out
        self.current: proto.Conversation | None = None
        self.joined: set[str] = set()
        self.directs: set[str] = set()
        #: Each open conversation's number in the status bar (/switch N, Alt-N): a new one takes the lowest free
        #: number, so joining or closing one never renumbers the others.
        self.numbers: dict[proto.Conversation, int] = {}
        self.known_rooms: set[str] = set()
        self.topics: dict[str, str] = {}  # room → topic, from GET_ROOM and TOPIC events (version 2)
        self.users: set[str] = set()
        self.unread: dict[proto.Conversation, int] = {}
        self.shown: dict[proto.Conversation, int] = {}  # highest seq shown (or not news any more)
        self.first_shown: dict[proto.Conversation, int] = {}  # where /history starts paging back
        self.printed: dict[proto.Conversation, int] = {}  # highest seq on screen (recaps may race live ones)
        self.read: dict[proto.Conversation, int] = {}  # highest seq on screen while its conversation was current
        self._read_marked: dict[proto.Conversation, int] = {}
        self._live = False  # catch-up done: from now on a message elsewhere is unread
        self._quit_asked = False  # quitting with messages not sent asks first; a second request quits
        self._recapped: set[proto.Conversation] = set()
        #: /passwd's answers so far while it asks (input unechoed); None otherwise.
        self.secret: list[str] | None = None
        #: Users whose display name we asked for (version 2, §9.17): once a session, and ourselves again after /nick;
        #: the answers are in ``self.r.names``.
        self._named: set[str] = set()
        self._sessions_listed: list[proto.SessionInfo] = []  # the last /sessions, numbered from 1 for /revoke
        self._forget_session = forget_session  # drops the saved token (after /logout-all)
        self._logging_out = False
        self.history_cursor: dict[proto.Conversation, int] = {}
        self.history_done: set[proto.Conversation] = set()
        self.pending: dict[int, _Pending] = {}
        self.typing: dict[tuple[proto.Conversation, str], float] = {}
        self.connected = True
        self.exit_code = 0
        self.status = ""  # the bottom toolbar; read by the prompt thread
        self.prompt_text = "> "
        self.completion_sources: dict = {"rooms": (), "joined": (), "users": (), "convs": ()}
        self._marked: dict[proto.Conversation, int] = {}
        self._typing_sent: dict[proto.Conversation, float] = {}
        self._caught_up = 0
        self._ops_send, self._ops_recv = trio.open_memory_channel(_QUEUE_LIMIT)
        self._queued = 0
        self._idle = trio.Event()
        self._idle.set()
        self._done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._input: _PromptThread | None = None

    # -- output ------------------------------------------------------------------------
    def out(self, line: str) -> None:
        self._print(line)

    def info(self, text: str) -> None:
        self.out(self.r.info(text, self.width()))

    def error(self, text: str) -> None:
        self.out(self.r.error(text, self.width()))

    def width(self) -> int | None:
        """Columns to wrap messages at: the terminal's; None (one line per message) without a terminal."""
        return shutil.get_terminal_size().columns if self.terminal else None

    def message_line(self, msg: proto.Message, *, pending: bool = False) -> str:
        return self.r.message(msg, pending=pending, width=self.width())

    def conv_list(self) -> list[proto.Conversation]:
        """The open conversations in the order of their numbers in the status bar."""
        return sorted(self.numbers, key=self.numbers.__getitem__)

    def _open(self, conv: proto.Conversation) -> None:
        """``conv`` is one of ours now: give it the lowest free number (rooms also go into ``joined``)."""
        if conv.kind == ConvKind.ROOM:
            self.joined.add(conv.name)
        else:
            self.directs.add(conv.name)
        if conv not in self.numbers:
            taken = set(self.numbers.values())
            self.numbers[conv] = next(n for n in range(1, len(taken) + 2) if n not in taken)

    def _close(self, conv: proto.Conversation) -> None:
        """Forget ``conv`` (left, or a direct conversation closed); its number is free for the next one."""
        (self.joined if conv.kind == ConvKind.ROOM else self.directs).discard(conv.name)
        self.numbers.pop(conv, None)
        for table in (self.unread, self.first_shown, self.history_cursor, self.printed):
            table.pop(conv, None)
        self.history_done.discard(conv)
        self._recapped.discard(conv)
        if self.current == conv:
            self.current = self._fallback()

    def refresh(self) -> None:
        """Rebuild the status bar, prompt and completion sources, and have the prompt redraw."""
        parts = []
        for conv in self.conv_list():
            n = self.unread.get(conv, 0)
            label = f"{self.numbers[conv]}:{conv}" + (f"({n})" if n else "")
            parts.append(f"[{label}]" if conv == self.current else label)
        status = " ".join(parts) or "no rooms yet: /join #room"
        if not self.connected:
            status = "reconnecting… | " + status
        if self.pending:
            status += f" | {len(self.pending)} pending"
        now = trio.current_time()
        typists = sorted(u for (conv, u), until in self.typing.items() if conv == self.current and until > now)
        if typists:
            status += f" | {', '.join(typists)} typing…"
        self.status = status
        elsewhere = [f"{conv} {unread}" for conv in self.conv_list()
                     if conv != self.current and (unread := self.unread.get(conv))]
        self.prompt_text = (("" if self.connected else "[offline] ") + str(self.current or "(no room)")
                            + (f" ({', '.join(elsewhere)})" if elsewhere else "") + "> ")
        if self.secret is not None:
            self.prompt_text = _SECRET_PROMPTS[len(self.secret)].format(rule=proto.PASSWORD_RULE)
        convs = [str(c) for c in self.conv_list()]
        self.completion_sources = {
            "rooms": tuple(self.known_rooms | self.joined), "joined": tuple(self.joined),
            "users": tuple(u for u in self.users | self.directs if u != self.me), "convs": tuple(convs),
        }
        if self._input is not None:
            self._input.refresh()

    # -- the session ---------------------------------------------------------------------
    async def run(self) -> int:
        """Catch up, then serve typed lines until /quit, end of input, or a connection lost for good."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._events)
            nursery.start_soon(self._worker)
            nursery.start_soon(self._mark_loop)
            nursery.start_soon(self._tick)
            try:
                # Catching up is the first piece of work: lines typed meanwhile wait behind it, and
                # the prompt is up at once even if the server goes away right now.
                self._enqueue(self._catch_up)
                self.refresh()
                self._input = _PromptThread(self) if self.terminal else None
                nursery.start_soon(self._read_input)
                await self._done.wait()
                await self._finish()
            finally:
                if self._input is not None:
                    self._input.stop()
                nursery.cancel_scope.cancel()
        return self.exit_code

    async def _catch_up(self) -> None:
        """Start live delivery (SYNC), showing in each room at most STARTUP_BACKLOG messages not yet seen."""
        while True:
            try:
                await self._catch_up_once()
                return
            except trio.TooSlowError:
                continue  # the server is away; the library reconnects meanwhile

    async def _catch_up_once(self) -> None:
        rooms = await self.client.rooms()
        self.known_rooms = {r.name for r in rooms}
        mine = sorted((r for r in rooms if r.joined), key=lambda r: r.name)
        # Our cursors: one CONVERSATIONS (version 2, §5.37), which also names our direct conversations; else
        # CURSORS room by room.
        cursors: dict[proto.Conversation, tuple[int, int]] = {}  # conv → (delivered, read)
        directs: list[proto.ConversationInfo] = []
        if (self.client.version or 1) >= 2:
            for info in await self.client.conversations():
                cursors[info.conv] = (info.delivered_seq, info.read_seq)
                if info.conv.kind == ConvKind.DIRECT:
                    directs.append(info)
        else:
            async def fetch(room: str) -> None:
                conv = proto.Conversation.room(room)
                for cursor in await self.client.cursors(conv):
                    if cursor.user == self.me:
                        cursors[conv] = (cursor.delivered_seq, cursor.read_seq)

            async with trio.open_nursery() as nursery:
                for r in mine:
                    nursery.start_soon(fetch, r.name)
        newest = [(proto.Conversation.room(r.name), r.last_seq) for r in mine]
        newest += [(info.conv, info.last_seq) for info in sorted(directs, key=lambda info: info.conv.name)]
        quiet: dict[proto.Conversation, int] = {}  # conversations with nothing new: a recap shows where they stand
        for conv, last_seq in newest:
            self._open(conv)
            seen, read = cursors.get(conv, (0, 0))
            if last_seq <= seen:
                quiet[conv] = last_seq
            start = max(seen, last_seq - STARTUP_BACKLOG)
            if start > seen:
                self.info(f"{conv}: {last_seq - seen} messages since you last looked; the last {STARTUP_BACKLOG}"
                          " follow (/history for more)")
            # Shown in an earlier session but never read: unread (what follows now is on screen, so it is not).
            if min(seen, last_seq) > read:
                self.unread[conv] = min(seen, last_seq) - read
            # (A reconnect meanwhile has synced by itself: then never go back and show things twice.)
            self.client.last_seq.setdefault(conv, start)
        if mine and self.current is None:
            self.current = proto.Conversation.room(mine[0].name)
        if self.current is not None:
            self.unread.pop(self.current, None)
        where = ", ".join(f"#{r.name}" for r in mine) or "no rooms yet (/join #room)"
        self.info(f"logged in as {self.me}; in {where}. /help lists the commands")
        await self.client.sync()
        self._live = True
        if self.current is not None and self.current.kind == ConvKind.ROOM and (self.client.version or 1) >= 2:
            await self._show_topic(self.current.name, quiet=True)
        if self.current in quiet and quiet[self.current]:
            await self._recap(self.current, upto=quiet[self.current])

    async def _finish(self) -> None:
        """Give queued lines a moment to reach the server, then record how far we have read."""
        if self._queued and self.connected:
            with trio.move_on_after(_QUIT_GRACE_S):
                await self._idle.wait()
        if self.pending:
            self.error(f"{len(self.pending)} message(s) not sent")
        with trio.move_on_after(1.0):
            await self._flush_marks()

    def quit(self) -> None:
        self._done.set()

    def request_quit(self) -> None:
        """Ctrl-C, Ctrl-D or /quit: quit, unless messages are still unsent; then ask, and quit on a second
        request (a line typed in between cancels the question)."""
        if self.secret is not None:
            self.secret = None
            self.info("password not changed")
            self.refresh()
            return
        if not self.pending or self._quit_asked:
            self.quit()
            return
        self._quit_asked = True
        n = len(self.pending)
        why = "the server is away" if not self.connected else "the server has not acknowledged them yet"
        self.error(f"{n} message{'s' if n > 1 else ''} not sent yet ({why}): quit anyway and lose "
                   f"{'them' if n > 1 else 'it'}? Ctrl-C again (or /quit) quits; keep typing to stay")

    # -- input -----------------------------------------------------------------------------
    async def _read_input(self) -> None:
        if self._input is not None:
            await trio.to_thread.run_sync(self._input.run)
        else:
            await trio.to_thread.run_sync(self._read_plain, abandon_on_cancel=True)

    def _read_plain(self) -> None:
        for line in sys.stdin:
            trio.from_thread.run_sync(self.on_line, line.rstrip("\r\n"))
        trio.from_thread.run_sync(self.quit)

    def on_line(self, line: str) -> None:
        """Act on one typed line (in the Trio thread). Never raises: errors become one line."""
        try:
            if self.secret is not None:
                self._secret_answer(line)
                return
            parsed = parse(line)
            if parsed is None:
                return
            if not (isinstance(parsed, Command) and parsed.name == "quit"):
                self._quit_asked = False
            if isinstance(parsed, Text):
                self._queue_text(self.current, parsed.body)
            else:
                self._command(parsed)
        except UsageError as exc:
            self.error(str(exc))
        except Exception as exc:  # a bug here must not end the session or print a traceback
            self.error(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.refresh()

    def on_keystroke(self, text: str) -> None:
        """The input line changed (in the Trio thread): say we are typing, now and then (§9.9)."""
        conv = self.current
        if conv is None or not text or text.startswith("/") or not self.connected or self._nursery is None:
            return
        if self.secret is not None:
            return  # a password being typed is nobody's business
        # Only where the server knows us: a room being joined, or a direct conversation not started
        # yet, would answer with an ERROR.
        if (conv.name not in self.joined) if conv.kind == ConvKind.ROOM else (conv not in self.shown):
            return
        now = trio.current_time()
        if now - self._typing_sent.get(conv, -proto.TYPING_INTERVAL_S) < proto.TYPING_INTERVAL_S:
            return
        self._typing_sent[conv] = now
        self._nursery.start_soon(self._send_typing, conv)

    async def _send_typing(self, conv: proto.Conversation) -> None:
        with contextlib.suppress(ConnectionLost, ServerError, proto.ProtocolError):
            await self.client.typing(conv)

    # -- commands ----------------------------------------------------------------------------
    def _command(self, cmd: Command) -> None:
        name, args = cmd.name, cmd.args
        if name == "help":
            for line in help_lines(args):
                self.info(line)
        elif name == "quit":
            self.request_quit()
        elif name == "join":
            room = room_arg(args, COMMANDS["join"].usage)
            previous, self.current = self.current, proto.Conversation.room(room)
            self._enqueue(self._join, room, previous)
        elif name == "leave":
            conv = conv_arg(args, COMMANDS["leave"].usage) if args else self.current
            if conv is None:
                raise UsageError(f"usage: {COMMANDS['leave'].usage}")
            if conv.kind == ConvKind.DIRECT:
                if conv not in self.numbers:
                    raise UsageError(f"no open conversation with {conv.name}")
                self._close(conv)  # the server keeps it; a new message from them opens it again
                self.info(f"closed {conv}" + (f"; now talking in {self.current}" if self.current else ""))
            else:
                self._enqueue(self._leave, conv.name)
        elif name == "switch":
            self._switch(args)
        elif name == "query":
            user, _, text = args.partition(" ")
            conv = conv_arg("@" + user.removeprefix("@"), COMMANDS["query"].usage) if user else None
            if conv is None:
                raise UsageError(f"usage: {COMMANDS['query'].usage}")
            self._switch(str(conv))
            if text.strip():
                self._queue_text(conv, text)
        elif name == "rooms":
            self._enqueue(self._rooms)
        elif name == "who":
            if args:
                room = room_arg(args, COMMANDS["who"].usage)
            elif self.current is not None and self.current.kind == ConvKind.ROOM:
                room = self.current.name
            else:
                raise UsageError("/who lists the people in a room: /who #room")
            self._enqueue(self._who, room)
        elif name == "msg":
            user, text = msg_args(args)
            if user == self.me:
                raise UsageError("that is you; /msg someone else")
            self._queue_text(proto.Conversation.direct(user), text)
        elif name == "me":
            if not args:
                raise UsageError(f"usage: {COMMANDS['me'].usage}")
            self._queue_text(self.current, args, action=True)
        elif name == "create":
            words = args.split()
            private = "--private" in words
            room = room_arg(" ".join(w for w in words if w != "--private"), COMMANDS["create"].usage)
            self._needs_version_2(name)
            previous, self.current = self.current, proto.Conversation.room(room)
            self._enqueue(self._join, room, previous, private)
        elif name in ("edit", "delete", "react", "unreact"):
            self._message_command(name, args)
        elif name in _ROOM_COMMANDS:
            self._room_command(name, args)
        elif name == "history":
            if self.current is None:
                raise UsageError("no conversation yet: /join #room first")
            self._enqueue(self._history, self.current, history_count(args))
        elif name == "passwd":
            if not self.terminal:
                raise UsageError("/passwd needs a terminal (the password is typed without echo)")
            self.secret = []
            self.info("changing your password (Ctrl-C cancels)")
        elif name == "nick":
            self._needs_version_2(name)
            self._enqueue(self._nick, args)
        elif name == "sessions":
            self._enqueue(self._sessions)
        elif name == "revoke":
            self._revoke_command(args)
        elif name == "logout-all":
            self._enqueue(self._logout_all)

    def _needs_version_2(self, name: str) -> None:
        if (self.client.version or 1) < 2:
            raise UsageError(f"/{name} needs a server that speaks protocol version 2; this one speaks version 1")

    def _here(self, name: str, *, room: bool) -> proto.Conversation:
        """The current conversation, which /``name`` acts on (a room, if ``room``). Raises ``UsageError``."""
        self._needs_version_2(name)
        conv = self.current
        if conv is None or (room and conv.kind != ConvKind.ROOM):
            raise UsageError(f"/{name} acts on the current room: /switch #room first")
        return conv

    def _message_command(self, name: str, args: str) -> None:
        """/edit N text, /delete N, /react N emoji, /unreact N emoji: N is the seq shown after the message."""
        conv = self._here(name, room=False)
        seq, text = seq_args(args, COMMANDS[name].usage, text=name != "delete")
        client = self.client
        if name == "edit":
            self._enqueue(self._ask, f"edit #{seq}", functools.partial(client.edit_message, conv, seq, text))
        elif name == "delete":
            self._enqueue(self._ask, f"delete #{seq}", functools.partial(client.delete_message, conv, seq))
        else:
            self._enqueue(self._ask, f"{'react to' if name == 'react' else 'take back a reaction to'} #{seq}",
                          functools.partial(client.react, conv, seq, text, add=name == "react"))

    def _room_command(self, name: str, args: str) -> None:
        """The moderation commands (spec §9.15), on the current room. What they do comes back as an event of the
        room, shown like everyone else sees it; a refusal is one line."""
        room = self._here(name, room=True).name
        client = self.client
        if name == "topic":
            if args:
                self._enqueue(self._ask, "set the topic", functools.partial(client.set_topic, room, args))
            else:
                self._enqueue(self._show_topic, room)
            return
        usage = COMMANDS[name].usage
        user, seconds, reason = user_args(args, usage, duration=name in ("ban", "mute"),
                                          reason=name in ("kick", "ban", "mute"))
        until_ms = int(time.time() * 1000) + seconds * 1000 if seconds else 0
        call: Callable[[], Awaitable[None]]
        if name == "kick":
            call = functools.partial(client.kick, room, user, reason)
        elif name in ("ban", "mute"):
            call = functools.partial(client.ban if name == "ban" else client.mute, room, user, until_ms=until_ms,
                                     reason=reason)
        elif name in ("unban", "unmute", "invite"):
            call = functools.partial(getattr(client, name), room, user)
        else:
            call = functools.partial(client.set_role, room, user, _ROLES[name])
        self._enqueue(self._ask, f"{name} {user}", call)

    async def _ask(self, what: str, call: Callable[[], Awaitable[None]]) -> None:
        """A request whose outcome is an event the server sends back to us; a refusal is one line."""
        try:
            await call()
        except ServerError as exc:
            self.error(f"cannot {what}: {describe(exc)}")

    async def _show_topic(self, room: str, *, quiet: bool = False) -> None:
        """/topic: show ``room``'s topic. ``quiet`` (the first time we talk there: at start, on /switch): only a
        topic there is, and no error."""
        try:
            details = await self.client.room(room)
        except ServerError as exc:
            if not quiet:
                self.error(f"cannot read the topic of #{room}: {describe(exc)}")
            return
        self.topics[room] = details.topic
        if details.topic:
            self.info(f"topic of #{room}: {details.topic}")
        elif not quiet:
            self.info(f"#{room} has no topic (/topic text sets it)")

    def _secret_answer(self, text: str) -> None:
        """One answer to /passwd's questions: the current password, a new one, the new one again."""
        answers = self.secret
        assert answers is not None
        answers.append(text)
        if len(answers) == 2 and (problem := password_problem(text, register=True)):
            answers.pop()
            self.error(f"{problem}; type another (Ctrl-C cancels)")
        elif len(answers) == 3:
            self.secret = None
            old, new, again = answers
            if again != new:
                self.error("the two new passwords differ; not changed (/passwd to try again)")
            else:
                self._enqueue(self._change_password, old, new)

    def _revoke_command(self, args: str) -> None:
        listed = self._sessions_listed
        if not args.strip().isdigit():
            raise UsageError(f"usage: {COMMANDS['revoke'].usage}")
        if not listed:
            raise UsageError("list them first: /sessions")
        n = int(args)
        if not 1 <= n <= len(listed):
            raise UsageError(f"no session number {n}; /sessions numbered them 1 to {len(listed)}")
        if listed[n - 1].current:
            raise UsageError("that is this session: /quit leaves it, /logout-all ends every one")
        self._enqueue(self._revoke, n, listed[n - 1].session_id)

    def switch_number(self, n: int) -> None:
        """Alt-N (from the prompt thread): as /switch N."""
        self.on_line(f"/switch {n}")

    def _switch(self, args: str) -> None:
        if not args:
            raise UsageError(f"usage: {COMMANDS['switch'].usage}")
        if args.strip().isdigit():
            n = int(args)
            found = [conv for conv, number in self.numbers.items() if number == n]
            if not found:
                numbers = ", ".join(str(number) for number in sorted(self.numbers.values())) or "none yet"
                raise UsageError(f"no conversation number {n}; the status bar numbers them ({numbers})")
            conv = found[0]
        else:
            conv = conv_arg(args, COMMANDS["switch"].usage)
            if conv.kind == ConvKind.ROOM and conv.name not in self.joined:
                raise UsageError(f"you are not in {conv}; /join {conv} first")
            if conv.kind == ConvKind.DIRECT:
                if conv.name == self.me:
                    raise UsageError("that is you; /switch @someone else")
                self._open(conv)
        if conv == self.current:
            self.info(f"already talking in {conv}")
            return
        self.current = conv
        self.unread.pop(conv, None)
        self._read_here()
        topic = self.topics.get(conv.name) if conv.kind == ConvKind.ROOM else None
        self.info(f"now talking in {conv}" + (f"; topic: {topic}" if topic else ""))
        if conv.kind == ConvKind.ROOM and conv.name not in self.topics and (self.client.version or 1) >= 2:
            self._enqueue(functools.partial(self._show_topic, conv.name, quiet=True))
        if conv not in self.first_shown:
            self._enqueue(self._recap, conv)

    def page_size(self) -> int:
        """Most messages a HISTORY page holds: WELCOME's ``max_page`` (§5.2)."""
        return self.client.welcome.max_page if self.client.welcome else DEFAULT_PAGE

    def _queue_text(self, conv: proto.Conversation | None, body: str, *, action: bool = False) -> None:
        if conv is None:
            raise UsageError("you are in no room: /join #room first, or /msg USER text")
        size = len(body.encode("utf-8"))
        limit = self.client.welcome.max_body_bytes if self.client.welcome else proto.MAX_BODY_BYTES
        if size > limit:
            raise UsageError(f"message too long: {size} bytes, the server takes at most {limit}")
        if conv.kind == ConvKind.DIRECT:
            self._open(conv)
        p = _Pending(conv, body, secrets.randbits(63) or 1, action)
        self._enqueue(self._send, p)
        self.pending[p.client_msg_id] = p
        if not self.connected:
            shown = proto.Message(conv, 0, int(time.time() * 1000), self.me, p.client_msg_id,
                                  "/me " + body if action else body)
            self.out(self.message_line(shown, pending=True))

    def _enqueue(self, fn: Callable[..., Awaitable[None]], *args) -> None:
        try:
            self._ops_send.send_nowait(functools.partial(fn, *args))
        except trio.WouldBlock:
            raise UsageError(f"{_QUEUE_LIMIT} lines are already waiting for the server; try again later") from None
        self._queued += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    async def _worker(self) -> None:
        async for op in self._ops_recv:
            try:
                await op()
            except ConnectionLost:
                return
            except (ServerError, trio.TooSlowError, proto.ProtocolError) as exc:
                self.error(describe(exc))
            finally:
                self._queued -= 1
                if not self._queued:
                    self._idle.set()
                self.refresh()

    async def _send(self, p: _Pending) -> None:
        try:
            while True:
                try:
                    if not p.action:
                        await self.client.send(p.conv, p.body, client_msg_id=p.client_msg_id)
                    elif (self.client.version or 1) >= 2:  # an ACTION event (spec §9.16)
                        await self.client.send_action(p.conv, p.body, client_msg_id=p.client_msg_id)
                    else:  # version 1's convention, which every client shows as an action
                        await self.client.send(p.conv, "/me " + p.body, client_msg_id=p.client_msg_id)
                    return
                except trio.TooSlowError:
                    continue  # still away: keep trying, with the same id so it is stored once
                except ServerError as exc:
                    if exc.code == ErrorCode.NOT_FOUND and p.conv.kind == ConvKind.DIRECT:
                        self._close(p.conv)
                        self.error(f"not sent: there is no user {p.conv.name}")
                    else:
                        self.error(f"not sent to {p.conv}: {describe(exc)}")
                    return
                except proto.LocalProtocolError as exc:
                    self.error(f"not sent to {p.conv}: {exc}")
                    return
        finally:
            self.pending.pop(p.client_msg_id, None)

    def _fallback(self) -> proto.Conversation | None:
        convs = self.conv_list()
        return convs[0] if convs else None

    async def _join(self, room: str, previous: proto.Conversation | None, private: bool | None = None) -> None:
        """/join, or with ``private`` not None /create (CREATE_ROOM, version 2)."""
        conv = proto.Conversation.room(room)
        try:
            if private is None:
                joined = await self.client.join(room)
            else:
                joined = await self.client.create_room(room, private=private)
        except ServerError as exc:
            self.error(f"cannot {'join' if private is None else 'create'} #{room}: {describe(exc)}")
            if self.current == conv:
                self.current = previous
            return
        self._open(conv)
        self.known_rooms.add(joined.room)
        # What was said before we joined is history, not news for the next start.
        self.shown[conv] = max(self.shown.get(conv, 0), joined.last_seq)
        people = "1 member" if joined.members == 1 else f"{joined.members} members"
        said = f"{joined.last_seq} messages so far" if joined.last_seq else "no messages yet"
        made = "" if private is None else "created private room " if private else "created "
        self.info(f"{made or 'joined '}#{joined.room} ({people}, {said})")
        with contextlib.suppress(ServerError):  # names to complete, and the topic; a failure here costs nothing else
            if (self.client.version or 1) >= 2:
                details = await self.client.room(joined.room)
                self.users |= {m.user for m in details.members}
                self.topics[joined.room] = details.topic
                if details.topic:
                    self.info(f"topic: {details.topic}")
            else:
                self.users |= {m.user for m in await self.client.members(joined.room)}
        if conv not in self.first_shown:
            await self._recap(conv, upto=joined.last_seq)

    async def _leave(self, room: str) -> None:
        conv = proto.Conversation.room(room)
        try:
            await self.client.leave(room)
        except ServerError as exc:
            self.error(f"cannot leave #{room}: {describe(exc)}")
            return
        self._close(conv)
        for table in (self.shown, self._marked, self.read, self._read_marked):
            table.pop(conv, None)
        self.info(f"left #{room}" + (f"; now talking in {self.current}" if self.current else ""))

    async def _rooms(self) -> None:
        rooms = await self.client.rooms()
        self.known_rooms |= {r.name for r in rooms}
        if not rooms:
            self.info("no rooms on this server yet: /join #name creates one")
            return
        self.info(f"{len(rooms)} room(s):")
        for r in rooms:
            people = "1 member" if r.members == 1 else f"{r.members} members"
            self.info(f"  #{r.name}  {people}, {r.last_seq} messages" + (", joined" if r.joined else ""))

    async def _change_password(self, old: str, new: str) -> None:
        try:
            await self.client.change_password(old, new)
        except ServerError as exc:
            self.error("wrong password; not changed" if exc.code == ErrorCode.AUTH_FAILED
                       else f"password not changed: {describe(exc)}")
            return
        self.info("password changed; your other sessions are logged out")

    async def _sessions(self) -> None:
        sessions = await self.client.sessions()
        self._sessions_listed = sessions
        self.info(f"{len(sessions)} session{'s' if len(sessions) > 1 else ''}, oldest first (/revoke N logs one out):")
        for n, info in enumerate(sessions, 1):
            started = clock(info.created_ms) if info.created_ms else "before the server kept the time"
            self.info(f"  {n}  started {started}, last used {clock(info.last_used_ms)}"
                      + ("  (this one)" if info.current else ""))

    async def _revoke(self, n: int, session_id: int) -> None:
        try:
            await self.client.revoke_session(session_id)
        except ServerError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise
            self.error(f"session {n} is already gone")
            return
        self.info(f"session {n} logged out")

    async def _logout_all(self) -> None:
        self._logging_out = True  # the connection's end is ours, not a failure
        await self.client.logout_all()
        if self._forget_session is not None:
            self._forget_session()
        self.info("logged out everywhere")
        self.quit()

    async def _nick(self, name: str) -> None:
        """/nick: set (or clear) our display name; the server's refusal (a look-alike of another user's name...) is
        one line. What it became is asked for again, as the server normalised it."""
        try:
            await self.client.set_display_name(name)
        except ServerError as exc:
            self.error(f"cannot set your display name: {describe(exc)}")
            return
        self._named.discard(self.me)
        self.r.names.pop(self.me, None)
        await self._learn_names([self.me])
        shown = self.r.names.get(self.me)
        self.info(f"you are {self.r.person(self.me)} now" if shown else "your display name is cleared")

    async def _learn_names(self, users) -> None:
        """Ask the server for the display names of ``users`` not asked about yet this session (version 2, §9.17)."""
        unknown = sorted({u for u in users if u} - self._named)
        if not unknown or (self.client.version or 1) < 2 or not self.connected:
            return
        try:
            for start in range(0, len(unknown), 1000):  # GET_USERS names at most 1000
                found = await self.client.display_names(unknown[start:start + 1000])
                self.r.names.update({user: name for user, name in found.items() if name})
        except (ServerError, ConnectionLost, proto.ProtocolError, trio.TooSlowError):
            return  # shown by login; asked again when next seen
        self._named.update(unknown)

    async def _who(self, room: str) -> None:
        try:
            if (self.client.version or 1) >= 2:
                await self._roles(room)
                return
            members = await self.client.members(room)
        except ServerError as exc:
            self.error(f"cannot list #{room}: {describe(exc)}")
            return
        self.users |= {m.user for m in members}
        order = sorted(members, key=lambda m: (m.status != proto.Status.ONLINE, m.user))
        self.info(f"#{room}: " + ", ".join(f"{m.user} ({m.status.name.lower()})" for m in order))

    async def _roles(self, room: str) -> None:
        """/who on version 2 (GET_ROOM, §5.57): the topic, members with role, presence and mute, and bans (which
        the server shows to moderators and the owner only). Raises ``ServerError``."""
        details = await self.client.room(room)
        self.topics[room] = details.topic
        self.users |= {m.user for m in details.members}
        await self._learn_names(m.user for m in details.members)
        rank = {proto.RoomRole.OWNER: 0, proto.RoomRole.MODERATOR: 1, proto.RoomRole.MEMBER: 2}

        def member(m: proto.RoomMember) -> str:
            notes = [m.role.name.lower()] if m.role != proto.RoomRole.MEMBER else []
            notes.append(m.status.name.lower())
            if m.muted:
                notes.append(f"muted until {clock(m.muted_until_ms)}" if m.muted_until_ms else "muted")
            return f"{self.r.person(m.user)} ({', '.join(notes)})"

        order = sorted(details.members, key=lambda m: (rank[m.role], m.status != proto.Status.ONLINE, m.user))
        private = " (private)" if details.private else ""
        self.info(f"#{room}{private}: " + ", ".join(map(member, order)))
        if details.topic:
            self.info(f"topic: {details.topic}")
        if details.bans:
            self.info("banned: " + ", ".join(f"{b.user} (until {clock(b.until_ms)})" if b.until_ms else b.user
                                             for b in details.bans))

    async def _older(self, conv: proto.Conversation, before: int | None, n: int) -> tuple[list[Entry], bool]:
        """Up to ``n`` entries (messages and, on version 2, events) of ``conv`` before seq ``before`` (None: the
        newest), oldest first, in as many HISTORY pages as that takes (§5.19), and whether they reach the
        beginning. A page of events only is a page like any other: paging goes on past it. Raises
        ``ServerError``."""
        found: list[Entry] = []
        while len(found) < n:
            page = await self.client.history(conv, before=before, limit=min(self.page_size(), n - len(found)))
            entries = page.entries
            found[:0] = entries
            if not entries or not page.has_more:
                return found, True
            before = entries[0].seq
        return found, False

    async def _history(self, conv: proto.Conversation, limit: int) -> None:
        if conv in self.history_done:
            self.info(f"no older messages in {conv}")
            return
        before = self.history_cursor.get(conv) or self.first_shown.get(conv) or None
        try:
            messages, done = await self._older(conv, before, limit)
        except ServerError as exc:
            self.error(f"no history for {conv}: {describe(exc)}")
            return
        if done:
            self.history_done.add(conv)
        if not messages:
            self.info(f"no older messages in {conv}")
            return
        # One block, oldest first, whatever the number of pages it took.
        self.info(f"{conv} history, messages {messages[0].seq} to {messages[-1].seq}:")
        self._print_block(conv, messages)
        self.history_cursor[conv] = messages[0].seq
        if done:
            self.info(f"that is the beginning of {conv}")

    async def _recap(self, conv: proto.Conversation, upto: int | None = None) -> None:
        """Show the last RECENT messages of ``conv`` (up to seq ``upto``) when nothing of it is on screen yet:
        on joining, or on switching to it. Messages printed meanwhile are not shown twice."""
        if conv in self._recapped:
            return
        self._recapped.add(conv)
        try:
            messages, done = await self._older(conv, None, RECENT)
        except ServerError as exc:
            if not (exc.code == ErrorCode.NOT_FOUND and conv.kind == ConvKind.DIRECT):  # else: nothing said yet
                self.error(f"no history for {conv}: {describe(exc)}")
            return
        # Live messages may have been printed while the page was on its way: show only what came before them.
        live = self.first_shown.get(conv)
        messages = [m for m in messages if (upto is None or m.seq <= upto) and (live is None or m.seq < live)]
        if not messages:
            return
        older = "; /history shows older ones" if not done or messages[0].seq > 1 else ""
        self.info(f"{conv}: the last {len(messages)} message{'s' if len(messages) > 1 else ''}{older}")
        self._print_block(conv, messages)
        self.first_shown[conv] = messages[0].seq
        self.printed[conv] = max(self.printed.get(conv, 0), messages[-1].seq)
        self.shown[conv] = max(self.shown.get(conv, 0), messages[-1].seq)
        self._read_here()

    # -- what the server says ---------------------------------------------------------------
    async def _events(self) -> None:
        try:
            async for event in self.client.events():
                if isinstance(event, proto.Message):
                    await self._learn_names([event.sender])
                    self._show(event)
                elif isinstance(event, proto.Events):
                    await self._learn_names(ev.actor if ev.kind == EventKind.ACTION else ev.target
                                            for ev in event.events if ev.kind in _MESSAGE_LIKE)
                    for ev in event.events:
                        self._show_event(event.conv, ev)
                elif isinstance(event, Disconnected):
                    self._disconnected(event)
                elif isinstance(event, Reconnected):
                    self.connected = True
                    n, self._caught_up = self._caught_up, 0
                    self.info("reconnected" + (f"; caught up {n} message(s)" if n else ""))
                elif isinstance(event, proto.UserTyping):
                    self.typing[(event.conv, event.user)] = trio.current_time() + proto.TYPING_SHOW_S
                elif isinstance(event, proto.Receipt):
                    self._receipt(event)
                elif isinstance(event, proto.Presence):
                    self.users.add(event.user)  # not printed: every script that connects would say hello
                elif isinstance(event, proto.GoAway):
                    self.info(f"the server is going away ({event.message or event.reason.name.lower()})")
                elif isinstance(event, proto.Error):
                    self.error(f"the server says: {describe(ServerError.from_event(event))}")
                self.refresh()
        finally:
            self.quit()  # the client is closed: by us, or for good by the server

    def _show(self, msg: proto.Message) -> None:
        conv = msg.conv
        if msg.seq <= self.printed.get(conv, 0):
            return  # a recap printed it already
        self._open(conv)  # a room: e.g. joined from another device
        self.users.add(msg.sender)
        self.typing.pop((conv, msg.sender), None)
        line = self.message_line(msg)
        if self._live and self.terminal and msg.sender != self.me and mentions(msg.body, self.me):
            line += "\a"  # the bell: someone named us
        self.out(line)
        self.shown[conv] = max(self.shown.get(conv, 0), msg.seq)
        self.printed[conv] = msg.seq
        self.first_shown.setdefault(conv, msg.seq)
        if self.current is None:
            self.current = conv
        self._read_here()
        # The start's backlog is on screen as it arrives: only what comes later elsewhere is unread.
        if self._live and conv != self.current and msg.sender != self.me:
            self.unread[conv] = self.unread.get(conv, 0) + 1
        if not self.connected and msg.sender != self.me:  # our own, re-sent from the outbox, were not missed
            self._caught_up += 1

    def _show_event(self, conv: proto.Conversation, ev: proto.ConvEvent) -> None:
        """A seq-ordered event, live or catching up (spec §9.15, §9.16): an ACTION is a message; the others are a
        line in words, and change what we know (the topic; our own removal from, or addition to, a room)."""
        if ev.kind == EventKind.ACTION:
            self._show(action_message(conv, ev))
            return
        if ev.seq <= self.printed.get(conv, 0):
            return  # a recap printed it already
        self._open(conv)
        self.users |= {name for name in (ev.actor, ev.target) if name}
        if ev.kind == EventKind.DELETED:  # a tombstone: only in catch-up, where its message was
            self.out(self.r.message(proto.Message(conv, ev.seq, ev.ts_ms, ev.target, 0, ""), width=self.width(),
                                    deleted_by=ev.actor))
        else:
            self.out(self.r.event(conv, ev, width=self.width()))
        self.shown[conv] = max(self.shown.get(conv, 0), ev.seq)
        self.printed[conv] = ev.seq
        self.first_shown.setdefault(conv, ev.seq)
        self._read_here()
        if ev.kind == EventKind.TOPIC:
            self.topics[conv.name] = ev.text
        elif ev.kind in (EventKind.KICK, EventKind.BAN) and ev.target == self.me:
            # The server stops sending us the room (its KICK or BAN is the last of it we get).
            self._close(conv)
            for table in (self.shown, self._marked, self.read, self._read_marked):
                table.pop(conv, None)
            self.info(f"you are no longer in {conv}" + (f"; now talking in {self.current}" if self.current else ""))
        elif ev.kind == EventKind.INVITE and ev.target == self.me:
            self.known_rooms.add(conv.name)
            self.info(f"you are in {conv} now: /switch {conv} to talk there")

    def _print_block(self, conv: proto.Conversation, entries: list[Entry]) -> None:
        """A page of history (a recap or /history), oldest first. Edits and reactions of messages in the block are
        shown on them ("(edited)", "[👍 2]": the page already has the latest text) rather than as lines of their
        own, and a DELETE beside its tombstone is not said twice."""
        here = {e.seq for e in entries if isinstance(e, proto.StoredMessage) or e.kind in _MESSAGE_LIKE}
        edited: set[int] = set()
        reactions: dict[int, dict[str, set[str]]] = {}
        folded: set[int] = set()  # seqs of events shown on their message
        for e in entries:
            if isinstance(e, proto.ConvEvent) and e.target_seq in here:
                if e.kind == EventKind.EDIT:
                    edited.add(e.target_seq)
                elif e.kind in (EventKind.REACT, EventKind.UNREACT):
                    users = reactions.setdefault(e.target_seq, {}).setdefault(e.text, set())
                    (users.add if e.kind == EventKind.REACT else users.discard)(e.actor)
                elif e.kind != EventKind.DELETE:
                    continue
                folded.add(e.seq)
        width = self.width()
        for e in entries:
            if isinstance(e, proto.StoredMessage):
                msg = proto.Message(conv, e.seq, e.ts_ms, e.sender, e.client_msg_id, e.body)
            elif e.kind == EventKind.ACTION:
                msg = action_message(conv, e)
            elif e.kind == EventKind.DELETED:
                self.out(self.r.message(proto.Message(conv, e.seq, e.ts_ms, e.target, 0, ""), width=width,
                                        deleted_by=e.actor))
                continue
            else:
                if e.seq not in folded:
                    self.out(self.r.event(conv, e, width=width))
                if e.kind == EventKind.TOPIC:
                    self.topics[conv.name] = e.text
                continue
            self.users.add(msg.sender)
            self.out(self.r.message(msg, width=width, edited=e.seq in edited,
                                    reactions=_reactions(reactions.get(e.seq, {}))))

    def _receipt(self, event: proto.Receipt) -> None:
        """Our own READ from another device (version 2 servers send it): what was read there is not unread here."""
        if event.user != self.me or event.kind != proto.ReceiptKind.READ:
            return
        self._read_marked[event.conv] = max(self._read_marked.get(event.conv, 0), event.seq)  # nothing to send
        if event.seq >= self.printed.get(event.conv, 0):
            self.unread.pop(event.conv, None)

    def _disconnected(self, event: Disconnected) -> None:
        self.connected = False
        if self._logging_out:
            return
        self._caught_up = 0
        if event.will_reconnect:
            self.info(f"{event.message}; reconnecting…")
        else:
            self.error(f"disconnected: {event.message}")
            self.exit_code = 1
            self.quit()

    # -- housekeeping ---------------------------------------------------------------------------
    async def _mark_loop(self) -> None:
        while True:
            await trio.sleep(_MARK_INTERVAL_S)
            await self._flush_marks()

    async def _flush_marks(self) -> None:
        """DELIVERED up to what we have shown, READ up to what we have read (§9.6): the next start begins there."""
        for marks, marked, mark in ((self.shown, self._marked, self.client.mark_delivered),
                                    (self.read, self._read_marked, self.client.mark_read)):
            for conv, seq in list(marks.items()):
                if seq > marked.get(conv, 0):
                    try:
                        await mark(conv, seq)
                    except (ConnectionLost, proto.ProtocolError):
                        return
                    marked[conv] = seq

    def _read_here(self) -> None:
        """Everything printed in the current conversation is read."""
        conv = self.current
        if conv is not None and self.printed.get(conv, 0) > self.read.get(conv, 0):
            self.read[conv] = self.printed[conv]

    async def _tick(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            expired = [key for key, until in self.typing.items() if until <= now]
            for key in expired:
                del self.typing[key]
            if expired:
                self.refresh()


class _PromptThread:
    """prompt_toolkit in a worker thread, on its own asyncio loop for the whole session."""

    def __init__(self, tui: Tui):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import Completer, Completion
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.layout.processors import Processor, Transformation

        self.tui = tui
        self.token = trio.lowlevel.current_trio_token()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

        class _Complete(Completer):
            def get_completions(self, document, complete_event):
                if tui.secret is not None:
                    return
                for text, start in completions(document.text_before_cursor, **tui.completion_sources):
                    yield Completion(text, start_position=start)

        class _Hide(Processor):
            """Draw nothing of the input while /passwd asks: not even one '*' per character (as getpass)."""

            def apply_transformation(self, ti):
                if tui.secret is None:
                    return Transformation(ti.fragments)
                return Transformation([], source_to_display=lambda i: 0, display_to_source=lambda i: 0)

        class _History(InMemoryHistory):
            def append_string(self, string: str) -> None:
                if tui.secret is None:  # a password never goes into the up-arrow history
                    super().append_string(string)

        keys = KeyBindings()
        for n in range(1, 10):  # Alt-1…9 (Esc then the digit): /switch N, as in irssi and weechat
            keys.add("escape", str(n))(functools.partial(self._alt_number, n))

        self.session: PromptSession[str] = PromptSession(
            message=lambda: tui.prompt_text,
            bottom_toolbar=lambda: tui.status,
            key_bindings=keys,
            history=_History(),
            input_processors=[_Hide()],
            completer=_Complete(),
            complete_while_typing=False,
            erase_when_done=True,  # the line comes back as a message line; don't show it twice
        )
        self.session.default_buffer.on_text_changed += self._changed

    def _alt_number(self, n: int, event) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self.tui.switch_number, n)

    def _changed(self, buffer) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self.tui.on_keystroke, buffer.text)

    def run(self) -> None:
        """The thread's body: prompt until stopped or the user ends input."""
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                line = await self.session.prompt_async(pre_run=self._pre_run)
            except (EOFError, KeyboardInterrupt):
                if not self.stopping:
                    trio.from_thread.run_sync(self.tui.request_quit, trio_token=self.token)
                continue  # the Trio side stops us, or asked first because messages are unsent
            if self.stopping:
                return
            trio.from_thread.run_sync(self.tui.on_line, line, trio_token=self.token)

    def _pre_run(self) -> None:
        if self.stopping:
            self.session.app.exit(exception=EOFError())

    def _exit(self) -> None:
        app = self.session.app
        if app.is_running and not app.is_done:
            app.exit(exception=EOFError())

    def stop(self) -> None:
        """End the prompt (from the Trio thread); the thread returns soon after."""
        self.stopping = True
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self.loop.call_soon_threadsafe(self._exit)

    def refresh(self) -> None:
        self.session.app.invalidate()  # thread-safe, and a no-op while no prompt is up
