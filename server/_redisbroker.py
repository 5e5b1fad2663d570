"""The Redis broker: the ``Broker`` (server/_ports.py) of node mode, so that several processes behave as one server.

How this works (DESIGN.md "More than one machine"; issue 11). Each node keeps a ``Fanout`` (server/_fanout.py) for
its own connections, exactly as the local broker does, and Redis carries what crosses nodes. Nothing on the delivery
path waits for Redis: ``publish`` and the pushes deliver to this node's connections at once and queue what must
leave (a bounded queue); one writer task sends it, many PUBLISHes per round trip.

Keys and channels (``P`` is ``Config.broker_prefix``; one Redis, not Redis Cluster: the scripts name keys
they build)::

    P:c:{conv_id}   channel: committed messages and ephemeral pushes of a conversation
    P:u:{user_id}   channel: pushes and user events for one user's connections
    P:b             channel: every node listens (presence, connection counts, "re-sync everything")
    P:node:{id}     a node's registry entry (JSON: NodeInfo), expires after node_ttl_s unless refreshed
    P:nodes         set of registered node ids (to find the ones whose entry expired)
    P:uc:{user_id}  hash node id -> that node's connections of the user (the total decides ONLINE and OFFLINE)
    P:nc:{node}     hash user id -> "count:name": the node's users, for whoever sweeps it after a crash
    P:po:{user_id}  "node token": the OFFLINE that node announces when its delay is over, unless cancelled

- **Messages.** One PUBLISH per conversation per committed batch (``M``: origin node, then the messages as compact
  JSON; an event of spec §9.15, which takes a seq like a message, adds its fields to its row). A node SUBSCRIBEs to
  ``P:c:{conv}`` only while it has local subscribers of it; its own publishes come back and are skipped by origin.
  What arrives goes to ``fanout.deliver``, which drops duplicates by seq and fills gaps from the store, so a late,
  doubled or lost publish costs a store read, never an order. ``republish`` (a retry the store answered as
  duplicate) publishes the stored message again.
- **Re-sync.** Pub/sub is at most once, and a subscription only hears what is published after Redis confirmed it.
  So each confirmation of a conversation channel (a first local subscriber, and every channel again after the link
  came back) re-syncs that conversation's live subscriptions from the store (``Fanout.resync``: the path of a gap,
  up to the end of the store) while later arrivals are held behind it. A node whose publishes could not leave (link
  down, queue full) keeps the newest message of each such conversation (bounded; past the bound it asks every node
  to re-sync everything) and publishes those when it can: a receiver that sees seq n fills up to it from the store.
- **Ephemeral frames** (typing, receipts, presence, membership) and **user events** cross nodes as encoded frames
  or small JSON on the conversation's or the user's channel; a node subscribes to ``P:u:{user}`` while it has a
  connection of that user. They are dropped while the link is down (ephemeral: spec §9.8).
- **Connections and presence.** A node writes its own count per user (absolute, so a retry or a repeat is
  harmless) with one Lua script that also decides, atomically over all nodes, ONLINE (the total went from 0 and no
  OFFLINE was pending), a pending OFFLINE (the total went to 0; this node announces it after the delay unless the
  user is back anywhere) or neither. Presence goes out on ``P:b`` with the rooms to tell; each node pushes it to
  its subscribers of those rooms. ``connection_count`` answers at once from this node's connections plus its view of
  the others', which ``P:b`` keeps current (and a full read after each reconnection): two logins racing on two
  nodes may both pass the per-user limit, so a user can briefly hold a few connections more than the limit, one
  per node at most. ``online`` asks Redis (and falls back on the view while Redis is down).
- **Node registry.** ``P:node:{id}`` with a TTL, refreshed every ttl/3 with the node's address, load and draining
  flag; ``nodes()`` lists the live ones. At each heartbeat a node looks for registered nodes whose entry expired and
  sweeps them with one script (``SREM`` of the id decides who sweeps; the rest is atomic): their counts go, and
  each user left with no connection anywhere is announced OFFLINE by the sweeper. A node that finds itself swept
  (a stall longer than the TTL) writes all its counts again.
- **Degradation.** Redis down: this node keeps serving its own clients (local fan-out is in-process, and every
  message is in the store), logs one line on losing the link and one on regaining it (no traceback), and retries
  with capped exponential backoff. ``run`` reports started after the first attempt whether or not it connected:
  an operator would rather have the node serve its clients and say Redis is missing than refuse to start. Back on
  line it writes its counts again, subscribes its channels again (each confirmation re-syncs, above) and publishes
  what it owes.
- **Bounds.** The publish queue, the owed messages and every pub/sub reply have limits; a node that reads too
  slowly is disconnected by Redis (``client-output-buffer-limit pubsub``) and re-syncs. Redis holds a few keys per
  connected user and per node, each removed when the user or the node goes; nothing a client sends adds more.

The pub/sub link is a small RESP2 reader on a Trio stream rather than coredis's ``PubSub``, which buffers without
bound and reconnects by itself, hiding the losses this broker must re-sync after; commands go through coredis.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import coredis
import coredis.exceptions
import coredis.retry
import trio

from chorus import proto
from chorus.proto import ConvKind

from ._broker import announce, push
from ._fanout import MAX_HELD, Fanout, Subscription
from ._ports import Appended, ConvRow, MemberJoined, MemberLeft, Muted, ReadMoved, SessionsRevoked, TokenRevoked

if TYPE_CHECKING:
    from ._config import Config
    from ._ports import Store, Subscriber, UserEvent

log = logging.getLogger("chorus.redisbroker")
# coredis logs a cancelled connection attempt (every shutdown) as an ERROR with a traceback; this module says in one
# line what the link does, so coredis's own lines add nothing but noise.
logging.getLogger("coredis").setLevel(logging.CRITICAL)

#: Publishes (a conversation's share of a batch, a push, an event) waiting for the writer; past it, messages are
#: owed (below) and pushes dropped.
MAX_QUEUED = 10_000
#: Conversations whose newest message this node owes the others; past it, every node re-syncs everything instead.
MAX_OWED = 10_000
#: PUBLISHes per round trip; connection counts written per round trip.
_PUBLISH_CHUNK = 500
_COUNTS_CHUNK = 200
#: Reconnection backoff: doubles from the first to the cap.
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
_CONNECT_TIMEOUT_S = 2.0
#: A command round trip longer than this counts as a lost link.
_COMMAND_TIMEOUT_S = 5.0
#: The largest pub/sub reply accepted (a batch's messages in one publish stay far below it).
_MAX_REPLY_BYTES = 16 << 20
#: (UN)SUBSCRIBE names per command.
_CHANNELS_PER_COMMAND = 1000

# Envelope kinds: the first byte of every payload, then the origin node id (one length byte), then the body.
_MESSAGES, _TO_CONVERSATION, _TO_USER, _USER_EVENT = b"M", b"E", b"P", b"U"
_COUNTS, _PRESENCE, _RESYNC = b"C", b"A", b"R"

# -- Lua: every script runs atomically in Redis ------------------------------------------------------------------

_TOTAL = """
local function total(key)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', key)) do n = n + tonumber(v) end
  return n
