"""What a client request can raise besides ``trio.TooSlowError`` (spec/PROTOCOL.md §7).

``ServerError`` is the server's ERROR answer to one request: the connection is
fine and other requests go on. ``ConnectionLost`` means the request cannot be
answered at all: the connection ended and the client will not (or may no
longer) reconnect.
"""
from __future__ import annotations

from chorus import proto


class ServerError(Exception):
    """The server answered a request with ERROR; ``code`` is a ``proto.ErrorCode``."""

    def __init__(self, code: proto.ErrorCode, message: str = "", retry_after_ms: int = 0):
        self.code = proto.ErrorCode(code)
        self.message = message
        self.retry_after_ms = retry_after_ms
        super().__init__(f"{self.code.name}: {message}" if message else self.code.name)

    @classmethod
    def from_event(cls, event: proto.Error) -> "ServerError":
        return cls(event.code, event.message, event.retry_after_ms)


class ConnectionLost(Exception):
    """The connection ended before the request was answered and no reconnect will answer it.

    ``reason`` is the server's close reason when it said one (BYE), else None.
    """

    def __init__(self, message: str = "connection lost", reason: proto.CloseReason | None = None):
        super().__init__(message)
        self.reason = reason
