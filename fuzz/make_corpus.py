"""Write the seed corpus of fuzz/fuzz_framing.py into fuzz/corpus/ (spec/PROTOCOL.md §2, §5, §11).

How this works: each seed is one fuzz input, byte 0 choosing how the harness
cuts the rest (0 = whole) and the rest being what a peer sent. The seeds are
one example frame of every frame type, a compressed MESSAGE and SYNC_PAGE, two
whole legal sessions (what a client sends, what a server sends) and, when
spec/PROTOCOL.md exists, the bytes of every ```hex and ```hex-invalid block in
it. Files are named after what they hold, so rerunning rewrites the same
names; files the fuzzer added (named by their SHA-1) are left alone.

Nothing here lists frame types (STYLE.md §20): the frame types come from
``FrameType`` (a type without a hand-picked example below gets the plain event
tests/fuzzframes.py builds from its declaration in ``proto._wire``), and the
frames of each session are those the state table (``proto._state``, spec §8)
lets that side send once authenticated, at the newest protocol version.
tests/test_fuzz_short.py fails when a frame type has no seed or a seed is stale.

    python fuzz/make_corpus.py     # or: make corpus
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # runnable from a bare checkout; tests/ has fuzzframes

from chorus import proto  # noqa: E402
from chorus.proto import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Conversation, FrameType, State  # noqa: E402
from chorus.proto._state import CLIENT, SERVER, TRANSITIONS  # noqa: E402
from fuzzframes import boundary_events  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
SPEC = ROOT / "spec" / "PROTOCOL.md"
WHOLE = b"\x00"  # control byte: feed the payload in one piece

general = Conversation.room("general")
bob = Conversation.direct("bøb")
text = "Hello, wörld! 👋 Ça va? 日本語のテキスト"
msg = proto.StoredMessage(41, 1766842000000, "alice", 9001, text)

#: Hand-picked values (non-ASCII text, arrays of two) for the frame types of version 1.
HAND_PICKED: list[proto.Event] = [
    proto.Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, "chorus-cli/0.1", request_id=1),
    proto.Welcome(PROTOCOL_VERSION, "chorus/0.1", 1 << 20, 4096, 15000, 50, 100, 100, 100, request_id=1),
    proto.Register("alice", "correct horse battery", request_id=2),
    proto.Login("alice", "correct horse battery", request_id=2),
    proto.Resume("Kw2AhMODDTcFYCJdT6o4GZYLOQ6-YNSmcPWgMFto9ng", request_id=2),
    proto.AuthOk("alice", "Kw2AhMODDTcFYCJdT6o4GZYLOQ6-YNSmcPWgMFto9ng", 1766842000000, request_id=2),
    proto.Logout(request_id=20),
    proto.Ok(request_id=5),
    proto.Join("general", request_id=3),
    proto.Joined("general", 41, 3, request_id=3),
    proto.Leave("general", request_id=4),
    proto.ListRooms(request_id=6),
    proto.RoomList((proto.RoomInfo("general", 3, 41, True), proto.RoomInfo("random", 12, 0, False)), request_id=6),
    proto.Members("general", request_id=7),
    proto.MemberList("general", (proto.MemberInfo("alice", proto.Status.ONLINE),
                                 proto.MemberInfo("bob", proto.Status.OFFLINE)), request_id=7),
    proto.Send(general, 9001, text, request_id=8),
    proto.Ack(general, 9001, 42, 1766842000000, False, request_id=8),
    proto.Message(general, 42, 1766842000000, "alice", 9001, text),
    proto.Sync((proto.Position(general, 40), proto.Position(bob, 0)), request_id=9),
    proto.SyncPage(general, (msg, proto.StoredMessage(42, 1766842000500, "bob", 7, "hi")), True, request_id=9),
    proto.SyncDone(request_id=9),
    proto.History(general, proto.Direction.BEFORE, 0, 50, request_id=10),
    proto.HistoryPage(general, (msg,), False, request_id=10),
    proto.Delivered(bob, 12),
    proto.Read(bob, 11),
    proto.Receipt(bob, "bøb", proto.ReceiptKind.READ, 11),
    proto.GetCursors(bob, request_id=11),
    proto.Cursors(bob, (proto.CursorInfo("alice", 12, 11), proto.CursorInfo("bøb", 12, 12)), request_id=11),
    proto.Presence("bob", proto.Status.ONLINE),
    proto.Typing(general),
    proto.UserTyping(general, "bob"),
    proto.Ping(0x0123456789ABCDEF, request_id=12),
    proto.Pong(0x0123456789ABCDEF, request_id=12),
    proto.Error(proto.ErrorCode.NOT_MEMBER, 0, "not a member of #random", request_id=13),
    proto.GoAway(proto.CloseReason.SHUTDOWN, 5000, "restarting"),
    proto.Bye(proto.CloseReason.CLIENT_QUIT),
]


def _examples() -> dict[FrameType, proto.Event]:
    """One event of every frame type: the hand-picked one, else the plain one built from proto's declaration."""
    picked = {event.FRAME: event for event in HAND_PICKED}
    return {ftype: picked.get(ftype) or boundary_events(ftype)[0] for ftype in FrameType}


