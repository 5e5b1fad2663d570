"""A minimal protocol client over a real socket, for server tests that need exact frames."""
from __future__ import annotations

import itertools

import trio

from chorus import proto


class RawClient:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.conn = proto.Connection(proto.CLIENT, max_frame_bytes=proto.ABSOLUTE_MAX_FRAME_BYTES)  # as the library
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, port: int, *, hello: bool = True, source: str | None = None) -> "RawClient":
        """Connect to 127.0.0.1:``port``, from the loopback address ``source`` if given (e.g. "127.0.0.2", to be
        another address than an attacker's), and say HELLO unless ``hello`` is false."""
        if source is None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        else:
            sock = trio.socket.socket()
            await sock.bind((source, 0))
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
        client = cls(stream)
        if hello:
            await client.send(proto.Hello(1, 1, "raw-test"))
            assert isinstance(await client.next(), proto.Welcome)
        return client

    def rid(self) -> int:
        return next(self._ids)

    async def send(self, event: proto.Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next(self):
        """The next event from the server (ConnectionClosed at EOF)."""
        while True:
            event = self.conn.next_event()
            if event is not proto.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.conn.receive_data(data)

    async def next_of(self, *types):
        """Skip pushes until an event of one of ``types`` arrives."""
        while True:
            event = await self.next()
            if isinstance(event, types):
                return event
            if isinstance(event, proto.ConnectionClosed):
                raise AssertionError(f"connection closed while waiting for {types}")

    async def request(self, event_cls, *args, **kw):
        """Send a request and return its reply (matched by request id; pushes are skipped)."""
        rid = self.rid()
        await self.send(event_cls(*args, **kw, request_id=rid))
        while True:
            event = await self.next()
            if isinstance(event, proto.ConnectionClosed):
                raise AssertionError("connection closed while waiting for a reply")
            if getattr(event, "request_id", 0) == rid:
                return event

    async def register(self, name: str, password: str = "correct horse") -> proto.AuthOk:
        reply = await self.request(proto.Register, name, password)
        assert isinstance(reply, proto.AuthOk), reply
        return reply

    async def go_live(self) -> None:
        """SYNC with no positions: catch up from the stored cursors, then receive live messages."""
        reply = await self.request(proto.Sync, ())
        assert isinstance(reply, (proto.SyncPage, proto.SyncDone)), reply
        while not isinstance(reply, proto.SyncDone):
            reply = await self.next_of(proto.SyncDone)

    async def drain_until_closed(self) -> list:
        """Every event until the server's EOF; then close our side, as a real client does."""
        events = []
        while True:
            event = await self.next()
            events.append(event)
            if isinstance(event, proto.ConnectionClosed):
                await self.stream.aclose()
                return events


async def alice_and_bob_in_lobby(alice: RawClient, bob: RawClient) -> tuple[RawClient, RawClient]:
    """Register two connected clients as alice and bob, make them live and put both in #lobby."""
    for client, name in ((alice, "alice"), (bob, "bob")):
        await client.register(name)
        await client.go_live()
    for client in (alice, bob):
        await client.request(proto.Join, "lobby")
    return alice, bob