end
"""

#: KEYS: uc:{user}, nc:{node}, po:{user}. ARGV: node, user, count, name, token, delay_ms, po_ttl_ms, prefix.
#: Returns 0 (no news), 1 (ONLINE), 2 (OFFLINE pending here: token set), 3 (back before an OFFLINE: no news),
#: 4 (OFFLINE now: no delay).
_SET_COUNT = _TOTAL + """
local before = total(KEYS[1])
local count = tonumber(ARGV[3])
if count > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], count)
  redis.call('HSET', KEYS[2], ARGV[2], count .. ':' .. ARGV[4])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local after = total(KEYS[1])
if before == 0 and after > 0 then
  local po = redis.call('GET', KEYS[3])
  if not po then return 1 end
  redis.call('DEL', KEYS[3])
  local owner = string.sub(po, 1, string.find(po, ' ', 1, true) - 1)
  local nc = ARGV[8] .. ':nc:' .. owner
  local v = redis.call('HGET', nc, ARGV[2])
  if v and string.sub(v, 1, 2) == '0:' then redis.call('HDEL', nc, ARGV[2]) end
  return 3
end
if before > 0 and after == 0 then
  if tonumber(ARGV[6]) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
    return 4
  end
  redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. ARGV[5], 'PX', ARGV[7])
  redis.call('HSET', KEYS[2], ARGV[2], '0:' .. ARGV[4])
  return 2
end
if count == 0 then
  local v = redis.call('HGET', KEYS[2], ARGV[2])
  if v and string.sub(v, 1, 2) ~= '0:' then redis.call('HDEL', KEYS[2], ARGV[2]) end
end
return 0
"""

#: KEYS: uc:{user}, nc:{node}, po:{user}. ARGV: node, user, token. 1: announce OFFLINE now.
_OFFLINE_DUE = _TOTAL + """
local v = redis.call('HGET', KEYS[2], ARGV[2])
local pending = v and string.sub(v, 1, 2) == '0:'
if pending then redis.call('HDEL', KEYS[2], ARGV[2]) end
local po = redis.call('GET', KEYS[3])
if po then
  if po ~= ARGV[1] .. ' ' .. ARGV[3] then return 0 end
  redis.call('DEL', KEYS[3])
elseif not pending then
  return 0
end
if total(KEYS[1]) > 0 then return 0 end
return 1
"""

#: ARGV: prefix, node, force. A dead node's registry entry expired: forget its counts; returns [user, name, ...] of
#: the users that had connections (or an OFFLINE pending) there and none anywhere now. Only one sweeper wins the
#: SREM; ``force`` sweeps a node's own leftovers (a restart under the same id, a clean stop).
_SWEEP = """
local P, dead = ARGV[1], ARGV[2]
if ARGV[3] == '1' then
  redis.call('DEL', P .. ':node:' .. dead)
  redis.call('SREM', P .. ':nodes', dead)
else
  if redis.call('EXISTS', P .. ':node:' .. dead) == 1 then return {} end
  if redis.call('SREM', P .. ':nodes', dead) == 0 then return {} end
