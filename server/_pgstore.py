"""The PostgreSQL store: the ``Store`` port (server/_ports.py) shared by every node (DESIGN.md "More than one machine").

How this works. psycopg 3's sync API in Trio worker threads (its async API needs asyncio): one connection is the
committer's alone (``_limiter``, a ``CapacityLimiter(1)``), the other ``pool_size - 1`` serve every other query and
write (``_Pool``: opened on first need, a broken one is dropped and the next call opens a fresh one), so Trio never
blocks on the network and the store reconnects by itself when PostgreSQL comes back. Connections are in
autocommit mode; multi-statement work is an explicit BEGIN ... COMMIT (``_transaction``) at READ COMMITTED.

Messages are group-committed per node by the same committer as the SQLite store's (server/_groupcommit.py: one
transaction a batch, ``on_commit`` and then the waiters only after COMMIT); this module writes the batch on the
committer's own connection (``_write_messages``). Several nodes write into the same conversations, so the batch
first locks its conversations' rows in id order (``FOR NO KEY UPDATE``, which still lets foreign-key checks of
joins and cursors through); a conversation's next message therefore commits only after its previous one, and
``seq = last_seq + 1`` read under that lock is gapless across nodes. Locking in one order means two nodes' batches
cannot deadlock; if PostgreSQL still aborts one (deadlock, serialization failure) the whole batch is retried, never
reported as a lost send. ``(sender_id, client_msg_id)`` is a unique index: a retry, from any node or inside the
batch, resolves to the stored row with ``duplicate=True``; if another node stores the same key between our lookup
and our INSERT, the batch is rolled back and retried, and then finds it.

Failure is local. Connection loss, PostgreSQL down or restarting, disk full, admin shutdown, a read-only standby
(``_refusal``) raise ``StoreError``, never a psycopg error, with the URL's password left out of every message. A
connection found dead when a query or a transaction's body runs (PostgreSQL restarted while it was idle) is
replaced and the work retried once: nothing of it took effect. A connection lost during COMMIT is not retried: the
outcome is unknown, so the waiters get ``StoreError`` and the client's retry (same ``client_msg_id``) finds the
message if it was committed. Acked always means committed.

Moderation (spec §9.15) is server/_moderation.py's rules and SQL, shared with the SQLite store, run over ``_Db``
(its ``:name`` parameters become psycopg's); each action is one transaction that locks its conversation's row first,
like a group commit, so events take gapless seqs among the messages of every node (``moderate``).

Values from the wire are u64 and ``bigint`` is signed, so the SQLite store's mappings apply (``_clamp``, ``_to_db_id``).
Bodies are ``bytea`` because ``text`` cannot hold the NUL character a body may contain. Names sort with
``COLLATE "C"``, byte order, as in SQLite. The schema is versioned in ``chorus_schema`` and migrated in ordered
steps (``_MIGRATIONS``) under an advisory lock, so nodes starting together do not race; a newer schema is refused.
"""
from __future__ import annotations

import functools
import logging
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from chorus.proto import (
    BanInfo, Conversation, ConversationInfo, ConvKind, CursorInfo, EventKind, ReceiptKind, RoomInfo, RoomRole,
    StoredMessage, UserInfo,
)

from . import _displaynames as displaynames
from . import _invites as invites
from ._displaynames import DisplayNameRefused
from ._config import without_password
from ._groupcommit import GroupCommitter
from ._invites import InviteRow
from ._moderation import (
    Applied, Entry, Moderation, apply, entries_after, entries_before, join_refusal, now_ms, room_bans, room_details,
)
from ._ports import (
    AdminAction, Appended, ConvRow, NameTaken, NewMessage, RoomExists, RoomStats, SchemaTooNew, SessionEntry,
    SessionRow, StoreError, TooManyRooms, UserRow,
)
# One mapping of wire u64s onto signed 64-bit integers for both stores; the rows both read alike; what a room owns;
# a user's mute.
from ._store import (
    _I64_MAX, _MUTE, _USER_COLUMNS, ROOM_TABLES, _clamp, _conv_row, _from_db_id, _room_stats, _session_row, _to_db_id,
    _user,
)

log = logging.getLogger(__name__)

_ROOM = int(ConvKind.ROOM)
_DIRECT = int(ConvKind.DIRECT)

#: libpq settings used unless the URL gives its own: fail fast when the server is unreachable, and notice a
#: silently dead peer (a pulled cable) instead of waiting forever on it.
_CONNECT_DEFAULTS = {
    "connect_timeout": "5", "application_name": "chorus", "keepalives": "1", "keepalives_idle": "10",
    "keepalives_interval": "5", "keepalives_count": "3", "tcp_user_timeout": "30000",
}
#: A batch or transaction aborted by PostgreSQL (deadlock, serialization failure) or by a dedup race is retried
#: this many times at most, after a short random pause, before it fails as ``StoreError``.
_MAX_ATTEMPTS = 20
#: ``pg_advisory_xact_lock`` key held while migrating: b"chorus" as an integer.
_SCHEMA_LOCK = int.from_bytes(b"chorus", "big")
#: SQLSTATE classes and codes that mean "the database cannot do this now" (as opposed to "this request is wrong"):
#: insufficient resources (disk full, too many connections), operator intervention (shutdown, cancel), system and
#: internal errors, a read-only transaction (a standby after failover). psycopg's OperationalError and
#: InterfaceError (connection lost or closed) are refusals too.
_REFUSED_CLASSES = frozenset({"08", "40", "53", "55", "57", "58", "XX"})
_REFUSED_STATES = frozenset({"25006"})

_SCHEMA = f"""
CREATE TABLE users (
    id            bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name          text COLLATE "C" NOT NULL UNIQUE,
    password_hash text NOT NULL
);
CREATE TABLE sessions (
    token_hash    bytea PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users(id),
    expires_at_ms bigint NOT NULL
);
CREATE INDEX sessions_expiry ON sessions(expires_at_ms);
-- One row per room (kind ROOM, unique name) and per unordered user pair (kind DIRECT, user_lo < user_hi).
-- last_seq is the seq of the newest message, written in the transaction that stores the message.
CREATE TABLE conversations (
    id       bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    kind     smallint NOT NULL,
    name     text COLLATE "C" UNIQUE,
    user_lo  bigint REFERENCES users(id),
    user_hi  bigint REFERENCES users(id),
    last_seq bigint NOT NULL DEFAULT 0,
    UNIQUE (user_lo, user_hi),
    CHECK ((kind = {_ROOM} AND name IS NOT NULL AND user_lo IS NULL AND user_hi IS NULL)
        OR (kind = {_DIRECT} AND name IS NULL AND user_lo < user_hi))
);
CREATE INDEX conversations_user_hi ON conversations(user_hi);
CREATE TABLE memberships (
    user_id bigint NOT NULL REFERENCES users(id),
    conv_id bigint NOT NULL REFERENCES conversations(id),
    PRIMARY KEY (user_id, conv_id)
);
CREATE INDEX memberships_conv ON memberships(conv_id, user_id);
CREATE TABLE messages (
    conv_id       bigint NOT NULL REFERENCES conversations(id),
    seq           bigint NOT NULL CHECK (seq > 0),
    ts_ms         bigint NOT NULL,
    sender_id     bigint NOT NULL REFERENCES users(id),
    client_msg_id bigint NOT NULL,
    body          bytea NOT NULL CHECK (octet_length(body) > 0),
    PRIMARY KEY (conv_id, seq)
);
CREATE UNIQUE INDEX messages_dedup ON messages(sender_id, client_msg_id);
CREATE TABLE cursors (
    user_id       bigint NOT NULL REFERENCES users(id),
    conv_id       bigint NOT NULL REFERENCES conversations(id),
    delivered_seq bigint NOT NULL DEFAULT 0,
    read_seq      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, conv_id)
);
"""

