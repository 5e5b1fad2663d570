"""Produce the generated parts of spec/PROTOCOL.md from proto/, so none is typed by hand.

The spec holds, for each example, an HTML comment with a Python expression
(``<!-- example: Ping(nonce=1, request_id=7) -->``) followed by a ```` ```hex ````
block. This script evaluates the expression with ``from chorus.proto import *`` in
scope, encodes it with ``proto.encode`` and lays the bytes out so that the
header fields (§2) and each body field (§3, §5) are visible: header on one
line, then one line per body field, one line per array item, long strings and
lz4 blocks wrapped at 32 bytes. It also writes the §5 "Legal in" rows and the
§8 state table from ``proto._state.TRANSITIONS``, the Type/Size cells of
the field tables from ``proto._wire``, the §6.3 table of frame types by protocol
version from ``FrameType.version``, and the §10 table of each client frame's
largest legal body from ``proto.LARGEST_BODY_BYTES``.

    .venv/bin/python spec/gen_examples.py           # print every example block
    .venv/bin/python spec/gen_examples.py --write   # refresh spec/PROTOCOL.md in place
    .venv/bin/python spec/gen_examples.py --check   # exit 1 if the file is stale

tests/test_spec.py checks the spec against proto independently of this script.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # for _gen, however this file is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gen  # noqa: E402
from _gen import ROOT  # noqa: E402
from construct import FormatField, Renamed  # noqa: E402

from chorus import proto  # noqa: E402
from chorus.proto import _state, _wire  # noqa: E402
from chorus.proto._const import COMPRESSED_PREFIX_BYTES, HEADER_BYTES, Flags, FrameType  # noqa: E402
from chorus.proto._wire import largest_compressed_length  # noqa: E402

SPEC = ROOT / "spec" / "PROTOCOL.md"
WRAP_BYTES = 32

EXAMPLE_RE = re.compile(r"<!-- example: (?P<expr>.*?) -->\n```hex\n(?P<hex>.*?)```", re.S)
STATE_TABLE_RE = re.compile(
    r"(?P<open><!-- generated: state-table .*?-->\n)(?P<body>.*?)(?P<close><!-- end generated -->)", re.S)
LARGEST_TABLE_RE = re.compile(
    r"(?P<open><!-- generated: largest-bodies .*?-->\n)(?P<body>.*?)(?P<close><!-- end generated -->)", re.S)
VERSIONS_TABLE_RE = re.compile(
    r"(?P<open><!-- generated: frame-versions .*?-->\n)(?P<body>.*?)(?P<close><!-- end generated -->)", re.S)
FRAME_HEADING_RE = re.compile(r"^### 5\.\d+ (?P<name>[A-Z_]+) \(0x(?P<code>[0-9A-F]{2})\)$", re.M)
RECORD_HEADING_RE = re.compile(r"^### 3\.\d+ (?P<name>[A-Za-z]+)$", re.M)
FIELD_ROW_RE = re.compile(r"^\| `(?P<field>[a-z_]+)` \| (?P<type>[^|]*?) \| (?P<size>[^|]*?) \|(?P<rest>.*)$", re.M)
LEGAL_ROW_RE = re.compile(r"^- Legal in: (?P<legal>.*)$", re.M)

#: Every record of ``proto._wire`` (Conversation, StoredMessage, ..., the version 2 ones), each a §3 section: found,
#: not listed, so that a new record's field table is generated (and tests/test_spec.py asks for its section).
RECORDS = {
    name: value for name, value in vars(_wire).items()
    if isinstance(value, _wire._Record) and not issubclass(value.cls, proto.Event) and name == value.cls.__name__
}


def namespace() -> dict:
    """The names an example expression may use: everything ``from chorus.proto import *`` gives."""
    ns: dict = {}
    exec("from chorus.proto import *", ns)
    return ns


def evaluate(expr: str) -> proto.Event:
    return eval(expr, namespace())


# --- field types and sizes (§3) ----------------------------------------------

def _inner(subcon):
    return subcon.subcon if isinstance(subcon, Renamed) else subcon


def type_name(subcon) -> str:
    """The spec's name for a field type: u8..u64, bool, u8 ConvKind, str8(32), Conversation, array(RoomInfo)."""
    c = _inner(subcon)
    if isinstance(c, FormatField):
        return f"u{c.sizeof() * 8}"
    if isinstance(c, _wire._Bool):
        return "bool"
    if isinstance(c, _wire._Enum):
        return f"u{c.subcon.sizeof() * 8} {c.enum_cls.__name__}"
    if isinstance(c, _wire._Text):
        return f"str{c.subcon.lengthfield.sizeof() * 8}({c.max_bytes})"
    if isinstance(c, _wire._Record):
        return c.cls.__name__
    if isinstance(c, _wire._Array):
        return f"array({type_name(c.subcon)})"
    raise TypeError(f"no spec name for {c!r}")


