"""Group commit, for both stores (server/_store.py, server/_pgstore.py): the append queue and its committer.

How this works. ``append`` puts the message on a pending list and waits (``append_nowait`` leaves a callback
instead of a waiting task); one committer task takes everything pending (up to ``max_batch``) and has the store
write it in ONE transaction in a worker thread holding ``_limiter``. While that transaction runs, new appends gather
for the next one: batches grow with load and the cost of a commit is shared. After COMMIT, still before any waiter
of the batch is told, ``on_commit`` gets the batch's new messages (no duplicates) in commit order; then each waiter
gets its result; then ``after_batch`` runs (the ``Store`` port, server/_ports.py, and spec/PROTOCOL.md §9.4:
nothing is acked or seen live before it is durable). A batch whose transaction fails fails its own waiters only,
each with its own copy of the error (``StoreError`` when the store calls it a refusal), and the committer goes on.
Once queued, a message is the committer's: cancelling its appender does not lose it, and closing the store
commits whatever is still pending (shielded, even when cancelled) before the store disconnects.

A store subclasses ``GroupCommitter`` and supplies ``_write_batch`` (the messages -> their ``Appended`` results, in
one transaction, in the worker thread), ``_refusal`` (is this exception the database refusing -> ``StoreError``)
and ``_disconnect``; ``_batch_done`` is for its own upkeep after a batch (SQLite's WAL checkpoints). Refusals are
counted here, whichever call met them (``_in_thread``), and logged once per episode.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from copy import copy
from typing import Any

import trio

from ._ports import AppendCallback, Appended, NewMessage, StoreError

log = logging.getLogger(__name__)

#: ``client_msg_id`` is a u64: below this.
_U64 = 1 << 64
#: Upper bounds (seconds) of the commit-latency buckets in ``statistics()["commit_seconds"]`` (the metrics' histogram).
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, float("inf"))


class _Raised:
    """What ``fn`` raised in a worker thread (``GroupCommitter._in_thread``)."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception):
        self.exc = exc


