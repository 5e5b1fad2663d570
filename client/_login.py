"""Logging in from the command line: which server, which user, which secret (spec/PROTOCOL.md §9.1).

How this works. ``open_session`` is shared by the interactive client and the
script commands. The user comes from ``--user``, else ``$CHORUS_USER``, else
the only user with a saved session on that server, else (interactively) a
question. The secret is, in order: the saved token (RESUME, no password asked),
``$CHORUS_PASSWORD``, or a password typed without echo (``getpass``). Passing
the password along with the token lets the library fall back from an expired
token to LOGIN on its own. Every new token is saved at once (``on_token``),
so the next start resumes. The password is held only in memory (the library
needs it to log in again if the token is revoked while reconnecting); it is
never written to a file or a log.

Before asking anyone for a password the server is tried (a TCP connection,
closed at once), so a server that is down is said before a password is typed
in vain. Ctrl-D at a prompt ends the program with one line, no traceback.

Refusals become ``LoginError`` with one sentence for the user: a stale token is
forgotten and a password asked for; a wrong password is asked again (three
tries) when there is a person to ask, and the third refusal suggests
``--register`` (the account may not exist on this server). Names, passwords and ports are checked,
and every sentence about them worded, by ``_rules`` from the protocol's constants.
"""
from __future__ import annotations

import contextlib
import getpass
import os
import ssl
import sys
from typing import AsyncIterator, Callable

import trio

from chorus import proto
from chorus.proto import ErrorCode

from ._client import Client, open_client
from ._config_dir import SessionStore
from ._errors import ConnectionLost, ServerError
from ._rules import is_port, is_user_name, not_a_user_name, password_problem, password_rule, user_name_rule

DEFAULT_SERVER = "127.0.0.1:7420"
_DEFAULT_PORT = 7420
_TRIES = 3
_PROBE_TIMEOUT_S = 10.0


class LoginError(Exception):
    """Could not log in; the message is one sentence meant for the user."""


def parse_server(text: str) -> tuple[str, int]:
    """"host", "host:port" or "[v6addr]:port" → (host, port). Raises ``ValueError``."""
    text = text.strip()
    host, port = text, str(_DEFAULT_PORT)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad server address {text!r}")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not is_port(int(port)):
        raise ValueError(f"bad server address {text!r} (expected HOST:PORT)")
    return host, int(port)


def parse_servers(text: str) -> list[tuple[str, int]]:
    """"a:7420,b:7420": the first is where to connect, the others nodes of the same cluster to move to (issue 11).
    Raises ``ValueError``."""
    servers = [parse_server(part) for part in text.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"bad server address {text!r} (expected HOST:PORT)")
    return servers


def _ask(prompt: str) -> str:
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        raise LoginError("no user name given")
    return line.strip()


def choose_user(given: str | None, store: SessionStore, interactive: bool) -> str:
    """The user to log in as. Raises ``LoginError``."""
    user = given or os.environ.get("CHORUS_USER") or None
    if user is None:
        saved = store.users()
        if len(saved) == 1:
            user = saved[0]
        elif interactive:
            user = _ask("User name: ")
        else:
            raise LoginError("say who you are with --user NAME (or $CHORUS_USER)")
    if not is_user_name(user):
        raise LoginError(not_a_user_name(user))
    return user


def _secret(prompt: str) -> str:
    """A line typed without echo. Raises ``LoginError`` at end of input (Ctrl-D)."""
    try:
        return getpass.getpass(prompt)
    except EOFError:
        print(file=sys.stderr, flush=True)  # getpass leaves the cursor after the prompt
        raise LoginError("no password given") from None


def _ask_password(user: str, register: bool) -> str:
    if not register:
        return _secret(f"Password for {user}: ")
    while True:
        first = _secret(f"Choose a password for {user} ({proto.PASSWORD_RULE}): ")
        problem = password_problem(first, register)
        if problem is None and _secret("Type it again: ") == first:
            return first
        print(f"{problem or 'The two passwords differ'}; once more.", file=sys.stderr, flush=True)


def _unreachable(host: str, port: int, exc: OSError) -> LoginError:
    return LoginError(f"cannot reach {host}:{port}: {exc.strerror or exc}"
                      " (is the server running? `make run` starts one)")


async def check_reachable(host: str, port: int) -> None:
    """Open and close a TCP connection to the server. Raises ``LoginError`` when nothing answers there."""
    try:
        with trio.fail_after(_PROBE_TIMEOUT_S):
            stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise _unreachable(host, port, exc) from None
    except trio.TooSlowError:
        raise LoginError(f"cannot reach {host}:{port}: no answer in {_PROBE_TIMEOUT_S:g} s") from None
    await stream.aclose()