def size_range(subcon) -> tuple[int, int] | None:
    """(min, max) encoded bytes of a field, or None for arrays (their size depends on the count)."""
    c = _inner(subcon)
    if isinstance(c, FormatField):
        return c.sizeof(), c.sizeof()
    if isinstance(c, (_wire._Bool, _wire._Enum)):
        return c.subcon.sizeof(), c.subcon.sizeof()
    if isinstance(c, _wire._Text):
        prefix = c.subcon.lengthfield.sizeof()
        return prefix, prefix + c.max_bytes
    if isinstance(c, _wire._Record):
        lo = hi = 0
        for sub in c.subcon.subcons:
            r = size_range(sub)
            if r is None:
                return None
            lo, hi = lo + r[0], hi + r[1]
        return lo, hi
    return None


def size_text(subcon) -> str:
    c = _inner(subcon)
    if isinstance(c, _wire._Array):
        return f"2 + n × {type_name(c.subcon)}"
    lo, hi = size_range(c)
    return str(lo) if lo == hi else f"{lo}..{hi}"


def record_fields(name: str) -> list:
    return list(RECORDS[name].subcon.subcons)


def frame_fields(ftype: FrameType) -> list:
    return list(_wire.FIELDS[ftype])


# --- hex layout ----------------------------------------------------------------

def _hex(data: bytes) -> str:
    return data.hex()


def _wrapped(data: bytes) -> list[list[str]]:
    return [[_hex(data[i:i + WRAP_BYTES])] for i in range(0, len(data), WRAP_BYTES)]


def _wrapped_text(text: str) -> list[list[str]]:
    """UTF-8 of ``text`` in lines of at most WRAP_BYTES, never splitting a character."""
    lines, line = [], b""
    for char in text:
        data = char.encode("utf-8")
        if len(line) + len(data) > WRAP_BYTES:
            lines.append([_hex(line)])
            line = b""
        line += data
    return lines + [[_hex(line)]]


def _lines(subcon, value) -> list[list[str]]:
    """Hex tokens of one field as lines; the first line continues the caller's line."""
    c = _inner(subcon)
    if isinstance(c, _wire._Text):
        data = value.encode("utf-8")
        prefix = len(data).to_bytes(c.subcon.lengthfield.sizeof(), "big").hex()
        if len(data) <= WRAP_BYTES:
            return [[prefix, _hex(data)] if data else [prefix]]
        return [[prefix]] + _wrapped_text(value)
    if isinstance(c, _wire._Record):
        lines: list[list[str]] = [[]]
        for sub in c.subcon.subcons:
            sub_lines = _lines(sub, getattr(value, sub.name))
            lines[-1] += sub_lines[0]
            lines += sub_lines[1:]
        return lines
    if isinstance(c, _wire._Array):
        lines = [[len(value).to_bytes(2, "big").hex()]]
        for item in value:
            lines += _lines(c.subcon, item)
        return lines
    return [[_hex(c.build(value))]]


