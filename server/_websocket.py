"""The WebSocket bridge: the chat page and Chorus over WebSocket on one port (spec/PROTOCOL.md §1).

Each accepted socket takes a connection slot first (``server.admission``, shared
with the TCP port, per address and in total) and holds it until the socket is
closed, HTTP phase included; without one it gets 503 with ``Retry-After``. It
then speaks HTTP (``_http``): GET / and the page's files are served from
server/static/, GET /ws is upgraded to a WebSocket when its ``Origin`` is on the
allow-list (RFC 6455 §4.2, §10.2). The allow-list is ``ws_allowed_origins``, or
by default the configured listen address and the bound port (with the loopback
names when that address is loopback): never anything derived from the
request's Host header, which DNS rebinding lets an attacker choose. The page's
Content-Security-Policy is built from the same list. The upgraded socket then
runs the very same ``ClientConnection`` as TCP, through ``WebSocketTransport``:

- outgoing: ``try_send``/``wait_writable`` are the socket's own, so the bridge
  is on the write-through path of DESIGN.md "Fan-out". ``wrap`` puts the
  2-10 byte header of a binary message in front of each Chorus frame; server
  frames are unmasked, so a broadcast's WebSocket frame is built once and the
  same bytes go to every subscriber (a one-entry cache keyed by the frame object).
- incoming: ``receive_some`` feeds the ``FrameReader`` and returns one complete
  binary message at a time, so that the size limit of the next one is the
  connection's state at that moment (before AUTH_OK only a few hundred bytes
  are legal). Each message must be exactly one Chorus frame: a message whose
  frame length disagrees with its size first shows the ClientConnection its
  header, which is judged as on TCP (so an oversize or unknown header gets the
  same ERROR code on both transports), and is MALFORMED_FRAME after that.
- every frame costs budget: a ping, an unsolicited pong and each frame of a
  fragmented message beyond the first are charged to the ClientConnection's
  rate bucket (``spend``); a refused ping is not answered, and too many
  refusals close the connection as RATE_LIMITED (close code 1008). A message
  in one frame costs only the Chorus frame the ClientConnection charges itself.
- a frame or fragmented message once begun must end within ``frame_timeout_s``
  (the ClientConnection's frame deadline, checked by the server's timer).
- every violation becomes the ClientConnection's protocol error (ERROR + BYE
  PROTOCOL_ERROR), then a close frame with the RFC code (``_CLOSE_CODES``).
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
import ipaddress
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import h11
import trio

from chorus import proto
from chorus.proto import CloseReason, ErrorCode

from . import _http
from ._tls import TLSStream
from ._tls import accept as tls_accept
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

if TYPE_CHECKING:
    from ._conn import ClientConnection

log = logging.getLogger("chorus.websocket")

WS_PATH = "/ws"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_RECV_BYTES = 65536
_LINGER_S = 1.0  # how long a closing socket waits for the client's close frame
_LINGER_BYTES = 64 << 10  # read and discarded at most while waiting: a flood is not worth reading
_REFUSE_S = 1.0  # a refused socket's 503 and close, at most (like Server.refuse on TCP)
_PING = control_frame(Opcode.PING, b"chorus")

#: The close code that follows a Chorus BYE; anything not listed is a normal close (1000).
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
    """``frame`` as one binary message; the fan-out hands every subscriber the same object."""
    global _last_frame, _last_wrapped
    if frame is _last_frame:
        return _last_wrapped
    wrapped = binary_header(len(frame)) + frame
    _last_frame, _last_wrapped = frame, wrapped
    return wrapped


class WebSocketTransport:
    """The ``Transport`` (server/_transport.py) ``ClientConnection`` runs on over an upgraded socket."""

    #: Each Chorus frame is one binary message.
    wrap: Callable[[bytes], bytes] | None = staticmethod(wrap)

    def __init__(self, stream: SocketStream | TLSStream, max_frame_bytes: int, leftover: bytes = b""):
        self._stream = stream
        # The socket's own methods, not wrappers: a delivery costs what it costs on TCP.
        self.try_send = stream.try_send
        self.wait_writable = stream.wait_writable
        self.peer = stream.peer
        self.address = stream.address
        self._max_frame_bytes = max_frame_bytes
        self._reader = FrameReader(max_frame_bytes + proto.HEADER_BYTES)
        self._reader.receive_data(leftover)
        self._conn: ClientConnection | None = None  # attached by the connection
        self._eof = False
        self._error: WebSocketError | None = None  # the violation that ends the connection
        self._not_one_frame: WebSocketError | None = None  # raised once the conn has judged the header
        self._close_sent = False
        self._peer_closed = False
        self._closed = False
        self._partial_since: float | None = None  # when the unfinished frame or message in the reader began
        self._completed = False  # a message was finished since we last waited for bytes
        self.unanswered_pings = 0

    def attach(self, conn: ClientConnection | None) -> None:
        """Keep the connection: control frames go through its output, violations close it (None: it has closed)."""
        self._conn = conn

    def _write(self, frame: bytes) -> None:
        conn = self._conn
        if conn is not None and not conn.output.write(frame):
            conn.output_failed()

    def _spend(self, frames: int = 1) -> bool:
        return self._conn.spend(frames) if self._conn is not None else True

    def _closing(self) -> bool:
        return self._conn is not None and self._conn.closing

    def _message_limit(self) -> int:
        # A message larger than any frame the peer may send in the connection's present state (before
        # AUTH_OK: a few hundred bytes) is refused from its WebSocket header, before it is buffered.
        if self._conn is None:
            return self._max_frame_bytes + proto.HEADER_BYTES
        return self._conn.wire.max_pending_bytes  # (at most max_frame_bytes + HEADER_BYTES)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The Chorus frame of the next complete binary message; ``b""`` at the end.

        Raises ``trio.BrokenResourceError`` on a reset. A protocol violation closes the
        connection through ``ClientConnection.protocol_error`` (so this raises ``trio.Cancelled``).
        """
        reader = self._reader
        try:
            if self._not_one_frame is not None:
                raise self._not_one_frame
            while True:
                while True:
                    reader.max_message_bytes = self._message_limit()
                    event = reader.next_event()
                    if event is NEED_DATA:
                        break
                    kind = type(event)
                    if kind is BinaryMessage:
                        self._completed = True
                        # Frames after the first are charged here; when refused, the bucket is empty and the
                        # ClientConnection refuses the Chorus frame too (ERROR RATE_LIMITED), so it still goes on.
                        if event.frames > 1:
                            self._spend(event.frames - 1)
                        if self._closing():
                            break
                        return self._one_frame(event.data)
                    elif kind is Pong:
                        if self.unanswered_pings:  # the answer to our ping is free, anything else is not
                            self.unanswered_pings = 0
                        else:
                            self._spend()
                    elif kind is Ping:
                        if self._spend():
                            self._write(control_frame(Opcode.PONG, event.payload))
                    elif kind is Close:
                        self._peer_closed = True
                        self._eof = True
                        if not self._close_sent:
                            self._close_sent = True
                            code = CloseCode.NORMAL if event.code == CloseCode.NO_STATUS else event.code
                            self._write(close_frame(code))
                        return b""
                    if self._closing():
                        break
                if self._closing():
                    await trio.lowlevel.checkpoint()  # raises Cancelled: the connection is closing
                    return b""
                if self._eof:
                    return b""
                self._frame_deadline()
                data = await self._stream.receive_some(max_bytes or _RECV_BYTES)
                if not data:
                    self._eof = True
                    return b""
                reader.receive_data(data)
        except WebSocketError as exc:
            self._error = exc
            code = ErrorCode.FRAME_TOO_LARGE if exc.code == CloseCode.MESSAGE_TOO_BIG else ErrorCode.MALFORMED_FRAME
            if self._conn is not None:
                self._conn.protocol_error(code, f"WebSocket: {exc}")
            await trio.lowlevel.checkpoint()  # raises Cancelled: the connection is closing
            return b""

    def _one_frame(self, data: bytes | bytearray) -> bytes:
        """A message's bytes when they are exactly one Chorus frame; raises ``WebSocketError`` otherwise."""
        size = len(data)
        if size >= 4:
            length = int.from_bytes(data[:4], "big")
            if length > self._max_frame_bytes:  # as on TCP: judged from the length alone (spec §2.3 step 2)
                raise WebSocketError(f"frame length {length} > {self._max_frame_bytes}", CloseCode.MESSAGE_TOO_BIG)
            if size == length + proto.HEADER_BYTES:
                return bytes(data)
            if size >= proto.HEADER_BYTES and length:
                # Let the ClientConnection judge the header as TCP would (type, state, size for its type); it
                # then waits for a body that is not coming, and the next call says why.
                self._not_one_frame = WebSocketError("a binary message must hold exactly one Chorus frame")
                return bytes(data[:proto.HEADER_BYTES])
        raise WebSocketError("a binary message must hold exactly one Chorus frame")

    def _frame_deadline(self) -> None:
        """Give the unfinished frame or message in the reader the ClientConnection's frame deadline.

        One that began after the last finished message starts it now; one that was pending keeps its start
        (control frames between its fragments do not move it), so a byte every few seconds cannot hold a
        slot forever.
        """
        if not self._reader.partial:
            self._partial_since = None
        elif self._completed or self._partial_since is None:
            self._partial_since = trio.current_time()
        self._completed = False
        if self._conn is not None:  # (its own buffer is empty while we wait: a message holds whole frames)
            self._conn.frame_started = self._partial_since

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
            self._write(_PING)

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
            self._stream.shutdown_write()
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


