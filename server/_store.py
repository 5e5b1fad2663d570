"""The SQLite store: users, sessions, conversations, messages, cursors (DESIGN.md "Guarantees" 1-3, 5).

How this works. One writing ``sqlite3`` connection, used only from worker threads and only one thread at a time (a
``CapacityLimiter(1)`` shared by every write), so SQLite never sees concurrent use and Trio never blocks on disk;
queries run on a second connection (their own limiter) and WAL checkpoints on a third, both beside the writer.
Autocommit mode (``isolation_level=None``): each multi-statement operation is an explicit ``BEGIN IMMEDIATE`` ...
``COMMIT``. WAL journal, ``synchronous=FULL`` by default so that a committed transaction survives power loss
(guarantee 2, "acked means durable"); ``NORMAL`` is faster and survives a process crash but not an OS crash.

Messages are group-committed by server/_groupcommit.py (the queue, the committer, ``on_commit`` before any waiter
wakes, closing that commits what is pending); this module's part is ``_write_batch``, the ONE transaction a batch is
stored in, which gives each message ``seq = conversations.last_seq + 1`` and writes the new ``last_seq`` back, so
seqs are gapless per conversation (spec/PROTOCOL.md, SEND and SYNC), and the fsync cost is shared by the batch.
``(sender_id, client_msg_id)`` is a unique index: a retry, even one inside the same batch, resolves to the stored
row with ``duplicate=True`` and takes no seq (guarantee 3). The server publishes from ``on_commit``, so live
delivery order is seq order and a message is never seen live before it is durable.

Values from the wire are u64 and SQLite integers are signed 64-bit. ``client_msg_id`` of 2**63 and above is
stored as its two's complement (negative) value and mapped back when read; seqs and limits are clamped by
``_clamp`` to 2**63 - 1, which no stored seq reaches, so "after 2**64 - 1" is an empty page and "before 2**64 - 1"
the newest one. Nothing a peer sends can raise ``OverflowError`` here.

Failure is local (DESIGN.md). When SQLite refuses (disk full, I/O error, busy, read-only, corrupt: ``_REFUSED``)
every public method raises ``StoreError`` chained from the ``sqlite3`` error, from one place (``_refusal``, which
the group committer applies); the caller answers SERVER_BUSY and the store stays usable. Other errors (constraint
violations, misuse) are bugs and stay what they are. On a full disk, writes are refused and reads served; opening
does not write when the schema is current, so the server also starts on a full disk (as long as the ``-shm`` index
exists or 32 KiB are free); nothing is remembered of a refusal, so writes work again as soon as space returns.

The WAL stays bounded (``WAL_MAX_BYTES``). SQLite only rewinds the WAL when a checkpoint has copied all of it and
no reader uses it, which never happens under steady load: PASSIVE checkpoints alone let it grow without limit. So
the checkpointer (its own connection, beside the writer) runs a step once a second after writes, or as soon as
the committer sees the -wal file pass ``WAL_CHECKPOINT_BYTES``: PASSIVE, copying the bulk without blocking anyone,
then, if the file is still past the threshold, ``wal_checkpoint(RESTART)`` under the writer's limiter, which
copies the tail PASSIVE missed and waits at most ``_CHECKPOINT_BUSY_MS`` for readers, so that the next commit
starts the WAL afresh; appends meanwhile gather for the next group commit. ``journal_size_limit = 0`` makes that
commit cut the file to its new content (as whenever SQLite rewinds the WAL by itself), so the file's size is
always the WAL's. If the disk cannot keep up and the file reaches ``WAL_MAX_BYTES``, the committer waits for a
step before its next batch: writes slow down instead of the WAL filling the disk.

Files are private: the database is created 0600 before SQLite opens it (SQLite gives ``-wal`` and ``-shm`` the
main file's mode), and group and other bits are taken off files an older version left readable.

JOIN's room limit is checked inside the transaction that inserts the membership (``join_room``), so concurrent
joins cannot overshoot it; ``list_rooms`` hides rooms nobody is in, so empty rooms cannot bury real ones.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from chorus.proto import (
    BanInfo, Conversation, ConversationInfo, ConvKind, CursorInfo, EventKind, ReceiptKind, RoomInfo, RoomRole,
    StoredMessage, UserInfo,
)

from . import _displaynames as displaynames
from . import _invites as invites
from ._displaynames import DisplayNameRefused
from ._groupcommit import _U64, GroupCommitter
from ._invites import InviteRow
from ._moderation import to_db_id as _to_db_id
from ._moderation import (
    Applied, Entry, Moderation, active, apply, entries_after, entries_before, join_refusal, now_ms, room_bans,
    room_details,
)

# The row types and errors are the Store port's (server/_ports.py); this module is one implementation of it.
from ._ports import (  # noqa: F401  (re-exported: tests and __main__ name them here)
    AdminAction, AppendCallback, Appended, ConvRow, NameTaken, NewMessage, RoomStats, SchemaTooNew, SessionEntry,
    SessionRow, StoreError, TooManyRooms, UserRow, RoomExists,
)

log = logging.getLogger(__name__)

#: ``PRAGMA user_version`` is the number of schema migrations applied: ``SCHEMA_VERSION`` (after ``_MIGRATIONS``).

#: A -wal file this large is reset (checkpoint RESTART) instead of only copied back. Each reset pauses the
#: writer briefly (see ``Store._checkpoint``): smaller means more pauses, larger more disk. 16 MiB is about a
#: second of the heaviest load measured here.
WAL_CHECKPOINT_BYTES = 16 << 20
#: The bound: at this size the committer waits for a checkpoint before its next batch, so the -wal file never
#: grows past it by more than one group commit (at most ``max_batch`` messages).
WAL_MAX_BYTES = 2 * WAL_CHECKPOINT_BYTES
#: How long the RESTART checkpoint waits for readers while it holds the write lock (commits wait that long at
#: worst); if a reader is still there, the WAL is reset at a later step.
_CHECKPOINT_BUSY_MS = 200

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1

#: SQLite result codes that mean "the database cannot do this now" (rather than "this request is wrong"):
#: they become ``StoreError``. Constraint violations, SQL errors and misuse are bugs and stay sqlite3 errors.
_REFUSED = frozenset({
    sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_INTERRUPT, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOTADB,
})

_ROOM = int(ConvKind.ROOM)
_DIRECT = int(ConvKind.DIRECT)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash    BLOB PRIMARY KEY,
    user_id       INTEGER NOT NULL REFERENCES users(id),
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
-- One row per room (kind ROOM, unique name) and per unordered user pair (kind DIRECT, user_lo < user_hi).
-- last_seq is the seq of the newest message, written in the transaction that stores the message.
CREATE TABLE IF NOT EXISTS conversations (
    id       INTEGER PRIMARY KEY,
    kind     INTEGER NOT NULL,
    name     TEXT UNIQUE,
    user_lo  INTEGER REFERENCES users(id),
    user_hi  INTEGER REFERENCES users(id),
    last_seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (user_lo, user_hi),
    CHECK ((kind = {_ROOM} AND name IS NOT NULL AND user_lo IS NULL AND user_hi IS NULL)
        OR (kind = {_DIRECT} AND name IS NULL AND user_lo < user_hi))
);
CREATE INDEX IF NOT EXISTS conversations_user_hi ON conversations(user_hi);
-- Room membership only: the members of a DIRECT conversation are its pair.
CREATE TABLE IF NOT EXISTS memberships (
    user_id INTEGER NOT NULL REFERENCES users(id),
    conv_id INTEGER NOT NULL REFERENCES conversations(id),
    PRIMARY KEY (user_id, conv_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS memberships_conv ON memberships(conv_id, user_id);
CREATE TABLE IF NOT EXISTS messages (
    conv_id       INTEGER NOT NULL REFERENCES conversations(id),
    seq           INTEGER NOT NULL CHECK (seq > 0),
    ts_ms         INTEGER NOT NULL,
    sender_id     INTEGER NOT NULL REFERENCES users(id),
    client_msg_id INTEGER NOT NULL,
    body          TEXT NOT NULL CHECK (body <> ''),
    PRIMARY KEY (conv_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON messages(sender_id, client_msg_id);
CREATE TABLE IF NOT EXISTS cursors (
    user_id       INTEGER NOT NULL REFERENCES users(id),
    conv_id       INTEGER NOT NULL REFERENCES conversations(id),
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    read_seq      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, conv_id)
) WITHOUT ROWID;
"""

