"""Display names (spec §9.17): Unicode names beside the ASCII login name, checked so that none looks like another.

How this works. A display name is NFC-normalised, 1..``MAX_DISPLAY_NAME_CHARS`` characters, without control, format
(bidi overrides) or line characters, and not starting or ending with a space. Two names "look alike" when their
skeletons are equal: NFKC, case-folded, the common Cyrillic and Greek look-alikes mapped to Latin, everything but
letters and digits dropped, 0 read as o and 1 as l (a reduced form of Unicode TR39's skeleton: it catches "аlice"
with a Cyrillic а, "ALICE", "a.l.i.c.e" and "a1ice"). A display name may not have the skeleton of another user's
login name or display name; the stores keep each display name's skeleton under a unique index, and compare login
names with the same reduction done in SQL (``LOGIN_SKELETON_SQL``), so both stores run ``set_display_name`` as is.
"""
from __future__ import annotations

import unicodedata

from chorus import proto

from ._moderation import Db

#: Cyrillic and Greek letters that look like Latin ones (lower case, after case folding).
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ɡ": "g",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "ϲ": "c", "ℓ": "l", "0": "o", "1": "l",
})
#: The same reduction of an ASCII login name ([a-z0-9_.-]), as SQL over the column ``name`` (both stores).
LOGIN_SKELETON_SQL = ("replace(replace(replace(replace(replace(name, '_', ''), '.', ''), '-', ''), '0', 'o'),"
                      " '1', 'l')")
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_JOINERS = {"\u200c", "\u200d"}  # ZWNJ, ZWJ: inside Persian, Indic and emoji sequences


class DisplayNameRefused(Exception):
    """A display name that breaks the rule or looks like another user's name; ``str()`` says which."""


def normalized(text: str) -> str:
    """``text`` as stored (NFC), or ``DisplayNameRefused``; "" clears the display name."""
    name = unicodedata.normalize("NFC", text)
    if not name:
        return name
    if (len(name) > proto.MAX_DISPLAY_NAME_CHARS or name != name.strip()
            or any(unicodedata.category(ch) in _REFUSED_CATEGORIES and ch not in _JOINERS for ch in name)):
        raise DisplayNameRefused(f"display names are {proto.DISPLAY_NAME_RULE}")
    if not skeleton(name):
        raise DisplayNameRefused("a display name needs a letter or a digit")
    return name


def skeleton(text: str) -> str:
    """What ``text`` looks like, for comparing names (see the module's comment)."""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_CONFUSABLES)
    return "".join(ch for ch in folded if ch.isalnum())


def set_display_name(db: Db, user_id: int, name: str) -> None:
    """Store ``name`` (already ``normalized``) in the caller's transaction; ``DisplayNameRefused`` if it looks like
    another user's login or display name."""
    mark = skeleton(name) if name else None
    if mark is not None:
        clash = db.one(f"SELECT name FROM users WHERE id <> :u AND (display_skeleton = :k OR {LOGIN_SKELETON_SQL} = :k)"
                       " LIMIT 1", u=user_id, k=mark)
        if clash is not None:
            raise DisplayNameRefused(f"that display name looks like {clash[0]}'s name")
    db.run("UPDATE users SET display_name = :d, display_skeleton = :k WHERE id = :u", d=name, k=mark, u=user_id)


def display_names(db: Db, names: list[str]) -> list[proto.UserInfo]:
    """The users among ``names`` that exist, in the order asked, with their display names."""
    found: dict[str, str] = {}
    for start in range(0, len(names), 200):  # bounded IN lists
        chunk = names[start:start + 200]
        params = {f"n{i}": name for i, name in enumerate(chunk)}
        rows = db.all(f"SELECT name, display_name FROM users WHERE name IN ({', '.join(':' + k for k in params)})",
                      **params)
        found.update(rows)
    return [proto.UserInfo(name, found[name]) for name in dict.fromkeys(names) if name in found]
