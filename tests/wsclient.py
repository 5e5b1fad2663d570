"""A Chorus client over WebSocket, built on wsproto (an implementation independent of the server's).

``client_frame`` builds any masked (or unmasked) client frame by hand, valid or not, for the tests that
flood or break the bridge on purpose.
"""
from __future__ import annotations

import os
import struct

import trio
import wsproto
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from chorus import proto
from rawclient import RawClient


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True,
                 length_bytes: int | None = None, key: bytes | None = None) -> bytes:
    """One client frame as RFC 6455 §5.2 lays it out; ``length_bytes`` (0, 2 or 8) forces the length's encoding
    (minimal when None), ``rsv`` is the three RSV bits as a number 0-7."""
    n = len(payload)
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n <= 0xFFFF else 8
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F])
    mask_bit = 0x80 if masked else 0
    if length_bytes == 0:
        head.append(mask_bit | n)
    elif length_bytes == 2:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return bytes(head + payload)
    key = os.urandom(4) if key is None else key
    mask = (key * (n // 4 + 1))[:n]
    return bytes(head + key + (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big"))


class Rejected(Exception):
    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status
        self.body = body
        self.headers = headers or {}


class WsClient(RawClient):
    """``RawClient``'s API over ``ws://127.0.0.1:port/ws``.

    ``close_code`` is set when the server's close frame arrives; ``ws_pings`` counts
    WebSocket pings, answered unless ``answer_ws_pings`` is False; ``ws_pongs`` counts pongs.
    """

    def __init__(self, stream, ws: wsproto.WSConnection, pending: list):
        super().__init__(stream)
        self.ws = ws
        self._pending = pending  # wsproto events read with the handshake response
        self._message = bytearray()
        self.close_code: int | None = None
        self.ws_pings = 0
        self.ws_pongs = 0
        self.answer_ws_pings = True

    @classmethod
    async def connect(cls, port: int, *, hello: bool = True, origin: str | None = None,
                      host: str | None = None, path: str = "/ws", local_address: str | None = None) -> "WsClient":
        """Connect (from ``local_address``, any of 127/8 on Linux) and upgrade.

        Raises ``Rejected`` when the server answers with an HTTP error.
        """
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        extra = [(b"origin", origin.encode())] if origin else []
        await stream.send_all(ws.send(Request(host=host or f"127.0.0.1:{port}", target=path, extra_headers=extra)))
        status, body, events, headers = None, b"", [], {}
        while True:
            data = await stream.receive_some(65536)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    status = 101
                elif isinstance(event, RejectConnection):
                    status = event.status_code
                    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        await stream.aclose()
                        raise Rejected(status, body, headers)
                elif status == 101:
                    events.append(event)
            if status == 101:
                break
            if not data:
                raise Rejected(status or 0, body, headers)
        client = cls(stream, ws, events)
        if hello:
            await client.send(proto.Hello(1, 1, "ws-test"))
            assert isinstance(await client.next(), proto.Welcome)
        return client

    async def send(self, event: proto.Event) -> None:
        await self.send_raw(self.conn.send(event))

    async def send_raw(self, data: bytes) -> None:
        """``data`` as one binary message (so it should be exactly one frame)."""
        await self.stream.send_all(self.ws.send(wsproto.events.Message(data=data)))

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def _handle(self, event) -> None:
        if isinstance(event, BytesMessage):
            self._message += event.data
            if event.message_finished:
                data = bytes(self._message)
                self._message.clear()
                assert int.from_bytes(data[:4], "big") == len(data) - proto.HEADER_BYTES, "not one frame"
                self.conn.receive_data(data)
        elif isinstance(event, Ping):
            self.ws_pings += 1
            if self.answer_ws_pings and self.ws.state is wsproto.ConnectionState.OPEN:
                await self.stream.send_all(self.ws.send(event.response()))
        elif isinstance(event, Pong):
            self.ws_pongs += 1
        elif isinstance(event, CloseConnection):
            self.close_code = event.code
            if self.ws.state is wsproto.connection.ConnectionState.REMOTE_CLOSING:
                await self.stream.send_all(self.ws.send(event.response()))
            self.conn.receive_data(b"")
        else:
            raise AssertionError(f"unexpected WebSocket event {event!r}")

    async def next(self):
        """The next Chorus event (``ConnectionClosed`` after the close frame or EOF)."""
        while True:
            event = self.conn.next_event()
            if event is not proto.NEED_DATA:
                return event
            if self._pending:
                await self._handle(self._pending.pop(0))
                continue
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.conn.receive_data(b"")
                continue
            self.ws.receive_data(data)
            self._pending.extend(self.ws.events())