#: Schema migrations: step n takes a database from version n to n + 1; ``_migrate`` applies the missing ones in
#: order in one transaction. A shipped step never changes: a change to the schema is a new step at the end.
_MIGRATIONS: tuple[str, ...] = (
    _SCHEMA,
    # 2: administration (chorus-admin): accounts an operator disabled, and the actions every node applies to its
    # live connections, polled by id (the primary key: one range read a second per node).
    """ALTER TABLE users ADD COLUMN disabled boolean NOT NULL DEFAULT false;
    CREATE TABLE admin_actions (
        id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind    text NOT NULL,
        user_id bigint,
        room_id bigint,
        at_ms   bigint NOT NULL
    );""",
    # 3: a user's own sessions (LIST_SESSIONS, REVOKE_SESSION, spec §9.1): each token gets an opaque id (an
    # identity: existing tokens are numbered as the column is added) and its creation and last use (0 for the
    # tokens made before this step).
    """ALTER TABLE sessions ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY UNIQUE;
    ALTER TABLE sessions ADD COLUMN created_ms bigint NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN last_used_ms bigint NOT NULL DEFAULT 0;
    CREATE INDEX sessions_user ON sessions(user_id);""",
    # 4: roles, moderation and private rooms (spec §9.15), as SQLite's step 5. A disabled account may be so until a
    # time (a server-wide ban); members get a role (rooms from before have no owner); rooms a topic and a private
    # flag; events share the conversation's seq with the messages (a page merges the two); bans and mutes are
    # sanctions (until_ms 0: no expiry); one-time invite codes (registration = invite) are kept as their SHA-256.
    """ALTER TABLE memberships ADD COLUMN role smallint NOT NULL DEFAULT 1;
    ALTER TABLE users ADD COLUMN disabled_until_ms bigint NOT NULL DEFAULT 0;
    ALTER TABLE conversations ADD COLUMN topic text NOT NULL DEFAULT '';
    ALTER TABLE conversations ADD COLUMN private boolean NOT NULL DEFAULT false;
    CREATE TABLE events (
        conv_id    bigint NOT NULL REFERENCES conversations(id),
        seq        bigint NOT NULL CHECK (seq > 0),
        ts_ms      bigint NOT NULL,
        kind       smallint NOT NULL,
        actor_id   bigint REFERENCES users(id),
        target_id  bigint REFERENCES users(id),
        target_seq bigint NOT NULL DEFAULT 0,
        until_ms   bigint NOT NULL DEFAULT 0,
        role       smallint NOT NULL DEFAULT 1,
        text       text NOT NULL DEFAULT '',
        PRIMARY KEY (conv_id, seq)
    );
    CREATE TABLE sanctions (
        conv_id  bigint NOT NULL REFERENCES conversations(id),
        user_id  bigint NOT NULL REFERENCES users(id),
        kind     smallint NOT NULL,
        until_ms bigint NOT NULL,
        PRIMARY KEY (conv_id, user_id, kind)
    );
    CREATE TABLE invites (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        code_hash  bytea NOT NULL UNIQUE,
        created_ms bigint NOT NULL,
        expires_ms bigint NOT NULL DEFAULT 0,
        used_by    bigint REFERENCES users(id)
    );""",
    # 5: reactions (spec §9.16): one row per message, user and reaction.
    """CREATE TABLE reactions (
        conv_id  bigint NOT NULL REFERENCES conversations(id),
        seq      bigint NOT NULL,
        user_id  bigint NOT NULL REFERENCES users(id),
        reaction text NOT NULL,
        PRIMARY KEY (conv_id, seq, user_id, reaction)
    );""",
    # 6: display names (spec §9.17) and what each looks like (its skeleton, unique, so two cannot look alike).
    """ALTER TABLE users ADD COLUMN display_name text NOT NULL DEFAULT '';
    ALTER TABLE users ADD COLUMN display_skeleton text;
    CREATE UNIQUE INDEX users_display_skeleton ON users(display_skeleton) WHERE display_skeleton IS NOT NULL;""",
)
#: The schema version this code writes and reads; a database at a higher one was written by a newer Chorus.
SCHEMA_VERSION = len(_MIGRATIONS)

# The user ids of conversation %(c)s's members: room members, or both users of a DIRECT pair.
_MEMBER_IDS = f"""
    SELECT user_id FROM memberships WHERE conv_id = %(c)s
    UNION ALL SELECT user_lo FROM conversations WHERE id = %(c)s AND kind = {_DIRECT}
    UNION ALL SELECT user_hi FROM conversations WHERE id = %(c)s AND kind = {_DIRECT}
"""

# Every conversation of user %(u)s as (id, kind, name, last_seq, peer_id): its rooms, then its DIRECT pairs named
# after the other user.
_CONVERSATIONS = """
    SELECT c.id, c.kind, c.name, c.last_seq, NULL::bigint AS peer_id
      FROM memberships m JOIN conversations c ON c.id = m.conv_id WHERE m.user_id = %(u)s
    UNION ALL
    SELECT c.id, c.kind, u.name, c.last_seq, u.id
      FROM conversations c JOIN users u ON u.id = c.user_hi WHERE c.user_lo = %(u)s
    UNION ALL
    SELECT c.id, c.kind, u.name, c.last_seq, u.id
      FROM conversations c JOIN users u ON u.id = c.user_lo WHERE c.user_hi = %(u)s
"""


class _CommitUnknown(Exception):
    """The connection was lost during COMMIT: the transaction may or may not have committed. Never retried."""


class _Conflict(Exception):
    """Another node stored one of the batch's ``(sender_id, client_msg_id)`` after the batch looked: retry."""


def _scrub(exc: BaseException, url: str, password: str | None) -> str:
    """The first line of ``exc``'s message, with ``url`` and ``password`` (should libpq quote them) masked."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    text = text.replace(url, without_password(url))
    return text.replace(password, "***") if password else text


def _aborted(exc: BaseException) -> bool:
    """PostgreSQL rolled the transaction back to break a deadlock or a serialization conflict (SQLSTATE class 40),
    or another node stored one of the batch's keys meanwhile: the whole transaction may run again."""
    return isinstance(exc, _Conflict) or (isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("40"))


def _lost(conn: psycopg.Connection) -> bool:
    return conn.closed or conn.broken


def _stored(row: tuple[Any, ...]) -> StoredMessage:
    seq, ts_ms, sender, client_msg_id, body = row
    return StoredMessage(seq, ts_ms, sender, _from_db_id(client_msg_id), bytes(body).decode())


