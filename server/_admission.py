"""Socket slots: how many connections the server holds, in total and per address (DESIGN.md "Failure is local").

A slot is taken the moment a socket is accepted, on either port, and held until
the socket is closed, so a WebSocket still in its HTTP phase counts like any
Chorus connection. One address may hold at most ``per_address`` slots, so one
client (or one attacker) cannot take the whole server; a NAT puts many people
behind one address, hence a generous default. The total stays below the
process's open-file limit (``open_file_budget``): past it ``accept`` would fail
with EMFILE instead of the client getting a clear TOO_MANY_CONNECTIONS.

New connections per address are rate limited too (a token bucket): a client that
reconnects in a loop would otherwise make the server pay a whole connection setup
and teardown every few milliseconds, refused or not.
"""
from __future__ import annotations

import logging
import resource
import time

from ._ratelimit import BucketTable

log = logging.getLogger("chorus.server")

#: File descriptors kept for everything that is not a client: listeners, SQLite and its WAL, logs, threads.
RESERVED_FDS = 64


def open_file_budget() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return how many client sockets fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may refuse; then live with the soft limit
            pass
    return max(1, soft - RESERVED_FDS)


class Admission:
    """Counts open sockets; ``acquire`` says whether one more from ``address`` may stay."""

    __slots__ = ("total_limit", "per_address", "total", "_by_address", "_rates", "refused")

    def __init__(self, total_limit: int, per_address: int, rate_per_s: float = 1e9, burst: int = 1 << 30):
        self.total_limit = total_limit
        self.per_address = per_address
        self.total = 0
        self._by_address: dict[str, int] = {}
        self._rates = BucketTable(rate_per_s, burst)
        self.refused = 0

    def acquire(self, address: str) -> str | None:
        """Take a slot for ``address``; None on success, else why not (a short text for the ERROR)."""
        if self.total >= self.total_limit:
            self.refused += 1
            return "server full"
        held = self._by_address.get(address, 0)
        if held >= self.per_address:
            self.refused += 1
            return f"at most {self.per_address} connections per address"
        if self._rates.take(address, time.monotonic()):
            self.refused += 1
            return "too many new connections from this address; retry later"
        self._by_address[address] = held + 1
        self.total += 1
        return None

    def release(self, address: str) -> None:
        held = self._by_address.get(address, 0)
        if held <= 1:
            self._by_address.pop(address, None)
        else:
            self._by_address[address] = held - 1
        self.total -= 1

    def held_by(self, address: str) -> int:
        return self._by_address.get(address, 0)
