"""spec/PROTOCOL.md checked against proto/, so the document a client author reads cannot drift from the code.

The spec's examples are HTML comments holding a Python expression (evaluated
with ``from chorus.proto import *``) followed by a ```` ```hex ```` block. Each must
decode to its event and the event must encode to exactly those bytes. The
tables are parsed from the markdown and compared with the code: the enums of
§2, §3, §5 and §7, the field tables of §3 and §5, the "Legal in" lines of §5,
the §8 state table (against ``proto._state.TRANSITIONS``), the constants of
§10 and its table of each client frame's largest legal body (against
``proto.LARGEST_BODY_BYTES``). The §11 exchanges are replayed through a client and a server
``Connection``. ``spec/gen_examples.py --write`` regenerates the generated parts.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import re
from pathlib import Path

import pytest

from chorus import proto
from chorus.proto import _const
from chorus.proto._state import CLIENT, SERVER, Role, State, TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "spec" / "PROTOCOL.md"
TEXT = SPEC_PATH.read_text(encoding="utf-8")

EXAMPLE_RE = re.compile(r"<!-- example: (?P<expr>.*?) -->\n```hex\n(?P<hex>.*?)```", re.S)
INVALID_RE = re.compile(r"<!-- invalid: (?P<code>[A-Z_]+) -->\n```hex-invalid\n(?P<hex>.*?)```", re.S)
HEADER_LINE_RE = re.compile(r"^[0-9a-f]{8} [0-9a-f]{2} [0-9a-f]{2} [0-9a-f]{8}$")
FRAME_HEADING_RE = re.compile(r"^### 5\.\d+ (?P<name>[A-Z_]+) \(0x(?P<code>[0-9A-Fa-f]{2})\)$", re.M)
SECTION_TITLES = {
    1: "Overview and transport",
    2: "Framing",
    3: "Field types",
    4: "Compression",
    5: "Frames",
    6: "Versioning and handshake",
    7: "Error codes and close reasons",
    8: "State machine",
    9: "Semantics",
    10: "Limits",
    11: "Examples of whole exchanges",
}


def _line(pos: int) -> int:
    return TEXT.count("\n", 0, pos) + 1


def _evaluate(expr: str):
    namespace: dict = {}
    exec("from chorus.proto import *", namespace)
    return eval(expr, namespace)


def _unhex(block: str) -> bytes:
    return bytes.fromhex("".join(block.split()))


def _section(number: str) -> str:
    """The text of ``## n.`` or ``### n.m`` up to the next heading of the same or a higher level."""
    level = "##" if "." not in number else "###"
    head = re.search(rf"^{level} {re.escape(number)}[. ]", TEXT, re.M)
    assert head, f"no section {number}"
    end = re.compile(r"^#{2,%d} " % len(level), re.M).search(TEXT, head.end())
    return TEXT[head.start():end.start() if end else len(TEXT)]


