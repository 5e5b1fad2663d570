"""Types are checked (STYLE.md §22): mypy, strict on ``chorus.proto`` (setup.cfg ``[mypy]``).

How this works. mypy cannot follow setuptools' editable install (``chorus.proto`` is the ``proto/``
directory through an import hook), so the test lays the package out as it installs, ``chorus/`` with
``proto`` linked in, in a temporary directory, and runs ``mypy -p chorus.proto`` there with the
repository's setup.cfg. By hand, the same: ``python tests/test_types.py``.
"""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_mypy(workdir: Path, package: str = "chorus.proto") -> subprocess.CompletedProcess[str]:
    """``mypy -p package`` on the installed layout, built under ``workdir``, with the repository's config."""
    tree = workdir / "tree"
    (tree / "chorus").mkdir(parents=True, exist_ok=True)
    for name, target in (("__init__.py", ROOT / "chorus" / "__init__.py"), ("proto", ROOT / "proto")):
        link = tree / "chorus" / name
        if not link.exists():
            link.symlink_to(target)
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg"),
               "--cache-dir", str(workdir / "mypy-cache"), "-p", package]
    return subprocess.run(command, cwd=tree, env={**os.environ, "MYPYPATH": str(tree)},
                          capture_output=True, text=True, timeout=600)


def test_mypy_strict_on_proto_passes(tmp_path):
    result = run_mypy(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_proto_is_checked_strictly():
    """The config this test runs with really is strict for every module of chorus.proto."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    sections = [s for s in config.sections() if s.startswith("mypy-") and "chorus.proto" in s.split(",")[0]]
    assert any(config.getboolean(s, "strict", fallback=False) and "chorus.proto.*" in s for s in sections), sections
    # construct is untyped: subclassing it is the one strictness _wire gives up, and nothing else relaxes proto
    relaxed = {s: dict(config[s]) for s in sections if not config.getboolean(s, "strict", fallback=False)}
    assert relaxed == {"mypy-chorus.proto._wire": {"disallow_subclassing_any": "False"}}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_mypy(Path(tmp))
    print(outcome.stdout + outcome.stderr, end="")
    sys.exit(outcome.returncode)
