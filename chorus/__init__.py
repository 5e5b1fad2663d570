"""Chorus: a real-time chat server on Trio (see README.md and spec/PROTOCOL.md).

``chorus.proto`` is the sans-IO wire protocol, ``chorus.server`` the server and ``chorus.client`` the client
library; their code lives in the repository's top-level ``proto/``, ``server/`` and ``client/`` directories.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chorus")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
