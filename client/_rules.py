"""The protocol's rules on names, passwords and ports, as the terminal client checks and words them (spec §9.1).

How this works. Each rule is a constant of ``chorus.proto`` (NAME_PATTERN and NAME_RULE, MIN_PASSWORD_BYTES,
MAX_PASSWORD_BYTES and PASSWORD_RULE, MAX_PORT), the same ones the server and the page use. They are looked up
when a check runs or a sentence is built, never copied, so nothing in the client can drift from the server
(STYLE.md §20).
"""
from __future__ import annotations

import re

from chorus import proto


def is_user_name(text: str) -> bool:
    """Whether ``text`` is a user name by the naming rule (also what makes it a safe file name)."""
    return re.fullmatch(proto.NAME_PATTERN, text) is not None


def not_a_user_name(text: str) -> str:
    """The sentence refusing ``text`` as a user name."""
    return f"{text!r} is not a user name: {proto.NAME_RULE}"


def user_name_rule() -> str:
    return f"user names are {proto.NAME_RULE}"


def password_rule() -> str:
    return f"passwords are {proto.PASSWORD_RULE}"


def password_problem(password: str, register: bool) -> str | None:
    """Why the server would refuse ``password``, or None: for REGISTER the length rule, for LOGIN only a length
    the wire cannot carry."""
    size = len(password.encode("utf-8"))
    if size > proto.MAX_PASSWORD_BYTES or (register and size < proto.MIN_PASSWORD_BYTES):
        return password_rule()
    return None


def is_port(number: int) -> bool:
    """A port a client can connect to: 1..MAX_PORT (0 means "any" only when listening)."""
    return 0 < number <= proto.MAX_PORT
