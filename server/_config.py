"""One typed configuration object: defaults < TOML file < command-line flags.

Every option is a field below with its unit in its name and its help text in
its metadata; ``chorus-server --help`` is generated from these fields, so the
help can never miss an option. Default limits live here and in proto/_const.py.

Every value is checked where the Config is built (STYLE.md §19): its type against
the field's annotation, its range, and whether the replies it shapes can be encoded
at all (WELCOME's field widths and the largest page, proto/_wire.py, spec §2.3 and
§6). A mistake raises ``ConfigError``, whose text is the one line the operator sees:
it names the option as they wrote it (``--max-page``, or ``max_page`` in the file,
prefixed by the file's name) and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import socket
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import chorus
from chorus import proto

DEFAULT_PORT = 7420
DEFAULT_WS_PORT = 7421
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SQLITE_SYNCHRONOUS = ("FULL", "NORMAL")
REGISTRATION = ("open", "invite", "closed")
STORE_SCHEMES = ("postgresql://", "postgres://")
BROKER_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_PORT = proto.MAX_PORT
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
#: A token outliving a century is a typo; the bound also keeps its expiry in ms far inside SQLite's int64.
MAX_SESSION_TTL_S = 100 * 365 * 86400
#: argon2 refuses fewer passes or less memory (8 KiB per lane, one lane) when it first hashes.
MIN_ARGON2_TIME_COST = 1
MIN_ARGON2_MEMORY_KIB = 8


def page_frame_bytes(max_page: int, max_body_bytes: int) -> int:
    """Body bytes of the largest SYNC_PAGE or HISTORY_PAGE: ``max_page`` messages of ``max_body_bytes`` each.

    From the wire layout (proto/_wire.py FIELDS; tests/test_config.py encodes such a page and compares):
    the page is conversation, u16 message count, the messages, has_more (u8). Names are u8-length-prefixed.
    """
    name = 1 + proto.MAX_NAME_BYTES
    conversation = 1 + name  # kind u8, name
    message = 8 + 8 + name + 8 + 2 + max_body_bytes  # seq u64, ts_ms u64, sender, client_msg_id u64, u16-prefixed body
    return conversation + 2 + max_page * message + 1


class ConfigError(ValueError):
    """An operator's mistake in an option; ``str()`` is the one line to show them.

    ``option`` is the key the mistake is about (None when it is about several, or about the file);
    ``problem`` is the text after it, or a function that builds the text given ``name(option)``, so that the
    options it mentions read as the operator wrote them. The loaders fill in where each option came from.
    """

    def __init__(self, option: str | None, problem: str | Callable[[Callable[[str], str]], str]) -> None:
        super().__init__(option, problem)
        self.option = option
        self.problem = problem
        self.file: str | None = None  # the TOML file, when one was read
        self.file_keys: frozenset[str] = frozenset()  # keys whose value came from that file
        self.flag_keys: frozenset[str] = frozenset()  # keys whose value came from a command-line flag
        self.command_line = False  # the operator gave flags (and maybe a file), so defaults are named as flags

    def name(self, option: str) -> str:
        """``option`` as the operator would write it: ``--max-page`` on a command line without a file (or for a
        flag they gave), else ``max_page``, the key in their file or in ``Config.from_dict``."""
        flag = option in self.flag_keys or (self.command_line and self.file is None)
        return "--" + option.replace("_", "-") if flag else option

    def __str__(self) -> str:
        named: list[str] = []

        def name(option: str) -> str:
            named.append(option)
            return self.name(option)

        text = self.problem if isinstance(self.problem, str) else self.problem(name)
        if self.option is not None:
            text = f"{name(self.option)}: {text}"
        if self.file is not None and any(option in self.file_keys for option in named):
            text = f"{self.file}: {text}"
        return text


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = _opt(DEFAULT_PORT, "TCP port for the Chorus protocol (0 picks a free one)")
    ws_port: int | None = _opt(None, "port for the WebSocket bridge and chat page (off when unset)")
    ws_allowed_origins: tuple[str, ...] = _opt((), "Origin values the WebSocket bridge accepts (empty: the configured "
                                                   "host and WebSocket port, plus localhost names if it is loopback)")
    data_dir: str = _opt("data", "directory of the SQLite database")
    store: str | None = _opt(None, "node mode: PostgreSQL URL (postgresql://user@host/db) of the store shared by every "
                                   "node; unset: the SQLite database in data_dir")
    broker: str | None = _opt(None, "node mode: Redis URL (redis://host:port/db) of the broker that links the nodes; "
                                    "unset: in-process (one node)")
    broker_prefix: str = _opt("chorus", "node mode: prefix of every Redis key and channel (clusters sharing one Redis "
                                        "need different ones)")
    node_id: str | None = _opt(None, "node mode: this node's name in the registry (default: host name and process id)")
    advertise_host: str | None = _opt(None, "node mode: the host name or address clients are told to reach this node "
                                            "at (NODES); default: host, or this machine's name if host is 0.0.0.0")
    reuse_port: bool = _opt(False, "share the ports with other processes (SO_REUSEPORT): several nodes on one machine")
    node_ttl_s: float = _opt(10.0, "node mode: a node silent this long is dead; its users go offline")
    pg_pool_size: int = _opt(4, "node mode: PostgreSQL connections per node (one writes, the rest read)")
    sqlite_synchronous: str = _opt("FULL", "SQLite synchronous mode: FULL (durable on power loss) or NORMAL")
    max_frame_bytes: int = _opt(proto.DEFAULT_MAX_FRAME_BYTES, "largest frame a client may send; above 1 MiB also "
                                                               "the largest the server sends (a full page must fit)")
    max_body_bytes: int = _opt(4096, "largest message body, in UTF-8 bytes")
    outbound_buffer_bytes: int = _opt(4 << 20, "bytes queued for a client before it is closed as a slow consumer")
    ping_interval_s: float = _opt(15.0, "send PING after this long without hearing from a client")
    max_missed_pings: int = _opt(2, "unanswered PINGs before a connection is closed as stale")
    handshake_timeout_s: float = _opt(10.0, "time a new connection has to send HELLO")
    auth_timeout_s: float = _opt(30.0, "time a new connection has to authenticate")
    rate_per_s: int = _opt(50, "frames per second a connection may send (token bucket refill)")
    rate_burst: int = _opt(100, "token bucket size")
    max_rate_violations: int = _opt(20, "refused frames in a row before the connection is closed")
    max_rooms_per_user: int = _opt(100, "rooms one user may be a member of")
    max_connections_per_user: int = _opt(8, "simultaneous connections of one user")
    max_connections: int = _opt(10000, "simultaneous connections in total (kept below the open-file limit)")
    max_connections_per_address: int = _opt(256, "simultaneous connections from one IP address, both ports and the "
                                                  "HTTP phase included (a NAT hides many people behind one)")
    connections_per_s_per_address: float = _opt(20.0, "new connections per second from one IP address, sustained")
    connection_burst_per_address: int = _opt(100, "new connections from one IP address in a burst")
    frame_timeout_s: float = _opt(30.0, "time a client has to finish a frame once its first byte arrived")
    max_pending_hashes: int = _opt(32, "password hashes waiting at once; further logins get SERVER_BUSY")
    throttle_delay_s: float = _opt(1.0, "a throttled LOGIN or REGISTER is refused after at most this long, so a "
                                        "guesser cannot make the server answer thousands of refusals a second")
    login_free_failures: int = _opt(5, "failed logins per user name and per address before back-off starts")
    login_backoff_max_s: float = _opt(300.0, "longest back-off after repeated failed logins (it doubles up to this)")
    user_send_rate_per_s: float = _opt(20.0, "SENDs per second one user may make across all its connections")
    user_send_burst: int = _opt(40, "SENDs one user may make in a burst")
    rooms_created_per_hour: int = _opt(30, "rooms one user may create per hour")
    registrations_per_hour: int = _opt(20, "accounts one IP address may register per hour")
    registration: str = _opt("open", "who may REGISTER: open (anyone), invite (REGISTER_INVITE with a one-time code "
                                     "from chorus-admin invites create) or closed (nobody)")
    presence_offline_delay_s: float = _opt(3.0, "wait this long before announcing OFFLINE (a quick reconnect hides it)")
    max_page: int = _opt(100, "messages per history or sync page")
    max_inflight_sends: int = _opt(256, "unacknowledged sends per connection before reading pauses")
    max_batch: int = _opt(512, "messages stored in one transaction at most (group commit: batches grow with load "
                               "up to this, sharing one fsync)")
    busy_retry_ms: int = _opt(1000, "retry-after hint of SERVER_BUSY when storage refuses a request")
    session_ttl_s: int = _opt(30 * 86400, "lifetime of a session token; each resume renews it")
    argon2_time_cost: int = _opt(2, "argon2id passes")
    argon2_memory_kib: int = _opt(19456, "argon2id memory per hash, KiB")
    shutdown_grace_s: float = _opt(5.0, "time in-flight work gets on shutdown before connections are cut")
    reconnect_hint_ms: int = _opt(1000, "GOAWAY's reconnect-after hint on shutdown")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_json: bool = _opt(False, "log one JSON object per line instead of text")
    admin_host: str = _opt("127.0.0.1", "address of the admin HTTP listener (/metrics, /healthz, /readyz)")
    admin_port: int | None = _opt(None, "port of the admin HTTP listener: Prometheus metrics and health (off when "
                                        "unset; keep it off the public network)")
    tls_cert_file: str | None = _opt(None, "PEM certificate chain: TLS on the Chorus port and HTTPS/WSS on the web "
                                           "port (reloaded on SIGHUP)")
    tls_key_file: str | None = _opt(None, "PEM private key of tls_cert_file")

    def __post_init__(self) -> None:
        """Check every value; raises ``ConfigError`` naming the first wrong one and the fix."""
        for f in dataclasses.fields(self):
            value = _typed(f.name, _HINTS[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # an int where a float goes becomes a float; a list a tuple
        for name in _FLOAT_FIELDS:
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(name, f"must be a finite number, not {getattr(self, name)}")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be above 0, not {getattr(self, name)}")
        for name in _NOT_NEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be 0 or more, not {getattr(self, name)}")
        self._check_choices()
        self._check_ranges()
        self._check_encodable()

    def _check_choices(self) -> None:
        if not self.host.strip():
            raise ConfigError("host", "must not be empty; use an address such as 127.0.0.1 (0.0.0.0 for every "
                                      "interface)")
        if not self.data_dir.strip():
            raise ConfigError("data_dir", "must not be empty; name the directory for the database")
        for name, choices in (("log_level", LOG_LEVELS), ("sqlite_synchronous", SQLITE_SYNCHRONOUS)):
            value = getattr(self, name)
            if value.upper() not in choices:
                raise ConfigError(name, f"must be one of {', '.join(choices)}, not {_shown(value)}")
            object.__setattr__(self, name, value.upper())  # case does not matter to the operator
        for name, schemes, what in (("store", STORE_SCHEMES, "PostgreSQL"), ("broker", BROKER_SCHEMES, "Redis")):
            value = getattr(self, name)
            if value is not None and not value.startswith(schemes):
                raise ConfigError(name, f"must be a {what} URL starting with {' or '.join(schemes)}, not "
                                        f"{_shown(without_password(value))}")
        if not (self.broker_prefix and self.broker_prefix.isprintable() and " " not in self.broker_prefix):
            raise ConfigError("broker_prefix", "must be printable text without spaces")
        if self.node_id is not None and not (0 < len(self.node_id.encode()) <= proto.MAX_NAME_BYTES
                                             and self.node_id.isprintable()):
            raise ConfigError("node_id", f"must be 1..{proto.MAX_NAME_BYTES} bytes of printable text")
        if self.registration not in REGISTRATION:
            raise ConfigError("registration", f"must be one of {', '.join(REGISTRATION)}, not "
                                              f"{_shown(self.registration)}")

    def _check_ranges(self) -> None:
        """Ranges of single values: ports, and what the WELCOME fields and the store can hold."""
        for name in ("port", "ws_port", "admin_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_PORT:
                raise ConfigError(name, f"must be 0..{MAX_PORT} (0 picks a free port), not {value}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(None, lambda name: f"{name('tls_cert_file')} and {name('tls_key_file')} go together; "
                                                 f"give both, or neither for no TLS")
        if self.ws_port is not None and self.ws_port == self.port != 0:
            raise ConfigError(None, lambda name: f"{name('ws_port')} and {name('port')} are both {self.port}; "
                                                 f"give the WebSocket bridge a port of its own")
        limits = (  # name, largest value, why
            ("max_frame_bytes", proto.ABSOLUTE_MAX_FRAME_BYTES, "the most any peer must accept, spec §2.3"),
            ("max_body_bytes", proto.MAX_BODY_BYTES, "a body's length is a u16 on the wire"),
            ("max_page", proto.MAX_LIST_ITEMS, "the most items a list on the wire may hold"),
            ("max_rooms_per_user", _U16_MAX, "WELCOME carries it as a u16"),
            ("reconnect_hint_ms", _U32_MAX, "GOAWAY carries it as a u32"),
            ("busy_retry_ms", _U32_MAX, "ERROR carries it as a u32"),
            ("session_ttl_s", MAX_SESSION_TTL_S, "100 years"),
        )
        for name, most, why in limits:
            if getattr(self, name) > most:
                raise ConfigError(name, f"must be at most {most} ({why}), not {getattr(self, name)}")
        if self.ping_interval_s * 1000 > _U32_MAX:
            raise ConfigError("ping_interval_s", f"must be at most {_U32_MAX // 1000} (WELCOME carries it in ms as "
                                                 f"a u32), not {self.ping_interval_s}")
        if self.argon2_time_cost < MIN_ARGON2_TIME_COST:
            raise ConfigError("argon2_time_cost", f"must be at least {MIN_ARGON2_TIME_COST}, not "
                                                  f"{self.argon2_time_cost}")
        if self.argon2_memory_kib < MIN_ARGON2_MEMORY_KIB:
            raise ConfigError("argon2_memory_kib", f"must be at least {MIN_ARGON2_MEMORY_KIB}, not "
                                                   f"{self.argon2_memory_kib}")

    def _check_encodable(self) -> None:
        """A full history or sync page must fit in a frame the server may send (issue 9 item 1)."""
        need = page_frame_bytes(self.max_page, self.max_body_bytes)
        if need <= self.outbound_frame_bytes:
            return

        def problem(name: Callable[[str], str]) -> str:
            fix = f"lower {name('max_body_bytes')} or {name('max_page')}"
            if need <= proto.ABSOLUTE_MAX_FRAME_BYTES:
                fix += f", or raise {name('max_frame_bytes')} to {need} or more"
            return (f"a full history page ({self.max_page} messages of {self.max_body_bytes} bytes) needs a "
                    f"{need}-byte frame, more than the {self.outbound_frame_bytes} allowed; {fix}")

        raise ConfigError(None, problem)

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "chorus.db"

    @property
    def advertised_host(self) -> str:
        """Where other nodes' clients reach this node (NODES, spec §9.14)."""
        if self.advertise_host:
            return self.advertise_host
        return socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def storage(self) -> str:
        """Where the data is, for logs and the start-up line (a URL's password is never shown)."""
        if self.store is not None:
            return without_password(self.store)
        return str(self.db_path)

    @property
    def outbound_frame_bytes(self) -> int:
        """Largest frame body the server may send: every client accepts 1 MiB, and more if WELCOME says so
        (spec §2.3)."""
        return max(proto.DEFAULT_MAX_FRAME_BYTES, self.max_frame_bytes)

    def welcome(self) -> proto.Welcome:
        """The limits a client learns in WELCOME (spec §6)."""
        return proto.Welcome(
            version=proto.PROTOCOL_VERSION,
            server=f"chorus/{chorus.__version__}",
            max_frame_bytes=self.max_frame_bytes,
            max_body_bytes=self.max_body_bytes,
            ping_interval_ms=int(self.ping_interval_s * 1000),
            rate_per_s=min(self.rate_per_s, 0xFFFF),  # u16 on the wire; beyond that it is unlimited anyway
            rate_burst=min(self.rate_burst, 0xFFFF),
            max_rooms=self.max_rooms_per_user,
            max_page=self.max_page,
        )

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> Config:
        """Load a TOML file (top-level keys = field names), with ``overrides`` (flag values) over it.

        Raises ``ConfigError`` naming the file when it cannot be read or is not TOML (with the line), and the
        key when it is unknown (with the closest known key), of the wrong type or out of range.
        """
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(None, f"{path}: cannot read the config file: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(None, f"{path}: not valid TOML: {exc}") from None
        try:
            return cls.from_dict({**values, **overrides})
        except ConfigError as exc:
            exc.file = str(path)
            exc.file_keys = frozenset(values) - frozenset(overrides)
            raise

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """A Config from option names and values; raises ``ConfigError`` (a ``ValueError``) on a mistake."""
        unknown = sorted(set(values) - _HINTS.keys())
        if unknown:
            def problem(name: Callable[[str], str]) -> str:
                return "unknown option " + ", ".join(name(key) + _suggestion(key, _HINTS) for key in unknown)

            raise ConfigError(None, problem)
        return cls(**values)


#: Field name -> its type, resolved from the annotations (strings, given ``from __future__ import annotations``).
_HINTS: dict[str, Any] = typing.get_type_hints(Config)
_FLOAT_FIELDS = tuple(name for name, hint in _HINTS.items() if hint is float)
_POSITIVE = ("ping_interval_s", "handshake_timeout_s", "auth_timeout_s", "rate_per_s", "rate_burst",
             "max_frame_bytes", "max_body_bytes", "outbound_buffer_bytes", "max_page", "max_inflight_sends",
             "max_connections", "max_connections_per_user", "session_ttl_s", "max_connections_per_address",
             "frame_timeout_s", "max_pending_hashes", "login_backoff_max_s", "user_send_rate_per_s",
             "user_send_burst", "rooms_created_per_hour", "registrations_per_hour", "max_missed_pings",
             "connections_per_s_per_address", "connection_burst_per_address", "max_batch", "busy_retry_ms",
             "node_ttl_s", "pg_pool_size")
_NOT_NEGATIVE = ("login_free_failures", "throttle_delay_s", "presence_offline_delay_s", "max_rate_violations",
                 "shutdown_grace_s", "max_rooms_per_user", "reconnect_hint_ms")


def _base(hint: Any) -> tuple[Any, bool]:
    """``(type, optional)``: ``int | None`` is ``(int, True)``."""
    args = typing.get_args(hint)
    if type(None) in args:
        (rest,) = [arg for arg in args if arg is not type(None)]
        return rest, True
    return hint, False


def _expected(hint: Any) -> str:
    base, _ = _base(hint)
    if typing.get_origin(base) is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", str: "a string"}[base]


def _typed(name: str, hint: Any, value: Any) -> Any:
    """``value`` as field ``name`` holds it, or ``ConfigError`` naming the type expected. A bool is no number."""
    base, optional = _base(hint)
    if value is None and optional:
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected true or false, got {_shown(value)}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int and number and isinstance(value, int):
        return value
    if base is float and number:
        return float(value)
    if base is str and isinstance(value, str):
        return value
    if typing.get_origin(base) is tuple and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if base not in (int, float, str) and typing.get_origin(base) is not tuple:
        raise TypeError(f"Config.{name}: no check for {hint!r}; teach _typed and _flag_type")  # a bug, not a mistake
    raise ConfigError(name, f"expected {_expected(hint)}, got {_shown(value)}")


def without_password(url: str) -> str:
    """``url`` with any password replaced by ``***``: it is shown in errors and logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def _shown(value: Any) -> str:
    """``value`` as TOML would write it, clipped: the message stays one short line whatever was given."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (list, tuple)):
        text = "a list"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _suggestion(given: str, known: typing.Iterable[str], dash: str = "_") -> str:
    """`` (did you mean ws_port?)`` for the known name closest to ``given``, compared with ``-`` and ``_`` alike;
    ``dash`` is the separator the known names use."""
    def key(name: str) -> str:  # the leading "--" of flags would make every pair look alike
        return name.lstrip("-").replace("-", "_").lower()

    by_key = {key(name): name for name in known}
    close = difflib.get_close_matches(key(given), by_key, n=1, cutoff=0.6)
    return f" (did you mean {by_key[close[0]]}?)" if close else ""


def _flag_type(name: str, hint: Any) -> Callable[[str], Any]:
    """The argparse ``type`` for a field: text to the field's type, with the same words as a TOML type error."""
    base, _ = _base(hint)
    if typing.get_origin(base) is tuple:
        return lambda text: tuple(x for x in text.split(",") if x)
    if base is str:
        return str
    if base not in (int, float):
        raise TypeError(f"Config.{name}: no flag type for {hint!r}")

    def parse(text: str) -> Any:
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_expected(hint)}, got {text!r}") from None

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line without the usage block, and an unknown flag gets a suggestion."""

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        message = message.strip().removeprefix("argument ")  # "--port: expected an integer", like ours
        if message.startswith(prefix):
            flags = [opt for action in self._actions for opt in action.option_strings if opt.startswith("--")]
            given = [word for word in message[len(prefix):].split() if word.startswith("--")]
            message += next((hint for word in given if (hint := _suggestion(word.split("=", 1)[0], flags))), "")
        self.exit(2, f"{self.prog}: error: {message}\n")


def argument_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chorus-server",
        description="Chorus chat server. Options come from defaults, then --config FILE (TOML), then flags.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    for f in dataclasses.fields(Config):
        if _HINTS[f.name] is bool:  # a switch: --reuse-port turns it on (the file may say false)
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true",
                                default=argparse.SUPPRESS, help=f.metadata["help"])
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_flag_type(f.name, _HINTS[f.name]),
            default=argparse.SUPPRESS,
            help=f.metadata["help"] + f" (default: {f.default!r})",
        )
    return parser


def config_from_args(argv: list[str] | None = None) -> Config:
    """Build the Config from the command line.

    On a mistake in a flag, the file or a value, prints one line to stderr and raises ``SystemExit(2)``.
    """
    parser = argument_parser()
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    try:
        return Config.from_toml(path, **args) if path else Config.from_dict(args)
    except ConfigError as exc:
        exc.flag_keys = frozenset(args)
        exc.command_line = True
        parser.error(str(exc))
