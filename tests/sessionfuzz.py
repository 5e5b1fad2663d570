"""Session-level fuzzing of a real server: well-formed frames of every type from logged-in clients (issue 9).

How this works. ``SessionMachine`` is a hypothesis ``RuleBasedStateMachine``. Each example starts a real server
(``server.serve`` on port 0, a real SQLite file in a temporary directory) in a thread of its own under
``trio.run`` (``LiveServer``); the machine's synchronous rules call into it with ``trio.from_thread``. Three
fuzzing clients (logged in, only past HELLO, or not even that) send frames of every client type, drawn from
proto's declarations by tests/fuzzframes.py, in whatever state they are in: one at a time (``step``), or a few
pipelined from several clients at once (``burst``); now and then one goes away and comes back (logging in step by
step, or HELLO, LOGIN and SYNC in one write). An honest pair of bystanders chats in ``#lobby`` (where the fuzzers
are members too) beside them. The server holds a few invite codes (``INVITES``), so that a REGISTER_INVITE (spec
§5.59) may make an account as well as be refused.

What the spec and DESIGN.md ("Failure is local") promise is checked after every frame (``answer``), from the
tables of proto and spec/PROTOCOL.md (tests/fuzzframes.py) rather than a list kept here:

- a frame illegal in the client's state gets ERROR ``WRONG_STATE`` (request_id 0), BYE ``PROTOCOL_ERROR``, close
  (``UNKNOWN_FRAME_TYPE`` if its type is newer than the version the connection negotiated);
- a request gets its reply (SYNC: SYNC_PAGE... then SYNC_DONE; version 2: EVENTS before a page) or an ERROR
  with its request_id, never ``INTERNAL`` (a bug the connection's catch-all caught); a frame with no reply on
  success is followed by a PING, whose PONG must come back; a connection ends only as the spec allows for that
  frame (UNSUPPORTED_VERSION, TOO_MANY_CONNECTIONS, an unsolicited PONG, LOGOUT, BYE), with ERROR and BYE
  wherever the server speaks last;
- every server frame is legal in the client's state machine, pushes carry request_id 0, no reply answers a
  request that was not asked, and nothing takes longer than ``STEP_TIMEOUT_S``;
- HISTORY and SYNC pages (with the EVENTS before them) fit their request (``PageCheck``: spec §9.5, §9.7,
  §5.46), no MESSAGE or live EVENTS repeats a seq the connection already got, and pipelined requests are
  answered in order (but SEND's), a connection's SENDs into one conversation taking their seqs in the order sent
  (spec §8; a SEND_ACTION, which is not queued, may overtake the SENDs sent just before it);
- the server task is still running and logged no traceback; the bystanders' message is ACKed and delivered, and
  the bystanders see every conversation's seqs without gap or repeat;
- at the end, with the server stopped, every conversation in the SQLite file holds seqs 1..last_seq (messages and
  events together; a DELETED tombstone and an ACTION share their message's seq), cursors are within last_seq,
  every ACKed message is stored with the seq and body its ACK said (an action's with "/me ", an edited one with its
  latest EDIT's text), and the stored reactions are what the REACT and UNREACT events add up to, the way a client
  counts them (spec §9.16); every display name follows the rule of spec §9.17 (NFC, 1..32 characters, no
  control, format or line character but ZWJ and ZWNJ, no space at an end) and none looks like another user's login
  or display name (``check_store``).

A broken promise raises ``ServerBug`` (``ServerDied`` when the server went down, with its traceback), and the
falsifying example lists the frames of every step, as sent, with their answers. tests/test_session_fuzz.py runs
a bounded number of examples and a deterministic sweep of boundary values; fuzz/fuzz_session.py runs longer.
"""
from __future__ import annotations

import dataclasses
import itertools
import unicodedata
import logging
import shutil
import sqlite3
import tempfile
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace

import trio
from hypothesis import HealthCheck, Phase, event as hypothesis_event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import conftest
from chorus import proto
from fuzzframes import ALLOWED_CLOSES, CLIENT_FRAMES, ERROR_CLOSES, PUSHES, REPLIES, Hints, Reply, frames, weighted
from chorus.proto import CloseReason, ErrorCode, FrameType, State
from chorus.proto._state import next_state
from chorus.server import Config, serve
from chorus.server._displaynames import skeleton

#: How long any one exchange (a frame and its reply, the bystanders' round) may take before it counts as a hang.
STEP_TIMEOUT_S = 5.0
PASSWORD = "fuzzing password"
BYSTANDER_PASSWORD = "bystander password, never fuzzed"  # kept from the fuzzers: they cannot log in as bystanders
BYSTANDERS = ("bya", "byb")
FUZZ_USERS = ("f0", "f1", "f2")
LOBBY = proto.Conversation.room("lobby")
FUZZ_ROOM = "fuzz"
#: One-time invite codes the server holds (``registration`` is "open": REGISTER works, and REGISTER_INVITE needs a
#: valid code, spec §9.1). A REGISTER_INVITE with a fresh name and one of them makes an account; the code is used then.
INVITES = tuple(f"fuzz-invite-{i}" for i in range(8))
#: What a version 1 connection sees of an action: "/me " and its text (spec §9.16), the body the store keeps.
ACTION_PREFIX = "/me "
#: Distinct reactions one user may leave on one message (spec §9.16, §10).
REACTIONS_PER_MESSAGE = 20
#: The HELLO of every connection the machine opens (a fuzzed HELLO offers anything): every version we speak.
VERSIONS = (proto.MIN_PROTOCOL_VERSION, proto.PROTOCOL_VERSION)


# --- failures ---------------------------------------------------------------------------------------------------

class ServerBug(AssertionError):
    """The server broke a promise of the spec or of DESIGN.md "Failure is local"."""


class ServerDied(ServerBug):
    """``serve()`` ended with an exception: the whole server went down (issue 9 item 1 did this)."""

    def __init__(self, message: str, exc: BaseException):
        super().__init__(message)
        self.exc = exc


# --- the server, in a Trio thread -------------------------------------------------------------------------------

#: Fuzzing is about what frames do, not how many or how fast (the budgets and timers have their own tests): the
#: timers are far away and the budgets generous, so that a sweep of hundreds of frames reaches the store. Pages
#: are small and the room limit low, so that SYNC and HISTORY page and JOIN meets its limit within a few steps.
#: Options this version of the server does not have yet are left out.
_FUZZ_OPTIONS = {
    "sqlite_synchronous": "NORMAL", "ping_interval_s": 600.0, "handshake_timeout_s": 600.0, "auth_timeout_s": 600.0,
    "rate_per_s": 100_000, "rate_burst": 100_000, "user_send_rate_per_s": 100_000.0, "user_send_burst": 100_000,
    "login_free_failures": 100_000, "max_page": 3, "max_rooms_per_user": 4,
}


def fuzz_config(data_dir: Path, **overrides) -> Config:
    """The test config (tests/conftest.py: FAST_HASH argon2, port 0) with ``_FUZZ_OPTIONS`` and ``overrides``."""
    known = {f.name for f in dataclasses.fields(Config)}
    return conftest.test_config(data_dir, **{k: v for k, v in _FUZZ_OPTIONS.items() if k in known}, **overrides)