def _sections(heading_re: re.Pattern) -> list[tuple[re.Match, str]]:
    out = []
    for m in heading_re.finditer(TEXT):
        end = re.compile(r"^#{1,3} ", re.M).search(TEXT, m.end())
        out.append((m, TEXT[m.end():end.start() if end else len(TEXT)]))
    return out


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: rows of stripped cells, header row first, separator dropped."""
    tables = []
    for block in re.finditer(r"(?:^\|.*\|[ \t]*\n?)+", text, re.M):
        rows = [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in block[0].strip().splitlines()]
        tables.append([row for row in rows if not all(re.fullmatch(r":?-+:?", c) for c in row)])
    return tables


def _plain(cell: str) -> str:
    return cell.replace("`", "").strip()


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_examples", ROOT / "spec" / "gen_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
EXAMPLES = [pytest.param(m["expr"], m["hex"], id=f"line{_line(m.start())}") for m in EXAMPLE_RE.finditer(TEXT)]
INVALID = [pytest.param(m["code"], m["hex"], id=f"line{_line(m.start())}") for m in INVALID_RE.finditer(TEXT)]


# --- examples ----------------------------------------------------------------------

def test_spec_has_examples():
    assert len(EXAMPLES) >= len(proto.FrameType)
    assert INVALID


def test_every_hex_block_belongs_to_an_example():
    """A typo in a comment must not turn an example into an unchecked block."""
    assert TEXT.count("```hex\n") == len(EXAMPLES)
    assert TEXT.count("```hex-invalid\n") == len(INVALID)


@pytest.mark.parametrize("expr, block", EXAMPLES)
def test_example_decodes_to_its_event(expr, block):
    assert proto.decode(_unhex(block)) == _evaluate(expr)


@pytest.mark.parametrize("expr, block", EXAMPLES)
def test_example_event_encodes_to_its_bytes(expr, block):
    assert proto.encode(_evaluate(expr)).hex() == _unhex(block).hex()


@pytest.mark.parametrize("expr, block", EXAMPLES)
def test_example_shows_the_header_fields_on_its_first_line(expr, block):
    assert HEADER_LINE_RE.match(block.splitlines()[0]), block.splitlines()[0]


@pytest.mark.parametrize("code, block", INVALID)
def test_invalid_example_is_refused_with_its_code(code, block):
    with pytest.raises(proto.RemoteProtocolError) as info:
        proto.decode(_unhex(block), max_frame_bytes=proto.DEFAULT_MAX_FRAME_BYTES)
    assert info.value.code is proto.ErrorCode[code]


def test_every_frame_type_has_an_example():
    shown = {_evaluate(param.values[0]).FRAME for param in EXAMPLES}
    assert set(proto.FrameType) - shown == set()


def test_there_is_a_compressed_example_of_600_bytes_or_more():
    sizes = [int.from_bytes(data[10:14], "big") for data in (_unhex(p.values[1]) for p in EXAMPLES)
             if data[5] & proto.Flags.COMPRESSED]
    assert sizes and max(sizes) >= 600


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, tuple):
        for item in value:
            yield from _strings(item)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _strings(getattr(value, f.name))


def test_there_are_non_ascii_examples():
    non_ascii = [p for p in EXAMPLES if any(not s.isascii() for s in _strings(_evaluate(p.values[0])))]
    assert len(non_ascii) >= 2


def test_generated_parts_are_fresh():
    assert GEN.refresh(TEXT) == TEXT, "spec/PROTOCOL.md is stale: run .venv/bin/python spec/gen_examples.py --write"


# --- section structure ---------------------------------------------------------------

def test_top_level_sections_keep_their_numbers():
    found = {int(m[1]): m[2].strip() for m in re.finditer(r"^## (\d+)\. (.*)$", TEXT, re.M)}
    assert found == SECTION_TITLES


def test_section_references_resolve():
    numbers = {m[1] for m in re.finditer(r"^## (\d+)\. ", TEXT, re.M)}
    numbers |= {m[1] for m in re.finditer(r"^### (\d+\.\d+) ", TEXT, re.M)}
    missing = {ref for ref in re.findall(r"§(\d+(?:\.\d+)?)", TEXT) if ref not in numbers}
    assert missing == set()


# --- enums (§2, §3, §5, §7) -------------------------------------------------------------

def _enum_rows(enum_cls: type[enum.Enum]) -> tuple[str, list[tuple[int, str]]]:
    """(heading, [(value, name)]) from the first table after the heading that names ``enum_cls``."""
    head = re.search(rf"^#+ .*`{enum_cls.__name__}`.*$", TEXT, re.M)
    assert head, f"no heading names `{enum_cls.__name__}`"
    nxt = re.compile(r"^#+ ", re.M).search(TEXT, head.end())
    tables = _tables(TEXT[head.end():nxt.start() if nxt else len(TEXT)])
    assert tables, f"no table under {head[0]!r}"
    rows = [(int(row[0], 0), _plain(row[1])) for row in tables[0][1:]]
    return head[0], rows


ENUMS = [proto.ErrorCode, proto.CloseReason, proto.FrameType, proto.Flags, proto.ConvKind, proto.Direction,
         proto.ReceiptKind, proto.Status, proto.MembershipChange, proto.RoomRole, proto.EventKind]


@pytest.mark.parametrize("enum_cls", ENUMS, ids=lambda e: e.__name__)
def test_enum_table_lists_every_member_with_its_number(enum_cls):
    _, rows = _enum_rows(enum_cls)
    assert len(rows) == len({name for _, name in rows}), "a name is listed twice"
    assert {name: value for value, name in rows} == {m.name: int(m.value) for m in enum_cls}


@pytest.mark.parametrize("enum_cls", [proto.ErrorCode, proto.CloseReason], ids=lambda e: e.__name__)
def test_error_and_close_tables_are_in_section_7(enum_cls):
    heading, _ = _enum_rows(enum_cls)
    assert heading.startswith("### 7.")


@pytest.mark.parametrize("enum_cls", [proto.ErrorCode, proto.CloseReason], ids=lambda e: e.__name__)
def test_every_number_in_the_section_7_tables_exists_in_proto(enum_cls):
    _, rows = _enum_rows(enum_cls)
    for value, name in rows:
        assert value in enum_cls._value2member_map_, f"{value} is not a {enum_cls.__name__}"
        assert enum_cls(value).name == name


def test_error_codes_of_a_later_version_say_so():
    """§7.1 opens the meaning of a code a later version added with "Version n." (a connection of an older version is
    sent INVALID_REQUEST instead), as ``proto.ERROR_CODE_VERSION`` records; the other codes say no version."""
    tables = [t for t in _tables(_section("7.1")) if t[0][:2] == ["Code", "Name"]]
    assert len(tables) == 1
    for row in tables[0][1:]:
        version = proto.ERROR_CODE_VERSION.get(proto.ErrorCode(int(row[0])), proto.MIN_PROTOCOL_VERSION)
        said = re.match(r"Version (\d+)\. ", row[2])
        assert (int(said[1]) if said else proto.MIN_PROTOCOL_VERSION) == version, row[1]
        if said:
            assert "INVALID_REQUEST" in row[3], row[1]


def test_codes_named_in_the_text_exist_in_proto():
    """ERROR `X`, BYE `X`, `X` (n) and n = `hex` mentions anywhere in the prose."""
    errors, reasons = proto.ErrorCode.__members__, proto.CloseReason.__members__
    for name in re.findall(r"\bERROR `([A-Z_]+)`", TEXT):
        assert name in errors, name
    for name in re.findall(r"\b(?:BYE|GOAWAY) `([A-Z_]+)`", TEXT):
        assert name in reasons, name
    for name in re.findall(r"\bERROR\(([A-Z_]+)", TEXT):
        assert name in errors, name
    for name in re.findall(r"\bBYE\(([A-Z_]+)", TEXT):
        assert name in reasons, name
    for name, number in re.findall(r"`([A-Z_]+)` \((\d+)\)", TEXT):
        member = errors.get(name) or reasons.get(name)
        assert member is not None and member.value == int(number), (name, number)
    for number, hexed in re.findall(r"\((\d+) = `([0-9a-f]+)`\)", TEXT):
        assert int(number) == int(hexed, 16) and int(number) in proto.ErrorCode._value2member_map_


def test_every_backticked_constant_name_exists():
    known = set()
    for enum_cls in ENUMS:
        known |= set(enum_cls.__members__)
    known |= {name for name in vars(_const) if name.isupper()}
    unknown = {name for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", TEXT) if name not in known}
    assert unknown == set()


# --- frames and records (§3, §5) ----------------------------------------------------------

FRAME_SECTIONS = _sections(FRAME_HEADING_RE)
FRAME_PARAMS = [pytest.param(m, body, id=m["name"]) for m, body in FRAME_SECTIONS]


def test_every_frame_type_has_one_section_with_its_code():
    names = [m["name"] for m, _ in FRAME_SECTIONS]
    assert sorted(names) == sorted(t.name for t in proto.FrameType)
    for m, _ in FRAME_SECTIONS:
        assert int(m["code"], 16) == proto.FrameType[m["name"]]


def _field_rows(text: str) -> list[tuple[str, str, str]] | None:
    for table in _tables(text):
        if table[0][:3] == ["Field", "Type", "Size"]:
            return [(_plain(row[0]), row[1], row[2]) for row in table[1:]]
    return None


def _declared(fields) -> list[tuple[str, str, str]]:
    return [(sub.name, GEN.type_name(sub), GEN.size_text(sub)) for sub in fields]


@pytest.mark.parametrize("heading, body", FRAME_PARAMS)
def test_frame_field_table_matches_the_wire_declaration(heading, body):
    fields = GEN.frame_fields(proto.FrameType[heading["name"]])
    rows = _field_rows(body)
    if not fields:
        assert rows is None and "Empty body." in body
    else:
        assert rows == _declared(fields)


@pytest.mark.parametrize("name", sorted(GEN.RECORDS))
def test_record_table_matches_the_wire_declaration(name):
    sections = [body for m, body in _sections(re.compile(r"^### 3\.\d+ (\w+)$", re.M)) if m[1] == name]
    assert len(sections) == 1
    assert _field_rows(sections[0]) == _declared(GEN.record_fields(name))


def _legal(ftype: proto.FrameType) -> set[tuple[Role, State, State]]:
    return {(role, state, moves[ftype]) for (state, role), moves in TRANSITIONS.items() if ftype in moves}


def _parse_legal(line: str) -> set[tuple[Role, State, State]]:
    out = set()
    for part in line.split(";"):
        role, _, items = part.strip().partition(": ")
        for item in items.split(","):
            m = re.fullmatch(r"\s*([A-Z]+)(?: \(→ ([A-Z]+)\))?\s*", item)
            assert m, item
            state = State[m[1]]
            out.add((Role(role), state, State[m[2]] if m[2] else state))
    return out


@pytest.mark.parametrize("heading, body", FRAME_PARAMS)
def test_frame_legal_in_line_matches_the_state_table(heading, body):
    lines = re.findall(r"^- Legal in: (.*)$", body, re.M)
    assert len(lines) == 1
    assert _parse_legal(lines[0]) == _legal(proto.FrameType[heading["name"]])


# --- versions (§6.3) ---------------------------------------------------------------------------

def test_versions_table_matches_proto():
    """§6.3's generated table, checked against ``FrameType.version`` without the generator."""
    tables = [t for t in _tables(_section("6.3")) if t[0][:2] == ["Version", "Frame types it introduced"]]
    assert len(tables) == 1
    listed = {}
    for version, cell in tables[0][1:]:
        for item in cell.split(", "):
            m = re.fullmatch(r"([A-Z_]+) \(0x([0-9A-F]{2})\)", item)
            assert m, item
            assert int(m[2], 16) == proto.FrameType[m[1]]
            listed[proto.FrameType[m[1]]] = int(version)
    assert listed == {ftype: ftype.version for ftype in proto.FrameType}
    assert max(listed.values()) == proto.PROTOCOL_VERSION and min(listed.values()) == proto.MIN_PROTOCOL_VERSION


