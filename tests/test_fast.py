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


def test_fast_build_declines_what_construct_refuses():
    bad = [
        proto.Send(proto.Conversation.room("x" * 33), 1, "hi"),  # name over 32 bytes
        proto.Send(proto.Conversation(9, "x"), 1, "hi"),  # not a ConvKind
        proto.Ack(proto.Conversation.room("x"), -1, 1, 1, False),  # negative u64
        proto.Ack(proto.Conversation.room("x"), 1, 1, 1, 1),  # not a bool
        proto.Send(proto.Conversation.room("x"), 1, "\udc80"),  # not encodable
    ]
    for event in bad:
        with pytest.raises(_fast.Fallback):
            _fast.build_body(event)
        with pytest.raises(proto.LocalProtocolError):
            proto.encode(event)
