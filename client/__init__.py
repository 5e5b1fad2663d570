"""Chorus client library for Trio programs, tests and benchmarks.

    async with client.open_client("127.0.0.1", 7420, username="ann", password="...", register=True) as c:
        await c.join("lobby")
        await c.send("#lobby", "hello")
        async for event in c.events():
            ...

See ``_client.py`` for how reconnects, the outbox and exactly-once delivery work.
"""
from ._client import Client, ClientStatistics, backoff_delay, open_client, parse_conv
from ._errors import ConnectionLost, ServerError
from ._events import Disconnected, Page, Reconnected
from ._queue import EventQueue

__all__ = [
    "Client",
    "ClientStatistics",
    "ConnectionLost",
    "Disconnected",
    "EventQueue",
    "Page",
    "Reconnected",
    "ServerError",
    "backoff_delay",
    "open_client",
    "parse_conv",
]