def hex_lines(event: proto.Event) -> list[str]:
    """The frame of ``event`` (as ``proto.encode`` makes it), one header or field per line."""
    frame = proto.encode(event)
    header, body = frame[:HEADER_BYTES], frame[HEADER_BYTES:]
    lines = [" ".join((_hex(header[0:4]), _hex(header[4:5]), _hex(header[5:6]), _hex(header[6:10])))]
    if header[5] & Flags.COMPRESSED:
        lines.append(_hex(body[:COMPRESSED_PREFIX_BYTES]))
        lines += [" ".join(tokens) for tokens in _wrapped(body[COMPRESSED_PREFIX_BYTES:])]
    else:
        for sub in frame_fields(event.FRAME):
            for tokens in _lines(sub, getattr(event, sub.name)):
                if tokens:
                    lines.append(" ".join(tokens))
    if bytes.fromhex("".join(lines).replace(" ", "")) != frame:
        raise AssertionError(f"layout of {event!r} does not reproduce its bytes")
    return lines


def example_block(expr: str) -> str:
    return f"<!-- example: {expr} -->\n```hex\n" + "\n".join(hex_lines(evaluate(expr))) + "\n```"


# --- state machine (§5 "Legal in", §8) --------------------------------------------

def legal_in(ftype: FrameType) -> str:
    """``client: HANDSHAKE (→ NEGOTIATING); server: ...`` from TRANSITIONS."""
    parts = []
    for role in (_state.CLIENT, _state.SERVER):
        items = []
        for state in _state.State:
            after = _state.TRANSITIONS.get((state, role), {}).get(ftype)
            if after is not None:
                items.append(state.name if after is state else f"{state.name} (→ {after.name})")
        if items:
            parts.append(f"{role.value}: {', '.join(items)}")
    return "; ".join(parts)


def state_table() -> str:
    """§8 table: one row per (state, sender), frames grouped by the state they lead to."""
    rows = ["| State | Sender | Frames it may send (→ state after; no arrow = state unchanged) |",
            "|---|---|---|"]
    for state in _state.State:
        for role in (_state.CLIENT, _state.SERVER):
            moves = _state.TRANSITIONS.get((state, role), {})
            groups: dict[_state.State, list[str]] = {}
            for ftype in sorted(moves):
                groups.setdefault(moves[ftype], []).append(ftype.name)
            cells = []
            for after in sorted(groups, key=lambda s: after_order(s, state)):
                names = ", ".join(groups[after])
                cells.append(names if after is state else f"{names} → {after.name}")
            rows.append(f"| {state.name} | {role.value} | {'; '.join(cells) or '(nothing)'} |")
    return "\n".join(rows) + "\n"


def after_order(after: _state.State, state: _state.State) -> tuple[int, str]:
    return (0 if after is not state else 1, after.name)


# --- largest legal bodies (§2.3, §10) ----------------------------------------------

PRE_AUTH_STATES = (_state.State.HANDSHAKE, _state.State.NEGOTIATING, _state.State.UNAUTHENTICATED)


def client_frames() -> list[FrameType]:
    """Every frame type a client may send in some state, in type order."""
    sent = set()
    for (_, role), moves in _state.TRANSITIONS.items():
        if role is _state.CLIENT:
            sent |= set(moves)
    return sorted(sent)


def pre_auth_client_frames() -> set[FrameType]:
    """The frame types a client may send before AUTH_OK."""
    return {f for state in PRE_AUTH_STATES for f in _state.TRANSITIONS.get((state, _state.CLIENT), {})}


