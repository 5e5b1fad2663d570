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
- SENDs per user (``user_send_rate_per_s``/``user_send_burst``), rooms created
  per user and accounts registered per address (per hour): token buckets.

Every table is bounded (``max_entries`` keys), so rotating names or addresses
costs an attacker memory it cannot make us keep.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._auth import HashQueue
from ._ratelimit import Backoff, BucketTable

if TYPE_CHECKING:
    from ._config import Config

#: Failed logins older than this (since the key's latest failure) are forgotten.
LOGIN_FAILURE_WINDOW_S = 900.0
#: Keys per table: about 100 bytes each, so a table stays within tens of megabytes whatever is rotated.
MAX_ENTRIES = 100_000


class Budgets:
    def __init__(self, config: "Config", *, max_entries: int = MAX_ENTRIES):
        self.config = config
        self.hashes = HashQueue(config.max_pending_hashes)
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