class _Tracebacks(logging.Handler):
    """Collects every log record of the server that carries a traceback: each one is a bug that was caught."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.levelno >= logging.WARNING:
            self.records.append(record)


class LiveServer:
    """``server.serve`` running in its own thread under ``trio.run``; ``call`` runs a coroutine there.

    If ``serve`` raises, the exception is kept (``died``) instead of ending the thread's run, so that the
    test can report it and still read the database.
    """

    def __init__(self, **overrides):
        self.tmp = Path(tempfile.mkdtemp(prefix="chorus-fuzz-"))
        self.config = fuzz_config(self.tmp, **overrides)
        self.server = None
        self.died: BaseException | None = None
        self.tracebacks = _Tracebacks()
        self._seen_tracebacks = 0
        self._token = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._exited = threading.Event()  # serve() returned or raised
        self._error: BaseException | None = None
        logging.getLogger("chorus").addHandler(self.tracebacks)
        logging.getLogger("server").addHandler(self.tracebacks)  # the store logs under its module name
        self._thread = threading.Thread(target=self._run, name="chorus-fuzz-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self.close()
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by __init__ or close
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.server = await nursery.start(self._serve)
            self._ready.set()
            await self._stop.wait()
            if self.died is None:
                self.server.shutdown()  # graceful: the store commits what is pending
                with trio.move_on_after(self.config.shutdown_grace_s + 10):
                    await self._done.wait()
            nursery.cancel_scope.cancel()

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._done = trio.Event()
        started = False

        def report(server) -> None:
            nonlocal started
            started = True
            task_status.started(server)

        try:
            await serve(self.config, task_status=SimpleNamespace(started=report))
        except Exception as exc:
            if not started:
                raise  # nursery.start raises it, and so does LiveServer()
            self.died = exc
        finally:
            self._done.set()
            self._exited.set()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def db_path(self) -> Path:
        return self.config.db_path

    def call(self, afn, *args):
        """Run ``await afn(*args)`` in the server's thread and return its result (or raise its exception)."""
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def check(self, wait_s: float = 0.0) -> None:
        """Raise ``ServerDied`` if serve() ended (waiting up to ``wait_s`` for it to), ``ServerBug`` if the server
        logged a traceback since the last check."""
        self._exited.wait(wait_s)
        if self.died is not None:
            text = "".join(traceback.format_exception(self.died))
            raise ServerDied(f"the server exited: {self.died!r}\n{text}", self.died)
        records = self.tracebacks.records[self._seen_tracebacks:]
        self._seen_tracebacks = len(self.tracebacks.records)
        if records:
            formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
            raise ServerBug("the server caught a bug (logged with a traceback):\n"
                            + "\n".join(formatter.format(r) for r in records))

    def diagnose(self) -> None:
        """After a failure: raise ``ServerDied`` if the server is going down, so that the failure says so.

        A dropped connection is often the first sign of a dying server, and serve() takes a while to unwind
        (each connection's close has a deadline): whether it still answers a new HELLO tells at once.
        """
        self.check()
        try:
            alive = self.call(self._answers_hello)
        except trio.RunFinishedError:
            alive = False
        if not alive:
            self.check(wait_s=30)

    async def _answers_hello(self) -> bool:
        peer = None
        try:
            with trio.move_on_after(0.5):  # a healthy server answers in milliseconds, even a loaded one well within
                peer = await Peer.connect("probe", self.port, set())
                return isinstance(await peer.reply_to(proto.Hello(*VERSIONS, "probe", request_id=1)), proto.Welcome)
            return False
        except (OSError, ServerBug):
            return False
        finally:
            if peer is not None and not peer.closed:
                await peer.aclose()

    def close(self) -> None:
        """Stop the server (gracefully unless it died) and wait for its thread; keeps the files (``remove``)."""
        if self._token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=30)
        logging.getLogger("chorus").removeHandler(self.tracebacks)
        logging.getLogger("server").removeHandler(self.tracebacks)

    def remove(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- clients ----------------------------------------------------------------------------------------------------

def brief(event, keep: int = 240) -> str:
    """``repr(event)`` cut short: a maximal frame's repr runs to megabytes."""
    text = repr(event)
    return text if len(text) <= keep else f"{text[:keep]}...({len(text)} chars)"


class Peer:
    """One client connection that may send any frame, legal or not, and checks what the server sends back.

    Legal frames go through a client ``proto.Connection`` (so its state follows the server's); illegal ones are
    encoded without a state check. Everything received passes the same Connection, which refuses any frame the
    server may not send in the current state.
    """

    def __init__(self, name: str, stream: trio.SocketStream, revoked: set[str],
                 issued: dict[str, set[str]] | None = None):
        self.name = name  # the slot: whom it logs in as when it reconnects
        self.check_gaps = name in BYSTANDERS  # a fuzzer's own SYNC positions may legitimately skip seqs
        self.user: str | None = None  # whom this connection is logged in as (a fuzzed LOGIN may pick another)
        self.stream = stream
        self.conn = proto.Connection(proto.CLIENT)
        self.closed = False
        self.token: str | None = None  # this connection's session token, once authenticated
        self.revoked = revoked  # tokens a LOGOUT revoked: a connection resumed with one may be closed any time
        self.issued = {} if issued is None else issued  # user → every token AUTH_OK gave it (shared by the peers)
        self._ids = itertools.count(1)
        self.seen_seq: dict[proto.Conversation, int] = {}  # highest seq pushed or paged, per conversation
        self.preludes: dict[int, proto.Events] = {}  # request_id → the EVENTS before the SYNC_PAGE to come (§5.46)
        self.max_page = 0  # from WELCOME

    @classmethod
    async def connect(cls, name: str, port: int, revoked: set[str],
                      issued: dict[str, set[str]] | None = None) -> "Peer":
        return cls(name, await trio.open_tcp_stream("127.0.0.1", port), revoked, issued)

    def rid(self) -> int:
        return next(self._ids)

    @property
    def state(self) -> State:
        return self.conn.state

    def known(self, ftype: FrameType) -> bool:
        """``ftype`` exists in the version this connection negotiated (spec §6.2; before WELCOME, the oldest)."""
        return getattr(ftype, "version", 1) <= getattr(self.conn, "version", proto.PROTOCOL_VERSION)

    def legal(self, ftype: FrameType) -> bool:
        return (not self.conn.we_said_bye and self.known(ftype)
                and next_state(self.conn.state, proto.CLIENT, ftype) is not None)

    async def send(self, event: proto.Event) -> bytes:
        data = self.conn.send(event) if self.legal(event.FRAME) else proto.encode(event)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server closed first: what it said before closing is still to be read
        return data

    async def next(self):
        """The next event from the server (``ConnectionClosed`` at the end); answers the server's PINGs.

        Raises ``ServerBug`` for a frame the state machine forbids, a push with a request_id, a MESSAGE whose seq
        this connection already got (pushed or paged), a gap in a conversation's seqs seen live (if ``check_gaps``).
        """
        while True:
            try:
                event = self.conn.next_event()
            except proto.RemoteProtocolError as exc:
                raise ServerBug(
                    f"{self.name}: the server sent what the protocol forbids: {exc} ({exc.code.name})") from exc
            if event is not proto.NEED_DATA:
                break
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.conn.receive_data(data)
        if isinstance(event, proto.ConnectionClosed):
            await self.aclose()  # the server waits for our end (it lingers so that its BYE is not reset away)
            return event
        if event.FRAME in PUSHES and event.request_id != 0:
            raise ServerBug(f"{self.name}: push {brief(event)} carries request_id {event.request_id}, not 0")
        if isinstance(event, proto.Ping) and event.request_id == 0 and self.legal(FrameType.PONG):
            await self.send(event.response())
        elif isinstance(event, proto.Welcome):
            self.max_page = event.max_page
        elif isinstance(event, proto.AuthOk):
            self.user, self.token = event.username, event.token
            self.issued.setdefault(event.username, set()).add(event.token)
        elif isinstance(event, proto.Message):
            self._live(event.conv, event.seq, "MESSAGE")
        elif isinstance(event, proto.Events) and event.request_id == 0:  # live: one event, a seq like a MESSAGE's
            for item in event.events:
                self._live(event.conv, item.seq, f"EVENTS {item.kind.name}")
        elif isinstance(event, proto.Events):  # the events of the page that follows (spec §5.46)
            self.preludes[event.request_id] = event
        elif isinstance(event, proto.SyncPage):
            prelude = self.preludes.pop(event.request_id, None)
            events = prelude.events if prelude is not None and prelude.conv == event.conv else ()
            seqs = [m.seq for m in event.messages] + [e.seq for e in events]
            if seqs:
                self.seen_seq[event.conv] = max(self.seen_seq.get(event.conv, 0), *seqs)
        elif isinstance(event, proto.HistoryPage):
            self.preludes.pop(event.request_id, None)
        return event

    def _live(self, conv: proto.Conversation, seq: int, what: str) -> None:
        """A MESSAGE or a live event of ``conv`` took ``seq``: it must be new (and, for a bystander, the next one)."""
        last = self.seen_seq.get(conv, 0)
        if seq <= last:  # spec §9.5: after a conversation's pages, only later messages and events are pushed
            raise ServerBug(f"{self.name}: {what} {conv} seq {seq} again: {last} already came")
        if self.check_gaps and last and seq != last + 1:
            raise ServerBug(f"{self.name}: {what} {conv} seq {seq} after {last}: a gap")
        self.seen_seq[conv] = seq

    def may_revoke(self, ftype: FrameType) -> None:
        """Before ``ftype`` goes out: the user's tokens it may revoke (spec §9.1, version 2) count as revoked, so the
        BYE LOGGED_OUT of a connection using one is expected from then on. REVOKE_SESSION's id is fuzzed and may name
        any of the user's sessions (this one too); CHANGE_PASSWORD revokes all but this one if it succeeds."""
        if ftype in (FrameType.REVOKE_SESSION, FrameType.CHANGE_PASSWORD) and self.user is not None:
            already = self.token in self.revoked  # e.g. by a LOGOUT_ALL on another connection: it stays revoked
            self.revoked.update(self.issued.get(self.user, ()))
            if ftype is FrameType.CHANGE_PASSWORD and self.token is not None and not already:
                self.revoked.discard(self.token)

    def logged_out_elsewhere(self, event) -> bool:
        """``event`` is the BYE LOGGED_OUT of a token another connection logged out (spec §9.1; issue 9 item 13)."""
        return isinstance(event, proto.Bye) and event.reason is CloseReason.LOGGED_OUT and self.token in self.revoked

    async def reply_to(self, request: proto.Event) -> proto.Event:
        """Send ``request`` and return its final reply or ERROR; pushes are skipped, anything else is a bug."""
        await self.send(request)
        reply = REPLIES[request.FRAME]
        while True:
            event = await self.next()
            if isinstance(event, proto.ConnectionClosed):
                raise ServerBug(f"{self.name}: connection closed while waiting for the reply to {brief(request)}")
            if event.request_id == request.request_id and type(event) in (
                    proto.EVENT_TYPES[reply.final], proto.Error):
                return event
            if event.request_id not in (0, request.request_id):
                raise ServerBug(f"{self.name}: {brief(event)} answers no request in flight ({brief(request)})")

    async def expect_close(self, after: proto.Event, *, code: ErrorCode | None, bye: CloseReason | None) -> None:
        """Read (skipping pushes) to the end of the connection: ERROR ``code`` (request_id 0) if given, then BYE
        ``bye`` if given, then nothing."""
        expected = ([proto.Error] if code is not None else []) + ([proto.Bye] if bye is not None else [])
        got = []
        while True:
            event = await self.next()
            if isinstance(event, proto.ConnectionClosed):
                break
            if self.logged_out_elsewhere(event) and not got:
                expected, code, bye = [proto.Bye], None, CloseReason.LOGGED_OUT
            elif event.request_id == 0 and not isinstance(event, (proto.Error, proto.Bye)):
                continue  # a push that was on its way
            got.append(event)
        if [type(e) for e in got] != expected:
            raise ServerBug(f"{self.name}: after {brief(after)} expected {[t.__name__ for t in expected]} and a "
                            f"close, got {[brief(e) for e in got]}")
        if code is not None and (got[0].code != code or got[0].request_id != 0):
            raise ServerBug(f"{self.name}: after {brief(after)} expected ERROR {code.name} with request_id 0, "
                            f"got {got[0]!r}")
        if bye is not None and got[-1].reason != bye:
            raise ServerBug(f"{self.name}: after {brief(after)} expected BYE {bye.name}, got {got[-1]!r}")

    async def aclose(self) -> None:
        self.closed = True
        await self.stream.aclose()


class PageCheck:
    """What the pages answering one HISTORY or SYNC must look like (spec §9.5, §9.7): seqs ascending without gap,
    at most the limit (0 or over ``max_page`` means ``max_page``), after or below the cursor; HISTORY AFTER starts
    right after it, and each listed conversation of a SYNC gets pages from its position on, the last with
    ``has_more`` false, before SYNC_DONE. On version 2 a page's events come just before it in one EVENTS frame
    (spec §5.46): the seqs of a page are its messages' and those events' together, and the limits count both."""

    def __init__(self, request: proto.Event, max_page: int):
        self.request = request
        self.max_page = max_page
        self.next: dict[proto.Conversation, int | None] = {}  # SYNC: the seq each listed conversation goes on with
        if isinstance(request, proto.Sync):
            for position in request.positions:  # a conversation listed twice pages from its last position
                self.next[position.conv] = position.last_seq + 1
        self.done: set[proto.Conversation] = set()
        self.prelude: proto.Events | None = None  # the EVENTS that came before the next page

    def check(self, reply: proto.Event) -> None:
        request = self.request
        if isinstance(reply, proto.Events):
            event_seqs = [e.seq for e in reply.events]
            if self.prelude is not None:
                self._bug(reply, "a second EVENTS before one page")
            if not event_seqs or event_seqs != sorted(set(event_seqs)):
                self._bug(reply, "the events of a page are not one or more, seq ascending")
            self.prelude = reply
            return
        prelude, self.prelude = self.prelude, None
        if prelude is not None and not (isinstance(reply, (proto.HistoryPage, proto.SyncPage))
                                        and reply.conv == prelude.conv):
            self._bug(reply, f"not a page of {prelude.conv}, whose EVENTS came just before")
        if isinstance(reply, (proto.HistoryPage, proto.SyncPage)):
            seqs = sorted([m.seq for m in reply.messages] + [e.seq for e in (prelude.events if prelude else ())])
            if [m.seq for m in reply.messages] != sorted({m.seq for m in reply.messages}):
                self._bug(reply, "messages not seq ascending")
            if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                self._bug(reply, "seqs (with the events before the page) not ascending one by one")
            if len(seqs) > self.max_page:
                self._bug(reply, f"more than max_page {self.max_page}")
        if isinstance(reply, proto.HistoryPage):
            limit = request.limit if 0 < request.limit <= self.max_page else self.max_page
            if reply.conv != request.conv or len(seqs) > limit or (len(seqs) < limit and reply.has_more):
                self._bug(reply, f"not a page of {request.conv} with at most {limit} (has_more only when full)")
            if request.direction is proto.Direction.AFTER and seqs and seqs[0] != request.seq + 1:
                self._bug(reply, f"AFTER {request.seq} does not start at {request.seq + 1}")
            if request.direction is proto.Direction.BEFORE and request.seq and seqs and seqs[-1] >= request.seq:
                self._bug(reply, f"BEFORE {request.seq} reaches {seqs[-1]}")
        elif isinstance(reply, proto.SyncPage) and reply.conv in self.next:
            expected = self.next[reply.conv]
            if reply.conv in self.done or (seqs and expected is not None and seqs[0] != expected):
                self._bug(reply, f"{reply.conv} should go on at seq {expected}, once")
            self.next[reply.conv] = seqs[-1] + 1 if seqs else expected
            if not reply.has_more:
                self.done.add(reply.conv)
        elif isinstance(reply, proto.SyncDone) and self.done != set(self.next):
            self._bug(reply, f"no last page for {set(self.next) - self.done}")

    def _bug(self, reply: proto.Event, what: str) -> None:
        raise ServerBug(f"{brief(reply)} answering {brief(self.request)}: {what}")


async def answer(peer: Peer, event: proto.Event, acks: list) -> str:
    """Send ``event`` (legal in ``peer``'s state or not) and check the server's answer against the spec.

    Returns what happened ("HistoryPage", "NOT_MEMBER", "WRONG_STATE, closed"...); raises ``ServerBug``. Fresh
    ACKs are added to ``acks`` as (user, Ack, body) for ``check_store``.
    """
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            outcome = await _answer(peer, event)
    except trio.TooSlowError:
        raise ServerBug(f"{peer.name}: no answer to {brief(event)} within {STEP_TIMEOUT_S} s") from None
    if isinstance(outcome, proto.Ack):
        if (outcome.conv, outcome.client_msg_id) != (event.conv, event.client_msg_id):
            raise ServerBug(f"{peer.name}: {brief(event)} acknowledged by {outcome!r}")
        acks.append((peer.user, outcome, stored_body(event)))
    return outcome if isinstance(outcome, str) else type(outcome).__name__


async def _answer(peer: Peer, event: proto.Event):
    ftype = event.FRAME
    if not peer.legal(ftype):  # spec §2.3: a type newer than the connection's version is unknown to it
        code = ErrorCode.WRONG_STATE if peer.known(ftype) else ErrorCode.UNKNOWN_FRAME_TYPE
        await peer.send(event)
        await peer.expect_close(event, code=code, bye=CloseReason.PROTOCOL_ERROR)
        return f"{code.name}, closed"
    token = peer.token
    peer.may_revoke(ftype)
    await peer.send(event)
    if ftype is FrameType.BYE:  # the server closes without a BYE of its own (spec §5.36)
        await peer.expect_close(event, code=None, bye=None)
        return "closed"
    if ftype in (FrameType.LOGOUT, FrameType.LOGOUT_ALL):
        peer.revoked.add(token)
        if ftype is FrameType.LOGOUT_ALL and peer.user is not None:  # every connection of the user ends
            peer.revoked.update(peer.issued.get(peer.user, ()))
        await peer.expect_close(event, code=None, bye=CloseReason.LOGGED_OUT)
        return "BYE LOGGED_OUT, closed"
    reply = REPLIES[ftype]
    if reply.final is not None:
        return await _until(peer, event, reply, event.request_id, refusable=True)
    if not peer.legal(FrameType.PING):
        return "no reply expected, none checked"  # an ERROR before HELLO: no request may follow it
    # No reply on success: the PING sent next is answered after it (a connection handles its frames in order).
    ping = proto.Ping(0x5EED, request_id=fresh_id(event.request_id, {event.request_id}))
    await peer.send(ping)
    return await _until(peer, event, Reply(FrameType.PONG), ping.request_id, refusable=ftype is not FrameType.ERROR)


async def _until(peer: Peer, event: proto.Event, reply: Reply, rid: int, *, refusable: bool):
    """Read until the reply ``rid`` completes and return it (or a string saying how the connection ended); an ERROR
    refusing ``event`` may come first when ``refusable``."""
    final, partial = proto.EVENT_TYPES[reply.final], {proto.EVENT_TYPES[f] for f in reply.partial}
    refused = None
    pages = PageCheck(event, peer.max_page)
    while True:
        got = await peer.next()
        if isinstance(got, proto.ConnectionClosed):
            raise ServerBug(f"{peer.name}: connection closed without ERROR and BYE after {brief(event)}")
        if isinstance(got, proto.Bye):
            if not (peer.logged_out_elsewhere(got) or got.reason is CloseReason.RATE_LIMITED):
                raise ServerBug(f"{peer.name}: {brief(event)} got {got!r} without an ERROR")
            await peer.expect_close(got, code=None, bye=None)
            return f"BYE {got.reason.name}, closed"
        if isinstance(got, proto.Error):
            if got.code is ErrorCode.INTERNAL:
                raise ServerBug(f"{peer.name}: {brief(event)} got {got!r}: a bug the connection's catch-all caught")
            closes = ERROR_CLOSES.get(got.code)
            if closes is not None or got.request_id == 0:  # the connection ends
                if got.code not in ALLOWED_CLOSES.get(event.FRAME, ()):
                    raise ServerBug(f"{peer.name}: {brief(event)} closed the connection with {got!r}")
                await peer.expect_close(event, code=None, bye=closes or CloseReason.PROTOCOL_ERROR)
                return f"{got.code.name}, closed"
            if got.request_id == event.request_id and refusable and refused is None:
                refused = got.code.name
                if got.request_id == rid:
                    return refused
                continue
            if got.request_id == rid:  # the PING after a frame with no reply was refused: that frame was handled
                return refused or f"PING {got.code.name}"
            raise ServerBug(f"{peer.name}: {got!r} while waiting for request {rid} ({brief(event)})")
        if got.request_id == 0:
            continue  # a push
        if got.request_id != rid:
            raise ServerBug(f"{peer.name}: {brief(got)} answers no request in flight (sent {brief(event)})")
        pages.check(got)
        if type(got) is final:
            return refused or got
        if type(got) not in partial:
            raise ServerBug(f"{peer.name}: {brief(event)} answered by {brief(got)}")


def stored_body(event: proto.Event) -> str:
    """The body a SEND or SEND_ACTION is stored with: an action's is "/me " and its text, the body that version 1
    connections get (spec §9.16)."""
    return ACTION_PREFIX + event.body if isinstance(event, proto.SendAction) else event.body


def stored_in_order(seqs: list[tuple[int, int, FrameType]]) -> bool:
    """Whether the fresh ACKs of one burst into one conversation, as (position sent, seq, frame type) in the order
    sent, took their seqs as spec §8 says: a frame is acted on before the next is read, but a SEND is queued, so
    whatever was sent before a SEND is stored before it, and an action (not queued) is stored after the actions sent
    before it; only a SEND followed by a SEND_ACTION may come out the other way round."""
    return all(seq_i < seq_j for (i, (_, seq_i, frame_i)) in enumerate(seqs) for (_, seq_j, frame_j) in seqs[i + 1:]
               if not (frame_i is FrameType.SEND and frame_j is FrameType.SEND_ACTION))


def fresh_id(after: int, taken) -> int:
    """The first nonzero u32 request id after ``after`` (wrapping) that is not in ``taken``."""
    rid = after % 0xFFFFFFFF + 1
    while rid in taken:
        rid = rid % 0xFFFFFFFF + 1
    return rid


def pipelinable(peer: Peer) -> list[FrameType]:
    """The frames ``peer`` may send back to back: legal now, and neither they nor their reply change the state
    (no LOGIN, LOGOUT, BYE...), and none that may end the connection (ALLOWED_CLOSES: a PONG). None before HELLO."""
    state = peer.state
    if not peer.legal(FrameType.PING):  # the PING that closes a burst
        return []
    return [f for f in CLIENT_FRAMES if peer.legal(f) and f is not FrameType.BYE and f not in ALLOWED_CLOSES
            and next_state(state, proto.CLIENT, f) is state
            and (REPLIES[f].final is None or next_state(state, proto.SERVER, REPLIES[f].final) is state)]


async def answer_many(peer: Peer, events: list[proto.Event], acks: list) -> list[str]:
    """Send ``events`` (``pipelinable``, distinct request ids) back to back, then a PING, and check that each gets
    its answer (spec §2.2: matched by request_id), and the pipelining rules of spec §8: replies come in the order
    of the requests, except SEND's; a connection's SENDs into one conversation get their seqs in the order sent.
    Returns the outcomes."""
    by_id = {e.request_id: e for e in events}
    assert len(by_id) == len(events), "request ids must be distinct"
    ping = proto.Ping(0x5EED, request_id=fresh_id(events[-1].request_id, by_id))
    pending = {e.request_id: REPLIES[e.FRAME] for e in events if REPLIES[e.FRAME].final is not None}
    pages = {e.request_id: PageCheck(e, peer.max_page) for e in events}
    outcomes: dict[int, str] = {}
    rank = {e.request_id: i for i, e in enumerate(events + [ping]) if e.FRAME is not FrameType.SEND}
    latest = -1  # rank of the latest request (not a SEND) that has had a reply
    stored: dict[proto.Conversation, list[tuple[int, int]]] = {}  # conv → (position sent, seq) of fresh ACKs
    try:
        with trio.fail_after(STEP_TIMEOUT_S):
            for event in events + [ping]:
                peer.may_revoke(event.FRAME)
                await peer.send(event)
            pending[ping.request_id] = REPLIES[FrameType.PING]
            by_id[ping.request_id] = ping
            while pending:
                got = await peer.next()
                if isinstance(got, proto.ConnectionClosed):
                    raise ServerBug(f"{peer.name}: closed while {len(pending)} of a burst waited for their answers")
                if peer.logged_out_elsewhere(got):
                    await peer.expect_close(got, code=None, bye=None)
                    return [f"BYE {got.reason.name}, closed"]
                rid = got.request_id
                if rid == 0 and not isinstance(got, (proto.Error, proto.Bye)):
                    continue  # a push
                sent = by_id.get(rid)
                if sent is None or rid in outcomes or isinstance(got, proto.Bye):
                    raise ServerBug(f"{peer.name}: {brief(got)} in a burst of {[brief(e, 80) for e in events]}")
                if rid in rank:
                    if rank[rid] < latest:
                        raise ServerBug(f"{peer.name}: {brief(got)} came after a reply to a later request of the "
                                        f"burst {[brief(e, 80) for e in events]} (spec §8: in order, but SEND's)")
                    latest = rank[rid]
                if isinstance(got, proto.Error):
                    if got.code is ErrorCode.INTERNAL or ERROR_CLOSES.get(got.code) or sent.FRAME is FrameType.ERROR:
                        raise ServerBug(f"{peer.name}: {brief(sent)}, sent in a burst, got {got!r}")
                    outcomes[rid] = got.code.name
                    pending.pop(rid, None)
                    continue
                reply = pending.get(rid)
                if reply is None or type(got) not in {proto.EVENT_TYPES[f] for f in reply.partial | {reply.final}}:
                    raise ServerBug(f"{peer.name}: {brief(sent)}, sent in a burst, answered by {brief(got)}")
                if rid in pages:
                    pages[rid].check(got)
                if type(got) is proto.EVENT_TYPES[reply.final]:
                    outcomes[rid] = type(got).__name__
                    del pending[rid]
                    if isinstance(got, proto.Ack):
                        if (got.conv, got.client_msg_id) != (sent.conv, sent.client_msg_id):
                            raise ServerBug(f"{peer.name}: {brief(sent)} acknowledged by {got!r}")
                        acks.append((peer.user, got, stored_body(sent)))
                        if not got.duplicate:
                            stored.setdefault(sent.conv, []).append((events.index(sent), got.seq, sent.FRAME))
    except trio.TooSlowError:
        raise ServerBug(f"{peer.name}: no answer within {STEP_TIMEOUT_S} s to "
                        f"{[brief(by_id[rid], 80) for rid in pending]} of a burst") from None
    for conv, seqs in stored.items():
        if not stored_in_order(sorted(seqs)):
            raise ServerBug(f"{peer.name}: SENDs into {conv} sent together got seqs {[s for _, s, _ in sorted(seqs)]} "
                            f"in the order sent (spec §8: stored in the order sent): {[brief(e, 80) for e in events]}")
    return [outcomes.get(e.request_id, "ok") for e in events]


# --- the state machine ------------------------------------------------------------------------------------------

class SessionMachine(RuleBasedStateMachine):
    """Fuzzing clients send random frames in random states; the server and two bystanders must not notice."""

    def __init__(self):
        super().__init__()
        self.live = LiveServer()
        self.clients: list[Peer] = []
        self.acks: list[tuple[str, proto.Ack, str]] = []  # (sender, ACK, body sent) of every fresh ACK
        self.revoked: set[str] = set()
        self.issued: dict[str, set[str]] = {}  # user → the tokens AUTH_OK gave it
        self._cmids = itertools.count(1)
        self._failed = False  # a step raised: teardown then only cleans up
        limit = self.live.config.max_body_bytes
        self.hints = Hints(users=FUZZ_USERS + BYSTANDERS, rooms=(FUZZ_ROOM, LOBBY.name), password=PASSWORD,
                           tokens=self._tokens, body_bytes=(1, limit, limit + 1), invites=INVITES)
        try:
            self.live.call(self._setup)
        except BaseException:
            self.live.close()
            self.live.remove()
            raise

    def _call(self, afn, *args):
        """``live.call``, turning a failure into ``ServerDied`` when the server was going down at the time."""
        self._failed = True
        try:
            result = self.live.call(afn, *args)
        except ServerBug:
            self.live.diagnose()
            raise
        self.live.check()
        self._failed = False
        return result

    async def _setup(self) -> None:
        """bya and byb in #lobby, live; f0..f2 registered, in #lobby and #fuzz with a message there, and each in a
        direct conversation with the one before it: so that fuzzed names often reach the store. The server holds
        the invite codes ``INVITES``."""
        from chorus.server._invites import code_hash

        with trio.fail_after(30):
            await self.live.server.store.add_invites([code_hash(code) for code in INVITES], 0)
            self.bystanders = [await self._user(name, BYSTANDER_PASSWORD, [LOBBY.name]) for name in BYSTANDERS]
            for i, name in enumerate(FUZZ_USERS):
                peer = await self._user(name, PASSWORD, [FUZZ_ROOM, LOBBY.name])
                for cmid, conv in enumerate([proto.Conversation.room(FUZZ_ROOM)]
                                            + [proto.Conversation.direct(FUZZ_USERS[i - 1])] * (i > 0), 1):
                    body = f"{name} was here"
                    ack = await peer.reply_to(proto.Send(conv, cmid, body, request_id=peer.rid()))
                    assert isinstance(ack, proto.Ack), ack
                    self.acks.append((name, ack, body))
                await peer.send(proto.Bye(CloseReason.CLIENT_QUIT))
                await peer.aclose()

    async def _user(self, name: str, password: str, rooms: list[str]) -> Peer:
        """A connection of a new user ``name``, live (SYNC) and in ``rooms``."""
        peer = await Peer.connect(name, self.live.port, self.revoked, self.issued)
        for request in [proto.Hello(*VERSIONS, "setup"), proto.Register(name, password), proto.Sync(())] + [
                proto.Join(room) for room in rooms]:
            reply = await peer.reply_to(dataclasses.replace(request, request_id=peer.rid()))
            assert type(reply) is proto.EVENT_TYPES[REPLIES[request.FRAME].final], reply
        return peer

    async def _open(self, name: str, mode: str, token: str | None) -> Peer:
        """A new connection of slot ``name``: "raw" (nothing sent), "hello" (UNAUTHENTICATED), "login" or
        "resume" (with ``token``, else login; then SYNC), or "pipelined" (resume or login, all in one write). The
        server's answers are checked like any fuzzed frame's."""
        peer = await Peer.connect(name, self.live.port, self.revoked, self.issued)
        peer.token = token
        if mode == "pipelined":
            await self._pipelined_login(peer, token)
            return peer
        steps = {"raw": [], "hello": [proto.Hello(*VERSIONS, "session-fuzz")],
                 "login": [proto.Hello(*VERSIONS, "session-fuzz"), proto.Login(name, PASSWORD)],
                 "resume": [proto.Hello(*VERSIONS, "session-fuzz"),
                            proto.Resume(token) if token else proto.Login(name, PASSWORD)]}[mode]
        for event in steps + [proto.Sync(())]:
            if not peer.legal(event.FRAME) or (peer.state is State.UNAUTHENTICATED and event.FRAME is FrameType.SYNC):
                break  # a refused login leaves it UNAUTHENTICATED, and that is a state worth fuzzing too
            await answer(peer, dataclasses.replace(event, request_id=peer.rid()), self.acks)
        return peer

    async def _pipelined_login(self, peer: Peer, token: str | None) -> None:
        """HELLO, RESUME (or LOGIN) and SYNC in one write, as spec §8 lets a client pipeline across state changes:
        each is answered in turn; if the login is refused, the SYNC is judged UNAUTHENTICATED: WRONG_STATE."""
        hello = proto.Hello(*VERSIONS, "session-fuzz", request_id=peer.rid())
        auth = proto.Resume(token) if token else proto.Login(peer.name, PASSWORD)
        auth = dataclasses.replace(auth, request_id=peer.rid())
        sync = proto.Sync((), request_id=peer.rid())
        try:
            with trio.fail_after(STEP_TIMEOUT_S):
                # Only HELLO goes through our Connection: the server's frames move it on (WELCOME, AUTH_OK), and
                # LOGIN and SYNC change nothing on the client's side.
                await peer.stream.send_all(peer.conn.send(hello) + proto.encode(auth) + proto.encode(sync))
                for request in (hello, auth, sync):
                    outcome = await _until(peer, request, REPLIES[request.FRAME], request.request_id, refusable=True)
                    if isinstance(outcome, str):  # refused
                        if "closed" not in outcome:
                            await peer.expect_close(sync, code=ErrorCode.WRONG_STATE, bye=CloseReason.PROTOCOL_ERROR)
                        return
        except trio.TooSlowError:
            raise ServerBug(
                f"{peer.name}: no answer to a pipelined {brief(hello)}, {brief(auth)}, {brief(sync)}") from None

    def _tokens(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.token for p in self.clients if p.token))  # in slot order: reproducible

    # -- rules ----------------------------------------------------------------------------------------------------
    @initialize(modes=st.lists(st.sampled_from(["login", "login", "pipelined", "hello", "raw"]),
                               min_size=len(FUZZ_USERS), max_size=len(FUZZ_USERS)))
    def connect_fuzzers(self, modes):
        """Each fuzzing slot connects: mostly logged in and live, sometimes only past HELLO, or not even that."""
        for name, mode in zip(FUZZ_USERS, modes, strict=True):
            self.clients.append(self._call(self._open, name, mode, None))
            note(f"{name} connected ({mode}): {self.clients[-1].state.name}")

    @rule(data=st.data())
    def step(self, data):
        """One fuzzing client sends one well-formed frame, usually legal in its state, and the answer is checked;
        or, one time in ten, it goes away (BYE, or the socket just closes) and comes back in some state."""
        i = data.draw(st.integers(0, len(self.clients) - 1), label="client")
        peer = self.clients[i]
        if peer.closed or data.draw(st.integers(0, 9), label="reconnect") == 9:
            how = "closed" if peer.closed else data.draw(st.sampled_from(["bye", "drop"]), label="leave by")
            mode = data.draw(st.sampled_from(["login", "resume", "pipelined", "hello", "raw"]), label="come back")
            self._call(self._leave, peer, how)
            peer = self.clients[i] = self._call(self._open, peer.name, mode, peer.token)
            note(f"{peer.name} left ({how}) and came back ({mode}): "
                 f"{'closed (refused)' if peer.closed else peer.state.name}")
            if peer.closed or data.draw(st.booleans(), label="send nothing yet"):
                return
        ftype = data.draw(self._frame_types(peer), label="frame type")
        event = data.draw(frames(ftype, self.hints), label="frame")
        frame = proto.encode(event)  # raises LocalProtocolError if the strategy made a frame that is not well-formed
        assert len(frame) <= self.live.config.max_frame_bytes, f"the strategy made a {len(frame)}-byte frame"
        state = peer.state.name
        hypothesis_event(f"{ftype.name} in {state}" if peer.legal(ftype) else f"{ftype.name} illegal in {state}")
        note(f"{peer.name} [{state}] sends {brief(event)} ({len(frame)} bytes: {_short_hex(frame)})")
        outcome = self._call(answer, peer, event, self.acks)
        hypothesis_event(f"{ftype.name} in {state}: {outcome}")
        note(f"  -> {outcome}")

    @rule(data=st.data())
    def burst(self, data):
        """Some clients each send a few frames back to back, all at the same time; every answer is checked."""
        plans = []
        for i in data.draw(st.lists(st.integers(0, len(self.clients) - 1), min_size=1, unique=True), label="clients"):
            peer = self.clients[i]
            kinds = [] if peer.closed else pipelinable(peer)
            if not kinds:
                continue
            drawn = data.draw(st.lists(st.sampled_from(kinds).flatmap(lambda f: frames(f, self.hints)),
                                       min_size=1, max_size=4), label=f"{peer.name} burst")
            events: list[proto.Event] = []
            for event in drawn:  # distinct request ids, so that every answer has one owner
                taken = {e.request_id for e in events}
                events.append(dataclasses.replace(event, request_id=fresh_id(event.request_id - 1, taken)))
            note(f"{peer.name} [{peer.state.name}] sends at once: {[brief(e, 160) for e in events]}")
            plans.append((peer, events))
        if plans:
            for (peer, _), outcomes in zip(plans, self._call(self._bursts, plans), strict=True):
                note(f"  {peer.name} -> {outcomes}")

    async def _bursts(self, plans) -> list[list[str]]:
        results: list[list[str]] = [[] for _ in plans]

        async def run(i, peer, events):
            results[i] = await answer_many(peer, events, self.acks)

        try:
            async with trio.open_nursery() as nursery:
                for i, (peer, events) in enumerate(plans):
                    nursery.start_soon(run, i, peer, events)
        except BaseExceptionGroup as group:  # report the first bug as itself, as a single client would
            bugs = group.subgroup(lambda exc: isinstance(exc, ServerBug))
            if bugs is None:
                raise
            while isinstance(bugs, BaseExceptionGroup):
                bugs = bugs.exceptions[0]
            raise bugs from group
        return results

    @staticmethod
    def _frame_types(peer: Peer) -> st.SearchStrategy[FrameType]:
        """Any client frame one time in eight (mostly illegal in the state); else a legal one, requests with a
        reply three times as often as the rest (which end the connection or are answered by nothing)."""
        legal = [f for f in CLIENT_FRAMES if peer.legal(f)]
        if not legal:
            return st.sampled_from(CLIENT_FRAMES)
        requests = [f for f in legal if REPLIES[f].final not in (None, FrameType.BYE)]
        others = [f for f in legal if f not in requests]
        return weighted(*[(6, st.sampled_from(requests))] * bool(requests)
                        + [(1, st.sampled_from(others))] * bool(others)
                        + [(1, st.sampled_from(CLIENT_FRAMES))])

    def send_in_its_state(self, event: proto.Event) -> str:
        """Send ``event`` from slot 0, first (re)connecting it into a state where ``event`` is legal (preferring
        AUTHENTICATED); then the bystanders chat. For a sweep of ``boundary_events`` outside hypothesis."""
        modes = {State.AUTHENTICATED: "login", State.UNAUTHENTICATED: "hello", State.HANDSHAKE: "raw"}
        mode = next(modes[state] for state in modes if next_state(state, proto.CLIENT, event.FRAME) is not None)
        if not self.clients:
            self.clients.append(self._call(self._open, FUZZ_USERS[0], mode, None))
        peer = self.clients[0]
        if peer.closed or not peer.legal(event.FRAME) or peer.state is not State.AUTHENTICATED and mode == "login":
            self._call(self._leave, peer, "bye")
            peer = self.clients[0] = self._call(self._open, peer.name, mode, None)
            if peer.closed:
                raise ServerBug(f"{peer.name} could not connect ({mode}) to send {brief(event)}")
        outcome = self._call(answer, peer, event, self.acks)
        self.bystanders_keep_chatting()
        return outcome

    def rejoin(self) -> None:
        """Slot 0 logs in (if it is not) and joins the rooms of the hints again: a sweep's LEAVE left them."""
        for room in self.hints.rooms:
            self.send_in_its_state(proto.Join(room, request_id=1))

    async def _leave(self, peer: Peer, how: str) -> None:
        if not peer.closed and how == "bye" and peer.legal(FrameType.BYE):
            await answer(peer, proto.Bye(CloseReason.CLIENT_QUIT), self.acks)
        await peer.aclose()

    # -- invariants -----------------------------------------------------------------------------------------------
    @invariant()
    def bystanders_keep_chatting(self):
        """bya says something in #lobby: bya gets the ACK, byb the MESSAGE, both in seq order (spec §9.4)."""
        self._call(self._bystanders_chat)

    async def _bystanders_chat(self) -> None:
        a, b = self.bystanders
        cmid = next(self._cmids)
        body = f"tick {cmid}"
        try:
            with trio.fail_after(STEP_TIMEOUT_S):
                ack = await a.reply_to(proto.Send(LOBBY, cmid, body, request_id=a.rid()))
                if not isinstance(ack, proto.Ack) or ack.duplicate:
                    raise ServerBug(f"the bystander's SEND got {ack!r}")
                self.acks.append((a.name, ack, body))
                while True:
                    got = await b.next()
                    if isinstance(got, proto.ConnectionClosed):
                        raise ServerBug("bystander byb was disconnected")
                    if isinstance(got, proto.Message) and got.sender == a.name and got.client_msg_id == cmid:
                        if got.seq != ack.seq or got.body != body:
                            raise ServerBug(f"byb got {got!r} for ACK {ack!r}")
                        return
        except trio.TooSlowError:
            raise ServerBug(
                f"the bystanders stalled: message {cmid} not ACKed and delivered in {STEP_TIMEOUT_S} s") from None

    async def _hang_up(self) -> None:
        for peer in self.clients + self.bystanders:
            if not peer.closed:
                await peer.aclose()

    def teardown(self):
        try:
            if self.live.died is None:
                self.live.call(self._hang_up)  # else the server lingers for each one's last words at shutdown
            self.live.close()
            if not self._failed:
                self.live.check()
                check_store(self.live.db_path, self.acks)
        finally:
            self.live.remove()


