"""Session-level fuzzing: well-formed frames of every type, in every state, never hurt the server (issue 9).

How this works: tests/fuzzframes.py makes the frames (from proto's declarations and state table) and reads what
answers them from the spec; tests/sessionfuzz.py drives a real server with them and checks, after every frame,
what the spec and DESIGN.md "Failure is local" promise (its docstring lists it). Here:

- every client frame type has a strategy and a row in the spec, and every frame drawn is well-formed;
- ``test_session_fuzz``: the hypothesis state machine, a bounded run (derandomized, no example database, so a run
  is reproducible; a failure is reported at once with all its steps, ``CHORUS_FUZZ_SHRINK=1`` shrinks it first,
  which takes minutes). ``CHORUS_FUZZ_EXAMPLES=2000`` (and ``CHORUS_FUZZ_STEPS``, default 50) runs longer with
  fresh randomness each time, shrinks, and keeps failures in .hypothesis/ to replay; so does fuzz/fuzz_session.py;
- ``test_boundary_sweep``: deterministic, every boundary variant of every client frame (fuzzframes.boundary_events);
- issue 9 item 1 as a plain regression test: seqs of 2**63 and 2**64 - 1 in HISTORY, SYNC, DELIVERED and READ.
"""
from __future__ import annotations

import dataclasses
import os
import sqlite3

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from chorus import proto
from fuzzframes import CLIENT_FRAMES, REPLIES, Hints, boundary_events, frames, spec_frame_table
from chorus.proto import Direction, FrameType
from sessionfuzz import (LOBBY, VERSIONS, LiveServer, PageCheck, Peer, ServerBug, SessionMachine, answer,
                        check_store, fuzz_settings)

EXAMPLES = int(os.environ.get("CHORUS_FUZZ_EXAMPLES", "0"))
STEPS = int(os.environ.get("CHORUS_FUZZ_STEPS", "50"))
SHRINK = os.environ.get("CHORUS_FUZZ_SHRINK") == "1"  # the default run reports a failure unshrunk, at once
#: The default run: about 15 s on two shared cores. More examples find more, slower (see fuzz/fuzz_session.py).
DEFAULT_EXAMPLES = 20
REPLY_NAMES = {f: proto.EVENT_TYPES[reply.final].__name__ for f, reply in REPLIES.items() if reply.final}


# --- the frames ------------------------------------------------------------------------------------------------

def test_every_client_frame_type_has_a_strategy_and_a_spec_row():
    """Generated from proto's tables: a new client frame type is fuzzed, or this fails and says why."""
    assert set(CLIENT_FRAMES) >= {FrameType.HELLO, FrameType.SEND, FrameType.SYNC, FrameType.PONG}
    table = spec_frame_table()
    for ftype in CLIENT_FRAMES:
        frames(ftype)  # NotImplementedError names a construct the strategies do not know
        assert len(boundary_events(ftype)) > 1, ftype
        assert ftype in table, f"spec §5's frame table has no row for {ftype.name}: what answers it?"
        assert table[ftype][0] in ("C→S", "both"), ftype
        assert ftype in REPLIES


def _well_formed(event: proto.Event) -> None:
    frame = proto.encode(event)
    assert len(frame) <= proto.DEFAULT_MAX_FRAME_BYTES
    assert proto.decode(frame) == event
    assert len(proto.encode(event, compress_threshold=None)) - proto.HEADER_BYTES <= \
        proto.LARGEST_BODY_BYTES[event.FRAME]


@pytest.mark.parametrize("ftype", CLIENT_FRAMES, ids=lambda f: f.name)
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_frames_are_well_formed(ftype, data):
    """Every drawn frame encodes, fits max_frame_bytes and its type's largest body, and decodes back to itself."""
    _well_formed(data.draw(frames(ftype, Hints())))


def test_boundary_events_are_well_formed():
    for ftype in CLIENT_FRAMES:
        for event in boundary_events(ftype):
            _well_formed(event)


# --- the checks catch what they should -------------------------------------------------------------------------

def _stored(*seqs):
    return tuple(proto.StoredMessage(seq, 0, "f0", seq, "x") for seq in seqs)


FUZZ = proto.Conversation.room("fuzz")


