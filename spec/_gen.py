"""What the generators in spec/ share: where the repository is, and the command line that refreshes a file.

How this works. spec/gen_examples.py (spec/PROTOCOL.md) and spec/gen_js.py (server/static/chorus.js) each
rewrite the generated parts of one file from ``chorus.proto`` with a ``refresh(text) -> text`` function, so that
no table of the protocol is copied by hand (STYLE.md §20). ``main`` gives both the same three modes:

    python spec/gen_X.py            # print what the generator makes
    python spec/gen_X.py --write    # refresh the file in place
    python spec/gen_X.py --check    # exit 1 if the file is stale

The generators are run as scripts and loaded by file path in tests (spec/ is not a package), so each puts spec/ on
``sys.path`` before ``import _gen``; importing this module puts the repository root there too.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None, *, doc: str, target: Path, refresh: Callable[[str], str],
         show: Callable[[], None], fix: str, parts: str) -> int:
    """The command line of a generator of ``target``'s ``parts``: print them (``show``), ``--write`` them in place
    (only if ``refresh`` changes the file), or ``--check`` (exit 1, saying to run ``fix``, if it would)."""
    name = target.relative_to(ROOT)
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"refresh {name} in place")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {name} is stale")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        show()
        return 0
    text = target.read_text(encoding="utf-8")
    new = refresh(text)
    if args.check:
        if new != text:
            print(f"{name} is stale: run {fix}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        target.write_text(new, encoding="utf-8")
        print(f"wrote {parts} of {name}")
    return 0
