"""A short, bounded run of the fuzzing invariant as part of the normal suite (spec/PROTOCOL.md §2-§5).

How this works: ``check`` is the very function fuzz/fuzz_framing.py hands to
atheris (its docstring states the invariant). Here hypothesis drives it, with
raw bytes and with mutations of the seed corpus (a rewritten length, flipped
bits, overwritten, inserted, padded and deleted bytes, truncations, splices), for a few hundred inputs;
then every file in fuzz/corpus/ -- the seeds and whatever the fuzzer kept --
is replayed whole, byte at a time and in uneven pieces. Neither needs atheris.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _load_harness():
    spec = importlib.util.spec_from_file_location("fuzz_framing", FUZZ / "fuzz_framing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_harness().check
CORPUS = sorted(p for p in (FUZZ / "corpus").iterdir() if p.is_file())
SEEDS = [p.read_bytes()[1:] for p in CORPUS]


def test_corpus_has_the_seeds():
    names = {p.name for p in CORPUS}
    assert len(CORPUS) >= 36
    assert {"frame-MESSAGE-compressed", "stream-client-session", "stream-server-session"} <= names


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 16), st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF])),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("length"), st.one_of(st.integers(0, 3000), st.integers(0, 2**32 - 1))),
    st.tuples(st.just("pad"), st.integers(0, 1 << 16), st.integers(1, 3000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 12)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("splice"), st.integers(0, 1 << 16), st.sampled_from(SEEDS)),
)


def _mutate(data: bytes, mutation) -> bytes:
    op, at, *args = mutation
    data = bytearray(data)
    if op == "length":  # what the first header claims
        return bytes(at.to_bytes(4, "big") + data[4:])
    at = at % (len(data) + 1)
    if op == "flip" and at < len(data):
        data[at] ^= 1 << args[0]
    elif op == "set" and at < len(data):
        data[at] = args[0]
    elif op == "insert":
        data[at:at] = args[0]
    elif op == "pad":  # long runs: bodies that outgrow the harness' max_frame_bytes
        data[at:at] = bytes([args[1]]) * args[0]
    elif op == "delete":
        del data[at:at + args[0]]
    elif op == "truncate":
        del data[at:]
    elif op == "splice":
        data[at:] = args[0]
    return bytes(data)


@st.composite
def fuzz_inputs(draw) -> bytes:
    control = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) == 0:
        return bytes([control]) + draw(st.binary(max_size=200))
    data = draw(st.sampled_from(SEEDS))
    for mutation in draw(st.lists(_mutation, max_size=4)):
        data = _mutate(data, mutation)
    return bytes([control]) + data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_inputs())
def test_invariant_holds_on_mutated_input(data):
    check(data)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_replays(path):
    data = path.read_bytes()
    check(data)
    for control in (0x00, 0x01, 0x0E, 0x07, 0xFF):  # whole, bytewise, 4-byte pieces, uneven pieces
        check(bytes([control]) + data[1:])


def test_check_catches_a_broken_invariant(monkeypatch):
    """The harness really asserts: a decoder whose events do not survive re-encoding is caught."""
    harness = _load_harness()
    seed = (FUZZ / "corpus" / "frame-PING").read_bytes()
    harness.check(seed)
    monkeypatch.setattr(harness.proto, "encode", lambda event, **kw: b"\x00" * 10)
    with pytest.raises(AssertionError, match="re-encoding"):
        harness.check(seed)
