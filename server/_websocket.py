"""The WebSocket bridge: the chat page and Chorus over WebSocket on one port (spec/PROTOCOL.md §1).

Each accepted socket first speaks HTTP (``_http``): GET / and the page's files
are served from server/static/, GET /ws is upgraded to a WebSocket after its
``Origin`` is checked (RFC 6455 §4.2, §10.2). The upgraded socket then runs the
very same ``ClientConnection`` as TCP, through ``WebSocketTransport``:

- outgoing: ``try_send``/``wait_writable`` are the socket's own, so the bridge
  is on the write-through path of DESIGN.md "Fan-out". ``wrap`` puts the
  2-10 byte header of a binary message in front of each Chorus frame; server
  frames are unmasked, so a broadcast's WebSocket frame is built once and the
  same bytes go to every subscriber (a one-entry cache keyed by the frame object).
- incoming: ``receive_some`` feeds the ``FrameReader`` and returns only the
  payloads of complete binary messages, each checked to be exactly one Chorus
  frame (its length field = message length - 10). Pings are answered, close
  frames echoed, and every violation becomes the ClientConnection's protocol
  error (ERROR + BYE PROTOCOL_ERROR), then a close frame with the RFC code.
- liveness: a WebSocket ping every ``ping_interval_s``; ``max_missed_pings``
  pings in a row without a pong close the connection as STALE, on top of the
  protocol's own PING (spec §9.10). Browsers answer them without any script.
- ending: ``aclose`` sends the close frame after the ClientConnection's BYE
  (GOAWAY, BYE SHUTDOWN, close 1001 on shutdown) and lingers briefly for the
  client's close frame so that closing the socket cannot reset the last bytes.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import socket
from functools import partial

import h11
import trio

import proto
from proto import CloseReason, ErrorCode

from . import _http
from ._transport import SocketStream, open_listener
from ._wsframe import (
    NEED_DATA,
    BinaryMessage,
    Close,
    CloseCode,
    FrameReader,
    Opcode,
    Ping,
    Pong,
    WebSocketError,
    binary_header,
    close_frame,
    control_frame,
)

log = logging.getLogger("chorus.websocket")

WS_PATH = "/ws"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_RECV_BYTES = 65536
_LINGER_S = 1.0  # how long a closing socket waits for the client's close frame
_LINGER_BYTES = 1 << 20
_PING = control_frame(Opcode.PING, b"chorus")

#: The close code that follows a Chorus BYE; anything not listed is a normal close.
_CLOSE_CODES = {
    CloseReason.SHUTDOWN: CloseCode.GOING_AWAY,
    CloseReason.PROTOCOL_ERROR: CloseCode.PROTOCOL_ERROR,
    CloseReason.RATE_LIMITED: CloseCode.POLICY_VIOLATION,
    CloseReason.AUTH_TIMEOUT: CloseCode.POLICY_VIOLATION,
    CloseReason.SERVER_FULL: CloseCode.TRY_AGAIN_LATER,
}

_last_frame: bytes | None = None
_last_wrapped: bytes = b""


def wrap(frame: bytes) -> bytes:
    """``frame`` as one binary message; the hub's broadcast hands every subscriber the same object."""
    global _last_frame, _last_wrapped
    if frame is _last_frame:
        return _last_wrapped
    wrapped = binary_header(len(frame)) + frame
    _last_frame, _last_wrapped = frame, wrapped
    return wrapped


