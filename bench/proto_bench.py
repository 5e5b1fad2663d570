"""How long proto takes to build and parse a chat message (spec/PROTOCOL.md §4, §5.18).

How this works: a typical MESSAGE frame (a room conversation, a ~150-byte body,
about 200 bytes on the wire) is built with ``proto.encode`` and parsed both with
the stateless ``proto.decode`` and by a client ``Connection`` in the
AUTHENTICATED state (what a client does for every message it receives). Each
figure is the median, over several ``timeit`` repeats, of the time per frame
(the best repeat is shown too: on a shared machine it is the steadier number).
A compressed variant (a ~2 KB body, which lz4 shrinks) and construct's checked
path (what parsing falls back to on anything unusual) are measured the same way.
Not a test: numbers depend on the machine.

    python bench/proto_bench.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a bare checkout

from chorus import proto  # noqa: E402
from chorus.proto import _wire  # noqa: E402

ROOM = proto.Conversation.room("general")
BODY = ("Hey team, the deploy finished at 14:05 and the dashboards look healthy. "
        "I'll keep an eye on error rates; ping me if anything looks off. Thanks! 👍")
TS_MS = 1766842000000


def message(body: str) -> proto.Message:
    return proto.Message(ROOM, 123456, TS_MS, "alice", 0x5EED_0000_1234, body)


def authenticated_client() -> proto.Connection:
    """A client Connection that has walked the handshake, ready to receive MESSAGE frames."""
    client, server = proto.Connection(proto.CLIENT), proto.Connection(proto.SERVER)
    for sender, receiver, event in [
        (client, server, proto.Hello(1, 1, "bench")),
        (server, client, proto.Welcome(1, "bench", 1 << 20, 4096, 15000, 50, 100, 100, 100)),
        (client, server, proto.Resume("t" * 43, request_id=1)),
        (server, client, proto.AuthOk("alice", "t" * 43, 0, request_id=1)),
    ]:
        receiver.receive_data(sender.send(event))
        assert receiver.next_event() == event
    return client


def per_call_us(stmt, repeats: int) -> tuple[float, float]:
    """(median, best) over ``repeats`` of the µs one call of ``stmt`` takes."""
    timer = timeit.Timer(stmt)
    number, _ = timer.autorange()  # enough calls for ~0.2 s per repeat
    times = [t / number * 1e6 for t in timer.repeat(repeats, number)]
    return statistics.median(times), min(times)


def bench(name: str, event: proto.Event, repeats: int) -> None:
    frame = proto.encode(event)
    body = _wire.build_body(event)
    compressed = bool(frame[5] & proto.Flags.COMPRESSED)
    assert proto.decode(frame) == event
    client = authenticated_client()

    def receive():
        client.receive_data(frame)
        return client.next_event()

    assert receive() == event
    rows = [
        ("build  proto.encode", lambda: proto.encode(event)),
        ("parse  proto.decode (stateless)", lambda: proto.decode(frame)),
        ("parse  Connection.receive_data + next_event", receive),
    ]
    if not compressed:
        rows += [
            ("build  construct checked path (body only)", lambda: _wire.build_body(event)),
            ("parse  construct checked path (body only)", lambda: _wire.parse_body(proto.FrameType.MESSAGE, body)),
        ]
    print(f"{name}: {len(frame)}-byte frame, {len(event.body.encode())}-byte body, "
          f"{'lz4-compressed from ' + str(len(body)) + ' bytes' if compressed else 'uncompressed'}")
    for label, stmt in rows:
        median, best = per_call_us(stmt, repeats)
        print(f"  {label:<46} {median:8.2f} µs/frame  (best {best:.2f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timeit repeats; the median is shown")
    args = parser.parse_args(argv)
    print(f"Python {sys.version.split()[0]}, median of {args.repeats} repeats")
    bench("MESSAGE", message(BODY), args.repeats)
    bench("MESSAGE, compressed", message((BODY + " ") * 12), args.repeats)


if __name__ == "__main__":
    main()
