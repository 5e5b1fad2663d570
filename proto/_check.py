"""Field checks derived from the wire declarations in ``_wire`` (spec §3; STYLE.md §19).

Every event and nested value checks its fields when it is made (``_events._Checked``):
this module walks the construct declarations once at import, like ``_fast``, and
registers one check per class in ``_events.CHECKS``. A check tests what the wire
can carry, without encoding anything: integers in range (no bools), text of at
most so many UTF-8 bytes (and encodable), enum members, real booleans, tuples of
at most 1000 items, nested values of the declared class, and a u32 ``request_id``.
Nested values were checked when they were made, so a check looks only at their
class. It raises ``LocalProtocolError`` naming the class and the field
(``Join.room: 40 bytes > 32``), with ``FIELD_TOO_LARGE`` or ``INVALID_FIELD``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from construct import Construct, FormatField

from . import _events as ev
from . import _wire
from ._const import ErrorCode
from ._errors import LocalProtocolError

_Check = Callable[[Any], None]
_U32_MAX = 2**32 - 1


class _Invalid(Exception):
    """A value the field cannot carry: ``where`` (an item index, or "") and a short ``reason``."""

    def __init__(self, reason: str, code: ErrorCode = ErrorCode.INVALID_FIELD, where: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.where = where


def _integer(max_value: int) -> _Check:
    def check(value: Any) -> None:
        if value.__class__ is not int and (not isinstance(value, int) or isinstance(value, bool)):
            raise _Invalid(f"expected int, not {type(value).__name__}")
        if not 0 <= value <= max_value:
            raise _Invalid(f"{value} is not in 0..{max_value}")

    return check


def _text(max_bytes: int) -> _Check:
    def check(value: Any) -> None:
        if value.__class__ is not str and not isinstance(value, str):
            raise _Invalid(f"expected str, not {type(value).__name__}")
        if value.isascii():
            size = len(value)
        else:
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise _Invalid("not encodable as UTF-8") from None
        if size > max_bytes:
            raise _Invalid(f"{size} bytes > {max_bytes}", ErrorCode.FIELD_TOO_LARGE)

    return check


def _enum(con: _wire._Enum) -> _Check:
    members = con.enum_cls._value2member_map_
    name = con.enum_cls.__name__

    def check(value: Any) -> None:
        try:
            known = value.__class__ is not bool and value in members
        except TypeError:  # unhashable
            known = False
        if not known:
            raise _Invalid(f"{value!r} is not a {name}")

    return check


def _bool(value: Any) -> None:
    if value is not True and value is not False:
        raise _Invalid(f"expected bool, not {type(value).__name__}")


def _instance_of(cls: type) -> _Check:
    def check(value: Any) -> None:
        if value.__class__ is not cls:
            raise _Invalid(f"expected {cls.__name__}, not {type(value).__name__}")

    return check


def _array(con: _wire._Array) -> _Check:
    item_check = _field_check(con.subcon)
    limit = con.max_items

    def check(value: Any) -> None:
        if value.__class__ is not tuple:
            raise _Invalid(f"expected a tuple, not {type(value).__name__}")
        if len(value) > limit:
            raise _Invalid(f"{len(value)} items > {limit}", ErrorCode.FIELD_TOO_LARGE)
        for i, item in enumerate(value):
            try:
                item_check(item)
            except _Invalid as exc:
                raise _Invalid(exc.reason, exc.code, f"[{i}]{exc.where}") from None

    return check


def _field_check(con: Construct) -> _Check:
    """The check of one field's value."""
    if isinstance(con, FormatField):
        return _integer(2 ** (8 * con.length) - 1)
    if isinstance(con, _wire._Text):
        return _text(con.max_bytes)
    if isinstance(con, _wire._Enum):
        return _enum(con)
    if isinstance(con, _wire._Bool):
        return _bool
    if isinstance(con, _wire._Array):
        return _array(con)
    if isinstance(con, _wire._Record):
        return _instance_of(con.cls)  # checked when it was made
    raise TypeError(f"no check for {con!r}: teach proto._check this construct")


def _record_check(record: _wire._Record, with_request_id: bool) -> _Check:
    """The check of a whole event or nested value: every field, then the request id.

    Like ``_fast``, it accepts the common case quickly and lets the precise path judge the rest: plain ints in
    range and text within its limit pass inline; anything else (an IntEnum, a bad value) goes through every
    field's own check, which accepts it or raises naming the field.
    """
    ints: list[tuple[str, int]] = []
    texts: list[tuple[str, int]] = []
    others: list[tuple[str, _Check]] = []
    for sub in record.subcon.subcons:
        if sub.name is None:
            continue
        if isinstance(sub.subcon, FormatField):
            ints.append((sub.name, 2 ** (8 * sub.subcon.length) - 1))
        elif isinstance(sub.subcon, _wire._Text):
            texts.append((sub.name, sub.subcon.max_bytes))
        else:
            others.append((sub.name, _field_check(sub.subcon)))
    if with_request_id:
        ints.append(("request_id", _U32_MAX))
    precise = [(name, _integer(hi)) for name, hi in ints] + [(name, _text(n)) for name, n in texts] + others
    cls_name = record.cls.__name__

    def check_precisely(value: Any) -> None:
        for name, field_check in precise:
            try:
                field_check(getattr(value, name))
            except _Invalid as exc:
                raise LocalProtocolError(f"{cls_name}.{name}{exc.where}: {exc.reason}", exc.code) from None

    def check(value: Any) -> None:
        for name, max_value in ints:
            number = getattr(value, name)
            if number.__class__ is not int or number < 0 or number > max_value:
                return check_precisely(value)
        for name, max_bytes in texts:
            text = getattr(value, name)
            if text.__class__ is not str or len(text) > max_bytes:
                return check_precisely(value)
            if not text.isascii():
                try:
                    if len(text.encode("utf-8")) > max_bytes:
                        return check_precisely(value)
                except UnicodeEncodeError:
                    return check_precisely(value)
        for name, field_check in others:
            try:
                field_check(getattr(value, name))
            except _Invalid:
                return check_precisely(value)
        return None

    return check


def _records() -> list[_wire._Record]:
    """Every record construct in the declarations: frame bodies and the values nested in them."""
    found: dict[type, _wire._Record] = {}

    def walk(con: Construct) -> None:
        if isinstance(con, _wire._Record):
            found.setdefault(con.cls, con)
            for sub in con.subcon.subcons:
                walk(sub)
        elif hasattr(con, "subcon"):  # Renamed, _Array, ...
            walk(con.subcon)

    for body in _wire.BODIES.values():
        walk(body)
    return list(found.values())


for _record in _records():
    ev.CHECKS[_record.cls] = _record_check(_record, issubclass(_record.cls, ev.Event))