class WebSocketTransport:
    """The transport ``ClientConnection`` runs on (see server/_conn.py), over an upgraded socket."""

    wrap = staticmethod(wrap)

    def __init__(self, stream: SocketStream, max_frame_bytes: int, leftover: bytes = b""):
        self._stream = stream
        # The socket's own methods, not wrappers: a delivery costs what it costs on TCP.
        self.try_send = stream.try_send
        self.wait_writable = stream.wait_writable
        self.peer = stream.peer
        self._reader = FrameReader(max_frame_bytes + proto.HEADER_BYTES)
        self._reader.receive_data(leftover)
        self._conn = None
        self._eof = False
        self._error: WebSocketError | None = None
        self._close_sent = False
        self._peer_closed = False
        self._closed = False
        self.unanswered_pings = 0

    def attach(self, conn) -> None:
        self._conn = conn

    def _write(self, frame: bytes) -> None:
        if self._conn is not None:
            self._conn.output.write(frame)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The Chorus frames of the next complete binary message(s); ``b""`` at the end.

        Raises ``trio.BrokenResourceError`` on a reset. A protocol violation closes the
        connection through ``ClientConnection.protocol_error`` (so this raises ``trio.Cancelled``).
        """
        while True:
            frames = []
            try:
                while True:
                    event = self._reader.next_event()
                    if event is NEED_DATA:
                        break
                    kind = type(event)
                    if kind is BinaryMessage:
                        data = event.data
                        if (len(data) < proto.HEADER_BYTES
                                or int.from_bytes(data[:4], "big") != len(data) - proto.HEADER_BYTES):
                            raise WebSocketError("a binary message must hold exactly one Chorus frame")
                        frames.append(data)
                    elif kind is Pong:
                        self.unanswered_pings = 0
                    elif kind is Ping:
                        self._write(control_frame(Opcode.PONG, event.payload))
                    elif kind is Close:
                        self._peer_closed = True
                        self._eof = True
                        if not self._close_sent:
                            self._close_sent = True
                            code = CloseCode.NORMAL if event.code == CloseCode.NO_STATUS else event.code
                            self._write(close_frame(code))
                        break
            except WebSocketError as exc:
                if frames:  # the reader raises it again next time
                    return b"".join(frames)
                self._error = exc
                code = ErrorCode.FRAME_TOO_LARGE if exc.code == CloseCode.MESSAGE_TOO_BIG else ErrorCode.MALFORMED_FRAME
                if self._conn is not None:
                    self._conn.protocol_error(code, f"WebSocket: {exc}")
                await trio.lowlevel.checkpoint()  # raises Cancelled: the connection is closing
                return b""
            if frames:
                return b"".join(frames)
            if self._eof:
                return b""
            data = await self._stream.receive_some(_RECV_BYTES)
            if not data:
                self._eof = True
                return b""
            self._reader.receive_data(data)

    async def keepalive(self, interval_s: float, max_missed: int) -> None:
        """Ping every ``interval_s``; close as STALE when ``max_missed`` pings in a row got no pong."""
        while True:
            await trio.sleep(interval_s)
            conn = self._conn
            if conn is None or conn.closing:
                return
            if self.unanswered_pings >= max_missed:
                conn.close(CloseReason.STALE)
                return
            self.unanswered_pings += 1
            conn.output.write(_PING)

    def _close_code(self) -> tuple[int, str]:
        if self._error is not None:
            return self._error.code, str(self._error)
        reason = self._conn.reason if self._conn is not None else None
        if reason is None:
            return CloseCode.NORMAL, ""
        return _CLOSE_CODES.get(reason, CloseCode.NORMAL), reason.name

    async def aclose(self, linger_s: float = _LINGER_S) -> None:
        """Close frame (unless the output may have stopped mid-frame), then a bounded linger, then close."""
        if self._closed:
            return
        self._closed = True
        try:
            output = self._conn.output if self._conn is not None else None
            at_boundary = output is not None and not output.failed and not output.buffered_bytes
            if at_boundary and not self._close_sent:
                self._close_sent = True
                try:
                    self._stream.try_send(close_frame(*self._close_code()))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if self._close_sent and not self._peer_closed and linger_s > 0:
                with trio.move_on_after(linger_s):
                    await self._linger()
        finally:
            await self._stream.aclose(linger_s=0)  # lingered above, for the close frame

    async def _linger(self) -> None:
        try:
            self._stream.socket.shutdown(socket.SHUT_WR)
            received = 0
            while received < _LINGER_BYTES:
                data = await self._stream.receive_some(_RECV_BYTES)
                if not data:
                    return
                received += len(data)
                if self._error is None:
                    self._reader.receive_data(data)
                    while (event := self._reader.next_event()) is not NEED_DATA:
                        if type(event) is Close:
                            return
        except (OSError, trio.BrokenResourceError, WebSocketError):
            return


def accept_token(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Browsers always send Origin on a WebSocket request; it is what stops other sites from using
    a visitor's browser against this server. Non-browser clients send none and are allowed."""
    if origin is None:
        return True
    if allowed:
        return "*" in allowed or origin in allowed
    if not host:
        return False
    return origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())


