"""``python -m bench.chorus_server ARGS``: the Chorus server exactly as ``python -m chorus.server ARGS`` runs it,
plus one thing the bench needs: on SIGUSR1 it writes ``Server.statistics()`` (connections, deliveries,
the store's group-commit counters) as JSON to the file named by ``$CHORUS_BENCH_STATS``.

The server keeps those counters but has no way to read them from outside the process; rather than
change the server, the bench swaps ``serve`` inside ``server.__main__`` for a wrapper that runs the
real one and adds a task waiting for the signal. Everything else (flags, logging, the first stdout
line, SIGINT/SIGTERM handling) is ``server.__main__``'s own code.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import trio

import chorus.server.__main__ as entry

_serve = entry.serve


async def _dump_statistics(srv, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    count = 0
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        task_status.started()  # from here SIGUSR1 is ours (its default action would end the process)
        async for _ in signals:
            count += 1
            stats = {"dump": count, **srv.statistics()}
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(stats, f, default=str)
            os.replace(tmp, path)
            if srv.gc_policy is not None:  # the next dump's worst pause is that of the window between the two
                srv.gc_policy.pauses.reset_window()


async def serve_with_statistics(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    path = os.environ.get("CHORUS_BENCH_STATS")
    async with trio.open_nursery() as nursery:
        async def run(task_status):
            await _serve(config, task_status=task_status)
            nursery.cancel_scope.cancel()  # the server is done: stop waiting for signals too

        srv = await nursery.start(run)
        if path:  # before the first stdout line: the bench may signal as soon as it has read it
            await nursery.start(_dump_statistics, srv, path)
        task_status.started(srv)


if __name__ == "__main__":
    entry.serve = serve_with_statistics
    sys.exit(entry.main(sys.argv[1:]))
