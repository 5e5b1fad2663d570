"""The two kinds of protocol error (STYLE.md §4, after h11's ``_util.py``).

``LocalProtocolError`` means our own code misused the protocol: a bug on this side.
``RemoteProtocolError`` means the peer sent something wrong; it carries the
``ErrorCode`` to put in the ERROR frame sent back before closing (spec §7).
"""
from __future__ import annotations

from ._const import ErrorCode


class ProtocolError(Exception):
    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED_FRAME):
        super().__init__(message)
        self.code = ErrorCode(code)


class LocalProtocolError(ProtocolError):
    """Raised when this side tries to send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """Raised when the peer's bytes break the protocol; ``code`` goes in the ERROR reply."""