#: Schema migrations (``PRAGMA user_version`` steps): step n takes a database from version n to n + 1, and
#: ``_connect`` applies the missing ones in order, in one transaction, so a database is at one version or the
#: next, never half-way. Step 0 is the version 1 schema as first shipped. A shipped step never changes: a change
#: to the schema is a new step at the end (with what it does to existing rows).
_MIGRATIONS: tuple[str, ...] = (
    _SCHEMA,
    # 2: expired sessions are found by an index range: the hourly purge no longer scans every session while it
    # holds the writer (group commits wait behind it).
    "CREATE INDEX sessions_expiry ON sessions(expires_at_ms)",
    # 3: administration (chorus-admin): accounts an operator disabled, and the actions running servers apply to
    # their live connections, polled by id (the primary key: one range read a second).
    """ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE admin_actions (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        kind    TEXT NOT NULL,
        user_id INTEGER,
        room_id INTEGER,
        at_ms   INTEGER NOT NULL
    )""",
    # 4: a user's own sessions (LIST_SESSIONS, REVOKE_SESSION, spec §9.1): each token gets an opaque id (never
    # reused: AUTOINCREMENT) and its creation and last use (0 for the tokens made before this step). SQLite
    # cannot add a key to a WITHOUT ROWID table, so the table is made anew and the tokens copied, ids in token
    # order; the expiry index goes with the old table and is made again, beside one by user.
    """CREATE TABLE sessions_v4 (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        token_hash    BLOB NOT NULL UNIQUE,
        user_id       INTEGER NOT NULL REFERENCES users(id),
        expires_at_ms INTEGER NOT NULL,
        created_ms    INTEGER NOT NULL DEFAULT 0,
        last_used_ms  INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO sessions_v4 (token_hash, user_id, expires_at_ms)
        SELECT token_hash, user_id, expires_at_ms FROM sessions ORDER BY token_hash;
    DROP TABLE sessions;
    ALTER TABLE sessions_v4 RENAME TO sessions;
    CREATE INDEX sessions_expiry ON sessions(expires_at_ms);
    CREATE INDEX sessions_user ON sessions(user_id)""",
    # 5: roles, moderation and private rooms (spec §9.15). A disabled account may be so until a time (a
    # server-wide ban, chorus-admin bans); members get a role (rooms from before have no owner);
    # rooms a topic and a private flag; events share the conversation's seq with the messages (a page merges the
    # two); bans and mutes are sanctions (until_ms 0: no expiry); one-time invite codes (registration = invite) are
    # kept as their SHA-256.
    """ALTER TABLE memberships ADD COLUMN role INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE users ADD COLUMN disabled_until_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE conversations ADD COLUMN topic TEXT NOT NULL DEFAULT '';
    ALTER TABLE conversations ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE events (
        conv_id    INTEGER NOT NULL REFERENCES conversations(id),
        seq        INTEGER NOT NULL CHECK (seq > 0),
        ts_ms      INTEGER NOT NULL,
        kind       INTEGER NOT NULL,
        actor_id   INTEGER REFERENCES users(id),
        target_id  INTEGER REFERENCES users(id),
        target_seq INTEGER NOT NULL DEFAULT 0,
        until_ms   INTEGER NOT NULL DEFAULT 0,
        role       INTEGER NOT NULL DEFAULT 1,
        text       TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (conv_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE sanctions (
        conv_id  INTEGER NOT NULL REFERENCES conversations(id),
        user_id  INTEGER NOT NULL REFERENCES users(id),
        kind     INTEGER NOT NULL,
        until_ms INTEGER NOT NULL,
        PRIMARY KEY (conv_id, user_id, kind)
    ) WITHOUT ROWID;
    CREATE TABLE invites (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        code_hash  BLOB NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL DEFAULT 0,
        used_by    INTEGER REFERENCES users(id)
    )""",
    # 6: reactions (spec §9.16): one row per message, user and reaction, so a REACT is stored once and an
    # UNREACT finds it; the events carry them to clients.
    """CREATE TABLE reactions (
        conv_id  INTEGER NOT NULL REFERENCES conversations(id),
        seq      INTEGER NOT NULL,
        user_id  INTEGER NOT NULL REFERENCES users(id),
        reaction TEXT NOT NULL,
        PRIMARY KEY (conv_id, seq, user_id, reaction)
    ) WITHOUT ROWID""",
    # 7: display names (spec §9.17) and what each looks like (its skeleton, unique, so two cannot look alike).
    """ALTER TABLE users ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
    ALTER TABLE users ADD COLUMN display_skeleton TEXT;
    CREATE UNIQUE INDEX users_display_skeleton ON users(display_skeleton) WHERE display_skeleton IS NOT NULL""",
)
#: What a room owns, deleted with it (both stores).
ROOM_TABLES = ("messages", "events", "reactions", "sanctions", "cursors", "memberships")
#: The schema version this code writes and reads; a database at a higher one was written by a newer Chorus.
SCHEMA_VERSION = len(_MIGRATIONS)

# The user ids of a conversation's members: room members, or both users of a DIRECT pair. Parameter :c.
_MEMBER_IDS = f"""
    SELECT user_id FROM memberships WHERE conv_id = :c
    UNION ALL SELECT user_lo FROM conversations WHERE id = :c AND kind = {_DIRECT}
    UNION ALL SELECT user_hi FROM conversations WHERE id = :c AND kind = {_DIRECT}
"""