def largest_table() -> str:
    """§10 table: each client→server frame's largest body, its largest compressed ``length``, pre-auth or not."""
    rows = ["| Frame | Largest body (bytes) | Largest `length` if compressed | Legal before AUTH_OK |",
            "|---|---|---|---|"]
    early = pre_auth_client_frames()
    for ftype in client_frames():
        largest = proto.LARGEST_BODY_BYTES[ftype]
        rows.append(f"| {ftype.name} | {largest} | {largest_compressed_length(largest)} | "
                    f"{'yes' if ftype in early else 'no'} |")
    pre_auth = max(max(proto.LARGEST_BODY_BYTES[f], largest_compressed_length(proto.LARGEST_BODY_BYTES[f]))
                   for f in early)
    rows.append("")
    rows.append(f"So before AUTH_OK no client frame is longer than {HEADER_BYTES} + {pre_auth} = "
                f"{HEADER_BYTES + pre_auth} bytes on the wire, header included.")
    return "\n".join(rows) + "\n"


# --- versions (§6.3) -------------------------------------------------------------------

def versions_table() -> str:
    """§6.3 table: each protocol version and the frame types it introduced, from ``FrameType.version``."""
    rows = ["| Version | Frame types it introduced |", "|---|---|"]
    for version in range(proto.MIN_PROTOCOL_VERSION, proto.PROTOCOL_VERSION + 1):
        frames = [t for t in FrameType if t.version == version]
        rows.append(f"| {version} | {', '.join(f'{t.name} (0x{int(t):02X})' for t in frames) or '(none)'} |")
    return "\n".join(rows) + "\n"


# --- rewriting the spec ------------------------------------------------------------

def refresh(text: str) -> str:
    """``text`` with every generated part recomputed."""
    text = EXAMPLE_RE.sub(lambda m: example_block(m["expr"]), text)
    text = STATE_TABLE_RE.sub(lambda m: m["open"] + state_table() + m["close"], text)
    text = LARGEST_TABLE_RE.sub(lambda m: m["open"] + largest_table() + m["close"], text)
    text = VERSIONS_TABLE_RE.sub(lambda m: m["open"] + versions_table() + m["close"], text)
    return _refresh_tables(text)


def _sections(text: str, heading_re: re.Pattern) -> list[tuple[re.Match, int, int]]:
    """(heading match, start, end) of each subsection whose heading matches."""
    heads = list(heading_re.finditer(text))
    out = []
    for m in heads:
        nxt = re.compile(r"^#{1,3} ", re.M).search(text, m.end())
        out.append((m, m.end(), nxt.start() if nxt else len(text)))
    return out


def _refresh_rows(chunk: str, fields: list) -> str:
    by_name = {sub.name: sub for sub in fields}

    def row(m: re.Match) -> str:
        sub = by_name.get(m["field"])
        if sub is None:
            return m[0]
        return f"| `{m['field']}` | {type_name(sub)} | {size_text(sub)} |{m['rest']}"

    return FIELD_ROW_RE.sub(row, chunk)


def _refresh_tables(text: str) -> str:
    edits = []
    for m, start, end in _sections(text, FRAME_HEADING_RE):
        ftype = FrameType[m["name"]]
        chunk = _refresh_rows(text[start:end], frame_fields(ftype))
        chunk = LEGAL_ROW_RE.sub(lambda _, ftype=ftype: f"- Legal in: {legal_in(ftype)}", chunk)
        edits.append((start, end, chunk))
    for m, start, end in _sections(text, RECORD_HEADING_RE):
        if m["name"] in RECORDS:
            edits.append((start, end, _refresh_rows(text[start:end], record_fields(m["name"]))))
    for start, end, chunk in sorted(edits, reverse=True):
        text = text[:start] + chunk + text[end:]
    return text


def show() -> None:
    """Print every example block and the generated tables."""
    for m in EXAMPLE_RE.finditer(SPEC.read_text(encoding="utf-8")):
        print(example_block(m["expr"]), end="\n\n")
    print(state_table())
    print(versions_table())
    print(largest_table())


def main(argv: list[str] | None = None) -> int:
    return _gen.main(argv, doc=__doc__ or "", target=SPEC, refresh=refresh, show=show,
                     fix="spec/gen_examples.py --write", parts="the generated parts")


if __name__ == "__main__":
    sys.exit(main())
