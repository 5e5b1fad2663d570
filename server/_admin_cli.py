"""``chorus-admin``: manage users and rooms in the store a Chorus server uses, while it runs (issue 12).

How this works. The CLI opens the same store as the server (``--data-dir`` for SQLite, ``--store`` for a PostgreSQL
URL, or the server's ``--config`` TOML) with the store implementations themselves (``open_store`` /
``open_pg_store``, inside ``trio.run``), makes its change there, and for a change that live connections must feel
(disable, revoke sessions, reset password, delete a room) appends an admin action that every running node applies
within a second (server/_adminactions.py). New LOGINs and RESUMEs see the store's state at once.

Output is plain aligned text, or JSON with ``--json``. An operator's mistake (unknown user or room, bad name or
password, unreachable store) is one line on stderr, ``chorus-admin: error: <what>``, exit status 1; a usage error
is exit status 2; never a traceback for either.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import trio

from chorus import proto

from ._adminactions import DELETE_ROOM, DISABLE, REVOKE_SESSIONS
from ._auth import Passwords, valid_name
from ._config import Config, ConfigError, without_password
from ._ports import NameTaken, SchemaTooNew, Store, StoreError, UserRow

PROG = "chorus-admin"


class AdminError(Exception):
    """An operator's mistake or a refusal: ``str()`` is the one line to show (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block (as chorus-server)
        self.exit(2, f"{PROG}: error: {message.strip()}\n")


def argument_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Manage the users and rooms of a Chorus server's store, live.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE", help="the server's TOML config (its store or data_dir)")
    where.add_argument("--data-dir", metavar="DIR", help="directory of the SQLite database (default: data)")
    where.add_argument("--store", metavar="URL", help="PostgreSQL URL (node mode), postgresql://...")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    topics = parser.add_subparsers(dest="topic", required=True, metavar="{users,rooms}", parser_class=_Parser)

    users = topics.add_parser("users", help="list, create, disable/enable, reset-password, revoke-sessions")
    user_commands = users.add_subparsers(dest="command", required=True, parser_class=_Parser)
    user_commands.add_parser("list", help="every user, with its status")
    for name, text in (("create", "a new user (password from CHORUS_PASSWORD or a prompt)"),
                       ("disable", "refuse the user's logins and close its connections"),
                       ("enable", "let a disabled user log in again"),
                       ("reset-password", "a new password (CHORUS_PASSWORD or a prompt); ends every session"),
                       ("revoke-sessions", "delete every session token of the user and close its connections")):
        user_commands.add_parser(name, help=text).add_argument("name", metavar="NAME")

    rooms = topics.add_parser("rooms", help="list, delete")
    room_commands = rooms.add_subparsers(dest="command", required=True, parser_class=_Parser)
    room_commands.add_parser("list", help="every room with its member and message counts")
    room_commands.add_parser("delete", help="delete a room and its messages; members are unsubscribed") \
        .add_argument("name", metavar="NAME")
    return parser


def _config(args: argparse.Namespace) -> Config:
    """The server's config that ``args`` name; raises ``ConfigError`` (a usage error)."""
    if args.config:
        return Config.from_toml(args.config)
    if args.store:
        return Config.from_dict({"store": args.store})
    return Config.from_dict({"data_dir": args.data_dir} if args.data_dir else {})


