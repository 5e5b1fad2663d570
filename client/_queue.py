"""The bounded queue behind ``Client.events()``.

Why not a plain memory channel: the reader task must never block on a slow
consumer (it also carries the replies a consumer may be awaiting, so blocking
it can deadlock a program that sends without reading events). So the reader
only *offers*: a message that does not fit is refused and the client fetches it
again later by seq (HISTORY), which is lossless because messages are stored;
an ephemeral event that does not fit (presence, typing, receipt) is dropped.
Messages and other events have separate budgets so that a backlog of messages
never crowds out a Disconnected event, and the other way round.
"""
from __future__ import annotations

import collections

import trio

from chorus import proto


class EventQueue:
    """Holds at most ``max_messages`` messages plus ``max_others`` other events, in arrival order."""

    def __init__(self, max_messages: int, max_others: int):
        if max_messages < 1 or max_others < 1:
            raise ValueError("event queue sizes must be at least 1")
        self._items: collections.deque = collections.deque()
        self._max_messages = max_messages
        self._max_others = max_others
        self._messages = 0
        self._others = 0
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()
        self._closed = False
        self.dropped = 0  # other events dropped because the queue was full

    def offer_message(self, message: proto.Message | proto.Events) -> bool:
        """Queue ``message`` if there is room; False means it was not queued."""
        if self._closed or self._messages >= self._max_messages:
            return False
        self._append(message, True)
        return True

    async def put_message(self, message: proto.Message | proto.Events) -> None:
        """Queue ``message``, waiting for room; raises ``trio.ClosedResourceError`` once closed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._closed and self._messages >= self._max_messages:
            await self._writable.park()
        if self._closed:
            raise trio.ClosedResourceError("event queue closed")
        self._append(message, True)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def offer(self, event) -> bool:
        """Queue a non-message event if there is room; otherwise drop it (counted in ``dropped``)."""
        if self._closed:
            return False
        if self._others >= self._max_others:
            self.dropped += 1
            return False
        self._append(event, False)
        return True

    def _append(self, item, is_message: bool) -> None:
        self._items.append((item, is_message))
        if is_message:
            self._messages += 1
        else:
            self._others += 1
        self._readable.unpark_all()

    def receive_nowait(self):
        """The oldest event; raises ``trio.WouldBlock`` if none, ``trio.EndOfChannel`` once closed and empty."""
        if not self._items:
            if self._closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        item, is_message = self._items.popleft()
        if is_message:
            self._messages -= 1
            self._writable.unpark_all()
        else:
            self._others -= 1
        return item

    async def receive(self):
        """The oldest event, waiting for one; raises ``trio.EndOfChannel`` once closed and drained."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                item = self.receive_nowait()
            except trio.WouldBlock:
                await self._readable.park()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item

    def close(self) -> None:
        """No more events: receivers drain what is queued, then see the end."""
        self._closed = True
        self._readable.unpark_all()
        self._writable.unpark_all()

    def __len__(self) -> int:
        return len(self._items)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
