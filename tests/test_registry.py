"""Registry tests (issue 10): every frame type has someone to handle it, on every side (spec §5, §8).

How this works. A frame nobody handles fails silently: the server ignores an unhandled request and the client
times out; the client library and the page drop an unknown push. So, for every frame type of proto:

- a frame a client may send (any state of the state table, ``proto._state.TRANSITIONS``) has a server handler:
  an entry of the session's ``_HANDLERS``, or a branch of the connection's own ``ClientConnection._dispatch``
  (PING, PONG, BYE, ERROR, SEND), read from its source: the ``proto.X`` its ``kind is``/``in`` tests name;
- a request (a client frame whose row in spec §5's frame table names a reply) has that reply in the client
  library's ``_REPLY``, and the client library's ``Client._dispatch`` handles the partial replies (SYNC_PAGE);
- a push (a frame the server may send that answers no request, plus BYE: spec §5 "push", request_id 0; and
  EVENTS, "push; or before a page of the reply to SYNC, HISTORY") is handled by the client library's
  ``Client._dispatch`` and by the page (``HANDLED_PUSHES`` of server/static/chorus.js, the keys of the table its
  ``_push`` dispatches on, read with node).

The frame types, who may send them and the replies come from proto and the spec (via tests/fuzzframes.py), so
a new frame type is checked as soon as it is declared. ``KNOWN_GAPS`` names the handlers known to be missing
(expected failures, not strict, so that the day one lands it shows as XPASS and its entry can go).
"""
from __future__ import annotations

import ast
import inspect
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from chorus import proto
from chorus.client import _client
from chorus.proto import EVENT_TYPES, FrameType
from chorus.proto._state import CLIENT, SERVER, TRANSITIONS
from chorus.server import _conn, _session
from fuzzframes import REPLIES, spec_frame_table

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "server" / "static" / "chorus.js"


def sent_by(role) -> set[FrameType]:
    """Every frame type ``role`` may send in some state (spec §8)."""
    return {f for (_, sender), moves in TRANSITIONS.items() if sender is role for f in moves}


CLIENT_FRAMES = sorted(sent_by(CLIENT))
SERVER_FRAMES = sorted(sent_by(SERVER))
#: Client frame → the frame that completes it on success, for the requests that have one (LOGOUT's is a BYE).
REQUESTS = {f: REPLIES[f] for f in CLIENT_FRAMES if f in REPLIES and REPLIES[f].final not in (None, FrameType.BYE)}
_REPLIES_TO_REQUESTS = {r.final for r in REQUESTS.values()} | {p for r in REQUESTS.values() for p in r.partial}
SPEC_TABLE = spec_frame_table()
#: The rows of spec §5 whose kind is "push", alone or first ("push; or before a page of the reply to ...": EVENTS).
SPEC_PUSHES = {f for f, (_, kind) in SPEC_TABLE.items() if kind.split(";")[0] == "push"}
#: What the server sends unasked: the frames it may send that answer no request, BYE, and the spec's pushes (EVENTS
#: is also a partial reply of SYNC and HISTORY, spec §5.46).
PUSHES = sorted((set(SERVER_FRAMES) - _REPLIES_TO_REQUESTS) | {FrameType.BYE} | SPEC_PUSHES)


#: (where, frame type name) → why its handler is missing today. Where: "server", "client", "page", "tables".
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _each(frames, where: str):
    """``frames`` as test parameters, those of ``KNOWN_GAPS`` at ``where`` as expected failures."""
    return [pytest.param(f, id=f.name, marks=pytest.mark.xfail(reason=KNOWN_GAPS[where, f.name], strict=False))
            if (where, f.name) in KNOWN_GAPS else pytest.param(f, id=f.name) for f in frames]


def compared_classes(function, module, var: str = "kind") -> set[type]:
    """The classes ``function`` tests ``var`` against: ``var is proto.X``, ``var == proto.X``,
    ``var in (proto.X, ...)``, ``var in NAME`` (a tuple or set of ``module``) or ``isinstance(var, proto.X)``.
    ``is not`` and ``not isinstance`` are not branches."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found: set[type] = set()

    def resolve(node) -> list[type]:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "proto":
            return [getattr(proto, node.attr)]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [cls for item in node.elts for cls in resolve(item)]
        if isinstance(node, ast.Name) and isinstance(getattr(module, node.id, None), (tuple, set, frozenset)):
            return list(getattr(module, node.id))
        return []

    negated = {id(node.operand) for node in ast.walk(tree)
               if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == var:
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, (ast.Is, ast.Eq, ast.In)):
                    found.update(resolve(right))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
              and len(node.args) == 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == var
              and id(node) not in negated):
            found.update(resolve(node.args[1]))
    return found


@pytest.mark.parametrize("ftype", _each(FrameType, "tables"))
def test_every_frame_is_in_the_tables(ftype):
    """Every frame type is someone's to send and has a row in spec §5's table; else the tests below miss it."""
    assert ftype in CLIENT_FRAMES or ftype in SERVER_FRAMES, f"no state of proto/_state.py lets one send {ftype.name}"
    assert ftype in SPEC_TABLE, f"spec §5's frame table has no row for {ftype.name}"
    assert ftype in EVENT_TYPES


def test_the_pushes_are_the_spec_pushes():
    """What this file derives as pushes agrees with spec §5's "push" rows (and BYE, PING, ERROR: both ways)."""
    assert SPEC_PUSHES <= set(PUSHES)
    assert {f for f in PUSHES if f in SPEC_TABLE} - SPEC_PUSHES == {FrameType.PING, FrameType.ERROR, FrameType.BYE}