# Every conversation of user :u as (id, kind, name, last_seq, peer_id): its rooms, then its DIRECT pairs named
# after the other user.
_CONVERSATIONS = """
    SELECT c.id, c.kind, c.name, c.last_seq, NULL
      FROM memberships m JOIN conversations c ON c.id = m.conv_id WHERE m.user_id = :u
    UNION ALL
    SELECT c.id, c.kind, u.name, c.last_seq, u.id
      FROM conversations c JOIN users u ON u.id = c.user_hi WHERE c.user_lo = :u
    UNION ALL
    SELECT c.id, c.kind, u.name, c.last_seq, u.id
      FROM conversations c JOIN users u ON u.id = c.user_lo WHERE c.user_hi = :u
"""

# The mute of user :u in conversation v (a row of _CONVERSATIONS): its until_ms, or NULL.
_MUTE = ("(SELECT s.until_ms FROM sanctions s WHERE s.conv_id = v.id AND s.user_id = :u"
         f" AND s.kind = {int(EventKind.MUTE)})")
_MESSAGE_COLUMNS = "m.seq, m.ts_ms, u.name, m.client_msg_id, m.body"
_USER_COLUMNS = "id, name, password_hash, disabled, disabled_until_ms"


def _refusal(exc: BaseException) -> StoreError | None:
    """The ``StoreError`` for ``exc`` if it is a refusal by the database (see ``_REFUSED``), else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.Error) or code is None or code & 0xFF not in _REFUSED:
        return None
    error = StoreError(f"the database refused: {exc}")
    error.__cause__ = exc
    return error


def _room_stats(conn: Any) -> list[RoomStats]:
    """Every room with its member count and newest seq, by name: the same SQL on SQLite and PostgreSQL."""
    rows = conn.execute(
        "SELECT c.id, c.name, (SELECT count(*) FROM memberships m WHERE m.conv_id = c.id), c.last_seq"
        f" FROM conversations c WHERE c.kind = {_ROOM} ORDER BY c.name").fetchall()
    return [RoomStats(*row) for row in rows]


def _clamp(value: int) -> int:
    """``value`` (a wire u64: seq or limit) in SQLite's signed 64-bit range, so binding it never overflows.

    No stored seq or count comes near 2**63 - 1, so comparisons against the clamped value keep their meaning.
    """
    return _I64_MAX if value > _I64_MAX else _I64_MIN if value < _I64_MIN else value


def _from_db_id(value: int) -> int:
    return value + _U64 if value < 0 else value


def _stored(row: tuple[Any, ...]) -> StoredMessage:
    seq, ts_ms, sender, client_msg_id, body = row
    return StoredMessage(seq, ts_ms, sender, _from_db_id(client_msg_id), body)


def _user(row: tuple[Any, ...]) -> UserRow:
    """A user row; ``disabled`` only while the operator's ban lasts (both stores)."""
    user_id, name, password_hash, disabled, until_ms = row
    return UserRow(user_id, name, password_hash, bool(disabled) and active(until_ms, now_ms()), until_ms)


def _session_row(row: tuple[Any, ...]) -> SessionRow:
    user_id, name, expires_at_ms, disabled, until_ms = row
    return SessionRow(user_id, name, expires_at_ms, bool(disabled) and active(until_ms, now_ms()))


def _conv_row(row: tuple[Any, ...]) -> ConvRow:
    """A conversation row (id, kind, name, last_seq, peer_id[, the user's mute's until_ms or None])."""
    conv_id, kind, name, last_seq, peer_id, *mute = row
    return ConvRow(conv_id, ConvKind(kind), name, last_seq, peer_id, mute[0] if mute else None)


class _Db:
    """The writing or reading connection as ``_moderation.Db``: SQLite takes ``:name`` parameters as they are."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def one(self, sql: str, **params: Any) -> tuple[Any, ...] | None:
        return self.conn.execute(sql, params).fetchone()

    def all(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, **params: Any) -> int:
        return self.conn.execute(sql, params).rowcount

    @staticmethod
    def body(text: str) -> str:
        return text


def _open(conn: sqlite3.Connection | None) -> sqlite3.Connection:
    """``conn``, unless the store has closed it (``trio.ClosedResourceError``)."""
    if conn is None:
        raise trio.ClosedResourceError("the store is closed")
    return conn


def _new_id(cursor: sqlite3.Cursor) -> int:
    """The rowid an INSERT just made (``lastrowid`` is None only for a cursor that inserted nothing)."""
    rowid = cursor.lastrowid
    if rowid is None:
        raise sqlite3.InterfaceError("the INSERT made no row")
    return rowid


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back if the body or the COMMIT itself raises."""
    if conn.in_transaction:
        # A ROLLBACK that failed (I/O error) left one open; without this every later BEGIN would fail too.
        conn.execute("ROLLBACK")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("store: ROLLBACK failed; retried before the next transaction", exc_info=True)
        raise


def _make_private(path: str) -> None:
    """Create the database file 0600 if absent, and take group and other bits off it and its -wal/-shm.

    SQLite creates -wal and -shm with the main file's mode, so they are private from the start too. Raises
    ``OSError`` if the file cannot be created.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
            if mode & 0o077:
                os.chmod(name, mode & ~0o077)
        except FileNotFoundError:
            pass
        except OSError as exc:  # a read-only file system: still open it, reads work
            log.warning("store: cannot make %s private: %s", name, exc)


def _open_side(path: str, synchronous: str, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A second connection to the same file: queries, or checkpoints, beside the writer (WAL allows both)."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms:d}")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


def backup(path: str | os.PathLike[str], dest: str | os.PathLike[str], pages_per_step: int = 1024) -> int:
    """Copy the database at ``path`` to ``dest`` (a new file, 0600) with SQLite's online backup API, while servers
    write to it: a consistent snapshot, taken in steps of ``pages_per_step`` pages so the writer waits at most one
    step at a time (a write between steps restarts the copy, which SQLite does by itself). Returns the pages copied.
    Raises ``FileExistsError`` (``dest`` exists), ``sqlite3.Error``, ``OSError``.
    """
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    source = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)
    target = sqlite3.connect(dest)
    copied = 0

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal copied
        copied = total

    try:
        source.execute("PRAGMA busy_timeout = 5000")
        source.backup(target, pages=pages_per_step, progress=progress)
    finally:
        target.close()
        source.close()
    return copied


def _connect(path: str, synchronous: str, max_page_count: int | None) -> sqlite3.Connection:
    """Open (creating if needed) and prepare the database.

    Writes only if the schema is not current: even a no-op ``CREATE TABLE IF NOT EXISTS`` transaction must
    COMMIT, which a full disk refuses, and the server must start on a full disk. Raises ``OSError``,
    ``sqlite3.Error`` or ``RuntimeError`` (schema newer than this code).
    """
    _make_private(path)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: on an existing database, a read
        # Checkpoints run beside the writer (Store._checkpoint_loop), not inside a commit that senders wait for.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA journal_size_limit = 0")  # see the module's docstring
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        if max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {max_page_count:d}")
        if _schema_version(conn, path) < SCHEMA_VERSION:
            with _transaction(conn):
                version = _schema_version(conn, path)  # again: another process may have just migrated it
                for step in _MIGRATIONS[version:]:
                    for statement in step.split(";"):  # so no ';' inside the schema's comments
                        if statement.strip():
                            conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


def _schema_version(conn: sqlite3.Connection, path: str) -> int:
    """``PRAGMA user_version``; raises ``SchemaTooNew`` if it is newer than this code's."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"{path}: schema version {version} is newer than this server's ({SCHEMA_VERSION})")
    return version