@pytest.mark.parametrize("heading, body", FRAME_PARAMS)
def test_frame_section_names_its_version(heading, body):
    """A frame of a later version says so in its §5 section; the version 1 frames say nothing."""
    ftype = proto.FrameType[heading["name"]]
    lines = re.findall(r"^- Version: (\d+) \(§6\.3\)\.$", body, re.M)
    assert lines == ([] if ftype.version == 1 else [str(ftype.version)])


def test_the_spec_names_both_versions():
    assert TEXT.startswith(f"# Chorus wire protocol, versions 1 and {proto.PROTOCOL_VERSION}\n")
    assert proto.MIN_PROTOCOL_VERSION == 1


# --- state machine (§8) ---------------------------------------------------------------------

def _state_table() -> dict[tuple[State, Role], dict[proto.FrameType, State]]:
    tables = [t for t in _tables(_section("8")) if t[0][:2] == ["State", "Sender"]]
    assert len(tables) == 1
    parsed: dict = {}
    for state_cell, role_cell, frames_cell in (row[:3] for row in tables[0][1:]):
        state, role = State[state_cell], Role(role_cell)
        assert (state, role) not in parsed, f"{state_cell}/{role_cell} listed twice"
        moves = parsed[state, role] = {}
        if frames_cell == "(nothing)":
            continue
        for group in frames_cell.split(";"):
            names, _, after = group.partition("→")
            for name in names.split(","):
                moves[proto.FrameType[name.strip()]] = State[after.strip()] if after else state
    return parsed


