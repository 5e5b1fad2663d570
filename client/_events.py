"""Client-level events, mixed into ``Client.events()`` with the server's pushes.

Like the protocol's events (proto/_events.py) they are frozen dataclasses, so a
consumer can match on type. They say what happened to the connection, not what
the server said.
"""
from __future__ import annotations

from dataclasses import dataclass

from chorus import proto


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended. ``reason`` is the server's BYE reason, STALE when the
    heartbeat gave up, PROTOCOL_ERROR when the server's bytes were bad, else
    PEER_CLOSED. ``will_reconnect`` is False when this client is done for good
    (reconnect off, LOGOUT, or a reconnect refused for good, e.g. AUTH_FAILED)."""

    reason: proto.CloseReason
    message: str = ""
    will_reconnect: bool = True


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A new connection is up: authenticated, caught up (its SYNC pages are already
    in the event stream before this event) and every unanswered request re-sent."""

    attempts: int = 1


@dataclass(frozen=True, slots=True)
class Page:
    """A page of a conversation from ``Client.history``: its messages, and on a version 2 connection its events
    (moderation, spec §9.15) that share the seqs; ``entries`` merges both in seq order."""

    conv: proto.Conversation
    messages: tuple[proto.StoredMessage, ...]
    events: tuple[proto.ConvEvent, ...]
    has_more: bool

    @property
    def entries(self) -> list[proto.StoredMessage | proto.ConvEvent]:
        return sorted([*self.messages, *self.events], key=lambda entry: entry.seq)
