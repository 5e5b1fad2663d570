"""A short, bounded run of the fuzzing invariant as part of the normal suite (spec/PROTOCOL.md §2-§5).

How this works: ``check`` is the very function fuzz/fuzz_framing.py hands to
atheris (its docstring states the invariant). Here hypothesis drives it, with
raw bytes and with mutations of the seed corpus (a rewritten length, flipped
bits, overwritten, inserted, padded and deleted bytes, truncations, splices), for a few hundred inputs;
then every file in fuzz/corpus/ -- the seeds and whatever the fuzzer kept --
is replayed whole, byte at a time and in uneven pieces. Neither needs atheris.
The corpus's named seeds are what fuzz/make_corpus.py makes from proto and the
spec today (one per frame type, so a new frame type is seeded): a stale or
missing seed fails ``test_corpus_has_the_seeds`` until ``make corpus`` runs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chorus.proto import FrameType

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, FUZZ / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_harness():
    return _load("fuzz_framing")


check = _load_harness().check
CORPUS = sorted(p for p in (FUZZ / "corpus").iterdir() if p.is_file())
SEEDS = [p.read_bytes()[1:] for p in CORPUS]


def test_corpus_has_the_seeds():
    """Every seed make_corpus.py makes is there as it makes it today (one per frame type, the sessions, the spec's
    examples), and no spec seed is left over from an older spec."""
    seeds = _load("make_corpus").seeds()
    assert {f"frame-{ftype.name}" for ftype in FrameType} <= set(seeds)
    assert {"frame-MESSAGE-compressed", "stream-client-session", "stream-server-session"} <= set(seeds)
    on_disk = {p.name: p for p in CORPUS}
    stale = sorted(name for name, data in seeds.items() if name not in on_disk or on_disk[name].read_bytes() != data)
    left_over = sorted(name for name in on_disk if name.startswith("spec-") and name not in seeds)
    assert not stale and not left_over, f"fuzz/corpus is stale ({stale + left_over}): run `make corpus`"


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
