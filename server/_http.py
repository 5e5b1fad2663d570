"""Just enough HTTP/1.1 for the bridge port: one request per connection (spec/PROTOCOL.md §1 "WebSocket").

The bridge port answers three kinds of request: GET of the chat page's static
files, GET /ws with an RFC 6455 upgrade, and errors for everything else. h11
parses the request (sans-IO); the request head may take ``MAX_REQUEST_BYTES``,
counted here as it is read (431 beyond). Every response says ``Connection:
close``, so there is no keep-alive state to manage, and the browser simply
opens a new connection for the next file or the WebSocket.
"""
from __future__ import annotations

import importlib.resources

import h11

__all__ = ["HttpError", "MAX_REQUEST_BYTES", "STATIC_FILES", "error_response", "header", "read_request",
           "fresh_connection", "response", "static_file", "switch_protocols", "tokens"]

#: Largest request head accepted (request line + headers); browsers send far less.
MAX_REQUEST_BYTES = 16384

#: URL path → (file in server/static/, content type). Nothing else is served.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/chorus.js": ("chorus.js", "text/javascript; charset=utf-8"),
    "/chorus.css": ("chorus.css", "text/css; charset=utf-8"),
}


class HttpError(Exception):
    """A request the bridge refuses; ``status`` is the response's status code."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


async def read_request(stream) -> tuple[h11.Connection, h11.Request]:
    """Read one request head from ``stream`` (a ``SocketStream``).

    The head (request line and headers) may take at most ``MAX_REQUEST_BYTES``. h11's own
    ``max_incomplete_event_size`` only limits what it buffers while the head is incomplete, so a
    larger head arriving in one piece would pass: the bytes are counted here, and never more than
    one byte past the cap is read.

    Raises ``HttpError`` (400 malformed, 431 over the cap), ``EOFError`` when the client closes
    first, and ``trio.BrokenResourceError`` on a reset.
    """
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    received = 0
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise _too_large() from None
            raise HttpError(400, f"bad request: {exc}") from None
        if event is h11.NEED_DATA:
            if received > MAX_REQUEST_BYTES:
                raise _too_large()
            data = await stream.receive_some(MAX_REQUEST_BYTES + 1 - received)
            if not data:
                raise EOFError("client closed before its request was complete")
            received += len(data)
            http.receive_data(data)
        elif isinstance(event, h11.Request):
            if received - len(http.trailing_data[0]) > MAX_REQUEST_BYTES:
                raise _too_large()
            return http, event
        else:  # ConnectionClosed before a request
            raise EOFError("client closed before sending a request")


def _too_large() -> HttpError:
    return HttpError(431, f"request head over {MAX_REQUEST_BYTES} bytes")


def header(request: h11.Request, name: bytes) -> str | None:
    """The value of header ``name`` (lower case), or None; repeated headers are joined with commas."""
    values = [value for key, value in request.headers if key == name]
    return b", ".join(values).decode("latin-1") if values else None


def tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def response(http: h11.Connection, status: int, body: bytes = b"", *, content_type: str = "text/plain; charset=utf-8",
             headers: list[tuple[str, str]] | None = None, head: bool = False) -> bytes:
    """The bytes of a complete response that ends the connection (``head``: no body, as for HEAD)."""
    all_headers = [("content-type", content_type), ("content-length", str(len(body))), ("connection", "close"),
                   ("cache-control", "no-cache"), ("x-content-type-options", "nosniff")] + (headers or [])
    out = http.send(h11.Response(status_code=status, headers=all_headers))
    if body and not head:
        out += http.send(h11.Data(data=body))
    out += http.send(h11.EndOfMessage())
    return out


def static_file(name: str) -> bytes:
    """A file of the chat page, from the installed package. Raises ``OSError`` when missing."""
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


def switch_protocols(http: h11.Connection, headers: list[tuple[str, str]]) -> tuple[bytes, bytes]:
    """Accept an upgrade request: (the 101 response's bytes, bytes the client sent after its request).

    Raises ``h11.ProtocolError`` when the request cannot be upgraded (e.g. it has a body).
    """
    while (event := http.next_event()) is not h11.PAUSED:
        if event is h11.NEED_DATA or isinstance(event, (h11.Data, h11.ConnectionClosed)):
            raise h11.RemoteProtocolError("an upgrade request has no body")
    data = http.send(h11.InformationalResponse(status_code=101, headers=headers, reason=b"Switching Protocols"))
    leftover, _ = http.trailing_data
    return data, bytes(leftover)


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    """A complete plain-text response to a request that was not (or could not be) parsed."""
    return response(fresh_connection(), status, (message + "\n").encode(), headers=headers)


def fresh_connection() -> h11.Connection:
    """A connection ready to send a response, for requests h11 could not parse (so it has no state to answer)."""
    http = h11.Connection(h11.SERVER)
    http.receive_data(b"GET / HTTP/1.1\r\nhost: -\r\n\r\n")
    http.next_event()
    return http