def fuzz_settings(examples: int, steps: int, *, reproducible: bool, shrink: bool = True) -> settings:
    """Hypothesis settings for ``SessionMachine``. ``reproducible`` (CI): derandomized, no example database.
    Otherwise each run explores anew and keeps failures in .hypothesis/ to replay first. Without ``shrink`` a
    failure is reported at once with every step it took (shrinking one replays hundreds of examples, each
    with its own server: minutes)."""
    extra: dict = {"derandomize": True, "database": None} if reproducible else {}
    if not shrink:
        extra["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=list(HealthCheck), **extra)


def _short_hex(frame: bytes, keep: int = 48) -> str:
    return frame.hex() if len(frame) <= keep else f"{frame[:keep].hex()}...({len(frame)} bytes)"


# --- the stored data ----------------------------------------------------------------------------------------------

def check_store(db_path: Path, acks=(), registered_first=FUZZ_USERS + BYSTANDERS) -> None:
    """The SQLite file (server stopped) is consistent: gapless seqs (messages and events together, each seq once;
    a deleted message keeps its seq, shared with its DELETED event, and so does an action with its ACTION event),
    cursors within last_seq, every ACK stored (a deleted one as its tombstone, an edited one with its latest text),
    and the edits and reactions as their events tell them (spec §9.16): an edited message holds its latest EDIT's
    text, an action's body is "/me " and its ACTION event's text, and the reactions stored are what the REACT and
    UNREACT events add up to (a client counts them that way), none on a deleted message."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        problems = []
        for conv_id, last_seq in db.execute("SELECT id, last_seq FROM conversations"):
            problems += _conversation_problems(db, conv_id, last_seq)
        for user_id, conv_id, delivered, read, last_seq in db.execute(
                "SELECT k.user_id, k.conv_id, k.delivered_seq, k.read_seq, c.last_seq"
                " FROM cursors k JOIN conversations c ON c.id = k.conv_id"):
            if not (0 <= delivered <= last_seq and 0 <= read <= last_seq):
                problems.append(f"user {user_id} conversation {conv_id}: cursors {delivered}/{read} > {last_seq}")
        for sender, ack, body in acks:
            db_id = ack.client_msg_id - (1 << 64) if ack.client_msg_id >= 1 << 63 else ack.client_msg_id
            row = db.execute("SELECT m.seq, m.body, EXISTS (SELECT 1 FROM events e WHERE e.conv_id = m.conv_id"
                             " AND ((e.seq = m.seq AND e.kind = ?) OR (e.target_seq = m.seq AND e.kind = ?)))"
                             " FROM messages m JOIN users u ON u.id = m.sender_id"
                             " WHERE u.name = ? AND m.client_msg_id = ?",
                             (_DELETED, _EDIT, sender, db_id)).fetchone()
            if row is None or row[0] != ack.seq or (not ack.duplicate and not row[2] and row[1] != body):
                problems.append(f"ACK {ack!r} of {sender}: stored as {row!r}")
        problems += _display_name_problems(db, registered_first)
        if problems:
            raise ServerBug("stored data inconsistent:\n" + "\n".join(problems))
    finally:
        db.close()


_DELETED, _EDIT, _REACT, _UNREACT, _ACTION = (int(k) for k in (
    proto.EventKind.DELETED, proto.EventKind.EDIT, proto.EventKind.REACT, proto.EventKind.UNREACT,
    proto.EventKind.ACTION))
#: Events at the seq of a message (it is the message), not at one of their own.
_AT_A_MESSAGE = (_DELETED, _ACTION)


def _conversation_problems(db: sqlite3.Connection, conv_id: int, last_seq: int) -> list[str]:
    problems = []
    where = f"conversation {conv_id}"
    messages = {seq: (sender_id, body) for seq, sender_id, body in db.execute(
        "SELECT seq, sender_id, body FROM messages WHERE conv_id = ?", (conv_id,))}
    events = db.execute("SELECT seq, kind, actor_id, target_id, target_seq, text FROM events WHERE conv_id = ?"
                        " ORDER BY seq", (conv_id,)).fetchall()
    seqs = sorted(list(messages) + [s for s, kind, *_ in events if kind not in _AT_A_MESSAGE])  # one seq each
    if seqs != list(range(1, last_seq + 1)):
        problems.append(f"{where}: last_seq {last_seq}, stored seqs {_ranges(seqs)}")
    stray = {s for s, kind, *_ in events if kind in _AT_A_MESSAGE} - set(messages)
    if stray:
        problems.append(f"{where}: DELETED or ACTION events at seqs {sorted(stray)} that are no message")
    deleted = {s for s, kind, *_ in events if kind == _DELETED}
    actions = {s: text for s, kind, _, _, _, text in events if kind == _ACTION}
    for seq, text in actions.items():
        if messages.get(seq, (None, None))[1] != ACTION_PREFIX + text:
            problems.append(f"{where}: action {seq} {text!r} stored as the message {messages.get(seq)!r}")
    latest_edit: dict[int, str] = {}
    reacted: set[tuple[int, int, str]] = set()  # (message seq, user id, reaction), replayed from the events
    for seq, kind, actor_id, target_id, target_seq, text in events:
        if kind not in (_EDIT, _REACT, _UNREACT):
            continue
        sender_id = messages.get(target_seq, (None, None))[0]
        if not target_seq < seq or sender_id is None:
            problems.append(f"{where}: event {seq} (kind {kind}) names no earlier message ({target_seq})")
            continue
        if target_id != sender_id or kind == _EDIT and actor_id != sender_id:
            problems.append(f"{where}: event {seq} (kind {kind}) on message {target_seq} of user {sender_id} has "
                            f"actor {actor_id}, target {target_id}")
        if kind == _EDIT:
            latest_edit[target_seq] = text
        elif (kind == _REACT) == ((target_seq, actor_id, text) in reacted):
            problems.append(f"{where}: event {seq} repeats a reaction or takes back none: {kind} {text!r} of user "
                            f"{actor_id} on message {target_seq} (spec §9.16: neither takes a seq)")
        else:
            (reacted.add if kind == _REACT else reacted.discard)((target_seq, actor_id, text))
    for seq, text in latest_edit.items():
        expected = ACTION_PREFIX + text if seq in actions else text
        if seq not in deleted and messages[seq][1] != expected:
            problems.append(f"{where}: message {seq} holds {messages[seq][1]!r}, its latest edit says {text!r}")
    stored = set(db.execute("SELECT seq, user_id, reaction FROM reactions WHERE conv_id = ?", (conv_id,)).fetchall())
    expected = {key for key in reacted if key[0] not in deleted}
    if stored != expected:
        problems.append(f"{where}: reactions stored {sorted(stored)}, the events add up to {sorted(expected)}")
    per_user: dict[tuple[int, int], int] = {}
    for seq, user_id, _ in stored:
        per_user[seq, user_id] = per_user.get((seq, user_id), 0) + 1
    if any(n > REACTIONS_PER_MESSAGE for n in per_user.values()):
        problems.append(f"{where}: more than {REACTIONS_PER_MESSAGE} reactions of one user on one message: {per_user}")
    return problems


#: What a display name may not hold (spec §9.17): control, format, surrogate, private-use, unassigned, line and
#: paragraph separators; ZWNJ and ZWJ excepted.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_JOINERS = {"\u200c", "\u200d"}


def _display_name_problems(db: sqlite3.Connection, registered_first: tuple[str, ...]) -> list[str]:
    """Every stored display name follows the rule of spec §9.17, and none looks like another user's display name,
    nor like the login name of another of ``registered_first`` (users made before any display name was set: one
    registered later may look like a display name set before, spec §9.17)."""
    problems = []
    users = db.execute("SELECT id, name, display_name FROM users").fetchall()
    marks = {skeleton(name): name for _, name, _ in users if name in registered_first}  # what those logins look like
    for _, name, display in users:
        if not display:
            continue
        if (display != unicodedata.normalize("NFC", display) or len(display) > proto.MAX_DISPLAY_NAME_CHARS
                or display != display.strip() or not skeleton(display)
                or any(unicodedata.category(ch) in _REFUSED_CATEGORIES and ch not in _JOINERS for ch in display)):
            problems.append(f"{name}'s display name {display!r} breaks the rule")
        other = marks.get(skeleton(display), name)
        if other != name:
            problems.append(f"{name}'s display name {display!r} looks like {other}'s name")
        marks.setdefault(skeleton(display), name)
    return problems


def _ranges(seqs: list[int]) -> str:
    return str(seqs) if len(seqs) <= 12 else f"{seqs[:6]}...{seqs[-6:]} ({len(seqs)} rows)"