@contextlib.asynccontextmanager
async def open_session(host: str, port: int, user: str, *, register: bool = False, invite: str | None = None,
                       interactive: bool, say: Callable[[str], None], **client_kwargs) -> AsyncIterator[Client]:
    """Connect and log in as ``user``, saving the token; yields the ``Client``. With ``register``, ``invite`` is
    the one-time code of a server whose registration is by invite (REGISTER_INVITE, spec §5.59).

    Raises ``LoginError`` when that is impossible (unreachable, refused, no
    credentials and nobody to ask).
    """
    store = SessionStore(host, port)
    token = store.load(user)
    password = os.environ.get("CHORUS_PASSWORD") or None
    typed = False
    refusals = 0

    def save(new_token: str) -> None:
        try:
            store.save(user, new_token)
        except OSError as exc:
            say(f"could not save the session in {store.dir}: {exc.strerror or exc}")

    async with contextlib.AsyncExitStack() as stack:
        for attempt in range(_TRIES):
            if token is None and password is None:
                if not interactive:
                    raise LoginError(f"no saved session for {user} on {host}:{port}: set CHORUS_PASSWORD"
                                     " or log in once with chorus")
                if not typed:
                    await check_reachable(host, port)  # before the password is typed, not after
                password, typed = _ask_password(user, register), True
            problem = password and password_problem(password, register and token is None)
            if problem:
                raise LoginError(problem if typed else f"CHORUS_PASSWORD: {problem}")
            try:
                client = await stack.enter_async_context(open_client(
                    host, port, username=user, password=password, token=token, register=register and token is None,
                    invite=invite if register and token is None else None, on_token=save, **client_kwargs))
            except ServerError as exc:
                code = exc.code
                if code == ErrorCode.INVALID_TOKEN and token is not None:
                    store.forget(user)
                    token = None
                    say("the saved session has expired; log in again")
                    continue
                refusals += code == ErrorCode.AUTH_FAILED
                bad_code = register and invite is not None and code == ErrorCode.AUTH_FAILED  # not the password's fault
                if code in (ErrorCode.AUTH_FAILED, ErrorCode.WEAK_PASSWORD) and typed and attempt + 1 < _TRIES \
                        and not bad_code:
                    say(_refusal(exc, user))
                    password = None
                    continue
                if refusals == _TRIES and not register:
                    raise LoginError(f"{_refusal(exc, user)}, {_TRIES} times; if there is no account {user} on "
                                     f"{host}:{port} yet, --register creates it") from None
                raise LoginError(_refusal(exc, user, invite if register else None)) from None
            except ssl.SSLError as exc:  # before OSError, which it is
                raise LoginError(f"TLS with {host}:{port} failed: {_tls_problem(exc)}") from None
            except OSError as exc:
                raise _unreachable(host, port, exc) from None
            except (ConnectionLost, trio.TooSlowError, proto.ProtocolError) as exc:
                raise LoginError(f"could not connect to {host}:{port}: {exc or 'timed out'}") from None
            yield client
            return
        raise LoginError("giving up after three tries")


def _tls_problem(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the server's certificate is not trusted ({exc.verify_message}); give its CA with --ca-file"
                if exc.verify_code != 62 else f"the server's certificate is not for this name ({exc.verify_message})")
    return f"{exc.reason or exc} (is it a TLS port? without --tls the client speaks plain TCP)"


def _refusal(exc: ServerError, user: str, invite: str | None = None) -> str:
    code = exc.code
    if code == ErrorCode.AUTH_FAILED and invite is not None:
        return "the invite code is unknown, used or expired; ask the server's operator for another"
    if code == ErrorCode.AUTH_FAILED:
        return "wrong user name or password"
    if code == ErrorCode.INVALID_REQUEST and "by invite" in exc.message:
        return ("registration on this server is by invite: ask its operator for a code and add --invite CODE "
                "(or set CHORUS_INVITE)")
    if code == ErrorCode.USERNAME_TAKEN:
        return f"the name {user} is taken; to log in as {user}, leave out --register"
    if code == ErrorCode.WEAK_PASSWORD:
        return password_rule()
    if code == ErrorCode.INVALID_NAME:
        return user_name_rule()
    if code == ErrorCode.INVALID_TOKEN:
        return "the session is no longer valid; log in with a password"
    return f"the server refused: {exc}"
