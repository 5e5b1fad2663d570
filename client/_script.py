"""``chorus send`` and ``chorus tail``: Chorus for shell scripts (spec/PROTOCOL.md §9.4, §9.5, §9.7).

How this works. ``send`` sends each message with its own client_msg_id and
waits for the ACK (§9.4), so exit status 0 means stored; a room the user is not
in is joined first (joining twice is harmless, §9.2). A room that does not exist
is refused (a typo such as '#lobyy' must not create a room and exit 0) unless
``--create`` says to make it; the refusal names the closest existing room.
``tail`` does the same, then starts live delivery with a SYNC that lists every
joined room at its current last seq (so nothing but the tailed room is paged)
and the tailed one ``--last`` N (default 20) messages back, or at ``--since``
(so that history comes first, then live messages, with no gap and no duplicate
between them, §9.5). On version 2 the events of the conversation come in the same
order (§9.15, §9.16): an action is "* carol waves", an edit, a reaction or a
moderation a line in words; with ``--json`` every line has a ``kind``
("message", "action", "event"), see ``_render.json_line``. It follows until interrupted,
across reconnects (the library resumes by seq). Connection news goes to stderr
so that stdout holds only messages: "following #room" once the backlog is
printed and live delivery has begun, then "reconnecting…" and "reconnected".
"""
from __future__ import annotations

import difflib
import sys

import trio

from chorus import proto
from chorus.proto import ConvKind, ErrorCode

from ._client import Client, parse_conv
from ._errors import ServerError
from ._events import Disconnected, Reconnected
from ._render import Renderer, action_message, json_line, use_colour


def _line(renderer: Renderer, item: proto.Message | proto.Events) -> str:
    """A message, an action, or an event in words (edits and reactions as lines of their own: a script's output
    is a log, nothing in it is rewritten)."""
    if isinstance(item, proto.Message):
        return renderer.message(item)
    (ev,) = item.events
    if ev.kind == proto.EventKind.ACTION:
        return renderer.message(action_message(item.conv, ev))
    if ev.kind == proto.EventKind.DELETED:
        return renderer.message(proto.Message(item.conv, ev.seq, ev.ts_ms, ev.target, 0, ""), deleted_by=ev.actor)
    return renderer.event(item.conv, ev)


class ScriptError(Exception):
    """The command failed; the message is one line for stderr."""


def target(text: str) -> proto.Conversation:
    """"#room" or "@user" (a bare name is a room). Raises ``ScriptError``."""
    if not text.startswith(("#", "@")):
        text = "#" + text
    try:
        return parse_conv(text)
    except ValueError as exc:
        raise ScriptError(str(exc)) from None


#: How many messages ``tail`` shows before following, unless ``--last`` or ``--since`` says otherwise.
DEFAULT_LAST = 20


async def send(client: Client, conv: proto.Conversation, bodies: list[str], *, create: bool = False,
               action: bool = False) -> None:
    """Send ``bodies`` in order, joining the room first if needed (creating it only if ``create``); ``action``:
    each is an action ("/me"; SEND_ACTION on version 2, a "/me " message on version 1). Raises ``ScriptError``."""
    joined = False
    for body in bodies:
        while True:
            try:
                if not action:
                    await client.send(conv, body)
                elif (client.version or 1) >= 2:
                    await client.send_action(conv, body)
                else:
                    await client.send(conv, "/me " + body)
                break
            except ServerError as exc:
                if exc.code == ErrorCode.NOT_MEMBER and conv.kind == ConvKind.ROOM and not joined:
                    await _join(client, conv, create)
                    joined = True
                    continue
                raise ScriptError(f"not sent to {conv}: {exc.message or exc.code.name}") from None


async def _join(client: Client, conv: proto.Conversation, create: bool) -> proto.Joined:
    """Join the room ``conv``; unless ``create``, only if it exists. Raises ``ScriptError``."""
    if not create:
        names = [r.name for r in await client.rooms()]
        if conv.name not in names:
            close = difflib.get_close_matches(conv.name, names, n=1)
            hint = f"did you mean #{close[0]}? " if close else ""
            raise ScriptError(f"there is no room {conv} on this server ({hint}--create makes it)")
    try:
        return await client.join(conv.name)
    except ServerError as exc:
        raise ScriptError(f"cannot join {conv}: {exc.message or exc.code.name}") from None


async def tail(client: Client, conv: proto.Conversation, *, since: int | None, as_json: bool, last: int = DEFAULT_LAST,
               create: bool = False, out=sys.stdout, err=sys.stderr) -> None:
    """Print the messages of ``conv`` (the ``last`` ones, or those after ``since``, first) until cancelled. Raises
    ``ScriptError``."""
    if conv.kind == ConvKind.ROOM:
        top = (await _join(client, conv, create)).last_seq
    else:
        try:
            page = await client.history(conv, limit=1)
        except ServerError as exc:
            raise ScriptError(f"cannot tail {conv}: {exc.message or exc.code.name}") from None
        top = page.entries[-1].seq if page.entries else 0  # an event takes a seq too (spec §9.15)
    for room in await client.rooms():
        if room.joined:
            client.last_seq[proto.Conversation.room(room.name)] = room.last_seq
    client.last_seq[conv] = max(0, top - last) if since is None else max(0, since)
    renderer = Renderer(client.username or "", colour=use_colour(out), gutter=False)
    events = client.events()

    def show(event) -> None:
        if isinstance(event, (proto.Message, proto.Events)) and event.conv == conv:
            out.write((json_line(event) if as_json else _line(renderer, event)) + "\n")
            out.flush()
        elif isinstance(event, Disconnected):
            print(f"chorus: {event.message}" + ("; reconnecting…" if event.will_reconnect else ""),
                  file=err, flush=True)
            if not event.will_reconnect:
                raise ScriptError("disconnected for good")
        elif isinstance(event, Reconnected):
            print("chorus: reconnected", file=err, flush=True)

    # The reader never waits for us (a backlog too big for the event queue is fetched again by
    # seq), so it is fine to read the events only once the SYNC is done.
    await client.sync()
    while True:
        try:
            show(events.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    # Everything up to now is printed; from here on lines are live (and a test can start talking).
    print(f"chorus: following {conv} (Ctrl-C to stop)", file=err, flush=True)
    async for event in events:
        show(event)
    raise ScriptError("the connection ended")