@asynccontextmanager
async def _open(config: Config, *, create: bool) -> AsyncIterator[Store]:
    """The store ``config`` names; raises ``AdminError`` if it is missing (unless ``create``) or unreachable."""
    try:
        if config.store is not None:
            from ._pgstore import open_pg_store

            opened: Any = open_pg_store(config.store, pool_size=2)
        else:
            path = config.db_path
            if not path.is_file():
                if not create:
                    raise AdminError(f"no database at {path}; check --data-dir (or --config, --store)")
                Path(config.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            from ._store import open_store

            opened = open_store(path, synchronous=config.sqlite_synchronous)
        async with opened as store:
            yield store
    except (StoreError, SchemaTooNew, OSError) as exc:
        raise AdminError(str(exc)) from None


def _password(config: Config) -> str:
    """From CHORUS_PASSWORD, else a prompt (twice on a terminal), checked against the protocol's rule."""
    password = os.environ.get("CHORUS_PASSWORD")
    if password is None:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                raise AdminError("the passwords differ")
        else:
            password = sys.stdin.readline().rstrip("\n")
    size = len(password.encode())
    if not proto.MIN_PASSWORD_BYTES <= size <= proto.MAX_PASSWORD_BYTES:
        raise AdminError(f"passwords are {proto.PASSWORD_RULE} (this one is {size})")
    return password


async def _user(store: Store, name: str) -> UserRow:
    user = await store.get_user(name)
    if user is None:
        raise AdminError(f"no user {name!r}")
    return user


async def _act(store: Store, kind: str, user_id: int | None = None, room_id: int | None = None) -> None:
    await store.append_admin_action(kind, user_id, room_id, time.time_ns() // 1_000_000)


async def run(args: argparse.Namespace, config: Config) -> Any:
    """Do what ``args`` say; returns what to print (rows for a list, a dict for a change)."""
    command = (args.topic, args.command)
    async with _open(config, create=command == ("users", "create")) as store:
        match command:
            case ("users", "list"):
                return [{"name": u.name, "id": u.id, "status": "disabled" if u.disabled else "active"}
                        for u in await store.list_users()]
            case ("users", "create"):
                if not valid_name(args.name):
                    raise AdminError(f"names are {proto.NAME_RULE}")
                if await store.get_user(args.name) is not None:
                    raise AdminError(f"{args.name!r} is taken")
                passwords = Passwords(time_cost=config.argon2_time_cost, memory_kib=config.argon2_memory_kib)
                hashed = await passwords.hash(_password(config))
                try:
                    user = await store.create_user(args.name, hashed)
                except NameTaken:
                    raise AdminError(f"{args.name!r} is taken") from None
                return {"done": "created", "name": user.name, "id": user.id}
            case ("users", "disable" | "enable"):
                user = await _user(store, args.name)
                disable = args.command == "disable"
                await store.set_disabled(user.id, disable)
                if disable:
                    await _act(store, DISABLE, user_id=user.id)
                return {"done": args.command + "d", "name": user.name, "id": user.id}
            case ("users", "reset-password"):
                user = await _user(store, args.name)
                passwords = Passwords(time_cost=config.argon2_time_cost, memory_kib=config.argon2_memory_kib)
                await store.set_password_hash(user.id, await passwords.hash(_password(config)))
                revoked = await store.delete_user_sessions(user.id)
                await _act(store, REVOKE_SESSIONS, user_id=user.id)
                return {"done": "password reset", "name": user.name, "id": user.id, "sessions_revoked": revoked}
            case ("users", "revoke-sessions"):
                user = await _user(store, args.name)
                revoked = await store.delete_user_sessions(user.id)
                await _act(store, REVOKE_SESSIONS, user_id=user.id)
                return {"done": "sessions revoked", "name": user.name, "id": user.id, "sessions_revoked": revoked}
            case ("rooms", "list"):
                return [{"name": r.name, "members": r.members, "messages": r.messages}
                        for r in await store.room_stats()]
            case ("rooms", "delete"):
                room_id = await store.delete_room(args.name)
                if room_id is None:
                    raise AdminError(f"no room {args.name!r}")
                await _act(store, DELETE_ROOM, room_id=room_id)
                return {"done": "deleted", "room": args.name, "id": room_id}
    raise AssertionError(command)  # argparse allows nothing else


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = [[c.upper() for c in columns]] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [all(isinstance(row[c], int) for row in rows) for c in columns]
    return "\n".join("  ".join(cell.rjust(w) if num else cell.ljust(w)
                               for cell, w, num in zip(line, widths, numeric, strict=True)).rstrip()
                     for line in cells)


def _text(result: Any) -> str:
    if isinstance(result, list):
        return _table(result)
    what = result.get("name") or result.get("room")
    extra = f" ({result['sessions_revoked']} sessions revoked)" if "sessions_revoked" in result else ""
    return f"{result['done']}: {what}{extra}"


def _only(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = trio.run(run, args, config)
    except BaseException as exc:
        failure = _only(exc)
        if isinstance(failure, KeyboardInterrupt):
            return 130
        if not isinstance(failure, AdminError):
            raise  # a bug: its traceback is how it gets found
        message = str(failure)
        if config.store is not None:
            message = message.replace(config.store, without_password(config.store))
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else _text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