#: A ``:name`` parameter of ``_moderation.Db``'s SQL (not the second colon of a ``::type`` cast, nor ``a::name``).
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """``sql`` with its ``:name`` parameters as psycopg's ``%(name)s`` (the SQL has no ``%`` of its own)."""
    return _NAMED.sub(r"%(\1)s", sql)


class _Db:
    """A connection inside its transaction as ``_moderation.Db``: ``:name`` parameters become ``%(name)s``, bodies
    are ``bytea``."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def _execute(self, sql: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        return self.conn.execute(_pg_sql(sql), params)

    def one(self, sql: str, **params: Any) -> tuple[Any, ...] | None:
        return self._execute(sql, params).fetchone()

    def all(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return self._execute(sql, params).fetchall()

    def run(self, sql: str, **params: Any) -> int:
        return self._execute(sql, params).rowcount

    @staticmethod
    def body(text: str) -> bytes:
        return text.encode()


@contextmanager
def _transaction(conn: psycopg.Connection) -> Iterator[None]:
    """BEGIN ... COMMIT on an autocommit connection; rolled back if the body raises.

    Raises ``_CommitUnknown`` if the connection is lost during COMMIT (the one case where a retry is not safe).
    """
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        _rollback(conn)
        raise
    try:
        conn.execute("COMMIT")
    except psycopg.Error as exc:
        if _lost(conn):
            raise _CommitUnknown("the connection to PostgreSQL was lost during COMMIT") from exc
        raise


class _Pool:
    """Up to ``size`` connections, opened on first need and replaced once broken; used from worker threads.

    ``limiter`` bounds the threads using it, so there is always an idle connection or room for a new one.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection], size: int) -> None:
        self.limiter = trio.CapacityLimiter(size)
        self._connect = connect
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()  # counters and the idle list, from several worker threads
        self._closed = False
        self.connects = 0
        self.retries = 0

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], retry_lost: bool) -> Any:
        """``fn(conn, *args)`` on a connection of the pool (in a worker thread holding a ``limiter`` token).

        Retried: an abort by PostgreSQL (deadlock, serialization failure) or ``_Conflict``, up to ``_MAX_ATTEMPTS``
        times; and once, if ``retry_lost``, a failure on a reused connection that turns out dead (PostgreSQL
        restarted or ended it while idle), since then nothing of ``fn`` took effect. ``_CommitUnknown`` never.
        """
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        attempt = 0
        try:
            while True:
                attempt += 1
                fresh = conn is None
                try:
                    if conn is None:
                        conn = self._open()
                    return fn(conn, *args)
                except (psycopg.Error, _Conflict) as exc:
                    if conn is not None and not _lost(conn) and _aborted(exc):
                        if attempt >= _MAX_ATTEMPTS:
                            raise
                        self._count_retry()
                        # Two nodes aborting each other again at once is what the random pause makes unlikely.
                        time.sleep(random.uniform(0, 0.001 * min(attempt, 10)))
                        continue
                    if conn is None or not _lost(conn):
                        raise
                    self._discard(conn)
                    conn = None
                    if fresh or not retry_lost:
                        raise
                    retry_lost = False
                    self._count_retry()
        finally:
            if conn is not None:
                if _lost(conn) or conn.info.transaction_status != TransactionStatus.IDLE:
                    self._discard(conn)  # dead, or left inside a transaction (a failed ROLLBACK)
                else:
                    self._release(conn)

    def _open(self) -> psycopg.Connection:
        conn = self._connect()
        with self._lock:
            self.connects += 1
        return conn

    def _count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def _release(self, conn: psycopg.Connection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    @staticmethod
    def _discard(conn: psycopg.Connection) -> None:
        try:
            conn.close()
        except Exception:  # closing a dead socket: nothing left to do
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)


def _connector(url: str) -> tuple[Callable[[], psycopg.Connection], str | None]:
    """The function that opens one connection to ``url``, and the URL's password (kept out of messages).

    Raises ``StoreError`` for a URL libpq cannot parse.
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:  # libpq may quote the URL: the password is replaced
        raise StoreError(f"invalid PostgreSQL URL: {_scrub(exc, url, None)}") from None
    password = params.get("password")
    conninfo = make_conninfo(url, **{key: value for key, value in _CONNECT_DEFAULTS.items() if key not in params})

    def connect() -> psycopg.Connection:
        return psycopg.connect(conninfo, autocommit=True)

    return connect, str(password) if password else None


def _schema_version(conn: psycopg.Connection, where: str) -> int:
    """The version in ``chorus_schema`` (0 without one); raises ``SchemaTooNew`` if it is newer than this code's."""
    (table,) = conn.execute("SELECT to_regclass('chorus_schema')").fetchone() or (None,)
    row = conn.execute("SELECT version FROM chorus_schema").fetchone() if table is not None else None
    version = row[0] if row else 0
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"{where}: schema version {version} is newer than this server's ({SCHEMA_VERSION})")
    return version


def _migrate(conn: psycopg.Connection, where: str) -> None:
    """Bring the schema to ``SCHEMA_VERSION``: nothing is written if it is current.

    Under an advisory lock, so that nodes starting at once migrate one after the other (the second finds the work
    done). Raises ``SchemaTooNew``.
    """
    if _schema_version(conn, where) == SCHEMA_VERSION:
        return
    with _transaction(conn):
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS chorus_schema"
                     " (one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)")
        version = _schema_version(conn, where)  # again, under the lock
        for step in _MIGRATIONS[version:]:
            conn.execute(step.encode())  # no parameters: several statements in one call
        conn.execute("INSERT INTO chorus_schema (version) VALUES (%s)"
                     " ON CONFLICT (one) DO UPDATE SET version = excluded.version", (SCHEMA_VERSION,))
        log.info("pgstore: schema of %s migrated from version %d to %d", where, version, SCHEMA_VERSION)