EXAMPLES = _examples()

COMPRESSED = {
    "MESSAGE": proto.Message(general, 43, 1766842001000, "alice", 9002,
                             "All work and no play makes Jack a dull boy. " * 12),  # under the harness' 600
    "SYNC_PAGE": proto.SyncPage(general, tuple(proto.StoredMessage(i, 1766842000000 + i, "alice", i, text)
                                               for i in range(1, 30)), False, request_id=9),
}


def _authenticated_frames(sender) -> list[proto.Event]:
    """The examples of every frame ``sender`` may send once authenticated without leaving that state (LOGOUT
    and BYE end a session, so the sessions below put them last), in frame type order."""
    moves = TRANSITIONS[(State.AUTHENTICATED, sender)]
    return [EXAMPLES[f] for f in sorted(moves) if moves[f] is State.AUTHENTICATED and f is not FrameType.BYE]


# What a client sends in one legal session, given a server that answers HELLO and LOGIN (as the harness does).
CLIENT_SESSION = [EXAMPLES[FrameType.HELLO], EXAMPLES[FrameType.LOGIN]] + _authenticated_frames(CLIENT) + [
    proto.Logout(request_id=20), proto.Bye(proto.CloseReason.CLIENT_QUIT)]

# What a server sends to a client that has sent HELLO.
SERVER_SESSION = [EXAMPLES[FrameType.WELCOME], EXAMPLES[FrameType.AUTH_OK]] + _authenticated_frames(SERVER) + [
    COMPRESSED["MESSAGE"], proto.Bye(proto.CloseReason.SHUTDOWN)]


def spec_blocks(path: Path = SPEC) -> list[tuple[str, bytes]]:
    """(kind, bytes) of every ```hex / ```hex-invalid block of the spec; [] when there is no spec yet."""
    if not path.exists():
        return []
    blocks = []
    for kind, body in re.findall(r"^```(hex(?:-invalid)?)[ \t]*\n(.*?)^```", path.read_text("utf-8"), re.M | re.S):
        try:
            blocks.append((kind, bytes.fromhex("".join(body.split()))))
        except ValueError:
            print(f"make_corpus: skipping a {kind} block that is not plain hex: {body[:40]!r}", file=sys.stderr)
    return blocks


def seeds() -> dict[str, bytes]:
    """File name → fuzz input."""
    out = {}
    for ftype, event in EXAMPLES.items():
        out[f"frame-{ftype.name}"] = WHOLE + proto.encode(event)
    for name, event in COMPRESSED.items():
        frame = proto.encode(event)
        assert frame[5] & proto.Flags.COMPRESSED, name
        out[f"frame-{name}-compressed"] = WHOLE + frame
    out["stream-client-session"] = WHOLE + b"".join(proto.encode(e) for e in CLIENT_SESSION)
    out["stream-server-session"] = WHOLE + b"".join(proto.encode(e) for e in SERVER_SESSION)
    out["stream-client-session-bytewise"] = b"\x01" + out["stream-client-session"][1:]
    for i, (kind, data) in enumerate(spec_blocks()):
        out[f"spec-{kind}-{i:03d}"] = WHOLE + data
    return out


def main() -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)
    for old in CORPUS.glob("spec-*"):  # the spec's examples change as it is edited
        old.unlink()
    written = seeds()
    for name, data in written.items():
        (CORPUS / name).write_bytes(data)
    print(f"wrote {len(written)} seeds to {CORPUS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