def _returning_errors(fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        # Its traceback holds this thread's frames and, through them, Trio's, which hold this very result: a cycle.
        # Where it came from is kept as text instead (shown with the traceback of wherever it is raised).
        exc.add_note("raised in the store's worker thread:\n" + "".join(traceback.format_tb(exc.__traceback__)))
        return _Raised(exc.with_traceback(None))


def _copy_error(exc: Exception) -> Exception:
    """A copy for one waiter, so that tracebacks raised in several tasks do not pile onto one object."""
    try:
        dup = copy(exc)
    except Exception:
        return exc
    dup.__cause__ = exc.__cause__
    dup.__context__ = exc.__context__
    return dup


class _Waiter:
    """One queued append: the committer calls ``finish`` with its result or error.

    ``notify`` is an event that ``append`` waits on, or the callback ``append_nowait`` was given, so a
    connection can pipeline sends without a task per message.
    """

    __slots__ = ("msg", "notify", "result", "error")

    def __init__(self, msg: NewMessage, notify: trio.Event | AppendCallback) -> None:
        self.msg = msg
        self.notify = notify
        self.result: Appended | None = None
        self.error: BaseException | None = None

    def finish(self, result: Appended | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        notify = self.notify
        if isinstance(notify, trio.Event):
            notify.set()
            return
        try:
            notify(result, error)
        except Exception:
            log.exception("store: an append callback raised")


class GroupCommitter:
    """The append half of a store (see the module's docstring); a store subclasses it.

    ``limiter`` is the committer's connection's (one token): held while a batch is written, and by whatever else
    must not run beside a commit.
    """

    #: The log line that opens a refusal episode is "store: <the StoreError> (<this>)".
    _while_refused = "further refusals are counted, and logged again once a request succeeds"
    #: The one that closes it is "store: <this> again (<n> refused meanwhile)".
    _recovered = "the database accepts requests"

    def __init__(self, *, limiter: trio.CapacityLimiter, max_batch: int,
                 on_commit: Callable[[list[Appended]], None] | None) -> None:
        self._limiter = limiter
        self._max_batch = max_batch
        #: Called in the Trio thread after each commit, before any ``append`` returns, with the batch's new
        #: messages in seq order. Must not block; an exception is logged and the waiters still get their results.
        self.on_commit = on_commit
        #: Called in the Trio thread once every waiter of a committed batch got its result (the server
        #: sends everything one batch produced for a connection, messages and ACKs, in one write).
        self.after_batch: Callable[[], None] | None = None
        self._pending: list[_Waiter] = []
        self._wakeup = trio.Event()
        self._closing = False
        self._refusals = 0
        self._refusing = False
        self._commits = 0
        self._failed_batches = 0
        self._appended = 0
        self._duplicates = 0
        self._batched = 0  # messages in committed batches, duplicates included
        self._batch_max = 0
        self._batch_histogram: dict[int, int] = {}
        self._commit_seconds = [0] * len(COMMIT_SECONDS_BUCKETS)  # committed batches per latency bucket
        self._commit_seconds_sum = 0.0
        self._refused_at: float | None = None  # trio.current_time() of the latest refusal

    # -- what the store supplies ---------------------------------------------------------------------------------

    def _write_batch(self, msgs: list[NewMessage]) -> list[Appended]:
        """In a worker thread holding ``_limiter``: store ``msgs`` in one transaction; their results, in order (a
        retry's are the original's, ``duplicate``). Raises whatever failed the transaction: then nothing is stored."""
        raise NotImplementedError

    def _refusal(self, exc: BaseException) -> StoreError | None:
        """The ``StoreError`` for ``exc`` if the database refused or cannot be reached, else None (a bug)."""
        raise NotImplementedError

    async def _disconnect(self) -> None:
        """Close the store's connections (last thing of a close, after the pending appends were committed)."""
        raise NotImplementedError

    async def _batch_done(self) -> None:
        """After a committed batch was reported (``after_batch`` included): the store's own upkeep, if any."""

    # -- appends -------------------------------------------------------------------------------------------------

    async def append(self, msg: NewMessage) -> Appended:
        """Store ``msg`` (group-committed) and return it with its seq, or the original if it is a retry.

        Returns only after COMMIT and after ``on_commit`` saw the message. Once called, the message is committed
        even if this call is cancelled. Raises ``ValueError`` for a ``client_msg_id`` outside u64 (before
        queueing), ``trio.ClosedResourceError`` after close, and whatever made its batch's transaction fail
        (``StoreError`` when the database refused or was unreachable, ``LookupError`` for an unknown conversation,
        the driver's error for a bug such as a broken constraint): then no message of that batch is stored, or (a
        connection lost during COMMIT) a retry with the same ``client_msg_id`` finds it.
        """
        done = trio.Event()
        waiter = self._enqueue(msg, done)
        await done.wait()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    def append_nowait(self, msg: NewMessage, callback: AppendCallback) -> None:
        """Queue ``msg`` and return at once; ``callback(result, error)`` runs in the Trio thread after the commit.

        The same guarantees as ``append`` (callback after COMMIT and after ``on_commit``). Raises ``ValueError``
        and ``trio.ClosedResourceError`` like ``append``, before queueing.
        """
        self._enqueue(msg, callback)

    def _enqueue(self, msg: NewMessage, notify: trio.Event | AppendCallback) -> _Waiter:
        if not 0 <= msg.client_msg_id < _U64:
            raise ValueError(f"client_msg_id {msg.client_msg_id} is not a u64")
        if self._closing:
            raise trio.ClosedResourceError("the store is closed")
        waiter = _Waiter(msg, notify)
        self._pending.append(waiter)
        self._wakeup.set()
        return waiter

    # -- the committer -------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _running(self, *background: Callable[[], Awaitable[object]],
                       prepare: Callable[[], Awaitable[object]] | None = None) -> AsyncIterator[None]:
        """Run the committer (and the ``background`` tasks) until the block exits; then take no new append, commit
        what is still pending (shielded: also when cancelled) and ``_disconnect``. ``prepare`` runs first (opening
        work that needs a connection); if it raises, the store disconnects and that error propagates."""
        try:
            if prepare is not None:
                await prepare()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._commit_loop)
                for task in background:
                    nursery.start_soon(task)
                try:
                    yield
                finally:
                    self._begin_close()
        finally:
            with trio.CancelScope(shield=True):
                await self._finish_close()

    async def _commit_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            await self._commit_batch()

    async def _commit_batch(self) -> None:
        """Commit the oldest pending messages (up to max_batch) in one transaction, then wake their waiters."""
        batch = self._pending[:self._max_batch]
        del self._pending[:self._max_batch]
        started = time.perf_counter()
        try:
            results = await trio.to_thread.run_sync(self._write_batch, [w.msg for w in batch], limiter=self._limiter)
        except Exception as exc:
            self._failed_batches += 1
            refusal = self._refusal(exc)
            if refusal is None:
                log.warning("store: a batch of %d messages failed: %r", len(batch), exc)
            else:
                refusal.__cause__ = exc
                self._refused(refusal)
            error = exc if refusal is None else refusal
            for waiter in batch:
                waiter.finish(None, _copy_error(error))
            return
        except BaseException:
            # Cancelled while waiting for the limiter, before the thread ran: nothing was written. Put the batch
            # back in front; the shielded drain in ``_running`` commits it.
            self._pending[:0] = batch
            raise
        self._timed(time.perf_counter() - started)
        self._accepted()
        fresh = [r for r in results if not r.duplicate]
        size = len(batch)
        self._commits += 1
        self._appended += len(fresh)
        self._duplicates += size - len(fresh)
        self._batched += size
        self._batch_max = max(self._batch_max, size)
        bucket = 1 << (size - 1).bit_length()
        self._batch_histogram[bucket] = self._batch_histogram.get(bucket, 0) + 1
        if fresh and self.on_commit is not None:
            try:
                self.on_commit(fresh)
            except Exception:
                log.exception("store: on_commit raised; the messages are stored and their senders get an ACK")
        for waiter, result in zip(batch, results, strict=True):
            waiter.finish(result, None)
        if self.after_batch is not None:
            try:
                self.after_batch()
            except Exception:
                log.exception("store: after_batch raised")
        await self._batch_done()

    def _begin_close(self) -> None:
        self._closing = True
        self._wakeup.set()

    async def _finish_close(self) -> None:
        # Normally the committer has drained everything; if it was cancelled, what it left is committed here.
        try:
            while self._pending:
                await self._commit_batch()
        finally:
            self._closing = True
            await self._disconnect()

    # -- refusals ------------------------------------------------------------------------------------------------

    async def _in_thread(self, limiter: trio.CapacityLimiter, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread holding ``limiter``; a refusal is counted and raised as ``StoreError``.

        The thread hands an exception back as a value and it is raised here, in this task: raised through
        ``trio.to_thread`` it would be held by a frame of its own traceback, a reference cycle that only the garbage
        collector frees, and never once the collector has frozen it (server/_memory.py)."""
        result = await trio.to_thread.run_sync(_returning_errors, fn, args, limiter=limiter)
        if type(result) is not _Raised:
            return result
        exc = result.exc
        del result
        try:
            error = self._refusal(exc)
            if error is None:
                raise exc
            self._refused(error)
            raise error from exc
        finally:
            del exc  # this frame is in the traceback: it must not hold the exception too

    def _refused(self, error: StoreError) -> None:
        # Logged once per episode: a full disk or a database that is down refuses every request, and each one is
        # answered already.
        self._refusals += 1
        self._refused_at = trio.current_time()
        if not self._refusing:
            self._refusing = True
            log.warning("store: %s (%s)", error, self._while_refused)

    def _accepted(self) -> None:
        if self._refusing:
            self._refusing = False
            log.warning("store: %s again (%d refused meanwhile)", self._recovered, self._refusals)

    # -- counters ------------------------------------------------------------------------------------------------

    def _timed(self, seconds: float) -> None:
        """Count one committed batch's latency (waiting for the connection, the transaction, the thread hops)."""
        self._commit_seconds_sum += seconds
        for i, bound in enumerate(COMMIT_SECONDS_BUCKETS):
            if seconds <= bound:
                self._commit_seconds[i] += 1
                return

    def statistics(self) -> dict[str, Any]:
        """Group-commit counters: ``batch_histogram`` maps a power of two n to batches of size (n/2, n]; ``refused``
        counts every request the database refused, appends or not; ``refusing`` is true from a refusal until a request
        succeeds, ``refused_at`` the ``trio.current_time()`` of the latest refusal; ``commit_seconds`` counts committed
        batches per latency bucket (upper bounds ``COMMIT_SECONDS_BUCKETS``, not cumulative)."""
        return {
            "commits": self._commits,
            "refused": self._refusals,
            "failed_batches": self._failed_batches,
            "appended": self._appended,
            "duplicates": self._duplicates,
            "pending": len(self._pending),
            "batch_max": self._batch_max,
            "batch_mean": self._batched / self._commits if self._commits else 0.0,
            "batch_histogram": dict(sorted(self._batch_histogram.items())),
            "refusing": self._refusing,
            "refused_at": self._refused_at,
            "commit_seconds": dict(zip(COMMIT_SECONDS_BUCKETS, self._commit_seconds, strict=True)),
            "commit_seconds_sum": self._commit_seconds_sum,
        }