@asynccontextmanager
async def open_pg_store(
    url: str,
    *,
    max_batch: int = 512,
    pool_size: int = 4,
    on_commit: Callable[[list[Appended]], None] | None = None,
) -> AsyncIterator[PgStore]:
    """Connect to the database at ``url``, migrate its schema, and run the committer until the block exits.

    On exit, even by cancellation, appends already queued are committed (shielded) before the connections close;
    later calls raise ``trio.ClosedResourceError``. ``pool_size``: connections in all, one of them the committer's.
    Raises ``ValueError`` for a bad argument, ``StoreError`` if the database cannot be reached or refuses,
    ``SchemaTooNew`` if its schema was written by a newer Chorus.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if pool_size < 1:
        raise ValueError("pool_size must be at least 1")
    connect, password = _connector(url)
    store = PgStore(connect, url=url, password=password, max_batch=max_batch,
                    pool_size=pool_size, on_commit=on_commit)
    async with store._running(prepare=store._open_schema):
        yield store


class PgStore(GroupCommitter):
    """The PostgreSQL implementation of the ``Store`` port (server/_ports.py), whose docstrings give the guarantees.

    Use ``open_pg_store``. Every method may also raise ``StoreError`` when the database refuses or cannot be
    reached, and ``trio.ClosedResourceError`` once the store is closed.
    """

    _recovered = "PostgreSQL answers"

    def __init__(self, connect: Callable[[], psycopg.Connection], *, url: str, password: str | None,
                 max_batch: int, pool_size: int, on_commit: Callable[[list[Appended]], None] | None) -> None:
        # The committer's own connection, so a group commit never waits for a free one.
        self._writer = _Pool(connect, 1)
        super().__init__(limiter=self._writer.limiter, max_batch=max_batch, on_commit=on_commit)
        self._url = url  # only to mask it in messages: they show ``_where``
        self._where = without_password(url)
        self._password = password
        self._pool = _Pool(connect, pool_size - 1) if pool_size > 1 else self._writer

    # -- plumbing ----------------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any, retry_lost: bool = False) -> Any:
        """``fn(conn, *args)`` in a worker thread on a pooled connection; refusals become ``StoreError``.

        ``retry_lost``: ``fn`` is a query or one transaction (``_transaction``), so a connection found dead while
        it ran means nothing took effect and it may run again on a fresh one. Single-statement writes in autocommit
        leave it False: their statement is their COMMIT.
        """
        if self._closing:
            raise trio.ClosedResourceError("the store is closed")
        return await self._call(self._pool, fn, args, retry_lost)

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._run(fn, *args, retry_lost=True)

    async def _call(self, pool: _Pool, fn: Callable[..., Any], args: tuple[Any, ...], retry_lost: bool) -> Any:
        result = await self._in_thread(pool.limiter, pool.run, fn, args, retry_lost)
        self._accepted()
        return result

    async def _open_schema(self) -> None:
        """Opening: bring the schema to ``SCHEMA_VERSION`` (``_migrate``) on the committer's connection."""
        try:
            await trio.to_thread.run_sync(self._writer.run, _migrate, (self._where,), False, limiter=self._limiter)
        except psycopg.Error as exc:
            # Any psycopg error here (bad URL option, refused, authentication) is the operator's to fix.
            raise StoreError(f"cannot open {self._where}: {self._scrub(exc)}") from None

    def _scrub(self, exc: BaseException) -> str:
        return _scrub(exc, self._url, self._password)

    def _refusal(self, exc: BaseException) -> StoreError | None:
        """The ``StoreError`` for ``exc`` if the database refused or cannot be reached, else None (a bug)."""
        if isinstance(exc, _Conflict):
            return StoreError(f"PostgreSQL: still conflicting after {_MAX_ATTEMPTS} attempts")
        if isinstance(exc, _CommitUnknown):
            return StoreError(f"PostgreSQL: {exc}; a retry with the same client_msg_id finds the message if it was"
                              " committed")
        if not isinstance(exc, psycopg.Error):
            return None
        state = exc.sqlstate or ""
        if not (isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
                or state[:2] in _REFUSED_CLASSES or state in _REFUSED_STATES):
            return None
        return StoreError(f"PostgreSQL refused: {self._scrub(exc)}")

    async def _disconnect(self) -> None:
        await trio.to_thread.run_sync(self._writer.close, limiter=self._writer.limiter)
        if self._pool is not self._writer:
            await trio.to_thread.run_sync(self._pool.close)

    # -- users and sessions ------------------------------------------------------------------------------------

    async def create_user(self, name: str, password_hash: str, *, invite: bytes | None = None) -> UserRow:
        """Raises ``NameTaken`` if ``name`` exists, ``InviteInvalid`` if ``invite`` (a code's hash) cannot be
        redeemed: then no account is made and the code stays as it was. One transaction: of two nodes redeeming one
        code at once, the second's UPDATE waits for the first's COMMIT and then finds the code used."""

        def run(conn: psycopg.Connection) -> UserRow:
            with _transaction(conn):
                try:
                    user_id = _one(conn, "INSERT INTO users (name, password_hash) VALUES (%s, %s) RETURNING id",
                                   (name, password_hash))
                except psycopg.errors.UniqueViolation as exc:
                    raise NameTaken(name) from exc
                if invite is not None:
                    invites.redeem(_Db(conn), invite, user_id, now_ms())
            return UserRow(user_id, name, password_hash)

        return await self._run(run)

    async def set_display_name(self, user_id: int, name: str) -> None:
        """Raises ``DisplayNameRefused`` if ``name`` looks like another user's name (nothing changes)."""

        def run(conn: psycopg.Connection) -> None:
            with _transaction(conn):
                try:
                    displaynames.set_display_name(_Db(conn), _clamp(user_id), name)
                except psycopg.errors.UniqueViolation:  # another user took that skeleton meanwhile
                    raise DisplayNameRefused("that display name looks like another user's name") from None

        await self._run(run, retry_lost=True)  # one transaction

    async def display_names(self, names: list[str]) -> list[UserInfo]:
        return await self._read(lambda conn: displaynames.display_names(_Db(conn), names))

    async def invite_usable(self, invite: bytes) -> bool:
        return await self._read(lambda conn: invites.usable(_Db(conn), invite, now_ms()))

    async def add_invites(self, hashes: list[bytes], expires_ms: int) -> None:
        def run(conn: psycopg.Connection) -> None:
            with _transaction(conn):
                invites.add(_Db(conn), hashes, now_ms(), _clamp(expires_ms))

        await self._run(run, retry_lost=True)  # one transaction

    async def list_invites(self) -> list[InviteRow]:
        return await self._read(lambda conn: invites.listed(_Db(conn)))

    async def revoke_invite(self, invite_id: int) -> bool:
        return await self._run(lambda conn: invites.revoke(_Db(conn), _clamp(invite_id)))

    async def get_user(self, name: str) -> UserRow | None:
        def run(conn: psycopg.Connection) -> UserRow | None:
            row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE name = %s", (name,)).fetchone()
            return _user(row) if row else None

        return await self._read(run)

    async def get_user_by_id(self, user_id: int) -> UserRow | None:
        def run(conn: psycopg.Connection) -> UserRow | None:
            row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s", (_clamp(user_id),)).fetchone()
            return _user(row) if row else None

        return await self._read(run)

    async def add_session(self, token_hash: bytes, user_id: int, expires_at_ms: int, *, now_ms: int = 0) -> None:
        def run(conn: psycopg.Connection) -> None:
            # A token is 32 random bytes: the one conflict there can be is this very INSERT, redone.
            conn.execute("INSERT INTO sessions (token_hash, user_id, expires_at_ms, created_ms, last_used_ms)"
                         " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (token_hash) DO NOTHING",
                         (token_hash, user_id, expires_at_ms, _clamp(now_ms), _clamp(now_ms)))

        await self._run(run, retry_lost=True)

    async def get_session(self, token_hash: bytes, now_ms: int) -> SessionRow | None:
        """The session, or None if there is none or it expired at or before ``now_ms``."""

        def run(conn: psycopg.Connection) -> SessionRow | None:
            row = conn.execute(
                "SELECT s.user_id, u.name, s.expires_at_ms, u.disabled, u.disabled_until_ms"
                " FROM sessions s JOIN users u ON u.id = s.user_id"
                " WHERE s.token_hash = %s AND s.expires_at_ms > %s", (token_hash, _clamp(now_ms))).fetchone()
            return _session_row(row) if row else None

        return await self._read(run)

    async def touch_session(self, token_hash: bytes, expires_at_ms: int, *, now_ms: int = 0) -> None:
        def run(conn: psycopg.Connection) -> None:
            conn.execute("UPDATE sessions SET expires_at_ms = %s, last_used_ms = greatest(last_used_ms, %s)"
                         " WHERE token_hash = %s", (expires_at_ms, _clamp(now_ms), token_hash))

        await self._run(run, retry_lost=True)  # harmless to repeat

    async def list_sessions(self, user_id: int, now_ms: int) -> list[SessionEntry]:
        def run(conn: psycopg.Connection) -> list[SessionEntry]:
            rows = conn.execute(
                "SELECT id, token_hash, created_ms, last_used_ms, expires_at_ms FROM sessions"
                " WHERE user_id = %s AND expires_at_ms > %s ORDER BY id", (_clamp(user_id), _clamp(now_ms)))
            return [SessionEntry(row[0], bytes(row[1]), *row[2:]) for row in rows]

        return await self._read(run)

    async def delete_session_by_id(self, user_id: int, session_id: int) -> bytes | None:
        def run(conn: psycopg.Connection) -> bytes | None:
            row = conn.execute("DELETE FROM sessions WHERE id = %s AND user_id = %s RETURNING token_hash",
                               (_clamp(session_id), _clamp(user_id))).fetchone()
            return bytes(row[0]) if row else None

        return await self._run(run)

    async def delete_session(self, token_hash: bytes) -> None:
        def run(conn: psycopg.Connection) -> None:
            conn.execute("DELETE FROM sessions WHERE token_hash = %s", (token_hash,))

        await self._run(run, retry_lost=True)  # harmless to repeat

    async def purge_sessions(self, now_ms: int) -> int:
        """Delete expired sessions (they are refused anyway); returns how many went."""

        def run(conn: psycopg.Connection) -> int:
            return conn.execute("DELETE FROM sessions WHERE expires_at_ms <= %s", (_clamp(now_ms),)).rowcount

        return await self._run(run, retry_lost=True)  # harmless to repeat (the count only goes to a log line)

    # -- administration --------------------------------------------------------------------------------------

    async def list_users(self) -> list[UserRow]:
        def run(conn: psycopg.Connection) -> list[UserRow]:
            return [_user(row) for row in conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY name")]

        return await self._read(run)

    async def set_disabled(self, user_id: int, disabled: bool, *, until_ms: int = 0) -> bool:
        def run(conn: psycopg.Connection) -> bool:
            return conn.execute("UPDATE users SET disabled = %s, disabled_until_ms = %s WHERE id = %s",
                                (disabled, _clamp(until_ms) if disabled else 0, _clamp(user_id))).rowcount == 1

        return await self._run(run, retry_lost=True)  # harmless to repeat

    async def set_password_hash(self, user_id: int, password_hash: str) -> bool:
        def run(conn: psycopg.Connection) -> bool:
            return conn.execute("UPDATE users SET password_hash = %s WHERE id = %s",
                                (password_hash, _clamp(user_id))).rowcount == 1

        return await self._run(run, retry_lost=True)  # harmless to repeat

    async def delete_user_sessions(self, user_id: int, *, keep: bytes | None = None) -> int:
        def run(conn: psycopg.Connection) -> int:
            return conn.execute("DELETE FROM sessions WHERE user_id = %s AND token_hash IS DISTINCT FROM %s",
                                (_clamp(user_id), keep)).rowcount

        return await self._run(run)

    async def room_stats(self) -> list[RoomStats]:
        return await self._read(_room_stats)

    async def delete_room(self, name: str) -> int | None:
        def run(conn: psycopg.Connection) -> int | None:
            with _transaction(conn):
                # Locked first: a group commit appending to it meanwhile waits, then finds no conversation.
                row = conn.execute(f"SELECT id FROM conversations WHERE kind = {_ROOM} AND name = %s FOR UPDATE",
                                   (name,)).fetchone()
                if row is None:
                    return None
                for table in ROOM_TABLES:
                    conn.execute(f"DELETE FROM {table} WHERE conv_id = %s", (row[0],))
                conn.execute("DELETE FROM conversations WHERE id = %s", (row[0],))
                return row[0]

        return await self._run(run, retry_lost=True)  # one transaction

    async def append_admin_action(self, kind: str, user_id: int | None, room_id: int | None, at_ms: int) -> int:
        # The table lock makes ids commit in id order (a sequence alone does not), so a node that read id n has
        # seen every smaller id; it blocks only other inserts, never the nodes' reads.
        def run(conn: psycopg.Connection) -> int:
            with _transaction(conn):
                conn.execute("LOCK TABLE admin_actions IN SHARE ROW EXCLUSIVE MODE")
                return _one(conn, "INSERT INTO admin_actions (kind, user_id, room_id, at_ms)"
                                  " VALUES (%s, %s, %s, %s) RETURNING id", (kind, user_id, room_id, at_ms))

        return await self._run(run, retry_lost=True)  # one transaction

    async def admin_actions_after(self, after_id: int, limit: int) -> list[AdminAction]:
        def run(conn: psycopg.Connection) -> list[AdminAction]:
            rows = conn.execute("SELECT id, kind, user_id, room_id, at_ms FROM admin_actions WHERE id > %s"
                                " ORDER BY id LIMIT %s", (_clamp(after_id), _clamp(limit))).fetchall()
            return [AdminAction(*row) for row in rows]

        return await self._read(run)

    async def last_admin_action_id(self) -> int:
        def run(conn: psycopg.Connection) -> int:
            return _one(conn, "SELECT coalesce(max(id), 0) FROM admin_actions", ())

        return await self._read(run)

    # -- rooms, pairs, membership ------------------------------------------------------------------------------

    async def room(self, name: str, *, create: bool) -> int | None:
        """The room's conversation id; None if it does not exist and ``create`` is false."""

        def run(conn: psycopg.Connection) -> int | None:
            query = f"SELECT id FROM conversations WHERE kind = {_ROOM} AND name = %s"
            row = conn.execute(query, (name,)).fetchone()
            if row or not create:
                return row[0] if row else None
            # Created by another node meanwhile: ON CONFLICT waits for its COMMIT, then the SELECT sees the row.
            row = conn.execute(f"INSERT INTO conversations (kind, name) VALUES ({_ROOM}, %s)"
                               " ON CONFLICT (name) DO NOTHING RETURNING id", (name,)).fetchone()
            return row[0] if row else _one(conn, query, (name,))

        return await self._run(run, retry_lost=True)  # every statement is harmless to repeat

    async def join_room(self, user_id: int, name: str, *, max_rooms: int, create: bool = True,
                        private: bool | None = None) -> tuple[int, bool]:
        """Join the room ``name`` (created if absent and ``create``, its creator its owner); returns (conv_id,
        newly_joined). ``private`` not None: CREATE_ROOM, which only creates (``RoomExists`` otherwise).

        One transaction that first locks the user's row, so this user's joins on every node run one at a time, then
        the room's, shared (so a moderation of the room, a BAN, commits wholly before or after it: ``moderate``): a
        member rejoins freely; anyone else is counted against ``max_rooms`` before the room is created or the
        membership inserted. Raises ``TooManyRooms`` (nothing written, no room created), ``LookupError`` if the room
        does not exist and not ``create``, ``Refused`` (FORBIDDEN: banned, or a private room), ``StoreError``.
        """

        def run(conn: psycopg.Connection) -> tuple[int, bool]:
            def existing(conv_id: int) -> None:  # a room that exists: CREATE_ROOM, or a JOIN by a non-member
                if private is not None:
                    raise RoomExists(name)
                join_refusal(_Db(conn), conv_id, user_id, name)

            with _transaction(conn):
                conn.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (user_id,))
                # FOR SHARE: a moderation of the room (a BAN) commits before or after this join, never beside it.
                query = f"SELECT id FROM conversations WHERE kind = {_ROOM} AND name = %s FOR SHARE"
                row = conn.execute(query, (name,)).fetchone()
                if row is not None:
                    if private is None and conn.execute("SELECT 1 FROM memberships WHERE user_id = %s AND conv_id = %s",
                                                        (user_id, row[0])).fetchone():
                        return row[0], False
                    existing(row[0])
                elif not create:
                    raise LookupError(f"no room {name}")
                count = _one(conn, "SELECT count(*) FROM memberships WHERE user_id = %s", (user_id,))
                if count >= max_rooms:
                    raise TooManyRooms(max_rooms)
                role = RoomRole.MEMBER
                if row is None:  # its creator owns it, unless another node created it meanwhile
                    made = conn.execute(f"INSERT INTO conversations (kind, name, private) VALUES ({_ROOM}, %s, %s)"
                                        " ON CONFLICT (name) DO NOTHING RETURNING id", (name, bool(private))).fetchone()
                    if made is None:
                        conv_id = _one(conn, query, (name,))
                        existing(conv_id)
                    else:
                        conv_id, role = made[0], RoomRole.OWNER
                else:
                    conv_id = row[0]
                conn.execute("INSERT INTO memberships (user_id, conv_id, role) VALUES (%s, %s, %s)",
                             (user_id, conv_id, int(role)))
                return conv_id, True

        return await self._run(run, retry_lost=True)

    async def join(self, user_id: int, conv_id: int) -> bool:
        """True if newly joined. Raises ``ValueError`` if ``conv_id`` is not a room. No room limit (see
        ``join_room``)."""

        def run(conn: psycopg.Connection) -> bool:
            row = conn.execute("SELECT kind FROM conversations WHERE id = %s", (_clamp(conv_id),)).fetchone()
            if not row or row[0] != _ROOM:
                raise ValueError(f"conversation {conv_id} is not a room")
            return conn.execute("INSERT INTO memberships (user_id, conv_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                                (user_id, conv_id)).rowcount == 1

        return await self._run(run)

    async def leave(self, user_id: int, conv_id: int) -> bool:
        """True if the user was a member. Cursors are kept, so rejoining resumes where the user was."""

        def run(conn: psycopg.Connection) -> bool:
            return conn.execute("DELETE FROM memberships WHERE user_id = %s AND conv_id = %s",
                                (_clamp(user_id), _clamp(conv_id))).rowcount == 1

        return await self._run(run)

    async def is_member(self, user_id: int, conv_id: int) -> bool:
        """Room membership, or being one of a DIRECT pair."""

        def run(conn: psycopg.Connection) -> bool:
            return conn.execute(f"SELECT 1 FROM ({_MEMBER_IDS}) m WHERE user_id = %(u)s",
                                {"c": _clamp(conv_id), "u": _clamp(user_id)}).fetchone() is not None

        return await self._read(run)

    async def room_count(self, user_id: int) -> int:
        def run(conn: psycopg.Connection) -> int:
            return _one(conn, "SELECT count(*) FROM memberships WHERE user_id = %s", (_clamp(user_id),))

        return await self._read(run)

    async def members(self, conv_id: int) -> list[tuple[int, str]]:
        """(user_id, name) of a room's members or of both users of a DIRECT pair, by name; [] if unknown."""

        def run(conn: psycopg.Connection) -> list[tuple[int, str]]:
            rows = conn.execute(f"SELECT u.id, u.name FROM ({_MEMBER_IDS}) m JOIN users u ON u.id = m.user_id"
                                " ORDER BY u.name", {"c": _clamp(conv_id)}).fetchall()
            return [(user_id, name) for user_id, name in rows]

        return await self._read(run)

    async def direct(self, user_a_id: int, user_b_id: int) -> int:
        """The pair's conversation id, created if absent; the same for either order, and one conversation even
        when two nodes create it at once (the pair is a unique key). Raises ``ValueError`` for one user twice,
        ``psycopg.IntegrityError`` if one does not exist."""
        if user_a_id == user_b_id:
            raise ValueError("a direct conversation needs two different users")
        lo, hi = sorted((user_a_id, user_b_id))

        def run(conn: psycopg.Connection) -> int:
            query = "SELECT id FROM conversations WHERE user_lo = %s AND user_hi = %s"
            row = conn.execute(query, (lo, hi)).fetchone()
            if row:
                return row[0]
            made = conn.execute(f"INSERT INTO conversations (kind, user_lo, user_hi) VALUES ({_DIRECT}, %s, %s)"
                                " ON CONFLICT (user_lo, user_hi) DO NOTHING RETURNING id", (lo, hi)).fetchone()
            return made[0] if made else _one(conn, query, (lo, hi))

        return await self._run(run, retry_lost=True)  # every statement is harmless to repeat

    async def conversations(self, user_id: int) -> list[ConvRow]:
        """The rooms the user joined and the user's DIRECT pairs, ordered by kind then name."""

        def run(conn: psycopg.Connection) -> list[ConvRow]:
            # _MUTE is SQLite's text, with a :u parameter that _Db translates.
            rows = _Db(conn).all(f"SELECT v.*, {_MUTE} FROM ({_CONVERSATIONS}) v ORDER BY 2, 3", u=_clamp(user_id))
            return [_conv_row(row) for row in rows]

        return await self._read(run)

    async def conversation(self, user_id: int, conv_id: int) -> ConvRow | None:
        """One conversation from the user's view: any room, or a DIRECT pair the user is in; else None."""

        def run(conn: psycopg.Connection) -> ConvRow | None:
            row = conn.execute(
                "SELECT c.id, c.kind, coalesce(c.name, u.name), c.last_seq, u.id FROM conversations c"
                " LEFT JOIN users u ON u.id = CASE WHEN c.user_lo = %(u)s THEN c.user_hi"
                "                                   WHEN c.user_hi = %(u)s THEN c.user_lo END"
                " WHERE c.id = %(c)s", {"u": _clamp(user_id), "c": _clamp(conv_id)}).fetchone()
            if row is None or (row[1] == _DIRECT and row[4] is None):
                return None
            return _conv_row(row)

        return await self._read(run)

    async def list_rooms(self, user_id: int, limit: int) -> list[RoomInfo]:
        """Up to ``limit`` rooms with members: those the user joined first, then the others, each group by name.
        A private room only for its members."""

        def run(conn: psycopg.Connection) -> list[RoomInfo]:
            rows = conn.execute(
                "SELECT c.name, (SELECT count(*) FROM memberships m WHERE m.conv_id = c.id), c.last_seq, v.joined"
                " FROM conversations c CROSS JOIN LATERAL (SELECT EXISTS (SELECT 1 FROM memberships m"
                "   WHERE m.conv_id = c.id AND m.user_id = %s) AS joined) v"
                f" WHERE c.kind = {_ROOM} AND EXISTS (SELECT 1 FROM memberships m WHERE m.conv_id = c.id)"
                "   AND (NOT c.private OR v.joined)"
                " ORDER BY v.joined DESC, c.name LIMIT %s", (_clamp(user_id), _clamp(limit))).fetchall()
            return [RoomInfo(name, members, last_seq, joined) for name, members, last_seq, joined in rows]

        return await self._read(run)

    async def conversation_list(self, user_id: int, limit: int) -> list[ConversationInfo]:
        """LIST_CONVERSATIONS (spec §5.38): the user's rooms and direct conversations with a message, each with its
        newest seq, that message's time and the user's cursors; the most recently active first, at most ``limit``."""

        def run(conn: psycopg.Connection) -> list[ConversationInfo]:
            rows = conn.execute(
                "SELECT v.kind, v.name, v.last_seq, coalesce(m.ts_ms, e.ts_ms, 0),"
                "       coalesce(k.delivered_seq, 0), coalesce(k.read_seq, 0)"
                f" FROM ({_CONVERSATIONS}) v"
                " LEFT JOIN messages m ON m.conv_id = v.id AND m.seq = v.last_seq"
                " LEFT JOIN events e ON e.conv_id = v.id AND e.seq = v.last_seq"  # the newest may be an event
                " LEFT JOIN cursors k ON k.user_id = %(u)s AND k.conv_id = v.id"
                f" WHERE v.kind = {_ROOM} OR v.last_seq > 0"
                " ORDER BY 4 DESC, 1, 2 LIMIT %(n)s", {"u": _clamp(user_id), "n": _clamp(limit)}).fetchall()
            return [ConversationInfo(Conversation(ConvKind(kind), name), last_seq, ts_ms, delivered, read)
                    for kind, name, last_seq, ts_ms, delivered, read in rows]

        return await self._read(run)

    # -- messages ----------------------------------------------------------------------------------------------

    async def sent_in(self, sender_id: int, client_msg_id: int) -> int | None:
        """The conversation holding the sender's message ``client_msg_id`` (any u64), or None if there is none."""

        def run(conn: psycopg.Connection) -> int | None:
            row = conn.execute("SELECT conv_id FROM messages WHERE sender_id = %s AND client_msg_id = %s",
                               (_clamp(sender_id), _to_db_id(client_msg_id))).fetchone()
            return row[0] if row else None

        return await self._read(run)

    async def last_seq(self, conv_id: int) -> int:
        """The conversation's newest seq; 0 if it has no messages or does not exist."""

        def run(conn: psycopg.Connection) -> int:
            row = conn.execute("SELECT last_seq FROM conversations WHERE id = %s", (_clamp(conv_id),)).fetchone()
            return row[0] if row else 0

        return await self._read(run)

    def _write_batch(self, msgs: list[NewMessage]) -> list[Appended]:
        """The group committer's hook, in its worker thread: ``_write_messages`` on the committer's connection, the
        whole batch retried after an abort or a dedup race, and once on a fresh connection if the idle one was dead.
        Raises ``LookupError`` for an unknown conversation, ``psycopg.Error``, ``_Conflict``, ``_CommitUnknown``."""
        return self._writer.run(_write_messages, (msgs,), True)

    async def messages_after(self, conv_id: int, after_seq: int, limit: int) -> tuple[list[Entry], bool]:
        """Up to ``limit`` entries (messages and events) with seq > ``after_seq``, ascending; has_more = newer ones
        exist. Any u64 ``after_seq`` and ``limit`` are fine. Raises ``ValueError`` if ``limit`` < 1.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._read(
            lambda conn: entries_after(_Db(conn), _clamp(conv_id), after_seq, limit, _clamp, _stored))

    async def messages_before(self, conv_id: int, before_seq: int, limit: int) -> tuple[list[Entry], bool]:
        """Up to ``limit`` entries with seq < ``before_seq`` (0: from the newest), ascending; has_more = older ones
        exist. Any u64 ``before_seq`` and ``limit`` are fine. Raises ``ValueError`` if ``limit`` < 1."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        bound = _clamp(before_seq) if before_seq > 0 else _I64_MAX
        return await self._read(lambda conn: entries_before(_Db(conn), _clamp(conv_id), bound, limit, _clamp, _stored))

    # -- moderation (spec §9.15) ---------------------------------------------------------------------------------

    async def moderate(self, action: Moderation) -> Applied:
        """Apply ``action`` and store its event in one transaction; redone after an abort (deadlock). Raises
        ``Refused``, ``TooManyRooms``.

        The transaction first locks the conversation's row, as a group commit does before it takes seqs: the
        conversation's writes on every node run one at a time, and each moderation reads roles, sanctions and
        messages as its predecessors committed them (at READ COMMITTED, two DELETEs of one message would otherwise
        both find it, and the second fail on the first one's tombstone). The event's seq is then ``last_seq + 1``
        under that lock (``UPDATE ... RETURNING``), gapless with the messages. An INVITE locks the invited user's
        row before it, as ``join_room`` does, so the user's room limit holds against their joins on other nodes.
        """

        def run(conn: psycopg.Connection) -> Applied:
            with _transaction(conn):
                if action.kind == EventKind.INVITE and action.target_id is not None:
                    conn.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (_clamp(action.target_id),))
                conn.execute("SELECT 1 FROM conversations WHERE id = %s FOR NO KEY UPDATE", (_clamp(action.conv_id),))
                return apply(_Db(conn), action)

        return await self._run(run, retry_lost=True)  # one transaction

    async def room_details(self, conv_id: int, viewer_id: int) -> tuple[str, bool, list[Any], list[Any]]:
        return await self._read(lambda conn: room_details(_Db(conn), _clamp(conv_id), _clamp(viewer_id)))

    async def room_bans(self, conv_id: int) -> list[BanInfo]:
        return await self._read(lambda conn: room_bans(_Db(conn), _clamp(conv_id)))

    # -- cursors -----------------------------------------------------------------------------------------------

    async def advance_cursor(self, user_id: int, conv_id: int, kind: ReceiptKind, seq: int) -> int | None:
        """Store max(old, min(seq, last_seq)) as the user's DELIVERED or READ cursor; ``seq`` may be any u64.

        Returns the new value if the cursor moved, else None (also for an unknown conversation). One statement:
        concurrent receipts from several nodes cannot move a cursor back.
        """
        column = {ReceiptKind.DELIVERED: "delivered_seq", ReceiptKind.READ: "read_seq"}[ReceiptKind(kind)]

        def run(conn: psycopg.Connection) -> int | None:
            row = conn.execute(
                f"INSERT INTO cursors AS k (user_id, conv_id, {column})"
                "  SELECT %(u)s, id, least(%(s)s, last_seq) FROM conversations WHERE id = %(c)s"
                "   AND least(%(s)s, last_seq) > 0"
                f" ON CONFLICT (user_id, conv_id) DO UPDATE SET {column} = excluded.{column}"
                f"  WHERE k.{column} < excluded.{column}"
                f" RETURNING {column}", {"u": user_id, "c": _clamp(conv_id), "s": _clamp(seq)}).fetchone()
            return row[0] if row else None

        return await self._run(run, retry_lost=True)  # max wins: harmless to repeat

    async def cursors(self, conv_id: int) -> list[CursorInfo]:
        """(user, delivered_seq, read_seq) for every member (0 where unset), by user name."""

        def run(conn: psycopg.Connection) -> list[CursorInfo]:
            rows = conn.execute(
                f"SELECT u.name, coalesce(k.delivered_seq, 0), coalesce(k.read_seq, 0) FROM ({_MEMBER_IDS}) m"
                " JOIN users u ON u.id = m.user_id"
                " LEFT JOIN cursors k ON k.user_id = m.user_id AND k.conv_id = %(c)s ORDER BY u.name",
                {"c": _clamp(conv_id)}).fetchall()
            return [CursorInfo(*row) for row in rows]

        return await self._read(run)

    async def undelivered(self, user_id: int) -> list[tuple[ConvRow, int]]:
        """The user's conversations with messages after the user's DELIVERED cursor, with that cursor."""

        def run(conn: psycopg.Connection) -> list[tuple[ConvRow, int]]:
            rows = conn.execute(
                f"SELECT v.*, coalesce(k.delivered_seq, 0) FROM ({_CONVERSATIONS}) v"
                " LEFT JOIN cursors k ON k.user_id = %(u)s AND k.conv_id = v.id"
                " WHERE v.last_seq > coalesce(k.delivered_seq, 0) ORDER BY 2, 3", {"u": _clamp(user_id)}).fetchall()
            return [(_conv_row(row[:5]), row[5]) for row in rows]

        return await self._read(run)

    # -- counters ----------------------------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """The group committer's counters (server/_groupcommit.py), plus ``retries`` (work redone after an abort, a
        dedup race or a dead idle connection) and ``connects`` (connections opened: more than ``pool_size`` means
        some were replaced)."""
        pools = {self._writer, self._pool}
        return {**super().statistics(), "retries": sum(p.retries for p in pools),
                "connects": sum(p.connects for p in pools)}


def _one(conn: psycopg.Connection, query: str, params: tuple[Any, ...]) -> Any:
    """The first column of the one row ``query`` returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[0]