# -- origins: who may open a WebSocket from a browser ----------------------------------------------

_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origins_of(host: str, port: int) -> list[str]:
    """How a browser writes the origin of a page at ``host``:``port``, over http and https (RFC 6454 §6.2)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    host = host.lower()
    out = []
    for scheme, default_port in (("http", 80), ("https", 443)):
        out.append(f"{scheme}://{host}" if port == default_port else f"{scheme}://{host}:{port}")
    return out


def allowed_origins(config, port: int) -> frozenset[str]:
    """The Origin values the bridge accepts: ``ws_allowed_origins``, else the configured listen address.

    The default is ``http(s)://{config.host}:{port}`` (``port`` being the bound WebSocket port), plus
    localhost, 127.0.0.1 and [::1] when that host is a loopback address; a wildcard host (0.0.0.0, ::)
    gives only the loopback names. Nothing here comes from a request: the Host header is the attacker's
    to choose with DNS rebinding. ``"*"`` in the list allows every origin.
    """
    if config.ws_allowed_origins:
        return frozenset(o.strip().rstrip("/").lower() for o in config.ws_allowed_origins if o.strip())
    host = config.host.strip("[]")
    hosts = [] if host in _WILDCARD_HOSTS else [host]
    if host in _WILDCARD_HOSTS or _is_loopback(host):
        hosts += _LOOPBACK_NAMES
    return frozenset(origin for h in hosts for origin in _origins_of(h, port))


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Browsers always send Origin on a WebSocket request; it is what stops other sites from using
    a visitor's browser against this server. Non-browser clients send none and are allowed."""
    if origin is None:
        return True
    return "*" in allowed or origin.strip().lower() in allowed


