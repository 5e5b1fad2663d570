"""Client frames for fuzzing a server, generated from proto's tables, and what the spec says answers them.

How this works. ``CLIENT_FRAMES`` is every frame type the state table (``proto._state``, spec §8) lets a client
send. For each, ``frames`` walks the construct declaration in ``proto._wire.BODIES`` (the one source of truth for
every body) and builds a hypothesis strategy: integers often at their boundaries (0, 1, 2**31, 2**63 - 1, 2**63,
2**64 - 1 within the field's width), strings empty, at their maximum in bytes (1- to 4-byte UTF-8 characters) or
short and random, arrays empty or of 1000 items, and often the ``Hints`` (an existing room or user, the right
password, a live token) so that requests get past the checks and reach the store. ``boundary_events`` lists, for
a deterministic sweep, a plain valid event and every variant of it with one field at a boundary. A construct the
walk does not know raises ``NotImplementedError``: a new frame type is fuzzed as soon as it is declared, or a
test says what to teach this file.

What answers each frame comes from spec/PROTOCOL.md: ``REPLIES`` from the "Reply / kind" column of §5's frame
table (with the frames a row says come "before a page of the reply to" a request: EVENTS before SYNC's and
HISTORY's pages), ``PUSHES`` from the same column, ``ERROR_CLOSES`` (which ERROR codes end the connection, with
which BYE) from §7.1. Every frame built here is well-formed: tests/test_session_fuzz.py encodes and decodes each.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from construct import FormatField
from hypothesis import strategies as st

from chorus import proto
from chorus.proto import CloseReason, ErrorCode, FrameType, _wire
from chorus.proto._state import TRANSITIONS

SPEC = Path(__file__).resolve().parent.parent / "spec" / "PROTOCOL.md"

#: Every frame type a client may send in some state (spec §8), straight from the state table.
CLIENT_FRAMES: tuple[FrameType, ...] = tuple(sorted(
    {frame for (_, sender), frames in TRANSITIONS.items() if sender is proto.CLIENT for frame in frames}))


# --- what spec/PROTOCOL.md says answers a frame ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reply:
    """What answers a client frame on success (spec §5 "Frame types"): ``final`` ends it, ``partial`` may precede."""

    final: FrameType | None
    partial: frozenset[FrameType] = frozenset()


_FRAME_ROW = re.compile(r"^\| 0x[0-9A-Fa-f]{2} \| `(\w+)` \| (C→S|S→C|both) \| (.*) \|$", re.M)
_ERROR_ROW = re.compile(r"^\| (\d{3}) \| `(\w+)` \| .* \| (.*) \|$", re.M)


def _spec_section(title: str) -> str:
    text = SPEC.read_text(encoding="utf-8")
    start = text.index(title)
    return text[start:text.index("\n### ", start + 1)]


def spec_frame_table() -> dict[FrameType, tuple[str, str]]:
    """FrameType → (direction, "Reply / kind" text), from the table opening spec §5."""
    return {FrameType[name]: (direction, kind) for name, direction, kind in
            _FRAME_ROW.findall(_spec_section("## 5. Frames"))}


def _reply(kind: str) -> Reply:
    if kind.startswith(("reply to", "push", "last frame", "none")):
        return Reply(None)
    names = [FrameType[name] for name in re.findall(r"\b[A-Z][A-Z_]+\b", re.sub(r"\(.*?\)", "", kind))]
    return Reply(names[-1], frozenset(names[:-1]))


def _preludes(table: dict[FrameType, tuple[str, str]]) -> dict[FrameType, frozenset[FrameType]]:
    """Request → the server frames that may come, with its request_id, before a page of its reply: the rows that
    say "before a page of the reply to SYNC, HISTORY" (EVENTS, spec §5.46)."""
    out: dict[FrameType, set[FrameType]] = {}
    for ftype, (_, kind) in table.items():
        said = re.search(r"before a page of the reply to ([A-Z_, ]+)", kind)
        for name in re.findall(r"[A-Z_]+", said[1]) if said else ():
            out.setdefault(FrameType[name], set()).add(ftype)
    return {request: frozenset(frames) for request, frames in out.items()}


def _closes(action: str) -> CloseReason | None:
    """The BYE reason an ERROR code ends the connection with (spec §7.1 "What the server does"), None if it does not."""
    if action.startswith("Request-level"):
        return None
    named = re.search(r"BYE `(\w+)`", action)
    return CloseReason[named.group(1)] if named else CloseReason.PROTOCOL_ERROR


_TABLE = spec_frame_table()
_PRELUDES = _preludes(_TABLE)
#: Client frame → what completes it on success (SYNC: SYNC_PAGE... then SYNC_DONE; LOGOUT: the BYE), and what may
#: come before (SYNC: SYNC_PAGE, and on version 2 EVENTS before a page).
REPLIES: dict[FrameType, Reply] = {
    f: dataclasses.replace(reply, partial=reply.partial | _PRELUDES.get(f, frozenset()))
    for f, reply in ((f, _reply(kind)) for f, (direction, kind) in _TABLE.items() if direction != "S→C")}
#: Server frames that are only ever pushes: always request_id 0 (spec §2.2). BYE is one too. (EVENTS is a push
#: too when live, but carries a request's id before one of its pages: it is a partial reply of SYNC and HISTORY.)
PUSHES = frozenset({f for f, (_, kind) in _TABLE.items() if kind == "push"} | {FrameType.BYE})
#: ErrorCode → the BYE reason it closes the connection with, or None for a request-level error (spec §7.1).
ERROR_CLOSES: dict[ErrorCode, CloseReason | None] = {
    ErrorCode(int(code)): _closes(action) for code, _, action in _ERROR_ROW.findall(_spec_section("### 7.1"))}
#: The closing ERRORs a frame legal in its state may still get (spec §5.1, §5.3-§5.5, §5.33, §5.59); any other is
#: a bug.
ALLOWED_CLOSES: dict[FrameType, frozenset[ErrorCode]] = {
    FrameType.HELLO: frozenset({ErrorCode.UNSUPPORTED_VERSION}),
    FrameType.REGISTER: frozenset({ErrorCode.TOO_MANY_CONNECTIONS}),
    FrameType.REGISTER_INVITE: frozenset({ErrorCode.TOO_MANY_CONNECTIONS}),
    FrameType.LOGIN: frozenset({ErrorCode.TOO_MANY_CONNECTIONS}),
    FrameType.RESUME: frozenset({ErrorCode.TOO_MANY_CONNECTIONS}),
    FrameType.PONG: frozenset({ErrorCode.INVALID_REQUEST}),  # a PONG that answers none of the server's PINGs
}


# --- values ------------------------------------------------------------------------------------------------------

_WIDTHS = ("a", "é", "€", "😀")  # 1, 2, 3 and 4 bytes of UTF-8
_EDGES = (0, 1, 2, 1 << 31, (1 << 32) - 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
_UNKNOWN_TOKEN = "x" * 43  # well-formed, and nobody was given it
_UNKNOWN_INVITE = "y" * 22  # shaped like an invite code, and the server made none like it
#: REACT's reactions (spec §9.16): valid ones first (an emoji, emoji joined by U+200D, a word), then ones the rule
#: refuses (a space, a zero-width space: a format character other than ZWJ, a control character).
REACTIONS = ("👍", "👩\u200d💻", "+1", "a b", "\u200b", "x\x07")
#: SET_DISPLAY_NAME's names (spec §9.17): valid ones first (Unicode, one not in NFC, ZWJ inside, "" clears), then
#: ones that look like a fuzz user's login name (f0's skeleton is "fo": refused for everyone else), then ones the
#: rule refuses (a space at an end, a bidi override, a line separator, no letter or digit, 33 characters).
DISPLAY_NAMES = ("Zoë Martín", "Cafe\u0301 ☕", "👩\u200d💻 dev", "", "F0", "f.o", "FО", " x", "a\u202eb",
                 "a\u2028b", "☕☕", "a" * 33)


def exactly(size: int, char: str = "a") -> str:
    """Text of exactly ``size`` UTF-8 bytes, mostly ``char`` (padded with "a" where ``char`` does not fit)."""
    width = len(char.encode("utf-8"))
    return char * (size // width) + "a" * (size % width)


def edges(bits: int) -> list[int]:
    """The boundary values of an unsigned ``bits``-wide integer: 0, 1, 2, 2**31, 2**63 - 1, 2**63, its top..."""
    top = (1 << bits) - 1
    return sorted({v for v in (*_EDGES, 1 << (bits - 1), top) if v <= top})


def _no_tokens() -> tuple[str, ...]:
    return ()


@dataclasses.dataclass(frozen=True)
class Hints:
    """Values that make requests reach the store: names that exist, the right password, live tokens, invite codes.

    ``tokens`` is called when a frame is drawn (tokens change with every login), so one Hints, and the strategies
    built from it, serve a whole run. ``body_bytes`` are sizes worth trying for message bodies (around the
    server's ``max_body_bytes``). ``invites`` are one-time codes the server holds (REGISTER_INVITE, spec §5.59):
    each makes one account, then it is a used code (``AUTH_FAILED``), as is any other string.
    """

    users: tuple[str, ...] = ()
    rooms: tuple[str, ...] = ()
    password: str = "x" * 8
    tokens: Callable[[], Sequence[str]] = _no_tokens
    body_bytes: tuple[int, ...] = (1, 4096, 4097)
    invites: tuple[str, ...] = ()

    def known(self, name: str | None) -> tuple[str, ...]:
        """Values of the string field ``name`` that mean something to the server (the first one is valid)."""
        if name == "room":
            return self.rooms
        if name in ("username", "user", "sender"):
            return self.users
        if name == "users":  # GET_USERS: users that exist, and one that does not
            return self.users + ("nobody",)
        if name == "display_name":
            return DISPLAY_NAMES
        if name == "name":
            return self.users + self.rooms
        if name == "password":
            return (self.password, "", "short", exactly(8), exactly(proto.MAX_PASSWORD_BYTES, "€"))
        if name == "invite" and self.invites:  # the valid codes first; then ones the server never made
            return self.invites + (_UNKNOWN_INVITE, exactly(proto.MAX_INVITE_BYTES))
        if name == "reaction":  # a few, so that a REACT often meets one it already added (or took back)
            return REACTIONS
        return ()

    def plain(self, name: str | None) -> str:
        """A valid value of the string field ``name``."""
        known = self.known(name)
        return known[0] if known else _UNKNOWN_TOKEN if name == "token" else "x"

    def strategy(self, name: str | None) -> st.SearchStrategy[str] | None:
        if name == "token":
            return st.integers(0, 3).map(self._token)
        known = self.known(name)
        return st.sampled_from(known) if known else None

    def _token(self, i: int) -> str:
        tokens = tuple(self.tokens()) + (_UNKNOWN_TOKEN,)
        return tokens[i % len(tokens)]


# --- random frames -------------------------------------------------------------------------------------------------

@st.composite
def weighted(draw, *choices: tuple[int, st.SearchStrategy]):
    """A value of one of the strategies, each (weight, strategy) chosen weight times as often as one of weight 1.

    (``st.one_of`` cannot weigh: it drops a branch it already has.) Shrinking goes to the first choice.
    """
    pick = draw(st.integers(0, sum(weight for weight, _ in choices) - 1))
    for weight, strategy in choices:
        if pick < weight:
            return draw(strategy)
        pick -= weight
    raise AssertionError("unreachable")


def texts(max_bytes: int, hints: st.SearchStrategy[str] | None = None, *,
          sizes: tuple[int, ...] = ()) -> st.SearchStrategy[str]:
    """Text of at most ``max_bytes``: often a hint, else empty, short (any Unicode), exactly at the limit or at one
    of ``sizes`` (in 1- to 4-byte characters), or (for names) one the naming rule takes."""
    choices = [(8, hints)] if hints is not None else []
    choices += [
        (1, st.just("")),
        (3 if sizes else 1, st.text(min_size=1, max_size=min(max_bytes // 4, 24))),
        (2 if sizes else 1, st.tuples(st.sampled_from((max_bytes,) + tuple(s for s in sizes if s <= max_bytes)),
                                      st.sampled_from(_WIDTHS)).map(lambda t: exactly(*t))),
    ]
    if max_bytes == proto.MAX_NAME_BYTES:  # names that pass the naming rule, so that requests get past it
        choices.append((1, st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,31}", fullmatch=True)))
    return weighted(*choices)


def _fields(record: _wire._Record) -> list[tuple[str, object]]:
    return [(sub.name, sub.subcon) for sub in record.subcon.subcons if sub.name is not None]


def _request_ids() -> st.SearchStrategy[int]:
    """Nonzero (spec §2.2): a reply with request_id 0 could not be told from a push."""
    return st.one_of(st.sampled_from((1, 1 << 31, (1 << 32) - 1)), st.integers(1, (1 << 32) - 1))


def values(con, hints: Hints, name: str | None = None) -> st.SearchStrategy:
    """A strategy for what ``con`` (a construct of ``proto._wire``) builds; raises NotImplementedError for a new one."""
    if isinstance(con, _wire._Record):
        if con.cls is proto.Conversation:  # mostly one that exists: a room of the hints, or a direct one
            name_texts = texts(proto.MAX_NAME_BYTES)
            return weighted(
                (4, st.sampled_from(hints.rooms or ("x",)).map(proto.Conversation.room)),
                (2, st.sampled_from(hints.users or ("x",)).map(proto.Conversation.direct)),
                (1, name_texts.map(proto.Conversation.room)),
                (1, name_texts.map(proto.Conversation.direct)))
        kwargs = {field: values(sub, hints, field) for field, sub in _fields(con)}
        if issubclass(con.cls, proto.Event):
            kwargs["request_id"] = _request_ids()
        return st.builds(con.cls, **kwargs)
    if isinstance(con, _wire._Text):
        return texts(con.max_bytes, hints.strategy(name), sizes=hints.body_bytes if name == "body" else ())
    if isinstance(con, _wire._Enum):
        return st.sampled_from(list(con.enum_cls))
    if isinstance(con, _wire._Bool):
        return st.booleans()
    if isinstance(con, _wire._Array):  # a few drawn items repeated to the maximum: cheap to draw, full on the wire
        few = st.lists(values(con.subcon, hints, name), min_size=1, max_size=3)
        return st.one_of(st.just(()), few.map(tuple),
                         few.map(lambda items: tuple(itertools.islice(itertools.cycle(items), con.max_items))))
    if isinstance(con, FormatField):
        bits = 8 * con.length
        return st.one_of(st.integers(0, 5), st.sampled_from(edges(bits)), st.integers(0, (1 << bits) - 1))
    raise NotImplementedError(f"no strategy for {con!r} (field {name}): teach tests/fuzzframes.py the new construct")


# --- boundary variants of a plain frame ------------------------------------------------------------------------------

def variants(con, hints: Hints, name: str | None = None) -> tuple[object, list]:
    """(a plain valid value of ``con``, the values that differ from it in one place by a boundary value).

    The plain value uses the hints (an existing room, a user, the password), so that each variant reaches as far
    into the server as its one odd value lets it.
    """
    if isinstance(con, _wire._Record):
        fields = {field: variants(sub, hints, field) for field, sub in _fields(con)}
        extra: list = []
        if con.cls is proto.Conversation:  # a room of the hints; the other room and a user as alternatives
            fields["name"] = (hints.plain("room"), fields["name"][1])
            extra = [proto.Conversation.room(room) for room in hints.rooms[1:2]] + [
                proto.Conversation.direct(user) for user in hints.users[1:2]]
        if issubclass(con.cls, proto.Event):
            fields["request_id"] = (1, [1 << 31, (1 << 32) - 1])
        base = {field: value for field, (value, _) in fields.items()}
        return con.cls(**base), extra + [con.cls(**{**base, field: value})
                                         for field, (_, others) in fields.items() for value in others]
    if isinstance(con, _wire._Text):
        sizes = [size for size in hints.body_bytes[1:] if size <= con.max_bytes] if name == "body" else []
        return hints.plain(name), ["", exactly(con.max_bytes), exactly(con.max_bytes, "😀")] + [
            exactly(size, "é") for size in sizes]
    if isinstance(con, _wire._Enum):
        first, *others = list(con.enum_cls)
        return first, others
    if isinstance(con, _wire._Bool):
        return False, [True]
    if isinstance(con, _wire._Array):
        item, others = variants(con.subcon, hints, name)
        return (item,), [(), (item,) * con.max_items] + [(other,) for other in others]
    if isinstance(con, FormatField):
        return 1, [v for v in edges(8 * con.length) if v != 1]
    raise NotImplementedError(f"no boundary values for {con!r} (field {name}): teach tests/fuzzframes.py")


def boundary_events(ftype: FrameType, hints: Hints = Hints()) -> list[proto.Event]:
    """The plain event of ``ftype``, then every variant of it with one field at a boundary: u64s at 0, 2**31,
    2**63 - 1, 2**63, 2**64 - 1..., strings empty and at their maximum, arrays empty and of 1000 items; and for
    REGISTER_INVITE, new users with a valid code, a used one and one the server never made."""
    base, others = variants(_wire.BODIES[ftype], hints)
    if hasattr(base, "invite") and hints.invites:  # the plain name is taken: these new ones reach the code
        codes = hints.invites[:1] + (_UNKNOWN_INVITE,) + hints.invites[1:2]  # (the first is used by now)
        others += [dataclasses.replace(base, username=f"invitee{i}", invite=code) for i, code in enumerate(codes)]
    return [base] + others


@functools.lru_cache(maxsize=64)  # built once per (type, hints): from_regex is not cheap
def frames(ftype: FrameType, hints: Hints = Hints()) -> st.SearchStrategy[proto.Event]:
    """Well-formed events of ``ftype``: one time in three a boundary variant of a plain event (it reaches the
    store), else random in every field."""
    return weighted((1, st.sampled_from(boundary_events(ftype, hints))), (2, values(_wire.BODIES[ftype], hints)))