def _write_messages(conn: psycopg.Connection, msgs: list[NewMessage]) -> list[Appended]:
    """Store ``msgs`` in one transaction (in a worker thread, on the committer's connection); returns their results.

    Two round trips, each a pipeline: BEGIN, lock, look up the keys; then INSERT, UPDATE, COMMIT. Every round trip
    of a worker thread waits for the GIL again, which a busy Trio thread holds for up to 5 ms (measured: six single
    statements took 7.5 ms a batch of 100, most of it waiting). Raises ``LookupError`` for an unknown conversation,
    ``_Conflict`` when another node stored one of the keys since the lookup (``_Pool.run`` retries the batch then),
    ``_CommitUnknown`` when the connection is lost in the second round trip.
    """
    conv_ids = sorted({m.conv_id for m in msgs})
    senders, ids = (list(column) for column in zip(*{(m.sender_id, _to_db_id(m.client_msg_id)) for m in msgs},
                                                   strict=True))
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            # Locked in id order: another node's batch locks its overlapping rows in the same order, so neither can
            # hold one row while waiting for a row the other holds. READ COMMITTED: the rows read are the newest.
            locked = conn.execute("SELECT id, last_seq FROM conversations WHERE id = ANY(%s::bigint[])"
                                  " ORDER BY id FOR NO KEY UPDATE", (conv_ids,))
            # After the locks: a retry committed by another node into one of these conversations is seen.
            found = conn.execute(
                "SELECT m.sender_id, m.client_msg_id, m.conv_id, m.seq, m.ts_ms, m.body FROM messages m"
                " JOIN unnest(%s::bigint[], %s::bigint[]) AS k(s, c) ON m.sender_id = k.s AND m.client_msg_id = k.c",
                (senders, ids))
            last: dict[int, int] = {conv_id: seq for conv_id, seq in locked.fetchall()}
            stored: dict[tuple[int, int], tuple[int, int, int, bytes]] = {
                (sender, db_id): (conv_id, seq, ts_ms, bytes(body))
                for sender, db_id, conv_id, seq, ts_ms, body in found.fetchall()}
        for conv_id in conv_ids:
            if conv_id not in last:
                raise LookupError(f"no conversation {conv_id}")
        results, rows, moved = _assign(msgs, last, stored)
    except BaseException:
        _rollback(conn)
        raise
    try:
        with conn.pipeline():
            if rows:
                conn.execute(
                    "INSERT INTO messages (conv_id, seq, ts_ms, sender_id, client_msg_id, body)"
                    " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[],"
                    " %s::bytea[])", [list(column) for column in zip(*rows, strict=True)])
                conn.execute("UPDATE conversations c SET last_seq = v.seq"
                             " FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, seq) WHERE c.id = v.id",
                             (list(moved), list(moved.values())))
            conn.execute("COMMIT")  # skipped by PostgreSQL if a statement before it failed
    except psycopg.Error as exc:
        if _lost(conn):
            raise _CommitUnknown("the connection to PostgreSQL was lost during COMMIT") from exc
        _rollback(conn)
        if isinstance(exc, psycopg.errors.UniqueViolation) and exc.diag.constraint_name == "messages_dedup":
            raise _Conflict() from exc
        raise
    return results


