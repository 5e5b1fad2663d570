"""Just enough MQTT 3.1.1 (OASIS standard, 2014) for the load generator to drive Mosquitto.

Packets are a fixed header (type << 4 | flags, then the "remaining length" as a base-128 varint of
1 to 4 bytes, §2.2.3) and a body. The generator needs CONNECT/CONNACK (§3.1, §3.2), SUBSCRIBE/SUBACK
at QoS 0 (§3.8, §3.9), PUBLISH at QoS 0 (§3.3: topic, then the payload up to the packet's end, no
packet id), PINGREQ/PINGRESP (§3.12, §3.13) and DISCONNECT (§3.14). Parsing is a function over a
buffer and an offset so that the receive loop can walk many packets of one ``recv`` without copying.
"""
from __future__ import annotations

import struct

CONNECT, CONNACK, PUBLISH, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 8, 9, 12, 13, 14

_U16 = struct.Struct(">H")
PINGREQ_PACKET = bytes([PINGREQ << 4, 0])
DISCONNECT_PACKET = bytes([DISCONNECT << 4, 0])


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    data = s.encode("utf-8") if isinstance(s, str) else s
    return _U16.pack(len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _remaining_length(len(body)) + body


def connect(client_id: str, keepalive_s: int) -> bytes:
    """CONNECT with a clean session, no will, no credentials (§3.1)."""
    flags = 0x02  # clean session
    return _packet(CONNECT << 4, _string("MQTT") + bytes([4, flags]) + _U16.pack(keepalive_s) + _string(client_id))


def subscribe(packet_id: int, topic: str) -> bytes:
    """SUBSCRIBE to one topic at QoS 0; the fixed header's flags must be 0b0010 (§3.8.1)."""
    return _packet(SUBSCRIBE << 4 | 0x02, _U16.pack(packet_id) + _string(topic) + b"\x00")


def publish(topic: bytes, payload: bytes) -> bytes:
    """PUBLISH at QoS 0, not retained: no packet id (§3.3)."""
    return _packet(PUBLISH << 4, _string(topic) + payload)


def parse_header(buf, pos: int) -> tuple[int, int, int] | None:
    """(packet type, body start, body end) of the packet at ``pos``, or None if it is not all there.

    Raises ValueError for a remaining length longer than four bytes (malformed, §2.2.3).
    """
    n = len(buf)
    i = pos + 1
    length = 0
    shift = 0
    while True:
        if i >= n:
            return None
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 21:
            raise ValueError("malformed MQTT remaining length")
    end = i + length
    if end > n:
        return None
    return buf[pos] >> 4, i, end

