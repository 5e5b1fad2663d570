"""One-time invite codes for ``registration = "invite"`` (spec §9.1, REGISTER_INVITE), written once for both stores.

How this works. ``chorus-admin invites create`` makes random codes and stores only their SHA-256 (like session
tokens: a leaked database holds no usable code), each with an optional expiry. REGISTER_INVITE redeems one in the
transaction that creates the account (``redeem`` then the user's INSERT): a code makes one account, however many
clients race with it. The SQL runs on a store's connection through ``_moderation.Db``.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from ._moderation import Db

#: The random part of a code, in bytes (urlsafe base64: 22 characters).
CODE_BYTES = 16


@dataclass(frozen=True, slots=True)
class InviteRow:
    id: int
    created_ms: int
    expires_ms: int  # 0: never
    used_by: str | None  # the user it made


class InviteInvalid(Exception):
    """An invite code that is unknown, used or expired."""


def new_code() -> str:
    return secrets.token_urlsafe(CODE_BYTES)


def code_hash(code: str) -> bytes:
    return hashlib.sha256(code.encode("utf-8")).digest()


def usable(db: Db, hashed: bytes, now_ms: int) -> bool:
    return db.one("SELECT 1 FROM invites WHERE code_hash = :h AND used_by IS NULL AND (expires_ms = 0 OR"
                  " expires_ms > :n)", h=hashed, n=now_ms) is not None


def redeem(db: Db, hashed: bytes, user_id: int, now_ms: int) -> None:
    """Mark the code used by ``user_id`` (in the caller's transaction); raises ``InviteInvalid``."""
    if not db.run("UPDATE invites SET used_by = :u WHERE code_hash = :h AND used_by IS NULL AND (expires_ms = 0"
                  " OR expires_ms > :n)", u=user_id, h=hashed, n=now_ms):
        raise InviteInvalid("invite code unknown, used or expired")


def add(db: Db, hashes: list[bytes], created_ms: int, expires_ms: int) -> None:
    for hashed in hashes:
        db.run("INSERT INTO invites(code_hash, created_ms, expires_ms) VALUES (:h, :c, :e)", h=hashed, c=created_ms,
               e=expires_ms)


def listed(db: Db) -> list[InviteRow]:
    return [InviteRow(*row) for row in db.all(
        "SELECT i.id, i.created_ms, i.expires_ms, u.name FROM invites i LEFT JOIN users u ON u.id = i.used_by"
        " ORDER BY i.id")]


def revoke(db: Db, invite_id: int) -> bool:
    """Delete an unused code; False if there is no such unused one."""
    return db.run("DELETE FROM invites WHERE id = :i AND used_by IS NULL", i=invite_id) == 1
