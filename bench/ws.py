"""Just enough RFC 6455 WebSocket for a load-generating client.

A client opens with an HTTP/1.1 Upgrade request carrying a random ``Sec-WebSocket-Key``; the server's
``101`` reply must carry ``Sec-WebSocket-Accept`` = base64(SHA-1(key + GUID)) (§4.1, §4.2.2). After that
both sides exchange frames (§5.2): byte 0 = FIN | opcode, byte 1 = MASK | 7-bit length (126: a u16
follows, 127: a u64 follows), then a 4-byte mask key if MASK is set, then the payload. Frames a client
sends must be masked (§5.3); frames from a server must not be. No extensions are offered, so the server
never compresses (``permessage-deflate`` needs the client to ask for it).

``parse_frame`` works on a buffer and an offset so that a receive loop can walk every frame of one
``recv`` without copying; it returns where the payload sits rather than a copy of it.
"""
from __future__ import annotations

import base64
import hashlib
import os
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


class HandshakeError(Exception):
    """The server did not accept the upgrade."""


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """(request bytes, the key to check the reply with)."""
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode("ascii")
    return request, key


def check_handshake_response(head: bytes, key: bytes) -> None:
    """Check the server's reply head (everything before the blank line); raises HandshakeError."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"101":
        raise HandshakeError(lines[0].decode("latin-1"))
    expected = base64.b64encode(hashlib.sha1(key + GUID).digest())
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            if value.strip() != expected:
                raise HandshakeError("wrong Sec-WebSocket-Accept")
            return
    raise HandshakeError("no Sec-WebSocket-Accept")


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    # One big-integer XOR is much faster in Python than a byte loop.
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, mask: bool = True) -> bytes:
    """One final (FIN) frame; client frames are masked with a fresh random key."""
    n = len(payload)
    head = bytearray([0x80 | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += _U16.pack(n)
    else:
        head.append(mask_bit | 127)
        head += _U64.pack(n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + _mask(payload, key)


def parse_frame(buf, pos: int) -> tuple[int, int, int, bytes | None] | None:
    """(FIN|opcode byte, payload start, payload end, mask key or None), or None if incomplete."""
    n = len(buf)
    if n - pos < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    length = b1 & 0x7F
    start = pos + 2
    if length == 126:
        if n - start < 2:
            return None
        (length,) = _U16.unpack_from(buf, start)
        start += 2
    elif length == 127:
        if n - start < 8:
            return None
        (length,) = _U64.unpack_from(buf, start)
        start += 8
    key = None
    if b1 & 0x80:
        if n - start < 4:
            return None
        key = bytes(buf[start:start + 4])
        start += 4
    end = start + length
    if end > n:
        return None
    return b0, start, end, key

