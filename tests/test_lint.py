"""Lint runs in `make test` (STYLE.md §22): ``ruff check`` on every directory that holds Python.

How this works. The rules are pyproject.toml's ``[tool.ruff]`` (pycodestyle errors and warnings, pyflakes,
bugbear; 120 columns); this test only says where they apply. It runs ruff from this environment (setup.cfg's test
extra installs it) without a cache, so that it writes nothing into the checkout, and fails with ruff's findings, one
per line. A second test keeps the list of directories whole: a new top-level directory with Python in it is linted
too or this fails. Without ruff the lint test skips, except under CI=true, where it fails (``service_required``).
By hand: ``python -m ruff check`` at the top of the repository (it reads the same config).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import service_required

ROOT = Path(__file__).resolve().parent.parent
#: Every directory of the repository that holds Python (the package's, and the tools around it).
LINTED = ("chorus", "proto", "server", "client", "tests", "bench", "fuzz", "spec")


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        service_required("ruff", "pip install -e '.[test]' installs it")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *LINTED],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_python_directory_is_linted():
    holding_python = {
        path.name for path in ROOT.iterdir()
        if path.is_dir() and not path.name.startswith(".") and not path.name.endswith(".egg-info")
        and any(path.rglob("*.py"))
    }
    assert holding_python <= set(LINTED), sorted(holding_python - set(LINTED))
