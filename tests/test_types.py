"""Types are checked (STYLE.md §22): mypy on the whole package, strict on ``chorus.proto`` (setup.cfg ``[mypy]``).

How this works. mypy cannot follow setuptools' editable install (``chorus.proto`` is the ``proto/``
directory through an import hook), so the test lays the package out as it installs, ``chorus/`` with
``proto``, ``server`` and ``client`` linked in, in a temporary directory, and runs mypy there with the
repository's setup.cfg: ``-p chorus.proto`` (strict) and ``-p chorus`` (everything, strict only inside proto).
Strictness comes from the config alone (no ``--strict`` on the command line), and a third test proves that
config is strict for proto and for proto only: in a copy of proto, an untyped function is an error inside
``chorus.proto`` and not outside it. By hand: ``python tests/test_types.py [chorus.proto]`` (default: ``chorus``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The subpackages of ``chorus`` and their directories (setup.cfg ``package_dir``).
SUBPACKAGES = ("proto", "server", "client")


def run_mypy(workdir: Path, package: str = "chorus.proto", *, copy: bool = False) -> subprocess.CompletedProcess[str]:
    """``mypy -p package`` on the installed layout, built under ``workdir``, with the repository's config.

    ``copy`` copies proto/ instead of linking it, so that a test may add modules to it.
    """
    tree = workdir / "tree"
    (tree / "chorus").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "chorus" / "__init__.py", tree / "chorus" / "__init__.py")
    for name in SUBPACKAGES:
        target = tree / "chorus" / name
        if target.exists():
            continue
        if copy and name == "proto":
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.symlink_to(ROOT / name)
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg"),
               "--cache-dir", str(workdir / "mypy-cache"), "-p", package]
    return subprocess.run(command, cwd=tree, env={**os.environ, "MYPYPATH": str(tree)},
                          capture_output=True, text=True, timeout=600)


def test_mypy_strict_on_proto_passes(tmp_path):
    result = run_mypy(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_mypy_passes_on_the_whole_package(tmp_path):
    """Server and client too, with the same config: not strict outside proto, but every error counts."""
    result = run_mypy(tmp_path, "chorus")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout
    # Every subpackage was read (mypy also counts a directory without Python, server/static, as a module).
    modules = sum(len(list((ROOT / name).glob("*.py"))) for name in SUBPACKAGES) + 1  # + chorus/__init__.py
    checked = re.search(r"in (\d+) source files", result.stdout)
    assert checked is not None and int(checked[1]) >= modules, (result.stdout, modules)


def test_both_transports_are_transports(tmp_path):
    """TCP's stream and the WebSocket bridge's adapter implement server/_transport.py's ``Transport`` as mypy sees
    them: every attribute explicit, none left to ``getattr``. (``bare`` shows the probe can fail.)"""
    run_mypy(tmp_path)  # lays out the tree
    (tmp_path / "tree" / "chorus" / "transport_probe.py").write_text(
        "from chorus.server._transport import SocketStream, Transport\n"
        "from chorus.server._websocket import WebSocketTransport\n\n\n"
        "def tcp(stream: SocketStream) -> Transport:\n    return stream\n\n\n"
        "def websocket(adapter: WebSocketTransport) -> Transport:\n    return adapter\n\n\n"
        "def bare(thing: object) -> Transport:\n    return thing\n")
    result = run_mypy(tmp_path, "chorus")
    probe = [line for line in result.stdout.splitlines() if line.startswith("chorus/transport_probe.py")]
    assert len(probe) == 1 and '(got "object", expected "Transport")' in probe[0], probe  # bare alone


def test_the_config_is_strict_for_proto_and_only_for_proto(tmp_path):
    untyped = "def twice(x):\n    return x * 2\n\n\nvalue = twice(2)\n"
    result = run_mypy(tmp_path, copy=True)  # lays out the copy
    assert result.returncode == 0, result.stdout
    (tmp_path / "tree" / "chorus" / "proto" / "untyped_probe.py").write_text(untyped)
    (tmp_path / "tree" / "chorus" / "untyped_probe.py").write_text(untyped)  # outside proto
    # a name a proto module imports but does not export (no implicit re-export), and one __init__ exports
    (tmp_path / "tree" / "chorus" / "reexport_probe.py").write_text(
        "from chorus.proto._connection import LocalProtocolError\nfrom chorus.proto import NEED_DATA\n")
    result = run_mypy(tmp_path, "chorus")
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert any(line.startswith("chorus/proto/untyped_probe.py") and "[no-untyped-def]" in line
               for line in errors), errors
    assert not any(line.startswith("chorus/untyped_probe.py") for line in errors), errors
    probe = [line for line in errors if line.startswith("chorus/reexport_probe.py")]
    assert len(probe) == 1 and '"LocalProtocolError"' in probe[0] and "explicitly export" in probe[0], probe


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_mypy(Path(tmp), *sys.argv[1:2] or ["chorus"])
    print(outcome.stdout + outcome.stderr, end="")
    sys.exit(outcome.returncode)
