"""A fast path derived from the construct declarations in ``_wire`` (spec §3, §5).

construct interprets its declarations field by field, about 25 µs for a chat
message; the hot frames of a chat server (SEND in, MESSAGE and ACK out) cannot
afford that. This module walks the *same* declarations once at import and turns
each into a pair of plain closures over ``struct``. Nothing here is declared a
second time, so the wire format still has one source of truth.

The fast path only ever answers when it is sure: on anything unusual (short
input, bad UTF-8, an unknown enum value, out-of-range numbers...) it raises
``Fallback`` and the caller redoes the work on construct's checked path, which
gives the precise error. A property test holds both paths equal.

Parsed values are made without running the dataclasses' ``__init__``: every
field was just checked against its declaration, so the check that ``__init__``
runs (``_check``) would only repeat it. Each field is set through its slot.
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

from construct import Construct, FormatField, Renamed, Struct, Terminated

from . import _events as ev
from . import _wire
from ._const import FrameType

_Build = Callable[[Any, list[bytes]], None]
_Parse = Callable[[bytes, int], tuple[Any, int]]


class Fallback(Exception):
    """The fast path declines; use the checked construct path."""


def _compile(con: Construct) -> tuple[_Build, _Parse]:
    """Return (build(value, out: list), parse(buf, pos) -> (value, pos)) for a construct."""
    if isinstance(con, FormatField):
        st = struct.Struct(con.fmtstr)
        size, pack, unpack = st.size, st.pack, st.unpack_from

        def build_int(value: Any, out: list[bytes]) -> None:
            if value.__class__ is not int and not isinstance(value, int):
                raise Fallback
            out.append(pack(value))

        def parse_int(buf: bytes, pos: int) -> tuple[Any, int]:
            return unpack(buf, pos)[0], pos + size

        return build_int, parse_int
    if isinstance(con, _wire._Text):
        st = struct.Struct(con.subcon.lengthfield.fmtstr)
        size, pack, unpack, limit = st.size, st.pack, st.unpack_from, con.max_bytes

        def build_text(value: Any, out: list[bytes]) -> None:
            if value.__class__ is not str:
                raise Fallback
            data = value.encode("utf-8")
            if len(data) > limit:
                raise Fallback
            out.append(pack(len(data)))
            out.append(data)

        def parse_text(buf: bytes, pos: int) -> tuple[Any, int]:
            n = unpack(buf, pos)[0]
            start = pos + size
            end = start + n
            if n > limit or end > len(buf):
                raise Fallback
            return str(buf[start:end], "utf-8"), end

        return build_text, parse_text
    if isinstance(con, _wire._Bool):
        def build_bool(value: Any, out: list[bytes]) -> None:
            if value is True:
                out.append(b"\x01")
            elif value is False:
                out.append(b"\x00")
            else:
                raise Fallback

        def parse_bool(buf: bytes, pos: int) -> tuple[Any, int]:
            byte = buf[pos]
            if byte > 1:
                raise Fallback
            return byte == 1, pos + 1

        return build_bool, parse_bool
    if isinstance(con, _wire._Enum):
        st = struct.Struct(con.subcon.fmtstr)
        size, pack, unpack = st.size, st.pack, st.unpack_from
        members = con.enum_cls._value2member_map_

        def build_enum(value: Any, out: list[bytes]) -> None:
            if value.__class__ is bool or value not in members:
                raise Fallback
            out.append(pack(value))

        def parse_enum(buf: bytes, pos: int) -> tuple[Any, int]:
            member = members.get(unpack(buf, pos)[0])
            if member is None:
                raise Fallback
            return member, pos + size

        return build_enum, parse_enum
    if isinstance(con, _wire._Array):
        item_build, item_parse = _compile(con.subcon)
        limit = con.max_items
        pack_count, unpack_count = struct.Struct(">H").pack, struct.Struct(">H").unpack_from

        def build_array(value: Any, out: list[bytes]) -> None:
            if len(value) > limit:
                raise Fallback
            out.append(pack_count(len(value)))
            for item in value:
                item_build(item, out)

        def parse_array(buf: bytes, pos: int) -> tuple[Any, int]:
            count = unpack_count(buf, pos)[0]
            if count > limit:
                raise Fallback
            pos += 2
            items = []
            for _ in range(count):
                item, pos = item_parse(buf, pos)
                items.append(item)
            return tuple(items), pos

        return build_array, parse_array
    if isinstance(con, _wire._Record):
        return _compile_record(con.cls, con.subcon)
    raise TypeError(f"no fast path for {con!r}")


def _setter(cls: type, name: str) -> Callable[[object, Any], None]:
    """The ``__set__`` of the slot that holds field ``name`` (on ``cls`` or a base): bypasses frozen-ness."""
    setter: Callable[[object, Any], None] = getattr(cls, name).__set__
    return setter


def _compile_record(cls: type, struct_con: Struct) -> tuple[_Build, _Parse]:
    fields = []
    for sub in struct_con.subcons:
        if sub is Terminated:
            continue
        assert isinstance(sub, Renamed), sub
        fields.append((sub.name, *_compile(sub.subcon)))
    names = [f.name for f in dataclasses.fields(cls) if f.name != "request_id"]
    if [name for name, _, _ in fields] != names:
        raise TypeError(f"{cls.__name__}: wire order differs from the dataclass")
    builders = [(name, build) for name, build, _ in fields]
    parsers = [(_setter(cls, name), parse) for name, _, parse in fields]
    new = object.__new__

    def build(value: Any, out: list[bytes]) -> None:
        if value.__class__ is not cls:
            raise Fallback
        for name, field_build in builders:
            field_build(getattr(value, name), out)

    def parse(buf: bytes, pos: int) -> tuple[Any, int]:
        value: Any = new(cls)
        for set_field, field_parse in parsers:
            field_value, pos = field_parse(buf, pos)
            set_field(value, field_value)
        return value, pos

    return build, parse


_BUILDERS: dict[FrameType, _Build] = {}
_PARSERS: dict[FrameType, _Parse] = {}
for _ftype, _record in _wire.BODIES.items():
    _BUILDERS[_ftype], _PARSERS[_ftype] = _compile_record(_record.cls, _record.subcon)
_SET_REQUEST_ID = _setter(ev.Event, "request_id")

_FAILURES = (Fallback, struct.error, UnicodeError, IndexError, TypeError, ValueError, OverflowError)


def build_body(event: ev.Event) -> bytes:
    """Body bytes of ``event``, equal to ``_wire.build_body``; raises ``Fallback`` when unsure."""
    out: list[bytes] = []
    try:
        _BUILDERS[event.FRAME](event, out)
    except _FAILURES:
        raise Fallback from None
    return b"".join(out)


def parse_body(ftype: FrameType, body: bytes, request_id: int = 0) -> ev.Event:
    """The event in ``body``, equal to ``_wire.parse_body``; raises ``Fallback`` when unsure."""
    try:
        event, end = _PARSERS[ftype](body, 0)
    except _FAILURES:
        raise Fallback from None
    if end != len(body):
        raise Fallback
    _SET_REQUEST_ID(event, request_id)  # an event's request_id comes from the header
    result: ev.Event = event
    return result