end
local gone = {}
local entries = redis.call('HGETALL', P .. ':nc:' .. dead)
for i = 1, #entries, 2 do
  local user, v = entries[i], entries[i + 1]
  local sep = string.find(v, ':', 1, true)
  local count, name = tonumber(string.sub(v, 1, sep - 1)), string.sub(v, sep + 1)
  local uc, pk = P .. ':uc:' .. user, P .. ':po:' .. user
  redis.call('HDEL', uc, dead)
  if redis.call('HLEN', uc) == 0 then
    local po = redis.call('GET', pk)
    local mine = po and string.sub(po, 1, #dead + 1) == dead .. ' '
    if count > 0 or mine then
      if po then redis.call('DEL', pk) end
      table.insert(gone, user)
      table.insert(gone, name)
    end
  end
end
redis.call('DEL', P .. ':nc:' .. dead)
return gone
"""

#: KEYS: uc:{user}, po:{user} for each user. 1 per user online as announced (an OFFLINE pending counts).
_ONLINE = """
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 or redis.call('EXISTS', KEYS[i + 1]) == 1 then out[#out + 1] = 1
  else out[#out + 1] = 0 end
end
return out
"""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A live node as its registry entry says (refreshed every ttl/3)."""

    id: str
    host: str
    port: int
    ws_port: int | None
    connections: int
    draining: bool
    started_ms: int


class LinkLost(Exception):
    """The link to Redis failed in a way a reconnection may cure (never leaves the broker)."""


_LINK_ERRORS = (OSError, TimeoutError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                coredis.exceptions.RedisError, LinkLost)


def _link_error(exc: BaseException) -> BaseException | None:
    """The first link failure in ``exc`` if that is all it holds (a group of them too), else None."""
    if isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(_LINK_ERRORS)
        if rest is not None or match is None:
            return None
        first: BaseException = match
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        return first
    return exc if isinstance(exc, _LINK_ERRORS) else None


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


# -- the pub/sub link ---------------------------------------------------------------------------------------------

class _RespError(Exception):
    pass


class _Incomplete(Exception):
    pass


class _RespReader:
    """RESP2 replies from bytes, with a hard cap on what one reply may buffer."""

    def __init__(self, max_bytes: int = _MAX_REPLY_BYTES) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._max = max_bytes

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data
        if len(self._buf) > self._max + 65536:
            raise LinkLost(f"a pub/sub reply above {self._max} bytes")

    def next(self) -> Any:
        """The next whole reply, or ``_Incomplete`` (the class) if more bytes are needed."""
        try:
            value, self._pos = self._parse(self._pos, 0)
        except _Incomplete:
            return _Incomplete
        return value

    def _parse(self, pos: int, depth: int) -> tuple[Any, int]:
        buf = self._buf
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        kind, line, pos = buf[pos], bytes(buf[pos + 1:end]), end + 2
        if kind == 0x24:  # $ bulk string
            n = int(line)
            if n < 0:
                return None, pos
            if n > self._max:
                raise LinkLost(f"a pub/sub reply of {n} bytes")
            if len(buf) < pos + n + 2:
                raise _Incomplete
            return bytes(buf[pos:pos + n]), pos + n + 2
        if kind == 0x2a:  # * array
            n = int(line)
            if n < 0:
                return None, pos
            if n > 16 or depth > 2:
                raise LinkLost("unexpected pub/sub reply shape")
            items = []
            for _ in range(n):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        if kind == 0x3a:  # : integer
            return int(line), pos
        if kind == 0x2b:  # + simple string
            return line, pos
        if kind == 0x2d:  # - error
            return _RespError(line.decode(errors="replace")), pos
        raise LinkLost(f"not RESP: {bytes(buf[pos - len(line) - 3:pos])[:40]!r}")


def _command(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _PubSubLink:
    """One subscriber connection: commands out, replies and messages in, read only as fast as they are handled."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._reader = _RespReader()
        self.last_read = trio.current_time()

    @classmethod
    async def open(cls, url: str, client_name: str) -> _PubSubLink:
        parts = urlsplit(url)
        stream: trio.abc.Stream
        if parts.scheme == "unix":
            stream = await trio.open_unix_socket(parts.path)
        else:
            stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 6379)
            if parts.scheme == "rediss":
                tls = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=parts.hostname)
                await tls.do_handshake()
                stream = tls
        link = cls(stream)
        try:
            setup = []
            if parts.password is not None:
                setup.append(_command(b"AUTH", *([unquote(parts.username)] if parts.username else []),
                                      unquote(parts.password)))
            setup.append(_command(b"CLIENT", b"SETNAME", client_name))
            await stream.send_all(b"".join(setup))
            for _ in setup:
                reply = await link.next()
                if isinstance(reply, _RespError):
                    raise LinkLost(f"redis refused the subscriber: {reply}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return link

    async def send(self, *commands: bytes) -> None:
        await self.stream.send_all(b"".join(commands))

    async def next(self) -> Any:
        while True:
            reply = self._reader.next()
            if reply is not _Incomplete:
                return reply
            data = await self.stream.receive_some(65536)
            if not data:
                raise LinkLost("redis closed the subscriber connection")
            self.last_read = trio.current_time()
            self._reader.feed(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# -- payloads -----------------------------------------------------------------------------------------------------

def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _message_row(m: Appended) -> list[Any]:
    """One committed message (or event: spec §9.15) of an ``M`` payload, as JSON values; an event's fields follow
    the message's, so a message's row is as it was before events."""
    row: list[Any] = [m.conv_id, m.seq, m.ts_ms, m.sender_id, m.sender_name, m.client_msg_id, m.body]
    if m.event is not None:
        ev = m.event
        row.append([ev.seq, ev.ts_ms, int(ev.kind), ev.actor, ev.target, ev.target_seq, ev.until_ms, int(ev.role),
                    ev.text])
    return row


def _appended(row: list[Any]) -> Appended:
    """``_message_row`` read back."""
    conv_id, seq, ts_ms, sender_id, sender_name, client_msg_id, body, *event = row
    ev = None
    if event:
        e_seq, e_ts, kind, actor, target, target_seq, until_ms, role, text = event[0]
        ev = proto.ConvEvent(e_seq, e_ts, proto.EventKind(kind), actor, target, target_seq, until_ms,
                             proto.RoomRole(role), text)
    return Appended(conv_id, seq, ts_ms, sender_id, sender_name, client_msg_id, body, False, ev)


def _encode_user_event(event: UserEvent) -> bytes:
    match event:
        case MemberJoined(user_id=uid, conv=conv):
            return _dumps(["J", uid, conv.id, int(conv.kind), conv.name, conv.last_seq, conv.peer_id])
        case MemberLeft(user_id=uid, conv_id=conv_id):
            return _dumps(["L", uid, conv_id])
        case TokenRevoked(user_id=uid, token_hash=token):
            return _dumps(["T", uid, token.hex()])
        case SessionsRevoked(user_id=uid, keep=keep):
            return _dumps(["S", uid, None if keep is None else keep.hex()])
        case Muted(user_id=uid, conv_id=conv_id, until_ms=until_ms):
            return _dumps(["M", uid, conv_id, until_ms])
        case ReadMoved(user_id=uid, conv_id=conv_id, seq=seq):
            return _dumps(["R", uid, conv_id, seq])
    raise TypeError(f"not a user event: {event!r}")


def _decode_user_event(body: bytes) -> UserEvent:
    value = json.loads(body)
    if value[0] == "J":
        _, uid, conv_id, kind, name, last_seq, peer_id = value
        return MemberJoined(uid, ConvRow(conv_id, ConvKind(kind), name, last_seq, peer_id))
    if value[0] == "L":
        return MemberLeft(value[1], value[2])
    if value[0] == "T":
        return TokenRevoked(value[1], bytes.fromhex(value[2]))
    if value[0] == "S":
        return SessionsRevoked(value[1], None if value[2] is None else bytes.fromhex(value[2]))
    if value[0] == "M":
        return Muted(value[1], value[2], value[3])
    if value[0] == "R":
        return ReadMoved(value[1], value[2], value[3])
    raise ValueError(f"unknown user event {value[0]!r}")


class RedisBroker:
    """The ``Broker`` of node mode (see the module's comment). ``prefix`` (default ``config.broker_prefix``) names
    its keys and channels: clusters sharing one Redis, or tests, each take their own."""

    def __init__(self, config: Config, store: Store, *, prefix: str | None = None, max_held: int = MAX_HELD,
                 max_queued: int = MAX_QUEUED, max_owed: int = MAX_OWED) -> None:
        if config.broker is None:
            raise ValueError("RedisBroker needs config.broker (a redis:// URL)")
        self.fanout = Fanout(store, page=config.max_page, max_held=max_held)
        self._store = store
        self._url = config.broker
        self.node_id = config.node_id or default_node_id()
        self._origin = bytes([len(self.node_id.encode())]) + self.node_id.encode()
        prefix = prefix or config.broker_prefix
        self._client_name = re.sub(r"[^A-Za-z0-9._:/@-]", "_", f"{prefix}/{self.node_id}")
        self._prefix = prefix
        self._ttl_s = config.node_ttl_s
        self._heartbeat_s = config.node_ttl_s / 3
        self._offline_delay_s = config.presence_offline_delay_s
        self.host, self.port, self.ws_port = config.advertised_host, config.port, config.ws_port
        self.draining = False
        self.started_ms = int(time.time() * 1000)
        self._max_queued = max_queued
        self._max_owed = max_owed
        self._bus = f"{prefix}:b".encode()
        self._conv_channel = f"{prefix}:c:".encode()
        self._user_channel = f"{prefix}:u:".encode()
        # users: this node's connections, and what it has yet to tell Redis
        self._users: dict[int, dict[Subscriber, None]] = {}
        self._connections = 0
        self._names: dict[int, str] = {}  # users with local connections or a pending OFFLINE here
        self._counts_due: dict[int, tuple[int, ...]] = {}  # user -> rooms of the latest change, count not written
        self._offline: dict[int, tuple[float, str, str, tuple[int, ...]]] = {}  # user -> (when, token, name, rooms)
        self._offline_due: deque[tuple[int, str, str, tuple[int, ...]]] = deque()
        self._offline_added: trio.Event | None = None
        self._tokens = 0
        self._remote: dict[int, dict[str, int]] = {}  # user -> node -> connections there (the other nodes)
        self._nodes: list[NodeInfo] = []
        # what leaves this node
        self._queue: deque[tuple[bytes, bytes, list[Appended] | None]] = deque()  # (channel, payload, messages)
        self._owed: dict[int, Appended] = {}  # conversation -> newest message not published
        self._owe_everything = False
        self._wake = trio.Event()
        # channels: this node's conversations with local subscribers; (un)subscriptions to send
        self._convs: set[int] = set()
        self._channel_changes: dict[bytes, tuple[str, int]] = {}
        self._channels: set[bytes] = set()  # subscribed (sent) on the current link
        self._channels_changed = trio.Event()
        self._client: Any = None  # the coredis client while the link is up
        self._set_count_script: Any = None  # the scripts, registered with each client
        self._offline_due_script: Any = None
        self._sweep_script: Any = None
        self._online_script: Any = None
        self._up = False
        self._first = True
        self._heartbeat_now = trio.Event()
        self._stats = {"links": 0, "losses": 0, "published": 0, "publishes": 0, "received": 0, "resyncs": 0,
                       "dropped": 0, "owed_max": 0, "swept_nodes": 0, "bad_payloads": 0}
        self._bad_logged = False

    # -- running ------------------------------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The fan-out's gap fills, the OFFLINE timer and the link to Redis (kept up, with backoff), until cancelled.

        Reports started once the first connection attempt is over, whether or not it succeeded (the node then
        serves its own clients and keeps trying; see the module's comment).
        """
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.fanout.run)
                nursery.start_soon(self._run_offline_timer)
                await nursery.start(self._run_link)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._deregister()

    async def _run_link(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        backoff = BACKOFF_MIN_S
        lost_at: float | None = None
        reported = False
        while True:
            connected = trio.Event()

            def up(connected: trio.Event = connected) -> None:
                nonlocal backoff, lost_at, reported
                connected.set()
                if lost_at is not None:
                    log.warning("redis link to %s restored after %.1f s; re-syncing %d conversations",
                                _redacted(self._url), time.monotonic() - lost_at, len(self._convs))
                lost_at = None
                backoff = BACKOFF_MIN_S
                if not reported:
                    reported = True
                    task_status.started()

            try:
                await self._session(up)
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Cancelled (shutdown), perhaps grouped with the link errors coredis raises while its tasks are
                    # cancelled mid-connect: those are moot now, the cancellation goes on.
                    if isinstance(exc, BaseExceptionGroup):
                        _, rest = exc.split(_LINK_ERRORS)
                        if rest is not None:
                            raise rest from None
                    raise
                cause = _link_error(exc)
                if lost_at is None:
                    lost_at = time.monotonic()
                    self._stats["losses"] += 1
                    what = "lost" if connected.is_set() else "unreachable"
                    if cause is None:
                        log.error("redis link to %s %s by a bug; serving local clients only, reconnecting",
                                  _redacted(self._url), what, exc_info=exc)
                    else:
                        log.warning("redis link to %s %s (%s); serving local clients only, reconnecting",
                                    _redacted(self._url), what, str(cause) or type(cause).__name__)
                elif cause is None:
                    log.error("redis link failed by a bug", exc_info=exc)
            finally:
                self._down()
            if not reported:
                reported = True
                task_status.started()
            await trio.sleep(backoff)
            backoff = min(2 * backoff, BACKOFF_MAX_S)

    async def _session(self, up: Any) -> None:
        """One life of the link: connect, register, subscribe, then serve until something fails."""
        client = coredis.Redis.from_url(
            self._url, client_name=self._client_name, connect_timeout=_CONNECT_TIMEOUT_S,
            stream_timeout=_COMMAND_TIMEOUT_S, retry_policy=coredis.retry.NoRetryPolicy())
        with trio.fail_after(_CONNECT_TIMEOUT_S + _COMMAND_TIMEOUT_S):
            link = await _PubSubLink.open(self._url, self._client_name)
        try:
            async with client:
                with trio.fail_after(_COMMAND_TIMEOUT_S):
                    await client.ping()
                self._set_count_script = client.register_script(_SET_COUNT)
                self._offline_due_script = client.register_script(_OFFLINE_DUE)
                self._sweep_script = client.register_script(_SWEEP)
                self._online_script = client.register_script(_ONLINE)
                self._up = True  # what is sent from here on is queued for the writer
                if self._first:  # a previous process under this id left its counts: they are gone now
                    if await client.exists([f"{self._prefix}:node:{self.node_id}"]):
                        log.warning("node id %s is registered already: a restart within %.0f s, or another node "
                                    "with this id (give each its own); taking it over", self.node_id, self._ttl_s)
                    gone = await self._sweep(client, self.node_id, force=True)
                    self._first = False
                    for uid, name, rooms in await self._gone(gone):
                        self._announce(uid, name, rooms, proto.Status.OFFLINE)
                await self._heartbeat_once(client)
                await self._load_remote(client)
                # Everything this node knows is written again: Redis may have lost it, or a sweeper taken it.
                for uid in list(self._users) + [u for u in self._offline if u not in self._users]:
                    self._counts_due.setdefault(uid, ())
                self._channels = set()
                wanted = [self._bus] + [self._conv_channel + b"%d" % c for c in self._convs]
                wanted += [self._user_channel + b"%d" % u for u in self._users]
                self._channel_changes.clear()
                await self._subscribe(link, wanted)
                self._client = client
                self._stats["links"] += 1
                self._wake.set()
                up()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, link)
                    nursery.start_soon(self._sync_channels, link)
                    nursery.start_soon(self._write, client)
                    nursery.start_soon(self._heartbeat, client)
        finally:
            self._client = None
            self._up = False
            with trio.CancelScope(shield=True):
                await link.aclose()

    def _down(self) -> None:
        """The link is gone: what was queued is owed (messages) or dropped (the rest)."""
        self._up = False
        while self._queue:
            _, _, messages = self._queue.popleft()
            if messages is None:
                self._stats["dropped"] += 1
            else:
                self._owe(messages[-1])

    async def _deregister(self) -> None:
        """A clean stop: take this node out of Redis and tell the others who went offline with it (bounded)."""
        if self._first:
            return  # never registered
        with trio.move_on_after(_CONNECT_TIMEOUT_S):
            try:
                client = coredis.Redis.from_url(self._url, client_name=self._client_name,
                                                connect_timeout=_CONNECT_TIMEOUT_S,
                                                stream_timeout=_COMMAND_TIMEOUT_S,
                                                retry_policy=coredis.retry.NoRetryPolicy())
                async with client:
                    self._sweep_script = client.register_script(_SWEEP)
                    gone = await self._sweep(client, self.node_id, force=True)
                    offline = await self._gone(gone, known_only=True)
                    if offline:
                        async with client.pipeline(transaction=False) as pipe:
                            for uid, name, rooms in offline:
                                pipe.publish(self._bus, self._presence(uid, name, rooms, proto.Status.OFFLINE))
            except Exception as exc:
                cause = _link_error(exc)
                if cause is None:
                    log.error("leaving redis failed", exc_info=exc)
                else:
                    log.warning("could not leave redis (%s): the other nodes sweep this node within %.0f s",
                                cause, self._ttl_s)

    # -- messages -----------------------------------------------------------------------------------------------------
    def publish(self, batch: list[Appended]) -> None:
        self.fanout.deliver(batch)
        self._send_messages(batch)

    def _send_messages(self, batch: list[Appended]) -> None:
        """Queue ``batch`` for the other nodes: one publish per conversation."""
        by_conv: dict[int, list[Appended]] = {}
        for msg in batch:
            by_conv.setdefault(msg.conv_id, []).append(msg)
        for conv_id, messages in by_conv.items():
            if not self._up or len(self._queue) >= self._max_queued:
                self._owe(messages[-1])
                continue
            body = _dumps([_message_row(m) for m in messages])
            self._queue.append((self._conv_channel + b"%d" % conv_id, _MESSAGES + self._origin + body, messages))
        self._wake.set()

    def _owe(self, msg: Appended) -> None:
        owed = self._owed
        current = owed.get(msg.conv_id)
        if current is not None:
            if msg.seq > current.seq:
                owed[msg.conv_id] = msg
        elif len(owed) < self._max_owed:
            owed[msg.conv_id] = msg
            self._stats["owed_max"] = max(self._stats["owed_max"], len(owed))
        else:
            self._owe_everything = True

    def flush(self) -> None:
        self.fanout.flush()

    def republish(self, msg: Appended) -> None:
        self.fanout.deliver([msg])
        self.fanout.flush()
        self._send_messages([msg])

    def subscribe(self, conv_id: int, conn: Subscriber, sub: Subscription) -> None:
        self.fanout.subscribe(conv_id, conn, sub)
        if conv_id not in self._convs:
            self._convs.add(conv_id)
            self._channel_changed(self._conv_channel + b"%d" % conv_id, "c", conv_id)

    def unsubscribe(self, conv_id: int, conn: Subscriber) -> None:
        self.fanout.unsubscribe(conv_id, conn)
        if conv_id in self._convs and not self.fanout.subscriptions(conv_id):
            self._convs.discard(conv_id)
            self._channel_changed(self._conv_channel + b"%d" % conv_id, "c", conv_id)

    def _channel_changed(self, channel: bytes, kind: str, ident: int) -> None:
        self._channel_changes[channel] = (kind, ident)
        self._channels_changed.set()

    # -- ephemeral frames -------------------------------------------------------------------------------------------
    def push_to_user(self, user_id: int, event: proto.Event) -> None:
        push(self._users.get(user_id, ()), event)
        if self._remote.get(user_id):
            self._send(self._user_channel + b"%d" % user_id, _TO_USER + self._origin + proto.encode(event))

    def push_to_conversation(self, conv_id: int, event: proto.Event, *, skip_user: int) -> None:
        push([conn for conn in self.fanout.subscriptions(conv_id) if conn.user_id != skip_user], event)
        self._send(self._conv_channel + b"%d" % conv_id,
                   _TO_CONVERSATION + self._origin + skip_user.to_bytes(8, "big") + proto.encode(event))

    def _send(self, channel: bytes, payload: bytes) -> None:
        """Queue an ephemeral publish; dropped while the link is down or the queue is full."""
        if not self._up or len(self._queue) >= self._max_queued:
            self._stats["dropped"] += 1
            return
        self._queue.append((channel, payload, None))
        self._wake.set()

    # -- users --------------------------------------------------------------------------------------------------------
    def connection_count(self, user_id: int) -> int:
        """This node's connections of the user and the others' as last heard (at most a heartbeat old, or as old as
        the link's outage): see the module's comment for what a race between nodes allows."""
        remote = self._remote.get(user_id)
        return len(self._users.get(user_id, ())) + (sum(remote.values()) if remote else 0)

    def connections_of(self, user_id: int) -> list[Subscriber]:
        """This node's connections of the user (not part of the port: for tests and the operator)."""
        return list(self._users.get(user_id, ()))

    def add_connection(self, conn: Subscriber, user_id: int, username: str, rooms: Sequence[int],
                       limit: int) -> bool:
        if self.connection_count(user_id) >= limit:
            return False
        conns = self._users.setdefault(user_id, {})
        conns[conn] = None
        self._connections += 1
        self._names[user_id] = username
        if len(conns) == 1:
            self._channel_changed(self._user_channel + b"%d" % user_id, "u", user_id)
        self._count_changed(user_id, rooms)
        return True

    def remove_connection(self, conn: Subscriber, user_id: int, username: str, rooms: Sequence[int]) -> None:
        conns = self._users.get(user_id)
        if conns is None or conn not in conns:
            return
        del conns[conn]
        self._connections -= 1
        if not conns:
            del self._users[user_id]
            self._channel_changed(self._user_channel + b"%d" % user_id, "u", user_id)
        self._count_changed(user_id, rooms)

    def _count_changed(self, user_id: int, rooms: Sequence[int]) -> None:
        self._counts_due[user_id] = tuple(rooms)
        self._wake.set()

    def user_event(self, event: UserEvent) -> None:
        for conn in list(self._users.get(event.user_id, ())):
            conn.user_event(event)
        self._send(self._user_channel + b"%d" % event.user_id,
                   _USER_EVENT + self._origin + _encode_user_event(event))

    async def online(self, user_ids: Iterable[int]) -> set[int]:
        """As announced, from Redis (an OFFLINE still pending counts as online); from this node's view of the others
        while Redis is down."""
        ids = list(dict.fromkeys(user_ids))
        client = self._client
        if client is not None and ids:
            try:
                online: set[int] = set()
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    keys = [key for uid in chunk for key in (f"{self._prefix}:uc:{uid}", f"{self._prefix}:po:{uid}")]
                    with trio.fail_after(_COMMAND_TIMEOUT_S):
                        flags: Any = await self._online_script(keys=keys, args=[], client=client)
                    online.update(uid for uid, flag in zip(chunk, flags, strict=True) if flag)
                return online
            except Exception as exc:
                if _link_error(exc) is None:
                    raise
        return {uid for uid in ids if uid in self._users or uid in self._offline or self._remote.get(uid)}

    # -- the node registry --------------------------------------------------------------------------------------------
    def node_info(self) -> NodeInfo:
        return NodeInfo(self.node_id, self.host, self.port, self.ws_port, self._connections, self.draining,
                        self.started_ms)

    def set_address(self, port: int, ws_port: int | None) -> None:
        """The ports clients reach this node on (the listeners' real ones when the config says 0)."""
        self.port, self.ws_port = port, ws_port
        self._heartbeat_now.set()

    def set_draining(self, draining: bool) -> None:
        """Mark this node draining (or not) in the registry, at once if Redis is up."""
        self.draining = draining
        self._heartbeat_now.set()

    def live_nodes(self) -> list[proto.NodeInfo]:
        """The live nodes as of the last heartbeat, least loaded first, for NODES (spec §5.40)."""
        nodes = sorted(self._nodes, key=lambda n: (n.connections, n.id))[:proto.MAX_LIST_ITEMS]
        # This node's own entry says draining at once, without waiting for the registry's next read.
        return [proto.NodeInfo(n.id, n.host, n.port, n.ws_port or 0, min(n.connections, 0xFFFF_FFFF),
                               n.draining or (n.id == self.node_id and self.draining)) for n in nodes]

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes, by id: read from Redis, or as last read (at most a heartbeat old) while it is down."""
        client = self._client
        if client is not None:
            try:
                with trio.fail_after(_COMMAND_TIMEOUT_S):
                    self._nodes = (await self._read_registry(client))[0]
            except Exception as exc:
                if _link_error(exc) is None:
                    raise
        return list(self._nodes)

    async def _read_registry(self, client: Any) -> tuple[list[NodeInfo], list[str]]:
        """(live nodes, registered ids whose entry expired)."""
        ids = sorted(m.decode() for m in await client.smembers(f"{self._prefix}:nodes"))
        if not ids:
            return [], []
        entries = await client.mget([f"{self._prefix}:node:{i}" for i in ids])
        live, dead = [], []
        for node_id, entry in zip(ids, entries, strict=True):
            if entry is None:
                dead.append(node_id)
            else:
                live.append(NodeInfo(**json.loads(entry)))
        return live, dead

    async def _heartbeat_once(self, client: Any) -> None:
        info = self.node_info()
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(f"{self._prefix}:node:{self.node_id}", _dumps(asdict(info)), px=max(1, int(self._ttl_s * 1000)))
            added = pipe.sadd(f"{self._prefix}:nodes", [self.node_id])
        if await added and self._nodes and any(n.id == self.node_id for n in self._nodes):
            # Registered before and swept since (this node stalled past the TTL): write every count again.
            log.warning("node %s was taken for dead by another node; registering its connections again", self.node_id)
            for uid in list(self._users):
                self._counts_due.setdefault(uid, ())
            self._wake.set()
        live, dead = await self._read_registry(client)
        self._nodes = live
        alive = {n.id for n in live}
        for uid in [uid for uid, nodes in self._remote.items() if not nodes.keys() <= alive]:
            nodes = {n: c for n, c in self._remote[uid].items() if n in alive}
            if nodes:
                self._remote[uid] = nodes
            else:
                del self._remote[uid]
        for node_id in dead:
            gone = await self._sweep(client, node_id)
            self._stats["swept_nodes"] += 1
            if gone:
                log.info("node %s is gone (no heartbeat for %.0f s): %d users offline", node_id, self._ttl_s,
                         len(gone))
            for uid, name, rooms in await self._gone(gone):
                self._announce(uid, name, rooms, proto.Status.OFFLINE)

    async def _heartbeat(self, client: Any) -> None:
        while True:
            with trio.move_on_after(self._heartbeat_s):
                await self._heartbeat_now.wait()
            self._heartbeat_now = trio.Event()
            with trio.fail_after(_COMMAND_TIMEOUT_S + self._heartbeat_s):
                await self._heartbeat_once(client)

    async def _sweep(self, client: Any, node_id: str, *, force: bool = False) -> list[tuple[int, str]]:
        flat: Any = await self._sweep_script(keys=[], args=[self._prefix, node_id, int(force)], client=client)
        return [(int(flat[i]), flat[i + 1].decode()) for i in range(0, len(flat), 2)]

    async def _gone(self, gone: list[tuple[int, str]], *, known_only: bool = False
                    ) -> list[tuple[int, str, tuple[int, ...]]]:
        """Users whose node went away, with the rooms to tell they are OFFLINE: known here, else from the store
        (unless ``known_only``)."""
        offline = []
        for uid, name in gone:
            if uid in self._users:
                continue  # back here meanwhile; its count is written again
            rooms = None
            pending = self._offline.pop(uid, None)
            if pending is not None:
                rooms = pending[3]
            elif uid in self._counts_due:
                rooms = self._counts_due[uid] or None
            if rooms is None:
                if known_only:
                    continue
                try:
                    rows = await self._store.conversations(uid)
                except Exception as exc:
                    log.warning("rooms of %s unknown (%r): its OFFLINE goes nowhere", name, exc)
                    continue
                rooms = tuple(row.id for row in rows if row.kind == ConvKind.ROOM)
            offline.append((uid, name, rooms))
        return offline

    async def _load_remote(self, client: Any) -> None:
        """The other nodes' connection counts, read whole (after a (re)connection: the bus may have missed some)."""
        remote: dict[int, dict[str, int]] = {}
        for node in self._nodes:
            if node.id == self.node_id:
                continue
            entries = await client.hgetall(f"{self._prefix}:nc:{node.id}")
            for uid, value in entries.items():
                count = int(value.split(b":", 1)[0])
                if count > 0:
                    remote.setdefault(int(uid), {})[node.id] = count
        self._remote = remote

    # -- presence -----------------------------------------------------------------------------------------------------
    def _announce(self, user_id: int, username: str, rooms: Sequence[int], status: proto.Status) -> None:
        """PRESENCE to every node's subscribers of ``rooms`` (this node's at once)."""
        announce(self.fanout, self._users.get(user_id, ()), username, rooms, status)
        self._send(self._bus, self._presence(user_id, username, rooms, status))

    def _presence(self, user_id: int, username: str, rooms: Sequence[int], status: proto.Status) -> bytes:
        return _PRESENCE + self._origin + _dumps([user_id, username, int(status), list(rooms)])

    async def _run_offline_timer(self) -> None:
        """Hand each pending OFFLINE to the writer when its delay is over (one delay for all: arrival order is
        deadline order)."""
        pending = self._offline
        while True:
            if not pending:
                self._offline_added = trio.Event()
                await self._offline_added.wait()
                continue
            user_id = next(iter(pending))
            when, token, name, rooms = pending[user_id]
            if when > trio.current_time():
                await trio.sleep_until(when)
                continue
            del pending[user_id]
            if user_id not in self._users:  # back here meanwhile: the count written already cancelled it
                self._offline_due.append((user_id, token, name, rooms))
                self._wake.set()

    # -- the writer ---------------------------------------------------------------------------------------------------
    async def _write(self, client: Any) -> None:
        """Send what is queued, many commands per round trip, until the link fails."""
        while True:
            if not (self._queue or self._owed or self._owe_everything or self._counts_due or self._offline_due):
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            with trio.fail_after(_COMMAND_TIMEOUT_S):
                if self._counts_due:
                    await self._write_counts(client)
                if self._offline_due:
                    await self._write_offline_due(client)
                if self._queue or self._owed or self._owe_everything:
                    await self._flush_queue(client, chunk=_PUBLISH_CHUNK)

    async def _flush_queue(self, client: Any, chunk: int | None = None) -> None:
        """PUBLISH what is queued and owed (``chunk`` at most), in one round trip."""
        taken: list[tuple[bytes, bytes, list[Appended] | None]] = []
        limit = chunk or len(self._queue) + len(self._owed) + 1
        while self._queue and len(taken) < limit:
            taken.append(self._queue.popleft())
        owed: list[Appended] = []
        while self._owed and len(taken) + len(owed) < limit:
            owed.append(self._owed.pop(next(iter(self._owed))))
        everything = self._owe_everything
        self._owe_everything = False
        try:
            async with client.pipeline(transaction=False) as pipe:
                for channel, payload, _ in taken:
                    pipe.publish(channel, payload)
                for msg in owed:
                    body = _dumps([_message_row(msg)])
                    pipe.publish(self._conv_channel + b"%d" % msg.conv_id, _MESSAGES + self._origin + body)
                if everything:
                    pipe.publish(self._bus, _RESYNC + self._origin)
        except BaseException:
            for _, _, messages in taken:
                if messages is not None:
                    self._owe(messages[-1])
            for msg in owed:
                self._owe(msg)
            self._owe_everything = self._owe_everything or everything
            raise
        self._stats["published"] += len(taken) + len(owed) + everything
        self._stats["publishes"] += 1

    async def _write_counts(self, client: Any) -> None:
        """Write this node's count of each changed user; announce what the scripts decided; tell the other nodes."""
        due: list[tuple[int, tuple[int, ...]]] = []
        while self._counts_due and len(due) < _COUNTS_CHUNK:
            uid = next(iter(self._counts_due))
            due.append((uid, self._counts_due.pop(uid)))
        p, node = self._prefix, self.node_id
        delay_ms = int(self._offline_delay_s * 1000)
        po_ttl_ms = delay_ms + int(self._ttl_s * 1000) * 10 + 60_000
        written: list[tuple[int, tuple[int, ...], int, str, str, Any]] = []
        try:
            async with client.pipeline(transaction=False) as pipe:
                for uid, rooms in due:
                    count = len(self._users.get(uid, ()))
                    name = self._names.get(uid, "")
                    self._tokens += 1
                    token = str(self._tokens)
                    result: Any = self._set_count_script(
                        keys=[f"{p}:uc:{uid}", f"{p}:nc:{node}", f"{p}:po:{uid}"],
                        args=[node, uid, count, name, token, delay_ms, po_ttl_ms, p], client=pipe)
                    written.append((uid, rooms, count, name, token, result))
        except BaseException:
            for uid, rooms in due:
                self._counts_due.setdefault(uid, rooms)
            raise
        counts: dict[str, int] = {}
        for uid, rooms, count, name, token, result in written:
            outcome = await result
            counts[str(uid)] = count
            if count > 0:
                self._offline.pop(uid, None)
            if outcome == 1:
                self._announce(uid, name, rooms, proto.Status.ONLINE)
            elif outcome == 2:
                self._offline.pop(uid, None)  # re-inserted last: the dict stays in deadline order
                self._offline[uid] = (trio.current_time() + self._offline_delay_s, token, name, rooms)
                if self._offline_added is not None:
                    self._offline_added.set()
            elif outcome == 4:
                self._announce(uid, name, rooms, proto.Status.OFFLINE)
            if count == 0 and uid not in self._offline:
                self._names.pop(uid, None)
        self._send(self._bus, _COUNTS + self._origin + _dumps(counts))

    async def _write_offline_due(self, client: Any) -> None:
        due = [self._offline_due.popleft() for _ in range(min(len(self._offline_due), _COUNTS_CHUNK))]
        p, node = self._prefix, self.node_id
        try:
            async with client.pipeline(transaction=False) as pipe:
                results: list[Any] = [
                    self._offline_due_script(keys=[f"{p}:uc:{uid}", f"{p}:nc:{node}", f"{p}:po:{uid}"],
                                             args=[node, uid, token], client=pipe)
                    for uid, token, _, _ in due]
        except BaseException:
            self._offline_due.extendleft(reversed(due))
            raise
        for (uid, _, name, rooms), result in zip(due, results, strict=True):
            if uid not in self._users:
                self._names.pop(uid, None)
            if await result == 1:
                self._announce(uid, name, rooms, proto.Status.OFFLINE)

    # -- the subscriber -----------------------------------------------------------------------------------------------
    async def _subscribe(self, link: _PubSubLink, channels: list[bytes]) -> None:
        for start in range(0, len(channels), _CHANNELS_PER_COMMAND):
            chunk = channels[start:start + _CHANNELS_PER_COMMAND]
            await link.send(_command(b"SUBSCRIBE", *chunk))
            self._channels.update(chunk)

    async def _sync_channels(self, link: _PubSubLink) -> None:
        """Keep the link's channels what this node's subscribers need; PING it when idle, and fail when it is mute."""
        while True:
            with trio.move_on_after(self._heartbeat_s):
                await self._channels_changed.wait()
            self._channels_changed = trio.Event()
            if trio.current_time() - link.last_read > 3 * self._heartbeat_s:
                raise LinkLost("redis stopped answering the subscriber")
            changes, self._channel_changes = self._channel_changes, {}
            on, off = [], []
            for channel, (kind, ident) in changes.items():
                wanted = ident in self._convs if kind == "c" else ident in self._users
                if wanted and channel not in self._channels:
                    on.append(channel)
                elif not wanted and channel in self._channels:
                    off.append(channel)
            await self._subscribe(link, on)
            for start in range(0, len(off), _CHANNELS_PER_COMMAND):
                chunk = off[start:start + _CHANNELS_PER_COMMAND]
                await link.send(_command(b"UNSUBSCRIBE", *chunk))
                self._channels.difference_update(chunk)
            if not changes:
                await link.send(_command(b"PING"))

    async def _read(self, link: _PubSubLink) -> None:
        conv_channel = self._conv_channel
        while True:
            reply = await link.next()
            if isinstance(reply, _RespError):
                raise LinkLost(f"redis: {reply}")
            if not isinstance(reply, list) or not reply:
                continue
            kind = reply[0]
            if kind == b"message" and len(reply) == 3:
                self._stats["received"] += 1
                try:
                    self._received(reply[1], reply[2])
                except Exception:  # a bug, or a node of another version: that payload is lost, not the link
                    self._stats["bad_payloads"] += 1
                    if not self._bad_logged:
                        self._bad_logged = True
                        log.exception("a payload from redis could not be handled (logged once)")
            elif kind == b"subscribe" and reply[1].startswith(conv_channel):
                # Live from here: what was published before the confirmation is read from the store.
                conv_id = int(reply[1][len(conv_channel):])
                if conv_id in self._convs:
                    self._stats["resyncs"] += 1
                    self.fanout.resync(conv_id)
                    self.fanout.flush()

    def _received(self, channel: bytes, payload: bytes) -> None:
        kind, size = payload[:1], payload[1]
        origin, body = payload[2:2 + size], payload[2 + size:]
        if origin == self._origin[1:]:
            return  # this node's own: delivered here already
        if kind == _MESSAGES:
            self.fanout.deliver([_appended(row) for row in json.loads(body)])
            self.fanout.flush()
        elif kind == _TO_CONVERSATION:
            conv_id, skip_user = int(channel[len(self._conv_channel):]), int.from_bytes(body[:8], "big")
            push([conn for conn in self.fanout.subscriptions(conv_id) if conn.user_id != skip_user],
                 proto.decode(body[8:]))
        elif kind == _TO_USER:
            push(self._users.get(int(channel[len(self._user_channel):]), ()), proto.decode(body))
        elif kind == _USER_EVENT:
            event = _decode_user_event(body)
            for conn in list(self._users.get(event.user_id, ())):
                conn.user_event(event)
        elif kind == _PRESENCE:
            uid, name, status, rooms = json.loads(body)
            announce(self.fanout, self._users.get(uid, ()), name, rooms, proto.Status(status))
        elif kind == _COUNTS:
            node, remote = origin.decode(), self._remote
            for key, count in json.loads(body).items():
                uid = int(key)
                if count > 0:
                    remote.setdefault(uid, {})[node] = count
                elif uid in remote:
                    remote[uid].pop(node, None)
                    if not remote[uid]:
                        del remote[uid]
        elif kind == _RESYNC:  # a node could not say which conversations it owes: every one re-syncs
            self._stats["resyncs"] += len(self._convs)
            self.fanout.resync()
            self.fanout.flush()
        else:
            raise ValueError(f"unknown payload kind {kind!r}")

    def statistics(self) -> dict[str, Any]:
        return {**self.fanout.statistics(), **self._stats, "link": "up" if self._up else "down",
                "node_id": self.node_id, "users": len(self._users), "connections": self._connections,
                "remote_users": len(self._remote), "offline_pending": len(self._offline) + len(self._offline_due),
                "queued": len(self._queue), "owed": len(self._owed), "channels": len(self._channels)}
