"""Passwords, session tokens and names (spec §9.1).

Passwords are hashed with argon2id, in worker threads under a small limiter so
that a burst of logins costs bounded memory and never blocks the event loop.
Tokens are random and only their SHA-256 is stored, so a leaked database holds
no usable token. Unknown users still cost one hash, so timing does not reveal
which names exist.

Hashes are admitted by a ``HashQueue`` first: one at a time per address (a
second one from the same address waits for the first, unless it would wait more
than ``max_wait_s``), and at most ``max_pending`` addresses' hashes queued or
running in all; beyond that the request is refused at once with ``Busy`` (ERROR
SERVER_BUSY + a retry hint), never left to wait past the auth deadline. So an attacker with a thousand connections from
one address holds one hashing thread, and an honest login from elsewhere waits
for at most ``max_pending`` hashes. The asking connection's auth deadline stops
while its hash waits for a thread and moves by the delay a refusal asks for
(``AuthClock``): in a storm of logins the deadline starts when a hashing thread
is free, so queued clients are served rather than timed out.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Protocol

import argon2
import trio

from chorus import proto

#: Hashing threads: every core but one, so a login flood can never take the event loop's core (argon2
#: releases the GIL, so each thread is a whole core while it hashes).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
_HASH_THREADS = max(1, _CORES - 1)

NAME_RE = re.compile(proto.NAME_PATTERN)  # the one rule (spec §9.1), also the clients' and the page's
#: How long a hash may expect to wait behind its own address's earlier ones before it is refused instead.
MAX_ADDRESS_WAIT_S = 5.0


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Passwords:
    def __init__(self, *, time_cost: int, memory_kib: int, concurrency: int = _HASH_THREADS):
        self._hasher = argon2.PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1,
                                             type=argon2.Type.ID)
        self._limiter = trio.CapacityLimiter(concurrency)
        self._dummy: str | None = None
        self.hashed = 0  # hashes computed or verified: what logins cost us

    async def hash(self, password: str) -> str:
        self.hashed += 1
        return await trio.to_thread.run_sync(self._hasher.hash, password, limiter=self._limiter)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches; ``stored_hash`` None (unknown user) costs the same and is False."""

        def check() -> bool:
            nonlocal stored_hash, password
            if stored_hash is None:
                if self._dummy is None:
                    self._dummy = self._hasher.hash(new_token())
                stored_hash, password = self._dummy, password + "\0"
            try:
                return self._hasher.verify(stored_hash, password)
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                return False

        self.hashed += 1
        return await trio.to_thread.run_sync(check, limiter=self._limiter)


class Busy(Exception):
    """The hashing queue is full; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float):
        super().__init__("too many logins at once; retry later")
        self.retry_after_s = retry_after_s


class AuthClock(Protocol):
    """The connection whose auth deadline stops while its LOGIN or RESUME waits for the server
    (server/_conn.py ``ClientConnection``)."""

    def auth_waiting(self, waiting: bool) -> None:
        """True while the request waits for its turn; False once the server can take it (or never will)."""

    def auth_refused(self, retry_after_s: float) -> None:
        """The queue answered Busy: the client was told to come back after ``retry_after_s``."""


class _AddressQueue:
    __slots__ = ("lock", "count")

    def __init__(self) -> None:
        self.lock = trio.Lock()  # fair: an address's hashes run in arrival order
        self.count = 0  # this address's hashes queued or running


class HashQueue:
    """Admission to password hashing: one hash per address at a time, ``max_pending`` addresses in all."""

    def __init__(self, max_pending: int, *, max_wait_s: float = MAX_ADDRESS_WAIT_S, threads: int = _HASH_THREADS):
        self.max_pending = max_pending
        self.max_wait_s = max_wait_s
        #: Admitted hashes that may run at once: as many as ``Passwords`` has threads, so a body that holds one
        #: starts hashing at once, and its wait (which the auth deadline does not count) ends here.
        self.threads = trio.CapacityLimiter(threads)
        self.pending = 0  # hashes admitted (at most one per address), queued for a thread or running
        self.refused = 0
        self._addresses: dict[str, _AddressQueue] = {}
        self._took_s = 0.05  # moving average: admission to done, i.e. how long a new one would take

    def retry_after_s(self) -> float:
        return max(0.1, self._took_s)

    def _refuse(self) -> Busy:
        self.refused += 1
        return Busy(self.retry_after_s())

    @asynccontextmanager
    async def slot(self, address: str, clock: AuthClock | None = None) -> AsyncIterator[None]:
        """Hold a hashing slot for ``address`` while the body hashes; raises ``Busy`` when there is none.

        ``clock``: the connection asking, whose auth deadline does not count the wait for a free hashing thread,
        nor the delay a refusal asks for (spec §9.1: a login storm must not time honest clients out)."""
        try:
            queue = self._addresses.get(address)
            if queue is None:
                if self.pending >= self.max_pending:
                    raise self._refuse()
                queue = self._addresses[address] = _AddressQueue()
            elif queue.count * self._took_s > self.max_wait_s:
                raise self._refuse()
        except Busy as exc:
            if clock is not None:
                clock.auth_refused(exc.retry_after_s)
            raise
        queue.count += 1
        if clock is not None:
            clock.auth_waiting(True)
        try:
            async with queue.lock:
                if self.pending >= self.max_pending:  # others filled the queue while this one waited
                    busy = self._refuse()
                    if clock is not None:
                        clock.auth_waiting(False)
                        clock.auth_refused(busy.retry_after_s)
                    raise busy
                self.pending += 1
                start = time.perf_counter()
                try:
                    async with self.threads:
                        if clock is not None:
                            clock.auth_waiting(False)  # a thread is free: the deadline runs again
                        yield
                finally:
                    self.pending -= 1
                    self._took_s += (time.perf_counter() - start - self._took_s) / 8
        finally:
            if clock is not None:
                clock.auth_waiting(False)
            queue.count -= 1
            if queue.count == 0:
                del self._addresses[address]

    def statistics(self) -> dict:
        return {"pending": self.pending, "queued": sum(queue.count for queue in self._addresses.values()),
                "addresses": len(self._addresses), "refused": self.refused}
