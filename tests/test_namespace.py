"""One namespace (issue 10): Chorus installs ``chorus`` and nothing else at the top level.

Google's proto-plus installs a top-level ``proto``; a ``server`` or ``client`` package is just as likely. So the
repository's ``proto/``, ``server/`` and ``client/`` install as ``chorus.proto``, ``chorus.server`` and
``chorus.client`` (setup.cfg ``package_dir``), and nothing in the repository imports them by their bare names.
"""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BARE_IMPORT = re.compile(r"^\s*(?:import|from)\s+(proto|server|client)\b", re.M)


def test_the_distribution_installs_only_chorus():
    dist = importlib.metadata.distribution("chorus")
    assert dist.read_text("top_level.txt").split() == ["chorus"]
    for entry in dist.entry_points:
        assert entry.value.startswith("chorus."), entry


def test_the_packages_are_the_repository_directories():
    import chorus.client
    import chorus.proto
    import chorus.server

    for package, directory in ((chorus.proto, "proto"), (chorus.server, "server"), (chorus.client, "client")):
        assert Path(package.__file__).resolve() == ROOT / directory / "__init__.py"
    assert chorus.__version__ == importlib.metadata.version("chorus")


def test_nothing_imports_the_bare_names():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    offenders = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}" for name in files
                 if (ROOT / name).exists()
                 for text in [(ROOT / name).read_text()] for m in BARE_IMPORT.finditer(text)]
    assert offenders == []


def test_the_bare_names_are_not_ours():
    probe = "import importlib.util, sys; spec = importlib.util.find_spec(sys.argv[1]); print(spec and spec.origin)"
    for name in ("proto", "server", "client"):
        result = subprocess.run([sys.executable, "-c", probe, name], cwd="/", capture_output=True, text=True,
                                check=True)
        assert str(ROOT) not in result.stdout, f"{name} resolves into the repository: {result.stdout}"
