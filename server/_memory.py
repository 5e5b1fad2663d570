"""The process's memory: when the garbage collector runs, and what malloc gives back (issue 14).

**Collector.** CPython's full collection walks every object the collector tracks, with the event loop stopped:
at 18,000 connections (about 50 tracked objects each) that measured 0.16–1.1 s, and it freed nothing, because
what a live server holds is long-lived. ``GcPolicy`` keeps the walked set small instead:

- ``gc.freeze()`` moves everything tracked to the permanent generation, which no collection walks. It runs after
  start-up, after every burst of new connections (``FREEZE_GROWTH`` more than at the last freeze, checked every
  ``CHECK_S``) and after any collection that took longer than ``FREEZE_AFTER_S`` (whatever else grew). Each
  freeze first collects what is not frozen yet, so only survivors are frozen; that set is small, so it is quick.
- A frozen cycle is never collected, so nothing that dies may leave one behind: a closed connection breaks its
  own cycles (``ClientConnection._release``) and is freed by reference counting (tests/test_memory.py). What a
  freeze catches in flight (a request whose exception crossed a worker thread dies in a cycle) is freed by a rare
  ``reclaim`` after a storm of connections: one full collection, when connections have stopped arriving.
- Every collection is timed (``gc.callbacks``): ``statistics()`` has the worst pause and the count per
  generation, since start and since the last ``reset_window()`` (bench/chorus_server.py's window).

**malloc.** argon2id takes 19 MiB per hash in a worker thread. glibc serves it from that thread's arena and,
after the first such block is freed, raises its mmap threshold to that size, so later blocks come from arenas
and stay in the process (about 118 MB after a login storm, issue 14). ``tune_malloc()`` fixes the mmap threshold
at ``MMAP_THRESHOLD_BYTES`` (so hash buffers are mapped and unmapped: returned the moment a hash ends) and caps
the arenas at ``ARENA_MAX``.

``CHORUS_GC_POLICY=off`` (freeze once after start-up and never again, as before issue 14) and
``CHORUS_MALLOC_TUNING=off`` exist for the bench's before/after rows (bench/run.py), not for operators.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._app import Server

log = logging.getLogger("chorus.server")

#: How often the policy looks at the connection count and the last collections.
CHECK_S = 0.1
#: New connections since the last freeze that make the next check freeze (a login burst, ~50 objects each).
FREEZE_GROWTH = 50
#: A collection longer than this means too much is unfrozen: freeze at the next check.
FREEZE_AFTER_S = 0.002
#: Connections opened since the last reclaim, per connection open now, that call for one (at least RECLAIM_MIN)...
RECLAIM_GROWTH = 2
RECLAIM_MIN = 5000
#: ...once no connection has opened for this long.
RECLAIM_QUIET_S = 30.0
#: Allocations at least this large are mapped and unmapped, never kept in an arena.
MMAP_THRESHOLD_BYTES = 1 << 20
ARENA_MAX = 2
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
_M_ARENA_MAX = -8


def enabled(name: str) -> bool:
    """False when the environment variable ``name`` says off (``off``, ``0``, ``no``)."""
    return os.environ.get(name, "on").lower() not in ("off", "0", "no", "false")


class GcPauses:
    """Times every collection through ``gc.callbacks`` (process-wide: install once, ``remove`` when done)."""

    def __init__(self) -> None:
        self._started = 0.0
        self._started_cpu = 0.0
        self.count = [0, 0, 0]
        self.max_s = [0.0, 0.0, 0.0]
        self.total_s = 0.0
        self.window_max_s = 0.0
        self.window_max_cpu_s = 0.0  # the same in this thread's CPU time: what the collector itself cost
        self.window_count = 0
        self.slow = False  # a collection over FREEZE_AFTER_S since the policy last looked
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            self._started_cpu = time.thread_time()
            return
        took = time.perf_counter() - self._started  # the loop's stall, including time the OS gave to others
        self.window_max_cpu_s = max(self.window_max_cpu_s, time.thread_time() - self._started_cpu)
        generation = info["generation"]
        self.count[generation] += 1
        self.max_s[generation] = max(self.max_s[generation], took)
        self.total_s += took
        self.window_max_s = max(self.window_max_s, took)
        self.window_count += 1
        if took > FREEZE_AFTER_S:
            self.slow = True

    def reset_window(self) -> None:
        self.window_max_s = 0.0
        self.window_max_cpu_s = 0.0
        self.window_count = 0

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


class GcPolicy:
    """Freeze what survives, so that no collection walks the long-lived heap (see the module's comment).

    ``active`` False freezes once at the start and never again (what chorus-server did before issue 14).
    """

    def __init__(self, server: "Server", *, active: bool = True):
        self.server = server
        self.active = active
        self.pauses = GcPauses()
        self.freezes = 0
        self.freeze_s = 0.0  # the worst freeze, its collection included
        self.reclaims = 0
        self.reclaim_s = 0.0  # the worst reclaim: a full collection, frozen objects included
        self._frozen_at = 0  # connections at the last freeze
        self._opened = 0  # connections opened (as seen by the checks) since the last reclaim
        self._seen = 0  # connections at the last check
        self._quiet_since = 0.0  # when the connection count last grew

    def freeze(self) -> None:
        """Collect what is not frozen yet (a small set), then freeze every survivor."""
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.freezes += 1
        self.freeze_s = max(self.freeze_s, time.perf_counter() - started)
        self._frozen_at = len(self.server.connections)
        self.pauses.slow = False

    def reclaim(self) -> None:
        """Unfreeze, collect everything, freeze again: what died in a cycle after it was frozen is freed. A pause
        as long as a full collection of the whole heap, so only rarely and when quiet (``check``)."""
        started = time.perf_counter()
        gc.unfreeze()
        self.freeze()
        self.reclaims += 1
        self.reclaim_s = max(self.reclaim_s, time.perf_counter() - started)
        self._opened = 0

    def check(self, now: float | None = None) -> bool:
        """Freeze when connections grew by ``FREEZE_GROWTH`` or a collection was slow; True when it froze.

        A freeze also takes what is in flight: a request's objects that later die in a reference cycle (an
        exception that crossed a worker thread, ~70 objects) stay frozen. So once as many connections have
        opened since the last reclaim as ``RECLAIM_GROWTH`` times those open now (at least ``RECLAIM_MIN``),
        and none opened for ``RECLAIM_QUIET_S``, the frozen heap is collected once (``reclaim``): what a storm
        left frozen is bounded, at the price of one full pause after it."""
        now = time.monotonic() if now is None else now
        count = len(self.server.connections)
        if count > self._seen:
            self._opened += count - self._seen
            self._quiet_since = now
        self._seen = count
        if not self.active:
            return False
        if (self._opened >= max(RECLAIM_MIN, RECLAIM_GROWTH * count)
                and now - self._quiet_since >= RECLAIM_QUIET_S):
            self.reclaim()
            return True
        if count - self._frozen_at >= FREEZE_GROWTH or self.pauses.slow:
            self.freeze()
            return True
        self._frozen_at = min(self._frozen_at, count)  # closes make room for the next burst
        return False

    async def run(self) -> None:
        """Check every ``CHECK_S`` until cancelled; freeze once at the start (everything made so far is for good)."""
        try:
            self.freeze()
            while True:
                await trio.sleep(CHECK_S)
                self.check()
        finally:
            self.pauses.remove()

    def statistics(self) -> dict:
        pauses = self.pauses
        return {"policy": "freeze" if self.active else "startup", "collections": list(pauses.count),
                "max_pause_ms": [round(s * 1000, 3) for s in pauses.max_s],
                "total_pause_ms": round(pauses.total_s * 1000, 1),
                "window_max_pause_ms": round(pauses.window_max_s * 1000, 3),
                "window_max_pause_cpu_ms": round(pauses.window_max_cpu_s * 1000, 3),
                "window_collections": pauses.window_count,
                "freezes": self.freezes, "worst_freeze_ms": round(self.freeze_s * 1000, 3),
                "reclaims": self.reclaims, "worst_reclaim_ms": round(self.reclaim_s * 1000, 3),
                "frozen_objects": gc.get_freeze_count()}


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold and cap its arenas (see the module's comment); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