def _upgrade_headers(request, config) -> list[tuple[str, str]]:
    """The 101 response's headers; raises ``HttpError`` when the request may not upgrade."""
    if request.method != b"GET":
        raise _http.HttpError(405, "use GET", [("allow", "GET")])
    if "websocket" not in _http.tokens(_http.header(request, b"upgrade")) \
            or "upgrade" not in _http.tokens(_http.header(request, b"connection")):
        raise _http.HttpError(426, "this is the WebSocket endpoint", [("upgrade", "websocket")])
    if _http.header(request, b"sec-websocket-version") != "13":
        raise _http.HttpError(426, "WebSocket version 13 only", [("sec-websocket-version", "13")])
    key = _http.header(request, b"sec-websocket-key") or ""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise _http.HttpError(400, "bad Sec-WebSocket-Key") from None
    origin = _http.header(request, b"origin")
    if not origin_allowed(origin, _http.header(request, b"host"), config.ws_allowed_origins):
        raise _http.HttpError(403, f"origin {origin} not allowed")
    return [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-accept", accept_token(key))]


def _page_headers(request) -> list[tuple[str, str]]:
    host = _http.header(request, b"host") or ""
    safe_host = host if all(c.isalnum() or c in ".:-[]" for c in host) else ""
    connect = f" ws://{safe_host} wss://{safe_host}" if safe_host else ""
    return [("content-security-policy", f"default-src 'self'; connect-src 'self'{connect}; img-src 'self' data:; "
                                        "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"),
            ("referrer-policy", "no-referrer")]


async def _serve_connection(server, stream: SocketStream) -> None:
    """One accepted socket: an HTTP request, then (for /ws) the same ClientConnection as TCP."""
    config = server.config
    transport = None
    try:
        with trio.move_on_after(config.handshake_timeout_s):
            transport = await _answer_http(stream, config)
        if transport is None:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.keepalive, config.ping_interval_s, config.max_missed_pings)
            try:
                await server.handle(transport)  # closes the transport, and so the socket
            finally:
                nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
        pass
    except Exception:  # a bug here must cost one connection, not the server
        log.exception("bridge connection from %s failed", stream.peer)
    finally:
        if transport is None:
            await stream.aclose()


async def _answer_http(stream: SocketStream, config) -> WebSocketTransport | None:
    """Answer one request; returns the upgraded transport for /ws, None when the response was the end.

    Raises ``EOFError`` or ``trio.BrokenResourceError`` when the client goes away.
    """
    http = None
    try:
        http, request = await _http.read_request(stream)
        path = request.target.decode("latin-1").split("?", 1)[0]
        if path == WS_PATH:
            response, leftover = _http.switch_protocols(http, _upgrade_headers(request, config))
            await stream.send_all(response)
            return WebSocketTransport(stream, config.max_frame_bytes, leftover)
        if path not in _http.STATIC_FILES:
            raise _http.HttpError(404, "not found")
        if request.method not in (b"GET", b"HEAD"):
            raise _http.HttpError(405, "use GET", [("allow", "GET, HEAD")])
        name, content_type = _http.STATIC_FILES[path]
        try:
            body = _http.static_file(name)
        except OSError:
            raise _http.HttpError(404, "not found") from None
        await stream.send_all(_http.response(http, 200, body, content_type=content_type,
                                             headers=_page_headers(request), head=request.method == b"HEAD"))
    except (_http.HttpError, h11.ProtocolError) as exc:
        status, headers = (exc.status, exc.headers) if isinstance(exc, _http.HttpError) else (400, [])
        log.info("http peer=%s %d %s", stream.peer, status, exc)
        if http is None or http.our_state is not h11.SEND_RESPONSE:
            http = _http.fresh_connection()
        await stream.send_all(_http.response(http, status, (str(exc) + "\n").encode(), headers=headers))
    return None


async def serve_websocket(server, handler_nursery: trio.Nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept on ``config.ws_port`` until cancelled; reports the bound port (real even for port 0)."""
    config = server.config
    listener = open_listener(config.host, config.ws_port)
    log.info("chat page and WebSocket bridge on http://%s:%d/ (WebSocket at %s)", config.host, listener.port, WS_PATH)
    task_status.started(listener.port)
    await trio.serve_listeners(partial(_serve_connection, server), [listener], handler_nursery=handler_nursery)