@pytest.mark.parametrize("request_, replies", [
    (proto.History(FUZZ, Direction.AFTER, 3, 10), [proto.HistoryPage(FUZZ, _stored(4, 6), False)]),  # a gap
    (proto.History(FUZZ, Direction.AFTER, 3, 10), [proto.HistoryPage(FUZZ, _stored(5, 6), False)]),  # not after 3
    (proto.History(FUZZ, Direction.BEFORE, 3, 10), [proto.HistoryPage(FUZZ, _stored(2, 3), False)]),  # not below
    (proto.History(FUZZ, Direction.AFTER, 0, 2), [proto.HistoryPage(FUZZ, _stored(1, 2, 3), False)]),  # over limit
    (proto.History(FUZZ, Direction.AFTER, 0, 5), [proto.HistoryPage(FUZZ, _stored(1, 2), True)]),  # has_more?
    (proto.Sync((proto.Position(FUZZ, 2),)), [proto.SyncPage(FUZZ, _stored(4), False)]),  # skips 3
    (proto.Sync((proto.Position(FUZZ, 2),)), [proto.SyncPage(FUZZ, _stored(3), True), proto.SyncDone()]),  # unfinished
    (proto.Sync((proto.Position(FUZZ, 2),)), [proto.SyncDone()]),  # no page at all
], ids=["gap", "after", "before", "limit", "has_more", "sync-skips", "sync-unfinished", "sync-no-page"])
def test_page_checks_catch_bad_pages(request_, replies):
    check = PageCheck(request_, max_page=100)
    with pytest.raises(ServerBug):
        for reply in replies:
            check.check(reply)


def test_page_checks_pass_good_pages():
    check = PageCheck(proto.Sync((proto.Position(FUZZ, 2), proto.Position(LOBBY, 0))), max_page=2)
    for reply in [proto.SyncPage(FUZZ, _stored(3, 4), True), proto.SyncPage(FUZZ, _stored(5), False),
                  proto.SyncPage(LOBBY, (), False), proto.SyncDone()]:
        check.check(reply)
    history = PageCheck(proto.History(FUZZ, Direction.BEFORE, 0, 0), max_page=2)
    history.check(proto.HistoryPage(FUZZ, _stored(8, 9), True))


# --- the session fuzzer ------------------------------------------------------------------------------------------

@pytest.mark.timeout(900 + 3 * EXAMPLES)  # shrinking a failure (CHORUS_FUZZ_SHRINK=1, long runs) takes minutes
def test_session_fuzz():
    """Random frames in random states from three clients; the server, the replies, the bystanders and the stored
    data hold (tests/sessionfuzz.py)."""
    if EXAMPLES:
        config = fuzz_settings(EXAMPLES, STEPS, reproducible=False)
    else:
        config = fuzz_settings(DEFAULT_EXAMPLES, STEPS, reproducible=True, shrink=SHRINK)
    run_state_machine_as_test(SessionMachine, settings=config)


def test_boundary_sweep():
    """Deterministic: every one-boundary-value variant of a plain frame of every client type (boundary_events:
    u64 fields at 0, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, strings empty and maximal, arrays empty and of 1000
    items...), each sent in a state where it is legal, with the same checks as the fuzzer after each."""
    machine = SessionMachine()
    outcomes = {}
    try:
        for ftype in CLIENT_FRAMES:
            machine.rejoin()
            for event in boundary_events(ftype, machine.hints):
                outcomes[event] = machine.send_in_its_state(event)
    finally:
        machine.teardown()
    reached = {type(e).__name__ for e, outcome in outcomes.items() if outcome == REPLY_NAMES.get(e.FRAME)}
    assert {"History", "Sync", "Send", "Join", "GetCursors"} <= reached, outcomes  # the plain ones got through


# --- issue 9 item 1 --------------------------------------------------------------------------------------------

_BIG_SEQS = [1 << 63, (1 << 64) - 1]


def _seq_frames(seq: int) -> list[proto.Event]:
    return [
        proto.History(LOBBY, Direction.BEFORE, seq, 10),
        proto.History(LOBBY, Direction.AFTER, seq, 10),
        proto.Sync((proto.Position(LOBBY, seq),)),
        proto.Delivered(LOBBY, seq),
        proto.Read(LOBBY, seq),
    ]