def page_headers(allowed: frozenset[str]) -> list[tuple[str, str]]:
    """The chat page's security headers; its WebSocket may go to the allowed origins only.

    ``'self'`` covers ws:/wss: to the page's own host in CSP Level 3 browsers; the explicit
    ws://, wss:// sources are for the older ones. CSP's host grammar has no IPv6 literals
    (Chromium reports ``ws://[::1]:port`` as invalid), so those rely on ``'self'``.
    """
    sockets = sorted({("wss://" if o.startswith("https://") else "ws://") + o.split("://", 1)[1]
                      for o in allowed if o.startswith(("http://", "https://")) and "://[" not in o})
    connect = " ".join(["'self'"] + sockets)
    return [("content-security-policy", f"default-src 'self'; connect-src {connect}; img-src 'self' data:; "
                                        "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"),
            ("referrer-policy", "no-referrer")]


class _Site:
    """What every connection of one bridge shares: the config, the allowed origins, the page's headers."""

    __slots__ = ("config", "origins", "page_headers", "retry_after_s")

    def __init__(self, config, port: int):
        self.config = config
        self.origins = allowed_origins(config, port)
        self.page_headers = page_headers(self.origins)
        self.retry_after_s = max(1, math.ceil(config.reconnect_hint_ms / 1000))