def test_state_table_matches_transitions():
    parsed = _state_table()
    assert set(parsed) == {(state, role) for state in State for role in Role}, "a (state, sender) row is missing"
    assert {k: v for k, v in parsed.items() if v} == {k: v for k, v in TRANSITIONS.items() if v}


# --- limits (§10) -----------------------------------------------------------------------------

PRE_AUTH = (State.HANDSHAKE, State.NEGOTIATING, State.UNAUTHENTICATED)


def _client_frames() -> set[proto.FrameType]:
    return {f for (state, role), moves in TRANSITIONS.items() if role is CLIENT for f in moves}


def _pre_auth_client_frames() -> set[proto.FrameType]:
    return {f for state in PRE_AUTH for f in TRANSITIONS.get((state, CLIENT), {})}


def _compressed_bound(n: int) -> int:
    return 4 + n + n // 255 + 16  # §4's prefix, then LZ4_COMPRESSBOUND


def test_largest_body_table_matches_proto():
    """§10's generated table, checked against proto without the generator."""
    tables = [t for t in _tables(_section("10")) if t[0][:2] == ["Frame", "Largest body (bytes)"]]
    assert len(tables) == 1
    rows = {proto.FrameType[row[0]]: (int(row[1]), int(row[2]), row[3]) for row in tables[0][1:]}
    early = _pre_auth_client_frames()
    assert rows == {
        ftype: (proto.LARGEST_BODY_BYTES[ftype], _compressed_bound(proto.LARGEST_BODY_BYTES[ftype]),
                "yes" if ftype in early else "no")
        for ftype in _client_frames()
    }