@pytest.mark.parametrize("seq", _BIG_SEQS, ids=["2**63", "2**64-1"])
@pytest.mark.parametrize("which", range(5), ids=["HISTORY-BEFORE", "HISTORY-AFTER", "SYNC", "DELIVERED", "READ"])
def test_seq_beyond_sqlite_integers_gets_an_answer_and_the_server_stays_up(which, seq):
    """Issue 9 item 1: a seq of 2**63 or more reached SQLite, OverflowError left serve_listeners and the server
    exited. Now the request gets its page (or an ERROR that is not INTERNAL), the connection stays usable, and
    the bystanders keep chatting."""
    _one_frame_beside_bystanders(_seq_frames(seq)[which])


def test_a_server_bug_is_caught(monkeypatch):
    """The checks really fail: a server whose HISTORY handler raises is reported, not passed."""
    from chorus.server import _session

    async def broken(self, ev):
        raise RuntimeError("planted bug")

    monkeypatch.setitem(_session._HANDLERS, proto.History, broken)
    with pytest.raises(ServerBug):
        _one_frame_beside_bystanders(proto.History(LOBBY, Direction.BEFORE, 0, 10))


#: Mallory's message 1 of #lobby edited, reacted to and an action beside it (spec §9.16), with the seq each takes;
#: a repeated REACT and the UNREACT of a reaction that is not there take none, a retried action is a duplicate.
_MESSAGE_EVENTS = (
    (proto.SendAction(LOBBY, 10, "waves 👋"), "Ack"),  # 2: an action
    (proto.EditMessage(LOBBY, 1, "some history, edited"), "Ok"),  # 3
    (proto.EditMessage(LOBBY, 2, "waves again"), "Ok"),  # 4: an action edited
    (proto.React(LOBBY, 1, "👍", True), "Ok"),  # 5
    (proto.React(LOBBY, 1, "👍", True), "Ok"),  # already there: no seq
    (proto.React(LOBBY, 2, "👩\u200d💻", True), "Ok"),  # 6
    (proto.React(LOBBY, 1, "👍", False), "Ok"),  # 7: UNREACT
    (proto.React(LOBBY, 1, "👍", False), "Ok"),  # not there: no seq
    (proto.React(LOBBY, 1, "a b", True), "INVALID_REQUEST"),
    (proto.EditMessage(LOBBY, 3, "not a message"), "NOT_FOUND"),  # 3 is an EDIT event
    (proto.SendAction(LOBBY, 10, "waves 👋"), "Ack"),  # a retry: ACK duplicate, nothing stored
    (proto.DeleteMessage(LOBBY, 2), "Ok"),  # the action goes, with its reaction
)


def test_edits_reactions_and_actions_are_stored_as_their_events_say():
    """Through a real server: the outcomes spec §5.60-§5.62 give, bob (a bystander checking gaps) sees every seq
    once, and the store check (edited text, "/me" bodies, reactions replayed from the events) passes."""
    events, expected = zip(*_MESSAGE_EVENTS, strict=True)
    assert _one_frame_beside_bystanders(*events) == list(expected)


@pytest.mark.parametrize("tamper", [
    "UPDATE messages SET body = 'the old text' WHERE seq = 1",  # the edit lost
    "UPDATE messages SET body = 'waves' WHERE seq = 2",  # an action without its "/me "
    "INSERT INTO reactions SELECT conv_id, 1, sender_id, '+1' FROM messages WHERE seq = 1",  # one no event added
], ids=["edit-lost", "action-body", "reaction-without-event"])
def test_the_store_check_catches_edits_and_reactions_gone_wrong(tamper):
    events = [event for event, _ in _MESSAGE_EVENTS[:-1]]  # the action not deleted

    def tampered(db_path):
        with sqlite3.connect(db_path) as db:
            assert db.execute(tamper).rowcount == 1

    with pytest.raises(ServerBug, match="stored data inconsistent"):
        _one_frame_beside_bystanders(*events, tamper=tampered)