# --- the server -------------------------------------------------------------------------------------------------

CONNECTION_HANDLES = compared_classes(_conn.ClientConnection._dispatch, _conn, var="event")


def test_the_connection_dispatch_is_read():
    """The parse of ``ClientConnection._dispatch`` finds its branches (if it is rewritten, teach this file)."""
    assert {proto.Ping, proto.Pong, proto.Bye, proto.Error, proto.Send} <= CONNECTION_HANDLES


@pytest.mark.parametrize("ftype", _each(CLIENT_FRAMES, "server"))
def test_server_handles_every_client_frame(ftype):
    event_type = EVENT_TYPES[ftype]
    assert event_type in _session._HANDLERS or event_type in CONNECTION_HANDLES, (
        f"the server has no handler for {ftype.name}: the session ignores it and the client waits for a reply "
        f"that never comes (add it to server/_session.py _HANDLERS)")


def test_server_handlers_are_for_client_frames():
    """A handler for a frame no client may send is dead code, or a frame missing from the state table."""
    handled = {cls.FRAME for cls in _session._HANDLERS} | {cls.FRAME for cls in CONNECTION_HANDLES}
    assert handled <= set(CLIENT_FRAMES), sorted(f.name for f in handled - set(CLIENT_FRAMES))


# --- the client library -------------------------------------------------------------------------------------------

CLIENT_HANDLES = compared_classes(_client.Client._dispatch, _client)


def test_the_client_dispatch_is_read():
    assert {proto.Message, proto.SyncPage, proto.Ping, proto.GoAway, proto.Bye} <= CLIENT_HANDLES


@pytest.mark.parametrize("ftype", _each(sorted(REQUESTS), "client"))
def test_client_library_knows_every_reply(ftype):
    reply = REQUESTS[ftype]
    expected = _client._REPLY.get(EVENT_TYPES[ftype])
    assert expected is EVENT_TYPES[reply.final], (
        f"client/_client.py _REPLY[{EVENT_TYPES[ftype].__name__}] is {expected and expected.__name__}; "
        f"spec §5 says {ftype.name} is answered by {reply.final.name}")
    for partial in reply.partial:  # SYNC_PAGE before SYNC_DONE: dispatched before the request_id match
        assert EVENT_TYPES[partial] in CLIENT_HANDLES, f"Client._dispatch does not handle {partial.name}"


def test_client_library_replies_are_requests():
    """Every ``_REPLY`` entry is a request of the spec with that reply (none left over from a removed frame)."""
    assert {cls.FRAME: reply.FRAME for cls, reply in _client._REPLY.items()} == {
        f: r.final for f, r in REQUESTS.items()}


@pytest.mark.parametrize("ftype", _each(PUSHES, "client"))
def test_client_library_handles_every_push(ftype):
    assert EVENT_TYPES[ftype] in CLIENT_HANDLES, (
        f"client/_client.py Client._dispatch drops {ftype.name}, a frame the server sends unasked")


# --- the page -------------------------------------------------------------------------------------------------------

def _page_pushes() -> set[str]:
    from conftest import service_required

    node = shutil.which("node")
    if node is None:
        service_required("node", "Node.js reads the page's push table (Debian package nodejs)")
    script = f"import({json.dumps(PAGE.as_uri())}).then((m) => console.log(JSON.stringify(m.HANDLED_PUSHES)))"
    result = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


@pytest.fixture(scope="module")
def page_pushes() -> set[str]:
    return _page_pushes()


@pytest.mark.parametrize("ftype", _each(PUSHES, "page"))
def test_page_handles_every_push(ftype, page_pushes):
    assert ftype.name in page_pushes, (
        f"server/static/chorus.js drops {ftype.name}, a frame the server sends unasked: add it to PUSH_HANDLERS")


def test_page_handles_nothing_but_pushes(page_pushes):
    assert page_pushes <= {f.name for f in PUSHES}, page_pushes - {f.name for f in PUSHES}