def test_pre_auth_bound_in_the_spec_is_what_a_server_connection_holds():
    m = re.search(r"before AUTH_OK no client frame is longer than (\d+) \+ (\d+) = (\d+) bytes", _section("10"))
    assert m and int(m[1]) + int(m[2]) == int(m[3]) and int(m[1]) == proto.HEADER_BYTES
    pending = []
    for state in PRE_AUTH:
        server = proto.Connection(SERVER)
        server.state = state
        pending.append(server.max_pending_bytes)
    assert max(pending) == int(m[3])


def test_pre_auth_frames_named_in_2_3_match_the_state_table():
    m = re.search(r"Before AUTH_OK a client may send only\s+(.*?)\s+\(§8\)", _section("2.3"), re.S)
    assert m
    names = re.split(r",\s*|\s+and\s+", m[1])
    assert {proto.FrameType[name] for name in names} == _pre_auth_client_frames()


def test_an_invalid_example_shows_the_per_type_bound():
    """A header one byte over its type's largest body, far under max_frame_bytes, refused from the header alone."""
    shown = []
    for param in INVALID:
        code, block = param.values
        data = _unhex(block)
        if code != "FRAME_TOO_LARGE" or len(data) != proto.HEADER_BYTES or data[5]:
            continue
        length, ftype = int.from_bytes(data[:4], "big"), proto.FrameType(data[4])
        if length == proto.LARGEST_BODY_BYTES[ftype] + 1 < proto.DEFAULT_MAX_FRAME_BYTES:
            shown.append(ftype)
            server = proto.Connection(SERVER)  # in a state where the type is legal, the state check passes
            server.state = next(state for state in State if ftype in TRANSITIONS.get((state, CLIENT), {}))
            server.receive_data(data)
            with pytest.raises(proto.RemoteProtocolError) as info:
                server.next_event()
            assert info.value.code is proto.ErrorCode.FRAME_TOO_LARGE
    assert proto.FrameType.LOGIN in shown


def test_limits_table_values_match_the_constants():
    rows = [row for table in _tables(_section("10")) for row in table if len(row) >= 3]
    checked = 0
    for row in rows:
        m = re.fullmatch(r"`chorus\.proto\.(?:_const\.)?([A-Z_]+)`", row[2])
        if m:
            assert int(re.match(r"\d+", row[1])[0]) == getattr(_const, m[1]), row
            checked += 1
    assert checked >= 10


# --- whole exchanges (§11) ----------------------------------------------------------------------

LABELLED_RE = re.compile(
    r"^\*\*(?P<dir>C→S|S→C)\*\*[^\n]*\n<!-- example: (?P<expr>.*?) -->\n```hex\n(?P<hex>.*?)```", re.M | re.S)
EXCHANGES = [
    pytest.param(m[1], id=f"11.{m[1]}") for m in re.finditer(r"^### 11\.(\d+) ", TEXT, re.M)
    if LABELLED_RE.search(_section(f"11.{m[1]}"))
]


def test_section_11_has_exchanges():
    assert len(EXCHANGES) >= 3


@pytest.mark.parametrize("number", EXCHANGES)
def test_exchange_replays_through_client_and_server(number):
    text = _section(f"11.{number}")
    steps = list(LABELLED_RE.finditer(text))
    assert len(steps) == len(EXAMPLE_RE.findall(text)), "every example in an exchange needs a C→S/S→C label"
    start = re.search(r"^Starting state: ([A-Z]+)(?:, version (\d+))?\.$", text, re.M)
    assert start, "an exchange says its starting state (and its version, past the handshake, if not 1)"
    client, server = proto.Connection(CLIENT), proto.Connection(SERVER)
    client.state = server.state = State[start[1]]
    client.version = server.version = int(start[2] or proto.MIN_PROTOCOL_VERSION)
    for step in steps:
        event = _evaluate(step["expr"])
        sender, receiver = (client, server) if step["dir"] == "C→S" else (server, client)
        data = sender.send(event)
        assert data == _unhex(step["hex"])
        receiver.receive_data(data)
        assert receiver.next_event() == event
        assert receiver.next_event() is proto.NEED_DATA
