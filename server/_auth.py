"""Passwords, session tokens and names (spec §9 "Authentication").

Passwords are hashed with argon2id, in worker threads under a small limiter so
that a burst of logins costs bounded memory and never blocks the event loop.
Tokens are random and only their SHA-256 is stored, so a leaked database holds
no usable token. Unknown users still cost one hash, so timing does not reveal
which names exist.
"""
from __future__ import annotations

import hashlib
import re
import secrets

import argon2
import trio

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
MIN_PASSWORD_BYTES = 8


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Passwords:
    def __init__(self, *, time_cost: int, memory_kib: int, concurrency: int = 2):
        self._hasher = argon2.PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1,
                                             type=argon2.Type.ID)
        self._limiter = trio.CapacityLimiter(concurrency)
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        return await trio.to_thread.run_sync(self._hasher.hash, password, limiter=self._limiter)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches; ``stored_hash`` None (unknown user) costs the same and is False."""
        if stored_hash is None:
            if self._dummy is None:
                self._dummy = await self.hash(new_token())
            stored_hash, password = self._dummy, password + "\0"

        def check() -> bool:
            try:
                return self._hasher.verify(stored_hash, password)
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                return False

        return await trio.to_thread.run_sync(check, limiter=self._limiter)
