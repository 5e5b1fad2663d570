"""The fast codec (proto/_fast.py) must agree with construct's checked path byte for byte."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus import proto
from chorus.proto import FrameType, _fast, _wire
from test_proto import any_event, events_of


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
@given(data=st.data())
@settings(max_examples=20, deadline=None)
def test_fast_build_and_parse_equal_construct(ftype, data):
    event = data.draw(events_of(ftype))
    body = _wire.build_body(event)
    assert _fast.build_body(event) == body
    assert _fast.parse_body(ftype, body) == _wire.parse_body(ftype, body)


@given(ftype=st.sampled_from(list(FrameType)), body=st.binary(max_size=200))
@settings(max_examples=600, deadline=None)
def test_fast_parse_of_any_bytes_never_disagrees(ftype, body):
    """Where the fast path answers, construct gives the same event; where it declines, construct decides."""
    try:
        fast = _fast.parse_body(ftype, body)
    except _fast.Fallback:
        return
    assert fast == _wire.parse_body(ftype, body)


@given(event=any_event(max_text=300), cut=st.integers(min_value=0))
@settings(max_examples=300, deadline=None)
def test_fast_parse_of_mutated_bodies_never_disagrees(event, cut):
    body = bytearray(_wire.build_body(event))
    if body:
        body[cut % len(body)] ^= 0xFF  # flip one byte: lengths, enums, UTF-8 and bools all get hit
    try:
        fast = _fast.parse_body(event.FRAME, bytes(body))
    except _fast.Fallback:
        return
    assert fast == _wire.parse_body(event.FRAME, bytes(body))


def _forced(event, **fields):
    """``event`` with ``fields`` set behind the dataclass's back, skipping the check that construction runs."""
    for name, value in fields.items():
        object.__setattr__(event, name, value)
    return event


def test_fast_build_declines_what_construct_refuses():
    room = proto.Conversation.room("x")
    bad = [
        _forced(proto.Send(room, 1, "hi"), conv=_forced(proto.Conversation.room("x"), name="x" * 33)),
        _forced(proto.Send(room, 1, "hi"), conv=_forced(proto.Conversation.room("x"), kind=9)),
        _forced(proto.Ack(room, 1, 1, 1, False), client_msg_id=-1),  # negative u64
        _forced(proto.Ack(room, 1, 1, 1, False), duplicate=1),  # not a bool
        _forced(proto.Send(room, 1, "hi"), body="\udc80"),  # not encodable
    ]
    for event in bad:
        with pytest.raises(_fast.Fallback):
            _fast.build_body(event)
        with pytest.raises(proto.LocalProtocolError) as info:
            proto.encode(event)
        assert "\n" not in str(info.value) and str(info.value).startswith(type(event).__name__), info.value
        with pytest.raises(proto.LocalProtocolError):
            proto.validate(event)


def test_fast_parse_makes_what_the_checked_path_makes():
    """Parsed events skip the construction check; they must still be complete, equal, hashable events."""
    event = proto.Message(proto.Conversation.room("général"), 7, 8, "zoé", 2**64 - 1, "salut ☕", request_id=9)
    body = _wire.build_body(event)
    fast = _fast.parse_body(FrameType.MESSAGE, body, 9)
    assert fast == event and hash(fast) == hash(event) and repr(fast) == repr(event)
    proto.validate(fast)
    assert _fast.parse_body(FrameType.MESSAGE, body).request_id == 0
