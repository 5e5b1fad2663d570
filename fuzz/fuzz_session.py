"""Long runs of the session-level fuzzer against a real server (issue 9), outside pytest.

INVARIANT (tests/sessionfuzz.py states it in full): whatever well-formed frames logged-in and not-yet-logged-in
clients send, in whatever state, the server never exits and logs no traceback; every request gets its reply or
an ERROR with its request_id (never INTERNAL), never silence; a connection ends only as the spec allows, with
ERROR and BYE; two honest bystanders keep chatting with no gap; and the SQLite file stays consistent (gapless
seqs, cursors within them, every ACKed message stored as acknowledged).

    python fuzz/fuzz_session.py                       # 2000 examples of up to 50 steps (tens of minutes)
    python fuzz/fuzz_session.py --examples 200 --steps 100
    CHORUS_FUZZ_EXAMPLES=2000 make test ARGS=tests/test_session_fuzz.py   # the same machine under pytest

Each run explores anew. A failure is shrunk to a short sequence of steps, printed with the frames each step sent
(as events and as hex) and what came back, and kept in .hypothesis/ so that the next run replays it first.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # runnable from a bare checkout, like fuzz_framing.py

from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from sessionfuzz import SessionMachine, fuzz_settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples to run (default 2000)")
    parser.add_argument("--steps", type=int, default=50, help="most steps per example (default 50)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    run_state_machine_as_test(SessionMachine, settings=fuzz_settings(args.examples, args.steps, reproducible=False))
    print(f"{args.examples} examples of up to {args.steps} steps held the invariant "
          f"({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