def _upgrade_headers(request, site: _Site) -> list[tuple[str, str]]:
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
    if not origin_allowed(origin, site.origins):
        raise _http.HttpError(403, f"origin {origin} not allowed")
    return [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-accept", accept_token(key))]


# -- one accepted socket ---------------------------------------------------------------------------

async def _serve_connection(server, site: _Site, stream: SocketStream) -> None:
    """One accepted socket: a slot, an HTTP request, then (for /ws) the same ClientConnection as TCP."""
    address = stream.address
    refusal = server.admission.acquire(address)
    if refusal is not None:
        await _refuse(server, site, stream, refusal)
        return
    try:
        if server.tls is None:
            await _serve_admitted(server, site, stream)
        elif (secure := await tls_accept(stream, server.tls, site.config.handshake_timeout_s)) is not None:
            await _serve_admitted(server, site, secure)  # HTTPS and WSS: the same, over TLS
    finally:
        server.admission.release(address)  # the socket is closed by now, whatever happened


async def _refuse(server, site: _Site, stream: SocketStream, refusal: str) -> None:
    """503 at once, before reading the request: a refused socket must cost as little as it can."""
    log.info("http peer=%s 503 %s", stream.peer, refusal)
    server.close_reasons[CloseReason.SERVER_FULL.name] += 1
    if server.tls is not None:  # a 503 would need a handshake, which is what a refusal must not cost
        await stream.aclose(linger_s=0)
        return
    try:
        stream.try_send(_http.error_response(503, f"{refusal}; retry later",
                                             [("retry-after", str(site.retry_after_s))]))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    with trio.move_on_after(_REFUSE_S):
        await stream.aclose()  # half-close and drain, so the request still arriving cannot reset the 503


async def _serve_admitted(server, site: _Site, stream: SocketStream | TLSStream) -> None:
    config = site.config
    transport = None
    try:
        with trio.move_on_after(config.handshake_timeout_s):
            transport = await _answer_http(stream, site)
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
        else:
            await transport.aclose(linger_s=0)  # (done already unless handle failed)


async def _answer_http(stream: SocketStream | TLSStream, site: _Site) -> WebSocketTransport | None:
    """Answer one request; returns the upgraded transport for /ws, None when the response was the end.

    Raises ``EOFError`` or ``trio.BrokenResourceError`` when the client goes away.
    """
    http = None
    try:
        http, request = await _http.read_request(stream)
        path = request.target.decode("latin-1").split("?", 1)[0]
        if path == WS_PATH:
            response, leftover = _http.switch_protocols(http, _upgrade_headers(request, site))
            await stream.send_all(response)
            return WebSocketTransport(stream, site.config.max_frame_bytes, leftover)
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
                                             headers=site.page_headers, head=request.method == b"HEAD"))
    except (_http.HttpError, h11.ProtocolError) as exc:
        status, headers = (exc.status, exc.headers) if isinstance(exc, _http.HttpError) else (400, [])
        log.info("http peer=%s %d %s", stream.peer, status, exc)
        if http is None or http.our_state is not h11.SEND_RESPONSE:
            await stream.send_all(_http.error_response(status, str(exc), headers))
        else:
            await stream.send_all(_http.response(http, status, (str(exc) + "\n").encode(), headers=headers))
    return None


async def serve_websocket(server, handler_nursery: trio.Nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept on ``config.ws_port`` until cancelled; reports the bound port (real even for port 0)."""
    config = server.config
    listener = open_listener(config.host, config.ws_port, reuse_port=config.reuse_port)
    site = _Site(config, listener.port)
    log.info("chat page and WebSocket bridge on %s://%s:%d/ (WebSocket at %s; origins allowed: %s)",
             "https" if server.tls is not None else "http", config.host, listener.port, WS_PATH,
             " ".join(sorted(site.origins)))
    if not config.ws_allowed_origins and config.host.strip("[]") in _WILDCARD_HOSTS:
        log.warning("listening on every address: only pages at localhost may use the WebSocket; "
                    "set ws_allowed_origins to the address people open (e.g. https://chat.example.org)")
    task_status.started(listener.port)
    await trio.serve_listeners(partial(_serve_connection, server, site), [listener], handler_nursery=handler_nursery)
