"""``chorus``: the terminal client (interactive) and its script commands ``send`` and ``tail``.

    chorus [--server HOST:PORT] [--user NAME] [--register]          chat in the terminal
           [--invite CODE]                                           register with an invite code (§5.59)
           [--tls] [--ca-file PEM]                                   over TLS (spec/PROTOCOL.md §1)
    chorus [...] send '#room' 'text' ['more text'...] [--create]       send (reads stdin lines if no text)
                 [--action]                                          ... as actions ("/me", §5.62)
    chorus [...] tail '#room' [--last N | --since SEQ] [--json]        print the last N, then follow

How this works. Arguments are parsed here; ``_login.open_session`` connects and
authenticates (saved token, $CHORUS_PASSWORD, or a password typed without
echo); then ``_tui.Tui`` or ``_script`` runs on the connected library client
(spec/PROTOCOL.md §9). Library warnings are shown as one line each: no
traceback reaches the user for anything the network or the server can cause.
Exit status: 0 fine, 1 failed (one line on stderr saying why), 2 bad usage,
130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import ssl
import sys

import trio

from ._client import client_tls_context
from ._config_dir import SessionStore
from ._login import DEFAULT_SERVER, LoginError, choose_user, open_session, parse_servers
from ._render import Renderer, use_colour
from ._script import DEFAULT_LAST, ScriptError, send, tail, target

_EPILOG = """\
environment:
  CHORUS_SERVER    default for --server (else 127.0.0.1:7420)
  CHORUS_USER      default for --user
  CHORUS_INVITE    default for --invite (a one-time code to --register with)
  CHORUS_TLS       set to 1 for --tls
  CHORUS_CA_FILE   default for --ca-file
  CHORUS_PASSWORD  password to use instead of asking (for scripts; with --register it sets the new
                   account's password). After one login the session token is saved (mode 0600) in
                   $XDG_CONFIG_HOME/chorus (default ~/.config/chorus) and later runs need no password.
  NO_COLOR         set to turn colours off (they are also off when output is not a terminal)
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="HOST:PORT", default=argparse.SUPPRESS,
                        help="the Chorus server (default: $CHORUS_SERVER or %s); several, comma-separated, are "
                             "nodes of one cluster: the client moves to the next when its node is lost"
                             % DEFAULT_SERVER)
    common.add_argument("--user", metavar="NAME", default=argparse.SUPPRESS, help="who to log in as")
    common.add_argument("--register", action="store_true", default=argparse.SUPPRESS,
                        help="create the account first")
    common.add_argument("--invite", metavar="CODE", default=argparse.SUPPRESS,
                        help="with --register: a one-time invite code from the server's operator, for a server whose "
                             "registration is by invite (default: $CHORUS_INVITE)")
    common.add_argument("--tls", action="store_true", default=argparse.SUPPRESS,
                        help="connect with TLS, checking the server's certificate against the system's CAs "
                             "(default: $CHORUS_TLS)")
    common.add_argument("--ca-file", metavar="PEM", default=argparse.SUPPRESS,
                        help="trust this CA certificate (PEM) instead of the system's; implies --tls "
                             "(default: $CHORUS_CA_FILE)")
    parser = argparse.ArgumentParser(
        prog="chorus", parents=[common], epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat on a Chorus server. With no command: the interactive client (/help inside lists "
                    "its commands).")
    commands = parser.add_subparsers(dest="command", metavar="{send,tail}")
    p_send = commands.add_parser("send", parents=[common], help="send messages and exit once they are stored",
                                 description="Send each TEXT as one message (or each line of stdin if no TEXT); "
                                             "exit 0 once all are stored. Joins the room if needed; a room that "
                                             "does not exist is refused (exit 1) unless --create.")
    p_send.add_argument("conv", metavar="#ROOM|@USER")
    p_send.add_argument("text", nargs="*", metavar="TEXT")
    p_send.add_argument("--create", action="store_true", help="create the room if there is none of that name")
    p_send.add_argument("--action", action="store_true", help="send each TEXT as an action (/me): \"* carol TEXT\"")
    p_tail = commands.add_parser("tail", parents=[common], help="print the last messages, then new ones as they arrive",
                                 description="Print the last messages of a room or direct conversation, then new "
                                             "ones as they arrive, until interrupted. Joins the room if needed; a "
                                             "room that does not exist is refused (exit 1) unless --create.")
    p_tail.add_argument("conv", metavar="#ROOM|@USER")
    since = p_tail.add_mutually_exclusive_group()
    since.add_argument("--last", type=_count, default=DEFAULT_LAST, metavar="N",
                       help=f"first print the last N messages (default {DEFAULT_LAST}; 0 = only new ones)")
    since.add_argument("--since", type=_count, metavar="SEQ", help="first print the messages after SEQ (0 = all)")
    p_tail.add_argument("--create", action="store_true", help="create the room if there is none of that name")
    p_tail.add_argument("--json", action="store_true",
                        help="one JSON object per line, with its kind: message, action or event (an edit, a reaction, "
                             "a moderation; fields in the README)")
    return parser


def _count(text: str) -> int:
    """A number >= 0 (for argparse: a bad one is a usage error, exit 2)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0, not {text!r}")
    return int(text)


class _OneLineHandler(logging.Handler):
    """Library warnings as one line each (never a traceback)."""

    def __init__(self, colour: bool):
        super().__init__(logging.WARNING)
        self.renderer = Renderer("", colour=colour)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            print(self.renderer.error(record.getMessage()), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    colour = use_colour(sys.stdout)
    root = logging.getLogger("chorus")
    root.handlers[:] = [_OneLineHandler(colour)]
    root.propagate = False
    try:
        (host, port), *args.servers = parse_servers(
            getattr(args, "server", None) or os.environ.get("CHORUS_SERVER") or DEFAULT_SERVER)
        args.tls = _tls_context(args)
        interactive = args.command is None or sys.stdin.isatty()
        user = choose_user(getattr(args, "user", None), SessionStore(host, port), interactive)
        if args.command is None:
            return _run(_interactive, host, port, user, args, colour)
        return _run(_script, host, port, user, args)
    except (ValueError, LoginError, ScriptError) as exc:
        print(Renderer("", colour=use_colour(sys.stderr)).error(str(exc)), file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `chorus tail ... | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 0


def _tls_context(args) -> ssl.SSLContext | None:
    """--tls/--ca-file (or $CHORUS_TLS/$CHORUS_CA_FILE) as the client's TLS context; None for plain TCP.
    Raises ``ValueError`` (one line) when the CA file cannot be read."""
    ca_file = getattr(args, "ca_file", None) or os.environ.get("CHORUS_CA_FILE") or None
    tls = getattr(args, "tls", False) or os.environ.get("CHORUS_TLS", "").lower() in ("1", "true", "yes", "on")
    try:
        return client_tls_context(tls, ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot read the CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None


def _invite(args) -> str | None:
    """--invite (or $CHORUS_INVITE): the code REGISTER_INVITE carries; None to REGISTER plainly."""
    return getattr(args, "invite", None) or os.environ.get("CHORUS_INVITE") or None


def _run(fn, *args) -> int:
    """``trio.run``, with an exception group of one kind of error unwrapped into that error."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        for kind in (KeyboardInterrupt, LoginError, ScriptError):
            for leaf in leaves:
                if isinstance(leaf, kind):
                    raise leaf from None
        raise


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


async def _interactive(host: str, port: int, user: str, args, colour: bool) -> int:
    from ._tui import Tui

    renderer = Renderer(user, colour=colour, seqs=True)
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    async with open_session(host, port, user, register=getattr(args, "register", False), interactive=True,
                            invite=_invite(args),
                            say=lambda text: print(renderer.info(text), flush=True),
                            client_name="chorus-terminal", sync_on_connect=False, servers=args.servers,
                            tls=args.tls or False) as client:
        renderer.me = client.username or user
        forget = functools.partial(SessionStore(host, port).forget, user)
        if not terminal:
            return await Tui(client, renderer, terminal=False, out=lambda line: print(line, flush=True),
                             forget_session=forget).run()
        from prompt_toolkit.patch_stdout import patch_stdout

        with patch_stdout(raw=True):
            return await Tui(client, renderer, terminal=True, out=lambda line: print(line, flush=True),
                             forget_session=forget).run()


async def _script(host: str, port: int, user: str, args) -> int:
    conv = target(args.conv)
    async with open_session(host, port, user, register=getattr(args, "register", False), invite=_invite(args),
                            interactive=sys.stdin.isatty(), say=lambda text: print(f"chorus: {text}", file=sys.stderr),
                            client_name="chorus-script", sync_on_connect=False, servers=args.servers,
                            tls=args.tls or False) as client:
        if args.command == "send":
            bodies = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
            if not bodies:
                raise ScriptError("nothing to send")
            await send(client, conv, bodies, create=args.create, action=args.action)
        else:
            await tail(client, conv, since=args.since, last=args.last, as_json=args.json, create=args.create)
    return 0


if __name__ == "__main__":
    sys.exit(main())
