"""Chorus server: listener, connections, hub and store (see README and spec/PROTOCOL.md)."""
from ._app import Server, serve
from ._config import DEFAULT_PORT, DEFAULT_WS_PORT, Config, config_from_args

__all__ = ["Config", "DEFAULT_PORT", "DEFAULT_WS_PORT", "Server", "config_from_args", "serve"]
