"""The admin HTTP listener: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``, on ``Config.admin_port``.

How this works. A Trio listener of its own (``admin_host``, loopback by default; off unless ``admin_port`` is set),
separate from the Chorus and web ports, so that the metrics are never exposed where clients connect. Each
connection is one request (h11 through server/_http.py's ``read_request``: the request head is capped, a bad one
is answered 400) and one response with ``Connection: close``. It is bounded like every listener here: at most
``MAX_ADMIN_CONNECTIONS`` at once (more are closed at once), ``REQUEST_TIMEOUT_S`` for the whole exchange.

- ``/healthz``: 200 while the process serves requests at all.
- ``/readyz``: 200 only when the server is not draining, the store answered a cheap read within
  ``READY_DEADLINE_S`` and refused nothing in the last ``REFUSAL_WINDOW_S``, and (node mode) the broker's link is
  up; else 503 with the reason on one line. At most one store probe runs at a time: it runs in a worker thread,
  which a deadline cannot cancel, so a hung database costs one thread, not one per scrape.
- ``/metrics``: the server's registry (server/_metrics.py) in the text exposition format.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ._http import HttpError, error_response, read_request, response
from ._metrics import registry_for

if TYPE_CHECKING:
    from ._app import Server

__all__ = ["AdminListener", "serve_admin"]

log = logging.getLogger("chorus.admin")

#: Admin connections served at once; an operator's scraper and a load balancer's probes need a few.
MAX_ADMIN_CONNECTIONS = 8
#: The whole exchange (request in, response out) of one admin connection.
REQUEST_TIMEOUT_S = 5.0
#: How long ``/readyz`` waits for the store's answer.
READY_DEADLINE_S = 1.0
#: A store that refused a request this recently is not ready, whatever a read answers (a full or read-only disk
#: still serves reads).
REFUSAL_WINDOW_S = 10.0


async def serve_admin(server: "Server", *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin port until cancelled; reports the bound port (the real one when configured as 0)."""
    config = server.config
    listeners = await trio.open_tcp_listeners(config.admin_port or 0, host=config.admin_host)
    for extra in listeners[1:]:  # a name with several addresses: one port, the first address
        await extra.aclose()
    listener = listeners[0]
    admin = AdminListener(server)
    port = listener.socket.getsockname()[1]
    log.info("admin listener on %s:%d (/metrics, /healthz, /readyz)", config.admin_host, port)
    async with trio.open_nursery() as nursery:
        admin.nursery = nursery
        await nursery.start(trio.serve_listeners, admin.handle, [listener])
        task_status.started(port)


class AdminListener:
    def __init__(self, server: "Server") -> None:
        self.server = server
        self.registry = registry_for(server)
        self.nursery: trio.Nursery | None = None
        self.active = 0
        self.refused = 0
        self.bad_requests = 0
        self._probe: trio.Event | None = None  # set when the running store probe finished
        self._probe_result: str | None = None

    def statistics(self) -> dict[str, int]:
        return {"active": self.active, "refused": self.refused, "bad_requests": self.bad_requests}

    async def handle(self, stream: trio.SocketStream) -> None:
        """One request; never raises (``serve_listeners`` would end with it)."""
        if self.active >= MAX_ADMIN_CONNECTIONS:
            self.refused += 1
            await trio.aclose_forcefully(stream)
            return
        self.active += 1
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        try:
            http, request = await read_request(stream)
        except HttpError as exc:
            self.bad_requests += 1
            await stream.send_all(error_response(exc.status, str(exc), exc.headers))
            return
        except EOFError:
            return
        await stream.send_all(await self._respond(http, request))

    async def _respond(self, http: h11.Connection, request: h11.Request) -> bytes:
        head = request.method == b"HEAD"
        if request.method not in (b"GET", b"HEAD"):
            return response(http, 405, b"only GET and HEAD\n", headers=[("allow", "GET, HEAD")])
        path = request.target.split(b"?", 1)[0]
        if path == b"/metrics":
            return response(http, 200, generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST, head=head)
        if path == b"/healthz":
            return response(http, 200, b"ok\n", head=head)
        if path == b"/readyz":
            reason = await self.readiness()
            if reason is None:
                return response(http, 200, b"ready\n", head=head)
            return response(http, 503, f"not ready: {reason}\n".encode(), head=head)
        return response(http, 404, b"not found: try /metrics, /healthz or /readyz\n", head=head)

    async def readiness(self) -> str | None:
        """Why the server should get no new clients now (one line), or None when it is ready."""
        server = self.server
        if server.draining:
            return "draining (shutting down)"
        broker = server.broker.statistics()
        if broker.get("link", "up") != "up":
            return "broker link down"
        store = server.store.statistics()
        refused_at = store.get("refused_at")
        if refused_at is not None and trio.current_time() - refused_at < REFUSAL_WINDOW_S:
            return "store refusing requests"
        return await self._probe_store()

    async def _probe_store(self) -> str | None:
        if self._probe is None:
            assert self.nursery is not None
            self._probe = trio.Event()
            self.nursery.start_soon(self._run_probe, self._probe)
        done = self._probe
        with trio.move_on_after(READY_DEADLINE_S):
            await done.wait()
            return self._probe_result
        return f"store did not answer within {READY_DEADLINE_S:g} s"

    async def _run_probe(self, done: trio.Event) -> None:
        try:
            await self.server.store.get_user_by_id(0)
        except Exception as exc:
            self._probe_result = f"store: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        else:
            self._probe_result = None
        finally:
            self._probe = None
            done.set()