#: Display names (spec §5.63-§5.65, §9.17), sent by mallory beside alice and bob.
_DISPLAY_NAME_EVENTS = (
    (proto.SetDisplayName("Cafe\u0301 ☕"), "Ok"),  # stored in NFC
    (proto.SetDisplayName("ALICE"), "INVALID_NAME"),  # alice's login name, case folded
    (proto.SetDisplayName("a.l\u0456ce"), "INVALID_NAME"),  # the same, with a dot and a Cyrillic і
    (proto.SetDisplayName("Mallory"), "Ok"),  # her own login name is fine
    (proto.SetDisplayName(" Mallory"), "INVALID_NAME"),  # a space at an end
    (proto.SetDisplayName("a\u202eb"), "INVALID_NAME"),  # a bidi override
    (proto.SetDisplayName("☕☕"), "INVALID_NAME"),  # no letter or digit
    (proto.SetDisplayName("a" * 33), "INVALID_NAME"),  # 33 characters
    (proto.GetUsers(("mallory", "nobody", "alice", "mallory")), "UserList"),
    (proto.SetDisplayName("👩\u200d💻 Mallory"), "Ok"),  # ZWJ inside
    (proto.SetDisplayName(""), "Ok"),  # cleared
)


def test_display_names_follow_the_rule():
    """Through a real server: the outcomes spec §5.63-§5.65 and §9.17 give, and the store check passes."""
    events, expected = zip(*_DISPLAY_NAME_EVENTS, strict=True)
    assert _one_frame_beside_bystanders(*events) == list(expected)


@pytest.mark.parametrize("tamper", [
    "UPDATE users SET display_name = 'A1ice' WHERE name = 'mallory'",  # looks like alice's login name
    "UPDATE users SET display_name = 'a' || char(10) || 'b' WHERE name = 'mallory'",  # a line break
    "UPDATE users SET display_name = 'Cafe' || char(769) WHERE name = 'mallory'",  # not NFC
], ids=["looks-like-alice", "control", "not-nfc"])
def test_the_store_check_catches_display_names_gone_wrong(tamper):
    def tampered(db_path):
        with sqlite3.connect(db_path) as db:
            assert db.execute(tamper).rowcount == 1

    with pytest.raises(ServerBug, match="stored data inconsistent"):
        _one_frame_beside_bystanders(proto.SetDisplayName("Mallory"), tamper=tampered)


def _one_frame_beside_bystanders(*events: proto.Event, tamper=None) -> list[str]:
    """alice, bob and mallory in #lobby with a message; mallory sends ``events``; then everyone carries on. Returns
    the outcomes of ``events``. ``tamper(db_path)``, if given, changes the stored data before it is checked."""
    live = LiveServer()
    acks: list = []
    try:
        try:
            outcomes = live.call(_one_frame, live, events, acks)
        except ServerBug:
            live.diagnose()  # ServerDied, if the server is going down
            raise
        live.check()
        live.close()
        if tamper is not None:
            tamper(live.db_path)
        check_store(live.db_path, acks, registered_first=("alice", "bob", "mallory"))
        return outcomes
    finally:
        live.close()
        live.remove()


async def _one_frame(live: LiveServer, events: tuple[proto.Event, ...], acks: list) -> list[str]:
    peers: list[Peer] = []
    try:
        with trio.fail_after(30):
            return await _mallory_beside_alice_and_bob(live, events, acks, peers)
    finally:
        for peer in peers:  # else the server lingers at shutdown, waiting for their side of the close
            if not peer.closed:
                await peer.aclose()


async def _mallory_beside_alice_and_bob(live: LiveServer, events: tuple[proto.Event, ...], acks: list,
                                        peers: list) -> list[str]:
    for name in ("alice", "bob", "mallory"):
        peer = await Peer.connect(name, live.port, set())
        peer.check_gaps = name != "mallory"
        peers.append(peer)
        for request in (proto.Hello(*VERSIONS, "item1"), proto.Register(name, "correct horse battery"),
                        proto.Sync(()), proto.Join(LOBBY.name)):
            reply = await peer.reply_to(dataclasses.replace(request, request_id=peer.rid()))
            assert type(reply) is proto.EVENT_TYPES[REPLIES[request.FRAME].final], reply
    alice, bob, mallory = peers

    async def send(peer, event):
        return await answer(peer, dataclasses.replace(event, request_id=peer.rid()), acks)

    assert await send(mallory, proto.Send(LOBBY, 1, "some history")) == "Ack"
    outcomes = []
    for event in events:
        outcomes.append(await send(mallory, event))
        assert "closed" not in outcomes[-1], outcomes
        live.check()
    assert await send(mallory, proto.Ping(7)) == "Pong"
    assert await send(alice, proto.Send(LOBBY, 2, "still here?")) == "Ack"
    while not isinstance(got := await bob.next(), proto.Message) or got.body != "still here?":
        assert not isinstance(got, proto.ConnectionClosed)
    return outcomes