def _wal_checkpoint(conn: sqlite3.Connection, mode: str) -> tuple[int, int, int]:
    """``PRAGMA wal_checkpoint(mode)``: (1 if it could not finish, frames in the WAL, frames copied back)."""
    busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return busy, frames, copied


def _wal_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _open_connections(path: str, synchronous: str, max_page_count: int | None
                      ) -> tuple[sqlite3.Connection, sqlite3.Connection, sqlite3.Connection]:
    """The writer, the reader and the checkpointer; raises like ``_connect``."""
    conn = _connect(path, synchronous, max_page_count)
    sides: list[sqlite3.Connection] = []
    try:
        sides.append(_open_side(path, synchronous))
        sides.append(_open_side(path, synchronous, _CHECKPOINT_BUSY_MS))
    except BaseException:
        for each in (conn, *sides):
            each.close()
        raise
    return conn, sides[0], sides[1]


@asynccontextmanager
async def open_store(
    path: str | os.PathLike[str],
    *,
    synchronous: str = "FULL",
    max_batch: int = 512,
    on_commit: Callable[[list[Appended]], None] | None = None,
    wal_checkpoint_bytes: int = WAL_CHECKPOINT_BYTES,
    max_page_count: int | None = None,
) -> AsyncIterator[Store]:
    """Open or create the database at ``path`` and run its committer and checkpointer until the block exits.

    On exit, even by cancellation, appends already queued are committed (shielded) before the file is closed;
    later calls raise ``trio.ClosedResourceError``. ``wal_checkpoint_bytes``: see ``WAL_CHECKPOINT_BYTES`` (the
    -wal file stays under twice that plus one group commit).
    ``max_page_count`` caps the database at that many pages on the writing connection, which is what a full disk
    looks like to SQLite (for tests; see ``Store.set_max_page_count``). Raises ``ValueError`` for a bad argument,
    ``StoreError`` (naming the path) if the file cannot be created or opened, ``RuntimeError`` if its schema is
    newer than this code.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if wal_checkpoint_bytes < 1:
        raise ValueError("wal_checkpoint_bytes must be at least 1")
    path = os.fspath(path)
    try:
        conns = await trio.to_thread.run_sync(_open_connections, path, synchronous, max_page_count)
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:
        if _refusal(exc) is None:
            raise
        raise StoreError(f"cannot open {path}: {exc}") from exc
    store = Store(*conns, wal_path=path + "-wal", max_batch=max_batch, on_commit=on_commit,
                  wal_checkpoint_bytes=wal_checkpoint_bytes)
    async with store._running(store._checkpoint_loop):
        yield store


class Store(GroupCommitter):
    """The SQLite implementation of the ``Store`` port (server/_ports.py), whose docstrings give the guarantees.

    Use ``open_store``. Every method may also raise ``StoreError`` when the database refuses (disk full...), and
    ``trio.ClosedResourceError`` once the store is closed."""

    _while_refused = "reads are still served; further refusals are counted, and logged again once a write succeeds"
    _recovered = "the database accepts writes"

    def __init__(self, conn: sqlite3.Connection, reader: sqlite3.Connection, checkpointer: sqlite3.Connection, *,
                 wal_path: str, max_batch: int, on_commit: Callable[[list[Appended]], None] | None,
                 wal_checkpoint_bytes: int) -> None:
        # Every write holds the committer's limiter: the writing connection is used by one thread at a time.
        super().__init__(limiter=trio.CapacityLimiter(1), max_batch=max_batch, on_commit=on_commit)
        self._conn: sqlite3.Connection | None = conn
        # Queries use their own connection, so a page of history never waits behind a group commit.
        self._reader: sqlite3.Connection | None = reader
        self._read_limiter = trio.CapacityLimiter(1)
        self._checkpointer: sqlite3.Connection | None = checkpointer
        self._wal_path = wal_path
        self._wal_checkpoint_bytes = wal_checkpoint_bytes
        self._wal_grown = trio.Event()  # set by the committer when the WAL passes the threshold
        self._checkpoint_lock = trio.Lock()  # one step at a time on the checkpointer's connection
        self._writes = 0  # successful writes of any kind: the checkpointer runs only when there are new ones
        self._checkpoints = 0
        self._wal_resets = 0
        self._reset_at_writes = -1  # self._writes when the WAL was last reset
        self._checkpoint_failing = False
        self._wal_bytes = 0  # the -wal file's size after the last group commit (stat by its worker thread)

    # -- plumbing ----------------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` in a worker thread, alone on the writing connection."""
        if self._closing:
            raise trio.ClosedResourceError("the store is closed")
        result = await self._in_thread(self._limiter, fn, self._conn, *args)
        self._writes += 1
        self._accepted()
        return result

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run the query ``fn(conn, *args)`` on the reading connection (sees every committed write)."""
        if self._closing:
            raise trio.ClosedResourceError("the store is closed")
        return await self._in_thread(self._read_limiter, fn, self._reader, *args)

    # The group committer's hook: a refusal by the database (see ``_REFUSED``) becomes ``StoreError``.
    _refusal = staticmethod(_refusal)

    async def set_max_page_count(self, pages: int) -> int:
        """Cap the database at ``pages`` pages, as a full disk would (a hook for tests); returns the cap in force.

        SQLite never sets it below the current size. Raises ``StoreError``.
        """

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(f"PRAGMA max_page_count = {int(pages):d}").fetchone()[0]

        return await self._run(run)

    async def _checkpoint_loop(self, period_s: float = 1.0) -> None:
        """Checkpoint after writes, once a second or as soon as the committer finds the WAL past its threshold."""
        writes = self._writes
        while not self._closing:
            with trio.move_on_after(period_s):
                await self._wal_grown.wait()
            self._wal_grown = trio.Event()
            if self._writes != writes and not self._closing:
                writes = self._writes
                await self._checkpoint()

    async def _checkpoint(self, at_least: int = 0) -> None:
        """One checkpoint step (if the -wal file holds ``at_least`` bytes): PASSIVE, then RESTART if it is still
        ``wal_checkpoint_bytes`` or more.

        PASSIVE copies while commits go on, so RESTART, which holds the writer's limiter (no commit starts, and it
        need not fight the committer for SQLite's write lock), only has the tail left to copy. Measured on this
        machine (2 shared cores, ext4, synchronous=FULL, 64 senders flat out over 50 rooms, 2,600-3,800 messages/s,
        a reset every ~0.3 s): RESTART holds the writer 8-14 ms (median), 30-53 ms at most, whatever the threshold
        (4, 16 or 64 MiB); PASSIVE takes 3-17 ms (median), 80 ms at most, blocking no one; the -wal file peaked at
        18-19 MiB (470-526 MiB after 15 s with PASSIVE alone), at the same throughput. TRUNCATE, which empties the
        file itself, held the writer 40-60 ms (median), 130 ms at most. Failures are logged once per episode and
        retried at the next step.
        """
        async with self._checkpoint_lock:
            if self._writes == self._reset_at_writes:
                return  # reset, and nothing written since: the next commit starts the file afresh
            try:
                checkpointer = _open(self._checkpointer)
                size = await trio.to_thread.run_sync(self._passive_checkpoint, checkpointer, at_least)
                if size is None:
                    return  # another step reset it meanwhile
                self._checkpoints += 1
                if size >= self._wal_checkpoint_bytes:
                    busy, _, _ = await trio.to_thread.run_sync(_wal_checkpoint, checkpointer, "RESTART",
                                                               limiter=self._limiter)
                    if not busy:
                        self._wal_resets += 1
                        self._reset_at_writes = self._writes
            except Exception as exc:  # maintenance: a failure here must not end the store (or the server)
                if not self._checkpoint_failing:
                    self._checkpoint_failing = True
                    log.warning("store: checkpoint failed: %s (retried after the next write; logged again once "
                                "one succeeds)", exc, exc_info=not isinstance(exc, sqlite3.Error))
                return
        if self._checkpoint_failing:
            self._checkpoint_failing = False
            log.warning("store: checkpoints succeed again")

    def _passive_checkpoint(self, checkpointer: sqlite3.Connection, at_least: int) -> int | None:
        """In a worker thread: PASSIVE, then the -wal file's size; None (and no checkpoint) if under ``at_least``."""
        if at_least and _wal_size(self._wal_path) < at_least:
            return None
        _wal_checkpoint(checkpointer, "PASSIVE")
        return _wal_size(self._wal_path)

    def _begin_close(self) -> None:
        super()._begin_close()
        self._wal_grown.set()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
        for side in (self._reader, self._checkpointer):
            if side is not None:
                await trio.to_thread.run_sync(side.close)
        self._reader = self._checkpointer = None

    # -- users and sessions ------------------------------------------------------------------------------------

    async def create_user(self, name: str, password_hash: str, *, invite: bytes | None = None) -> UserRow:
        """Raises ``NameTaken`` if ``name`` exists, ``InviteInvalid`` if ``invite`` (a code's hash) cannot be
        redeemed: then no account is made and the code stays as it was."""

        def run(conn: sqlite3.Connection) -> UserRow:
            with _transaction(conn):
                try:
                    cursor = conn.execute("INSERT INTO users(name, password_hash) VALUES (?, ?)",
                                          (name, password_hash))
                except sqlite3.IntegrityError as exc:
                    raise NameTaken(name) from exc
                user_id = _new_id(cursor)
                if invite is not None:
                    invites.redeem(_Db(conn), invite, user_id, now_ms())
            return UserRow(user_id, name, password_hash)

        return await self._run(run)

    async def set_display_name(self, user_id: int, name: str) -> None:
        """Raises ``DisplayNameRefused`` if ``name`` looks like another user's name (nothing changes)."""

        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                try:
                    displaynames.set_display_name(_Db(conn), user_id, name)
                except sqlite3.IntegrityError:  # another user took that skeleton meanwhile (unique index)
                    raise DisplayNameRefused("that display name looks like another user's name") from None

        await self._run(run)

    async def display_names(self, names: list[str]) -> list[UserInfo]:
        return await self._read(lambda conn: displaynames.display_names(_Db(conn), names))

    async def invite_usable(self, invite: bytes) -> bool:
        return await self._read(lambda conn: invites.usable(_Db(conn), invite, now_ms()))

    async def add_invites(self, hashes: list[bytes], expires_ms: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                invites.add(_Db(conn), hashes, now_ms(), expires_ms)

        await self._run(run)

    async def list_invites(self) -> list[InviteRow]:
        return await self._read(lambda conn: invites.listed(_Db(conn)))

    async def revoke_invite(self, invite_id: int) -> bool:
        return await self._run(lambda conn: invites.revoke(_Db(conn), _clamp(invite_id)))

    async def get_user(self, name: str) -> UserRow | None:
        def run(conn: sqlite3.Connection) -> UserRow | None:
            row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
            return _user(row) if row else None

        return await self._read(run)

    async def get_user_by_id(self, user_id: int) -> UserRow | None:
        def run(conn: sqlite3.Connection) -> UserRow | None:
            row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)).fetchone()
            return _user(row) if row else None

        return await self._read(run)

    async def add_session(self, token_hash: bytes, user_id: int, expires_at_ms: int, *, now_ms: int = 0) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO sessions(token_hash, user_id, expires_at_ms, created_ms, last_used_ms)"
                         " VALUES (?, ?, ?, ?, ?)", (token_hash, user_id, expires_at_ms, now_ms, now_ms))

        await self._run(run)

    async def get_session(self, token_hash: bytes, now_ms: int) -> SessionRow | None:
        """The session, or None if there is none or it expired at or before ``now_ms``."""

        def run(conn: sqlite3.Connection) -> SessionRow | None:
            row = conn.execute(
                "SELECT s.user_id, u.name, s.expires_at_ms, u.disabled, u.disabled_until_ms"
                " FROM sessions s JOIN users u ON u.id = s.user_id"
                " WHERE s.token_hash = ? AND s.expires_at_ms > ?", (token_hash, now_ms)).fetchone()
            return _session_row(row) if row else None

        return await self._read(run)

    async def touch_session(self, token_hash: bytes, expires_at_ms: int, *, now_ms: int = 0) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE sessions SET expires_at_ms = ?, last_used_ms = max(last_used_ms, ?)"
                         " WHERE token_hash = ?", (expires_at_ms, now_ms, token_hash))

        await self._run(run)

    async def list_sessions(self, user_id: int, now_ms: int) -> list[SessionEntry]:
        def run(conn: sqlite3.Connection) -> list[SessionEntry]:
            rows = conn.execute(
                "SELECT id, token_hash, created_ms, last_used_ms, expires_at_ms FROM sessions"
                " WHERE user_id = ? AND expires_at_ms > ? ORDER BY id", (_clamp(user_id), _clamp(now_ms)))
            return [SessionEntry(*row) for row in rows]

        return await self._read(run)

    async def delete_session_by_id(self, user_id: int, session_id: int) -> bytes | None:
        def run(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("DELETE FROM sessions WHERE id = ? AND user_id = ? RETURNING token_hash",
                               (_clamp(session_id), _clamp(user_id))).fetchone()
            return bytes(row[0]) if row else None

        return await self._run(run)

    async def delete_session(self, token_hash: bytes) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

        await self._run(run)

    async def purge_sessions(self, now_ms: int) -> int:
        """Delete expired sessions (they are refused anyway); returns how many went."""

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM sessions WHERE expires_at_ms <= ?", (now_ms,)).rowcount

        return await self._run(run)

    # -- administration --------------------------------------------------------------------------------------

    async def list_users(self) -> list[UserRow]:
        def run(conn: sqlite3.Connection) -> list[UserRow]:
            return [_user(row) for row in conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY name")]

        return await self._read(run)

    async def set_disabled(self, user_id: int, disabled: bool, *, until_ms: int = 0) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute("UPDATE users SET disabled = ?, disabled_until_ms = ? WHERE id = ?",
                                (int(disabled), until_ms if disabled else 0, _clamp(user_id))).rowcount == 1

        return await self._run(run)

    async def set_password_hash(self, user_id: int, password_hash: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute("UPDATE users SET password_hash = ? WHERE id = ?",
                                (password_hash, _clamp(user_id))).rowcount == 1

        return await self._run(run)

    async def delete_user_sessions(self, user_id: int, *, keep: bytes | None = None) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM sessions WHERE user_id = ? AND token_hash IS NOT ?",
                                (_clamp(user_id), keep)).rowcount

        return await self._run(run)

    async def room_stats(self) -> list[RoomStats]:
        return await self._read(_room_stats)

    async def delete_room(self, name: str) -> int | None:
        def run(conn: sqlite3.Connection) -> int | None:
            with _transaction(conn):
                row = conn.execute(f"SELECT id FROM conversations WHERE kind = {_ROOM} AND name = ?",
                                   (name,)).fetchone()
                if row is None:
                    return None
                for table in ROOM_TABLES:
                    conn.execute(f"DELETE FROM {table} WHERE conv_id = ?", (row[0],))
                conn.execute("DELETE FROM conversations WHERE id = ?", (row[0],))
                return row[0]

        return await self._run(run)

    async def append_admin_action(self, kind: str, user_id: int | None, room_id: int | None, at_ms: int) -> int:
        # AUTOINCREMENT: ids are never reused; SQLite has one writer at a time, so they commit in id order.
        def run(conn: sqlite3.Connection) -> int:
            return _new_id(conn.execute("INSERT INTO admin_actions(kind, user_id, room_id, at_ms) VALUES (?, ?, ?, ?)",
                                        (kind, user_id, room_id, at_ms)))

        return await self._run(run)

    async def admin_actions_after(self, after_id: int, limit: int) -> list[AdminAction]:
        def run(conn: sqlite3.Connection) -> list[AdminAction]:
            rows = conn.execute("SELECT id, kind, user_id, room_id, at_ms FROM admin_actions WHERE id > ?"
                                " ORDER BY id LIMIT ?", (_clamp(after_id), _clamp(limit))).fetchall()
            return [AdminAction(*row) for row in rows]

        return await self._read(run)

    async def last_admin_action_id(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute("SELECT coalesce(max(id), 0) FROM admin_actions").fetchone()[0]

        return await self._read(run)

    # -- rooms, pairs, membership ------------------------------------------------------------------------------

    async def room(self, name: str, *, create: bool) -> int | None:
        """The room's conversation id; None if it does not exist and ``create`` is false."""

        def run(conn: sqlite3.Connection) -> int | None:
            query = f"SELECT id FROM conversations WHERE kind = {_ROOM} AND name = ?"
            row = conn.execute(query, (name,)).fetchone()
            if row or not create:
                return row[0] if row else None
            with _transaction(conn):
                conn.execute(f"INSERT INTO conversations(kind, name) VALUES ({_ROOM}, ?) ON CONFLICT DO NOTHING",
                             (name,))
                return conn.execute(query, (name,)).fetchone()[0]

        return await self._run(run)

    async def join_room(self, user_id: int, name: str, *, max_rooms: int, create: bool = True,
                        private: bool | None = None) -> tuple[int, bool]:
        """Join the room ``name`` (created if absent and ``create``, its creator its owner); returns (conv_id,
        newly_joined). ``private`` not None: CREATE_ROOM, which only creates (``RoomExists`` otherwise).

        One ``BEGIN IMMEDIATE`` transaction: a member rejoins freely; anyone else is counted against ``max_rooms``
        before the room is created or the membership inserted, so concurrent joins (any connection, any process)
        cannot overshoot. Raises ``TooManyRooms`` when the user is in ``max_rooms`` rooms already (nothing is
        written, no room created), ``LookupError`` if the room does not exist and not ``create``, ``Refused``
        (FORBIDDEN: banned, or a private room), ``StoreError``.
        """

        def run(conn: sqlite3.Connection) -> tuple[int, bool]:
            with _transaction(conn):
                row = conn.execute(f"SELECT id FROM conversations WHERE kind = {_ROOM} AND name = ?",
                                   (name,)).fetchone()
                if row is not None:
                    if private is not None:  # CREATE_ROOM only creates, even for a member
                        raise RoomExists(name)
                    if conn.execute("SELECT 1 FROM memberships WHERE user_id = ? AND conv_id = ?",
                                    (user_id, row[0])).fetchone():
                        return row[0], False
                    join_refusal(_Db(conn), row[0], user_id, name)
                elif not create:
                    raise LookupError(f"no room {name}")
                (count,) = conn.execute("SELECT count(*) FROM memberships WHERE user_id = ?", (user_id,)).fetchone()
                if count >= max_rooms:
                    raise TooManyRooms(max_rooms)
                role = RoomRole.MEMBER
                if row is None:  # its creator owns it
                    conv_id = _new_id(conn.execute(f"INSERT INTO conversations(kind, name, private) VALUES"
                                                   f" ({_ROOM}, ?, ?)", (name, bool(private))))
                    role = RoomRole.OWNER
                else:
                    conv_id = row[0]
                conn.execute("INSERT INTO memberships(user_id, conv_id, role) VALUES (?, ?, ?)",
                             (user_id, conv_id, int(role)))
                return conv_id, True

        return await self._run(run)

    async def join(self, user_id: int, conv_id: int) -> bool:
        """True if newly joined. Raises ``ValueError`` if ``conv_id`` is not a room.

        No room limit: JOIN uses ``join_room``, which checks it in the same transaction.
        """

        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                row = conn.execute("SELECT kind FROM conversations WHERE id = ?", (conv_id,)).fetchone()
                if not row or row[0] != _ROOM:
                    raise ValueError(f"conversation {conv_id} is not a room")
                cursor = conn.execute("INSERT INTO memberships(user_id, conv_id) VALUES (?, ?)"
                                      " ON CONFLICT DO NOTHING", (user_id, conv_id))
                return cursor.rowcount == 1

        return await self._run(run)

    async def leave(self, user_id: int, conv_id: int) -> bool:
        """True if the user was a member. Cursors are kept, so rejoining resumes where the user was."""

        def run(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM memberships WHERE user_id = ? AND conv_id = ?", (user_id, conv_id))
            return cursor.rowcount == 1

        return await self._run(run)

    async def is_member(self, user_id: int, conv_id: int) -> bool:
        """Room membership, or being one of a DIRECT pair."""

        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute(f"SELECT 1 FROM ({_MEMBER_IDS}) WHERE user_id = :u",
                               {"c": conv_id, "u": user_id}).fetchone()
            return row is not None

        return await self._read(run)

    async def room_count(self, user_id: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute("SELECT count(*) FROM memberships WHERE user_id = ?", (user_id,)).fetchone()[0]

        return await self._read(run)

    async def members(self, conv_id: int) -> list[tuple[int, str]]:
        """(user_id, name) of a room's members or of both users of a DIRECT pair, by name; [] if unknown."""

        def run(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = conn.execute(f"SELECT u.id, u.name FROM ({_MEMBER_IDS}) m JOIN users u ON u.id = m.user_id"
                                " ORDER BY u.name", {"c": conv_id}).fetchall()
            return [(user_id, name) for user_id, name in rows]

        return await self._read(run)

    async def direct(self, user_a_id: int, user_b_id: int) -> int:
        """The pair's conversation id, created if absent; the same for either order.

        Raises ``ValueError`` if both ids are the same user, ``sqlite3.IntegrityError`` if one does not exist.
        """
        if user_a_id == user_b_id:
            raise ValueError("a direct conversation needs two different users")
        lo, hi = sorted((user_a_id, user_b_id))

        def run(conn: sqlite3.Connection) -> int:
            query = "SELECT id FROM conversations WHERE user_lo = ? AND user_hi = ?"
            row = conn.execute(query, (lo, hi)).fetchone()
            if row:
                return row[0]
            with _transaction(conn):
                conn.execute(f"INSERT INTO conversations(kind, user_lo, user_hi) VALUES ({_DIRECT}, ?, ?)"
                             " ON CONFLICT DO NOTHING", (lo, hi))
                return conn.execute(query, (lo, hi)).fetchone()[0]

        return await self._run(run)

    async def conversations(self, user_id: int) -> list[ConvRow]:
        """The rooms the user joined and the user's DIRECT pairs, ordered by kind then name."""

        def run(conn: sqlite3.Connection) -> list[ConvRow]:
            rows = conn.execute(f"SELECT v.*, {_MUTE} FROM ({_CONVERSATIONS}) v ORDER BY 2, 3",
                                {"u": user_id}).fetchall()
            return [_conv_row(row) for row in rows]

        return await self._read(run)

    async def conversation(self, user_id: int, conv_id: int) -> ConvRow | None:
        """One conversation from the user's view: any room (member or not), or a DIRECT pair the user is in.

        None if ``conv_id`` does not exist or is a DIRECT pair of two other users.
        """

        def run(conn: sqlite3.Connection) -> ConvRow | None:
            row = conn.execute(
                "SELECT c.id, c.kind, coalesce(c.name, u.name), c.last_seq, u.id FROM conversations c"
                " LEFT JOIN users u ON u.id = CASE WHEN c.user_lo = :u THEN c.user_hi"
                "                                   WHEN c.user_hi = :u THEN c.user_lo END"
                " WHERE c.id = :c", {"u": user_id, "c": conv_id}).fetchone()
            if row is None or (row[1] == _DIRECT and row[4] is None):
                return None
            return _conv_row(row)

        return await self._read(run)

    async def list_rooms(self, user_id: int, limit: int) -> list[RoomInfo]:
        """Up to ``limit`` rooms with members: those the user joined first, then the others, each group by name.

        Rooms nobody is in are left out, so rooms made by JOIN then LEAVE cannot bury the real ones.
        """

        def run(conn: sqlite3.Connection) -> list[RoomInfo]:
            rows = conn.execute(
                "SELECT c.name, (SELECT count(*) FROM memberships m WHERE m.conv_id = c.id), c.last_seq,"
                "       EXISTS (SELECT 1 FROM memberships m WHERE m.conv_id = c.id AND m.user_id = ?) AS joined"
                f" FROM conversations c WHERE c.kind = {_ROOM}"
                "   AND EXISTS (SELECT 1 FROM memberships m WHERE m.conv_id = c.id)"
                "   AND (c.private = 0 OR joined)"
                " ORDER BY joined DESC, c.name LIMIT ?",
                (user_id, _clamp(limit))).fetchall()
            return [RoomInfo(name, members, last_seq, bool(joined)) for name, members, last_seq, joined in rows]

        return await self._read(run)

    async def conversation_list(self, user_id: int, limit: int) -> list[ConversationInfo]:
        """LIST_CONVERSATIONS (spec §5.38): the rooms the user is in and its direct conversations with a message,
        each with its newest seq, that message's time and the user's own cursors; the most recently active first
        (those with no message last, rooms first, by name), at most ``limit``. Every join is on a key."""

        def run(conn: sqlite3.Connection) -> list[ConversationInfo]:
            rows = conn.execute(
                "SELECT v.kind, v.name, v.last_seq, coalesce(m.ts_ms, e.ts_ms, 0),"
                "       coalesce(k.delivered_seq, 0), coalesce(k.read_seq, 0)"
                f" FROM ({_CONVERSATIONS}) v"
                " LEFT JOIN messages m ON m.conv_id = v.id AND m.seq = v.last_seq"
                " LEFT JOIN events e ON e.conv_id = v.id AND e.seq = v.last_seq"  # the newest may be an event
                " LEFT JOIN cursors k ON k.user_id = :u AND k.conv_id = v.id"
                f" WHERE v.kind = {_ROOM} OR v.last_seq > 0"
                " ORDER BY 4 DESC, 1, 2 LIMIT :n", {"u": user_id, "n": _clamp(limit)}).fetchall()
            return [ConversationInfo(Conversation(ConvKind(kind), name), last_seq, ts_ms, delivered, read)
                    for kind, name, last_seq, ts_ms, delivered, read in rows]

        return await self._read(run)

    # -- messages ----------------------------------------------------------------------------------------------

    async def sent_in(self, sender_id: int, client_msg_id: int) -> int | None:
        """The conversation holding the sender's message ``client_msg_id`` (any u64), or None if there is none."""

        def run(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT conv_id FROM messages WHERE sender_id = ? AND client_msg_id = ?",
                               (sender_id, _to_db_id(client_msg_id))).fetchone()
            return row[0] if row else None

        return await self._read(run)

    async def last_seq(self, conv_id: int) -> int:
        """The conversation's newest seq; 0 if it has no messages or does not exist."""

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT last_seq FROM conversations WHERE id = ?", (conv_id,)).fetchone()
            return row[0] if row else 0

        return await self._read(run)

    def _write_batch(self, msgs: list[NewMessage]) -> list[Appended]:
        """The group committer's hook, in its worker thread: store ``msgs`` in one transaction; their results.

        Raises ``LookupError`` for an unknown conversation, ``sqlite3.Error`` (nothing stored).
        """
        conn = _open(self._conn)
        results: list[Appended] = []
        last: dict[int, int] = {}  # conv_id -> last_seq as of this transaction
        with _transaction(conn):
            for msg in msgs:
                conv_id = msg.conv_id
                if conv_id not in last:
                    row = conn.execute("SELECT last_seq FROM conversations WHERE id = ?", (conv_id,)).fetchone()
                    if row is None:
                        raise LookupError(f"no conversation {conv_id}")
                    last[conv_id] = row[0]
                seq = last[conv_id] + 1
                db_id = _to_db_id(msg.client_msg_id)
                # The conflict target is the dedup index only: any other constraint still fails the batch.
                inserted = conn.execute(
                    "INSERT INTO messages(conv_id, seq, ts_ms, sender_id, client_msg_id, body)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(sender_id, client_msg_id) DO NOTHING",
                    (conv_id, seq, msg.ts_ms, msg.sender_id, db_id, msg.body)).rowcount
                if inserted:
                    last[conv_id] = seq
                    results.append(Appended(conv_id, seq, msg.ts_ms, msg.sender_id, msg.sender_name,
                                            msg.client_msg_id, msg.body, duplicate=False))
                else:  # a retry: stored earlier, or earlier in this very batch
                    orig_conv, orig_seq, orig_ts, orig_body = conn.execute(
                        "SELECT conv_id, seq, ts_ms, body FROM messages WHERE sender_id = ? AND client_msg_id = ?",
                        (msg.sender_id, db_id)).fetchone()
                    results.append(Appended(orig_conv, orig_seq, orig_ts, msg.sender_id, msg.sender_name,
                                            msg.client_msg_id, orig_body, duplicate=True))
            conn.executemany("UPDATE conversations SET last_seq = ? WHERE id = ?",
                             [(seq, conv_id) for conv_id, seq in last.items()])
        # One stat beside an fsync: how the checkpointer learns early that the WAL needs a reset.
        self._wal_bytes = _wal_size(self._wal_path)
        return results

    async def _batch_done(self) -> None:
        """The group committer's hook after a batch: count the write, and keep the WAL bounded."""
        self._writes += 1
        if self._wal_bytes >= self._wal_checkpoint_bytes:
            self._wal_grown.set()
        if self._wal_bytes >= 2 * self._wal_checkpoint_bytes:
            # The checkpointer is not keeping up (the disk is slower than the writes): wait for a step, so the WAL
            # stays bounded; appends gather meanwhile and go in the next batch.
            await self._checkpoint(at_least=2 * self._wal_checkpoint_bytes)

    async def messages_after(self, conv_id: int, after_seq: int, limit: int) -> tuple[list[Entry], bool]:
        """Up to ``limit`` entries (messages and events) with seq > ``after_seq``, ascending; has_more = newer ones
        exist. Any u64 ``after_seq`` and ``limit`` are fine (2**63 and above: an empty page). Raises ``ValueError``
        if ``limit`` < 1.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._read(lambda conn: entries_after(_Db(conn), conv_id, after_seq, limit, _clamp, _stored))

    async def messages_before(self, conv_id: int, before_seq: int, limit: int) -> tuple[list[Entry], bool]:
        """Up to ``limit`` entries with seq < ``before_seq`` (0: from the newest), ascending; has_more = older ones
        exist. Any u64 ``before_seq`` and ``limit`` are fine (2**63 and above: from the newest too). Raises
        ``ValueError`` if ``limit`` < 1.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        bound = _clamp(before_seq) if before_seq > 0 else _I64_MAX
        return await self._read(lambda conn: entries_before(_Db(conn), conv_id, bound, limit, _clamp, _stored))

    # -- moderation (spec §9.15) ---------------------------------------------------------------------------------

    async def moderate(self, action: Moderation) -> Applied:
        """Apply ``action`` and store its event in one transaction. Raises ``Refused``, ``TooManyRooms``."""

        def run(conn: sqlite3.Connection) -> Applied:
            with _transaction(conn):
                return apply(_Db(conn), action)

        return await self._run(run)

    async def room_details(self, conv_id: int, viewer_id: int) -> tuple[str, bool, list[Any], list[Any]]:
        return await self._read(lambda conn: room_details(_Db(conn), conv_id, viewer_id))

    async def room_bans(self, conv_id: int) -> list[BanInfo]:
        return await self._read(lambda conn: room_bans(_Db(conn), conv_id))

    # -- cursors -----------------------------------------------------------------------------------------------

    async def advance_cursor(self, user_id: int, conv_id: int, kind: ReceiptKind, seq: int) -> int | None:
        """Store max(old, min(seq, last_seq)) as the user's DELIVERED or READ cursor; ``seq`` may be any u64.

        Returns the new value if the cursor moved, else None (also for an unknown conversation).
        """
        column = {ReceiptKind.DELIVERED: "delivered_seq", ReceiptKind.READ: "read_seq"}[ReceiptKind(kind)]
        seq = _clamp(seq)

        def run(conn: sqlite3.Connection) -> int | None:
            with _transaction(conn):
                row = conn.execute("SELECT last_seq FROM conversations WHERE id = ?", (conv_id,)).fetchone()
                if row is None:
                    return None
                target = min(seq, row[0])
                old = conn.execute(f"SELECT {column} FROM cursors WHERE user_id = ? AND conv_id = ?",
                                   (user_id, conv_id)).fetchone()
                if target <= (old[0] if old else 0):
                    return None
                conn.execute(f"INSERT INTO cursors(user_id, conv_id, {column}) VALUES (?, ?, ?)"
                             f" ON CONFLICT DO UPDATE SET {column} = excluded.{column}",
                             (user_id, conv_id, target))
                return target

        return await self._run(run)

    async def cursors(self, conv_id: int) -> list[CursorInfo]:
        """(user, delivered_seq, read_seq) for every member (0 where unset), by user name."""

        def run(conn: sqlite3.Connection) -> list[CursorInfo]:
            rows = conn.execute(
                f"SELECT u.name, coalesce(k.delivered_seq, 0), coalesce(k.read_seq, 0) FROM ({_MEMBER_IDS}) m"
                " JOIN users u ON u.id = m.user_id"
                " LEFT JOIN cursors k ON k.user_id = m.user_id AND k.conv_id = :c ORDER BY u.name",
                {"c": conv_id}).fetchall()
            return [CursorInfo(*row) for row in rows]

        return await self._read(run)

    async def undelivered(self, user_id: int) -> list[tuple[ConvRow, int]]:
        """The user's conversations with messages after the user's DELIVERED cursor, with that cursor."""

        def run(conn: sqlite3.Connection) -> list[tuple[ConvRow, int]]:
            rows = conn.execute(
                f"SELECT v.*, coalesce(k.delivered_seq, 0) FROM ({_CONVERSATIONS}) v"
                " LEFT JOIN cursors k ON k.user_id = :u AND k.conv_id = v.id"
                " WHERE v.last_seq > coalesce(k.delivered_seq, 0) ORDER BY 2, 3", {"u": user_id}).fetchall()
            return [(_conv_row(row[:5]), row[5]) for row in rows]

        return await self._read(run)

    # -- counters ----------------------------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """The group committer's counters (server/_groupcommit.py), plus the WAL's: ``checkpoints`` (steps that
        copied the WAL back) and ``wal_resets`` (RESTART checkpoints that rewound it)."""
        return {**super().statistics(), "checkpoints": self._checkpoints, "wal_resets": self._wal_resets}
