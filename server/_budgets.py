"""What one user or one address may spend, across all its connections (spec §9.1, §9.11; DESIGN.md "Failure is local").

A connection's own frame rate is its ``ClientConnection``'s business; the budgets
here span connections, so a peer cannot multiply them by opening more:

- logins: failures are counted per address and per user name; after
  ``login_free_failures`` of them each further attempt waits 1, 2, 4 ... s up to
  ``login_backoff_max_s`` and is refused without hashing until then (RATE_LIMITED).
  A failure is counted when the attempt starts (so concurrent guesses see it) and
  taken back if the password was right; success forgets the user name's failures
  but not the address's (an attacker's own account must not wash its address clean);
- password hashes: ``HashQueue`` (server/_auth.py), SERVER_BUSY when full;
- token resumes: ``Paced``, at most ``MAX_RESUMES_RUNNING`` at once and ``MAX_RESUMES_WAITING`` queued, the rest
  refused SERVER_BUSY with a retry hint spread over the time the queue needs to drain (a server restarted after
  a crash gets every client's RESUME in the same second: it serves them in turn instead of all at once);
- SENDs per user (``user_send_rate_per_s``/``user_send_burst``), rooms created
  per user and accounts registered per address (per hour): token buckets.

Every table is bounded (``max_entries`` keys), so rotating names or addresses
costs an attacker memory it cannot make us keep.
"""
from __future__ import annotations

import random
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import trio

from ._auth import AuthClock, Busy, HashQueue
from ._ratelimit import Backoff, BucketTable

if TYPE_CHECKING:
    from ._config import Config

#: Failed logins older than this (since the key's latest failure) are forgotten.
LOGIN_FAILURE_WINDOW_S = 900.0
#: Keys per table: about 100 bytes each, so a table stays within tens of megabytes whatever is rotated.
MAX_ENTRIES = 100_000
#: RESUMEs served at once (each is a store read, a session touch and a read of the user's conversations)...
MAX_RESUMES_RUNNING = 16
#: ...and queued behind them; beyond that SERVER_BUSY with a hint.
MAX_RESUMES_WAITING = 1024


class Paced:
    """At most ``running`` requests at once, ``waiting`` more queued in arrival order, the rest refused with ``Busy``.

    The retry hint is the time the queue needs to drain (from how long requests took lately), times a random
    factor in [1, 2): refused clients come back spread out, not all together.
    """

    def __init__(self, running: int, waiting: int, rng: random.Random | None = None):
        self.limiter = trio.CapacityLimiter(running)
        self.max_waiting = waiting
        self.waiting = 0
        self.refused = 0
        self._took_s = 0.005  # moving average of one request's time
        self._rng = rng or random.Random()

    def retry_after_s(self) -> float:
        running = self.limiter.total_tokens
        drain = (self.waiting + running) * self._took_s / running
        return max(0.05, drain) * (1 + self._rng.random())

    @asynccontextmanager
    async def slot(self, clock: AuthClock | None = None) -> AsyncIterator[None]:
        """Hold one of the ``running`` places while the body runs; raises ``Busy`` when the queue is full.

        ``clock``: the connection asking, whose auth deadline does not count the wait nor the hint."""
        if self.waiting >= self.max_waiting and not self.limiter.available_tokens:
            self.refused += 1
            busy = Busy(self.retry_after_s())
            if clock is not None:
                clock.auth_refused(busy.retry_after_s)
            raise busy
        self.waiting += 1
        if clock is not None:
            clock.auth_waiting(True)
        try:
            await self.limiter.acquire()  # first come, first served
        finally:
            self.waiting -= 1
            if clock is not None:
                clock.auth_waiting(False)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.limiter.release()
            self._took_s += (time.perf_counter() - start - self._took_s) / 16

    def statistics(self) -> dict:
        return {"running": self.limiter.borrowed_tokens, "waiting": self.waiting, "refused": self.refused}


class Budgets:
    def __init__(self, config: "Config", *, max_entries: int = MAX_ENTRIES):
        self.config = config
        self.hashes = HashQueue(config.max_pending_hashes)
        self.resumes = Paced(MAX_RESUMES_RUNNING, MAX_RESUMES_WAITING)
        self.login_by_address = Backoff(config.login_free_failures, config.login_backoff_max_s,
                                        window_s=LOGIN_FAILURE_WINDOW_S, max_entries=max_entries)
        self.login_by_name = Backoff(config.login_free_failures, config.login_backoff_max_s,
                                     window_s=LOGIN_FAILURE_WINDOW_S, max_entries=max_entries)
        self.sends = BucketTable(config.user_send_rate_per_s, config.user_send_burst, max_entries)
        self.rooms_created = BucketTable(config.rooms_created_per_hour / 3600, config.rooms_created_per_hour,
                                         max_entries)
        self.registrations = BucketTable(config.registrations_per_hour / 3600, config.registrations_per_hour,
                                         max_entries)

    # -- logins ---------------------------------------------------------------------------------------------
    def login_wait_s(self, address: str, name: str, now: float) -> float:
        """Seconds before a LOGIN from ``address`` for ``name`` may be tried (0.0: now)."""
        return max(self.login_by_address.wait_s(address, now), self.login_by_name.wait_s(name, now))

    def login_started(self, address: str, name: str, now: float) -> tuple[int, int]:
        """Count the attempt as a failure until it proves otherwise; returns the failures (address, name)."""
        return self.login_by_address.failed(address, now), self.login_by_name.failed(name, now)

    def login_undone(self, address: str, name: str) -> None:
        """The attempt never reached a verdict (busy, store error, cancelled): it counts for nothing."""
        self.login_by_address.undo(address)
        self.login_by_name.undo(name)

    def login_succeeded(self, address: str, name: str) -> None:
        self.login_by_address.undo(address)
        self.login_by_name.forget(name)

    def statistics(self) -> dict:
        return {
            "hashes": self.hashes.statistics(),
            "resumes": self.resumes.statistics(),
            "login_addresses": len(self.login_by_address),
            "login_names": len(self.login_by_name),
            "send_buckets": len(self.sends),
        }


def budgets_of(server) -> Budgets:
    """The server's ``Budgets`` (``Server.budgets``), created from its config on first use."""
    budgets = getattr(server, "budgets", None)
    if budgets is None:
        budgets = server.budgets = Budgets(server.config)
    return budgets
