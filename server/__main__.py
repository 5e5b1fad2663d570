"""``chorus-server``: run the server until SIGINT/SIGTERM, then shut down gracefully (exit code 0); SIGHUP reloads
the TLS certificate and key for new connections.

An operator's mistake is one line on stderr, ``chorus-server: error: <what>; <fix>``, never a traceback:
exit status 2 for a usage error (flag, config file, value: ``config_from_args``) and 1 for what the
machine refuses. Those runtime refusals are checked before the event loop starts, where each check
knows what it was checking (the data directory, the host, each port); a failure inside ``serve`` before
it reports started (a race with those checks, or the database) is matched by type and errno. Anything
else keeps its traceback: it is a bug, and hiding it would cost its diagnosis.
"""
from __future__ import annotations

import errno
import logging
import signal
import socket
import sqlite3
import ssl
import sys
import tempfile
from pathlib import Path

import trio

from ._app import serve
from ._config import Config, config_from_args, without_password
from ._logs import configure as configure_logging
from ._memory import GcPolicy, enabled, tune_malloc
from ._store import SchemaTooNew, StoreError
from ._tls import load_context
from ._transport import open_listener

PROG = "chorus-server"
#: SQLite result codes that describe the file or the machine, not our SQL (``sqlite3.Error.sqlite_errorname``).
_SQLITE_ENVIRONMENT = ("SQLITE_CANTOPEN", "SQLITE_NOTADB", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY",
                       "SQLITE_PERM", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CORRUPT", "SQLITE_AUTH")


class StartupError(Exception):
    """The server could not start for a reason outside it; ``str()`` is the one line for the operator."""


async def _run(config: Config) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            try:
                server = await nursery.start(serve, config)
            except Exception as exc:  # only before it started: afterwards an escaping error is a bug
                problem = startup_problem(exc, config)
                if problem is None:
                    raise
                raise StartupError(problem) from exc
            # What survives start-up and each burst of logins lives long, yet every full collection would walk
            # it with the loop stopped (up to a second at 18,000 connections): freeze it (server/_memory.py).
            server.gc_policy = GcPolicy(server, active=enabled("CHORUS_GC_POLICY"))
            gc_scope = trio.CancelScope()  # ends with service: the nursery then waits for the drain alone
            nursery.start_soon(_run_in, gc_scope, server.gc_policy.run)
            scheme = "https" if config.tls_cert_file is not None else "http"
            ws = f", chat page on {scheme}://{config.host}:{server.ws_port}/" if server.ws_port else ""
            node = f", node {server.broker.node_id} via {without_password(config.broker)}" if config.broker else ""
            print(f"Chorus listening on {config.host}:{server.port}{ws} (data in {config.storage}{node})", flush=True)
            async for signum in signals:
                logging.getLogger("chorus.server").info("%s received", signal.Signals(signum).name)
                if signum == signal.SIGHUP:  # new certificate and key for new connections (a bad file: the old)
                    server.reload_tls()
                    continue
                server.shutdown()
                gc_scope.cancel()
                break


async def _run_in(scope: trio.CancelScope, fn) -> None:
    with scope:
        await fn()


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)  # a usage error prints its line and exits 2
    configure_logging(config.log_level, config.log_json)  # text or JSON lines, repeated lines rate-limited
    if enabled("CHORUS_MALLOC_TUNING"):
        tune_malloc()  # before any hashing thread has an arena
    try:
        problem = preflight(config)
        if problem is None:
            trio.run(_run, config)
            return 0
    except BaseException as exc:
        failure = only_exception(exc)
        if not isinstance(failure, StartupError):
            raise  # a bug (or Ctrl-C): its traceback is how it gets found
        problem = str(failure)
    print(f"{PROG}: error: {problem}", file=sys.stderr)
    return 1


