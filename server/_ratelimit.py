"""Rates and back-offs: token buckets, bounded tables of them, failure back-off (spec §9.11).

``TokenBucket`` is one budget (a connection's frames, a user's SENDs). ``BucketTable``
keeps one bucket per key (a user id, an address) in bounded memory: a bucket that
has refilled to its burst is the same as no bucket, so those are the ones dropped
when the table is full. ``Backoff`` counts failures per key (logins per address and
per user name) and says how long the key must wait before its next attempt; it too
is bounded, and forgets a key after a quiet window.
"""
from __future__ import annotations

import collections
import itertools


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate_per_s: float, burst: int, now: float):
        self.rate = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        """Return a token spent on something that did not happen after all."""
        self.tokens = min(float(self.burst), self.tokens + 1.0)

    def retry_after_s(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


def retry_ms(seconds: float) -> int:
    """A wait as ERROR's ``retry_after_ms``: rounded up, at least 1 ms, within the field's u32."""
    return min(0xFFFFFFFF, max(1, int(seconds * 1000) + 1))


class BucketTable:
    """One ``TokenBucket`` per key, at most ``max_entries`` of them."""

    __slots__ = ("rate", "burst", "max_entries", "_buckets")

    def __init__(self, rate_per_s: float, burst: int, max_entries: int = 100_000):
        self.rate = rate_per_s
        self.burst = burst
        self.max_entries = max_entries
        self._buckets: dict[object, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: object, now: float) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if it had one, else the seconds until it will."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_entries:
                self._prune(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        if bucket.take(now):
            return 0.0
        return bucket.retry_after_s()

    def give_back(self, key: object) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.give_back()

    def _prune(self, now: float) -> None:
        """Drop the refilled buckets; if that frees less than a quarter, the oldest ones too (amortised O(1))."""
        buckets = self._buckets
        for key in [key for key, bucket in buckets.items() if bucket.full(now)]:
            del buckets[key]
        excess = len(buckets) - self.max_entries * 3 // 4
        if excess > 0:
            for key in list(itertools.islice(buckets, excess)):
                del buckets[key]


class Backoff:
    """Failures per key, with exponential back-off after ``free`` of them.

    After n ≥ ``free`` failures (n ≥ 1) the key's next attempt must wait
    min(2^(n − free), ``max_s``) seconds after the latest failure: with free = 5 that is 1 s after the
    fifth failure, then 2, 4, 8 ... up to ``max_s``. A key with no failure for ``window_s`` starts over.
    At most ``max_entries`` keys are kept; the least recently failed go first.
    """

    __slots__ = ("free", "max_s", "window_s", "max_entries", "_keys")

    def __init__(self, free: int, max_s: float, *, window_s: float = 900.0, max_entries: int = 100_000):
        self.free = free
        self.max_s = max_s
        self.window_s = max(window_s, 2 * max_s)
        self.max_entries = max_entries
        # key -> [failures, latest failure's time, the time before it (for undo)]
        self._keys: collections.OrderedDict[object, list] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def wait_s(self, key: object, now: float) -> float:
        """Seconds ``key`` must still wait before its next attempt (0.0: it may try now)."""
        entry = self._keys.get(key)
        if entry is None:
            return 0.0
        failures, at, _ = entry
        if now - at >= self.window_s:
            del self._keys[key]
            return 0.0
        return max(0.0, at + self.delay_s(failures) - now)

    def delay_s(self, failures: int) -> float:
        if failures < max(self.free, 1):
            return 0.0
        return min(self.max_s, 2.0 ** (failures - self.free))

    def failed(self, key: object, now: float) -> int:
        """Count one failure of ``key``; returns its failures so far."""
        keys = self._keys
        entry = keys.get(key)
        if entry is None or now - entry[1] >= self.window_s:
            entry = keys[key] = [0, now, now]
            if len(keys) > self.max_entries:
                keys.popitem(last=False)
        else:
            keys.move_to_end(key)
        entry[0] += 1
        entry[1], entry[2] = now, entry[1]
        return entry[0]

    def undo(self, key: object) -> None:
        """Take back one failure counted before the attempt's outcome was known (it succeeded)."""
        entry = self._keys.get(key)
        if entry is not None:
            entry[0] -= 1
            entry[1] = entry[2]
            if entry[0] <= 0:
                del self._keys[key]

    def forget(self, key: object) -> None:
        self._keys.pop(key, None)