def _assign(msgs: list[NewMessage], last: dict[int, int], stored: dict[tuple[int, int], tuple[int, int, int, bytes]]
            ) -> tuple[list[Appended], list[tuple[int, int, int, int, int, bytes]], dict[int, int]]:
    """Seqs for the batch: (results, rows to insert, conversation -> its new last_seq). A key already ``stored``, or
    earlier in the batch, is a duplicate and takes no seq."""
    results: list[Appended] = []
    rows: list[tuple[int, int, int, int, int, bytes]] = []
    moved: dict[int, int] = {}
    for msg in msgs:
        key = (msg.sender_id, _to_db_id(msg.client_msg_id))
        original = stored.get(key)
        if original is not None:  # a retry: stored earlier, or earlier in this very batch
            conv_id, seq, ts_ms, body = original
            results.append(Appended(conv_id, seq, ts_ms, msg.sender_id, msg.sender_name, msg.client_msg_id,
                                    body.decode(), duplicate=True))
            continue
        seq = last[msg.conv_id] + 1
        last[msg.conv_id] = moved[msg.conv_id] = seq
        body = msg.body.encode()
        stored[key] = (msg.conv_id, seq, msg.ts_ms, body)
        rows.append((msg.conv_id, seq, msg.ts_ms, msg.sender_id, key[1], body))
        results.append(Appended(msg.conv_id, seq, msg.ts_ms, msg.sender_id, msg.sender_name, msg.client_msg_id,
                                msg.body, duplicate=False))
    return results, rows, moved


def _rollback(conn: psycopg.Connection) -> None:
    """End the transaction a failure left open; the pool drops a connection where that fails too."""
    if not _lost(conn) and conn.info.transaction_status != TransactionStatus.IDLE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error as exc:  # e.g. a pipeline cut off mid-way: the connection is beyond repair
            log.warning("pgstore: ROLLBACK failed (%s); dropping the connection", str(exc).splitlines()[0])
            conn.close()