def only_exception(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one: trio nurseries wrap what crosses them
    (``strict_exception_groups``); a group of several is returned as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def preflight(config: Config) -> str | None:
    """What would stop ``serve`` from starting, as one line (None if nothing): checked here, where it is
    clear which thing failed, rather than guessed from an exception out of the event loop."""
    return _check_data_dir(config) or _check_host(config) or _check_ports(config) or _check_tls(config)


def _check_tls(config: Config) -> str | None:
    """The certificate and key load (as ``Server`` loads them) when TLS is configured."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    try:
        load_context(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        return (f"cannot load the TLS certificate {config.tls_cert_file} and key {config.tls_key_file}: {exc}; "
                "check the paths and that the key matches the certificate (PEM)")
    return None


def _check_data_dir(config: Config) -> str | None:
    """The data directory exists (created 0700, as ``serve`` would) and this user can create files in it."""
    if config.store is not None:  # node mode keeps nothing in it
        return None
    path = Path(config.data_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return data_dir_problem(exc, config)
    if config.db_path.exists() and not config.db_path.is_file():
        return f"{config.db_path} is not a file; move it away or choose another --data-dir"
    return None


def _check_host(config: Config) -> str | None:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET  # as open_listener chooses
    try:
        socket.getaddrinfo(config.host, None, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return host_problem(exc, config)
    return None


def _check_ports(config: Config) -> str | None:
    """Bind each configured port once and let it go, with the listener's own code and options."""
    for port, what in ((config.port, "port"), (config.ws_port, "ws_port")):
        if not port:  # None (no bridge) or 0 (the kernel picks a free one): nothing to check
            continue
        try:
            listener = open_listener(config.host, port, reuse_port=config.reuse_port)
        except OSError as exc:
            return bind_problem(exc, config, [(port, what)])
        listener.socket.close()
    return _check_admin_port(config)


def _check_admin_port(config: Config) -> str | None:
    """The admin listener's port (server/_admin.py), on ``admin_host``, as trio binds it (SO_REUSEADDR)."""
    if not config.admin_port:
        return None
    family = socket.AF_INET6 if ":" in config.admin_host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((config.admin_host, config.admin_port))
            sock.listen()
    except OSError as exc:
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            return f"admin host {config.admin_host} is not an address of this machine; give --admin-host one"
        return bind_problem(exc, config, [(config.admin_port, "admin_port")])
    return None


def startup_problem(exc: BaseException, config: Config) -> str | None:
    """The one line for a failure of ``serve`` before it started, or None when it is not the machine's or
    the operator's doing (then it is a bug and keeps its traceback)."""
    exc = only_exception(exc)
    if isinstance(exc, socket.gaierror):
        return host_problem(exc, config)
    if isinstance(exc, OSError) and exc.filename is not None:  # mkdir, open: a path was refused
        return data_dir_problem(exc, config)
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
        # From a bind that passed the preflight, so freshly taken since; which listener's is unknown here.
        listeners = [(config.port, "port")] + ([(config.ws_port, "ws_port")] if config.ws_port is not None else [])
        return bind_problem(exc, config, listeners)
    if isinstance(exc, StoreError) and config.store is not None:  # PostgreSQL unreachable or refusing
        return f"store {config.storage}: {exc}; check that PostgreSQL runs there and --store"
    if isinstance(exc, StoreError):  # the store's word for "the database refused", naming the file
        return f"{exc}; check the file and the disk, or choose another --data-dir"
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorname", "").startswith(_SQLITE_ENVIRONMENT):
        return (f"cannot open {config.db_path}: {exc}; check the file and the disk, or choose another "
                f"--data-dir")
    if isinstance(exc, SchemaTooNew):
        return f"{exc}; run a newer chorus-server, or choose another {'--store' if config.store else '--data-dir'}"
    return None


def data_dir_problem(exc: OSError, config: Config) -> str:
    where = f"data dir {config.data_dir}"
    if isinstance(exc, FileExistsError):
        return f"{where} is a file, not a directory; choose another --data-dir"
    if isinstance(exc, NotADirectoryError):
        return f"{where} lies under a file, not a directory; choose another --data-dir"
    if isinstance(exc, PermissionError):
        return f"{where} is not writable by this user; fix its permissions or choose another --data-dir"
    return f"{where}: {exc.strerror or exc}; choose another --data-dir"


def host_problem(exc: socket.gaierror, config: Config) -> str:
    return (f"host {config.host} cannot be resolved ({exc.strerror or exc}); give --host an IP address or a "
            f"name this machine resolves")


def bind_problem(exc: OSError, config: Config, listeners: list[tuple[int, str]]) -> str:
    """``listeners``: (port, option) of the bind that failed, or of each that may have."""
    thing = " or ".join(f"{'WebSocket port' if what == 'ws_port' else 'port'} {port}" for port, what in listeners)
    flag = " or ".join("--" + what.replace("_", "-") for _, what in listeners)
    if exc.errno == errno.EADDRINUSE:
        return f"{thing} is in use (another chorus-server?); pick another with {flag}"
    if exc.errno == errno.EACCES:
        return (f"{thing} needs privileges this user lacks (ports below 1024 need root or CAP_NET_BIND_SERVICE); "
                f"pick another with {flag}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"host {config.host} is not an address of this machine; give --host one of its addresses, or "
                f"0.0.0.0 for every interface")
    return f"cannot listen on {config.host} ({thing}): {exc.strerror or exc}; check --host and {flag}"


if __name__ == "__main__":
    sys.exit(main())
