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
import sqlite3
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import trio

from chorus import proto

from ._adminactions import DELETE_ROOM, DISABLE, REVOKE_SESSIONS, ROOM_EVENT
from ._invites import code_hash, new_code
from ._moderation import NO_EXPIRY, Moderation, Refused, now_ms, utc_text
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
    topics = parser.add_subparsers(dest="topic", required=True,
                                   metavar="{users,rooms,messages,bans,invites,backup}",
                                   parser_class=_Parser)

    users = topics.add_parser("users", help="list, create, disable/enable, reset-password, revoke-sessions")
    user_commands = users.add_subparsers(dest="command", required=True, parser_class=_Parser)
    user_commands.add_parser("list", help="every user, with its status")
    for name, text in (("create", "a new user (password from CHORUS_PASSWORD or a prompt)"),
                       ("disable", "refuse the user's logins and close its connections"),
                       ("enable", "let a disabled user log in again"),
                       ("reset-password", "a new password (CHORUS_PASSWORD or a prompt); ends every session"),
                       ("revoke-sessions", "delete every session token of the user and close its connections")):
        user_commands.add_parser(name, help=text).add_argument("name", metavar="NAME")

    rooms = topics.add_parser("rooms", help="list, show, set-topic, set-role, delete")
    room_commands = rooms.add_subparsers(dest="command", required=True, parser_class=_Parser)
    room_commands.add_parser("list", help="every room with its member and message counts")
    room_commands.add_parser("show", help="a room's topic, members and roles, bans") \
        .add_argument("name", metavar="NAME")
    topic = room_commands.add_parser("set-topic", help="set a room's topic (an event its members see)")
    topic.add_argument("name", metavar="NAME")
    topic.add_argument("text", metavar="TOPIC")
    role = room_commands.add_parser("set-role", help="give a member a role: owner, moderator or member")
    role.add_argument("name", metavar="NAME")
    role.add_argument("user", metavar="USER")
    role.add_argument("role", choices=[r.name.lower() for r in proto.RoomRole])
    room_commands.add_parser("delete", help="delete a room and its messages; members are unsubscribed") \
        .add_argument("name", metavar="NAME")

    messages = topics.add_parser("messages", help="delete")
    message_commands = messages.add_subparsers(dest="command", required=True, parser_class=_Parser)
    delete = message_commands.add_parser("delete", help="replace a room's message by a tombstone (its text goes)")
    delete.add_argument("name", metavar="ROOM")
    delete.add_argument("seq", metavar="SEQ", type=int)

    bans = topics.add_parser("bans", help="list, add, remove: server-wide (the account) or per room (--room)")
    ban_commands = bans.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ban_commands.add_parser("list", help="active bans, server-wide and per room") \
        .add_argument("--room", metavar="ROOM")
    add = ban_commands.add_parser("add", help="ban a user: its connections close (server-wide) or it leaves ROOM")
    add.add_argument("user", metavar="USER")
    add.add_argument("--room", metavar="ROOM", help="only from this room (default: the whole server)")
    add.add_argument("--for", dest="duration", metavar="DURATION", type=_duration,
                     help="how long: 30m, 12h, 7d (default: until removed)")
    add.add_argument("--reason", default="", help="shown to the room with the ban (per-room bans)")
    remove = ban_commands.add_parser("remove", help="lift a ban")
    remove.add_argument("user", metavar="USER")
    remove.add_argument("--room", metavar="ROOM")

    invites = topics.add_parser("invites", help="one-time registration codes (registration = \"invite\")")
    invite_commands = invites.add_subparsers(dest="command", required=True, parser_class=_Parser)
    create = invite_commands.add_parser("create", help="new codes, printed once (only their hashes are kept)")
    create.add_argument("--count", type=int, default=1, choices=range(1, 1001), metavar="N", help="how many (1-1000)")
    create.add_argument("--for", dest="duration", metavar="DURATION", type=_duration,
                        help="valid for: 30m, 12h, 7d (default: until used)")
    invite_commands.add_parser("list", help="every code: when made, until when, by whom it was used")
    invite_commands.add_parser("revoke", help="delete an unused code").add_argument("id", metavar="ID", type=int)

    topics.add_parser("backup", help="copy the SQLite database, live, to a new file (PostgreSQL: use pg_dump)") \
        .add_argument("dest", metavar="FILE")
    return parser


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    """"30m", "12h", "7d" → milliseconds (argparse's type: a bad one is a usage error)."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS_S or not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 12h or 7d")
    return int(number) * _UNITS_S[unit] * 1000


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
    await store.append_admin_action(kind, user_id, room_id, now_ms())


async def _room(store: Store, name: str) -> int:
    room_id = await store.room(name, create=False) if valid_name(name) else None
    if room_id is None:
        raise AdminError(f"no room {name!r}")
    return room_id


async def _moderate(store: Store, action: Moderation) -> dict[str, Any]:
    """Apply an operator's action (its events' actor is "": the operator) and have running servers deliver it."""
    try:
        applied = await store.moderate(action)
    except Refused as exc:
        raise AdminError(str(exc)) from None
    await _act(store, ROOM_EVENT, user_id=applied.removed_id, room_id=applied.conv_id)
    return {"done": applied.event.kind.name.lower(), "room": applied.conv.name, "seq": applied.event.seq}


def _until(duration_ms: int | None) -> int:
    return 0 if duration_ms is None else now_ms() + duration_ms


def _when(until_ms: int) -> str:
    return "never" if until_ms == NO_EXPIRY else utc_text(until_ms)


def _backup(config: Config, dest: str) -> dict[str, Any]:
    if config.store is not None:
        raise AdminError("backup copies a SQLite database; for PostgreSQL use pg_dump")
    if not config.db_path.is_file():
        raise AdminError(f"no database at {config.db_path}; check --data-dir (or --config)")
    from ._store import backup

    try:
        pages = backup(config.db_path, dest)
    except FileExistsError:
        raise AdminError(f"{dest} exists; give a new file") from None
    except (OSError, sqlite3.Error) as exc:
        raise AdminError(f"backup failed: {exc}") from None
    return {"done": "backed up", "name": f"{config.db_path} to {dest}", "pages": pages}


async def run(args: argparse.Namespace, config: Config) -> Any:
    """Do what ``args`` say; returns what to print (rows for a list, a dict for a change)."""
    if args.topic == "backup":
        return await trio.to_thread.run_sync(_backup, config, args.dest)
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
            case ("rooms", "show"):
                shown = await _room(store, args.name)
                topic, private, members, _ = await store.room_details(shown, 0)
                return {"room": args.name, "topic": topic, "private": private,
                        "members": [{"name": name, "role": role.name.lower(), "muted": until is not None}
                                    for _, name, role, until in members],
                        "bans": [{"name": b.user, "until": _when(b.until_ms)}
                                 for b in await store.room_bans(shown)]}
            case ("rooms", "set-topic"):
                if len(args.text.encode()) > proto.MAX_TEXT_BYTES:
                    raise AdminError(f"topics are at most {proto.MAX_TEXT_BYTES} bytes")
                return await _moderate(store, Moderation(proto.EventKind.TOPIC, await _room(store, args.name), None,
                                                         text=args.text))
            case ("rooms", "set-role"):
                where, user = await _room(store, args.name), await _user(store, args.user)
                return await _moderate(store, Moderation(proto.EventKind.ROLE, where, None, user.id,
                                                         role=proto.RoomRole[args.role.upper()]))
            case ("messages", "delete"):
                return await _moderate(store, Moderation(proto.EventKind.DELETE, await _room(store, args.name), None,
                                                         target_seq=max(0, min(args.seq, 2**63 - 1))))
            case ("bans", "list"):
                rows = []
                if args.room is None:
                    rows += [{"user": u.name, "room": "(server)", "until": _when(u.disabled_until_ms)}
                             for u in await store.list_users() if u.disabled]
                rooms = [r.name for r in await store.room_stats()] if args.room is None else [args.room]
                for room in rooms:
                    rows += [{"user": b.user, "room": room, "until": _when(b.until_ms)}
                             for b in await store.room_bans(await _room(store, room))]
                return rows
            case ("bans", "add"):
                user = await _user(store, args.user)
                if args.room is not None:
                    return await _moderate(store, Moderation(proto.EventKind.BAN, await _room(store, args.room), None,
                                                             user.id, until_ms=_until(args.duration),
                                                             text=args.reason))
                await store.set_disabled(user.id, True, until_ms=_until(args.duration))
                await _act(store, DISABLE, user_id=user.id)
                return {"done": "banned", "name": user.name, "until": _when(_until(args.duration))}
            case ("bans", "remove"):
                user = await _user(store, args.user)
                if args.room is not None:
                    return await _moderate(store, Moderation(proto.EventKind.UNBAN, await _room(store, args.room),
                                                             None, user.id))
                if not user.disabled:
                    raise AdminError(f"{user.name!r} is not banned")
                await store.set_disabled(user.id, False)
                return {"done": "unbanned", "name": user.name}
            case ("invites", "create"):
                codes = [new_code() for _ in range(args.count)]
                await store.add_invites([code_hash(code) for code in codes], _until(args.duration))
                return [{"code": code} for code in codes]
            case ("invites", "list"):
                return [{"id": row.id, "created": _when(row.created_ms), "expires": _when(row.expires_ms),
                         "used_by": row.used_by or "-"} for row in await store.list_invites()]
            case ("invites", "revoke"):
                if not await store.revoke_invite(args.id):
                    raise AdminError(f"no unused invite {args.id}")
                return {"done": "revoked", "name": f"invite {args.id}"}
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
    if "members" in result:  # rooms show
        private = " (private)" if result["private"] else ""
        return (f"#{result['room']}{private}: {result['topic'] or '(no topic)'}\n" + _table(result["members"])
                + "\nbans:\n" + _table(result["bans"]))
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
