"""One typed configuration object: defaults < TOML file < command-line flags.

Every option is a field below with its unit in its name and its help text in
its metadata; ``chorus-server --help`` is generated from these fields, so the
help can never miss an option. Default limits live here and in proto/_const.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import proto

DEFAULT_PORT = 7420
DEFAULT_WS_PORT = 7421


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = _opt(DEFAULT_PORT, "TCP port for the Chorus protocol (0 picks a free one)")
    ws_port: int | None = _opt(None, "port for the WebSocket bridge and chat page (off when unset)")
    ws_allowed_origins: tuple[str, ...] = _opt((), "Origin values the WebSocket bridge accepts (empty: same host only)")
    data_dir: str = _opt("data", "directory of the SQLite database")
    sqlite_synchronous: str = _opt("FULL", "SQLite synchronous mode: FULL (durable on power loss) or NORMAL")
    max_frame_bytes: int = _opt(proto.DEFAULT_MAX_FRAME_BYTES, "largest frame a client may send")
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
    frame_timeout_s: float = _opt(30.0, "time a client has to finish a frame once its first byte arrived")
    max_pending_hashes: int = _opt(32, "password hashes waiting at once; further logins get SERVER_BUSY")
    login_free_failures: int = _opt(5, "failed logins per user name and per address before back-off starts")
    login_backoff_max_s: float = _opt(300.0, "longest back-off after repeated failed logins (it doubles up to this)")
    user_send_rate_per_s: float = _opt(20.0, "SENDs per second one user may make across all its connections")
    user_send_burst: int = _opt(40, "SENDs one user may make in a burst")
    rooms_created_per_hour: int = _opt(30, "rooms one user may create per hour")
    registrations_per_hour: int = _opt(20, "accounts one IP address may register per hour")
    registration: str = _opt("open", "who may REGISTER: open (anyone) or closed (nobody)")
    presence_offline_delay_s: float = _opt(3.0, "wait this long before announcing OFFLINE (a quick reconnect hides it)")
    max_page: int = _opt(100, "messages per history or sync page")
    max_inflight_sends: int = _opt(256, "unacknowledged sends per connection before reading pauses")
    session_ttl_s: int = _opt(30 * 86400, "lifetime of a session token; each resume renews it")
    argon2_time_cost: int = _opt(2, "argon2id passes")
    argon2_memory_kib: int = _opt(19456, "argon2id memory per hash, KiB")
    shutdown_grace_s: float = _opt(5.0, "time in-flight work gets on shutdown before connections are cut")
    reconnect_hint_ms: int = _opt(1000, "GOAWAY's reconnect-after hint on shutdown")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self):
        for name in ("ping_interval_s", "handshake_timeout_s", "auth_timeout_s", "rate_per_s", "rate_burst",
                     "max_frame_bytes", "max_body_bytes", "outbound_buffer_bytes", "max_page", "max_inflight_sends",
                     "max_connections", "max_connections_per_user", "session_ttl_s", "max_connections_per_address",
                     "frame_timeout_s", "max_pending_hashes", "login_backoff_max_s", "user_send_rate_per_s",
                     "user_send_burst", "rooms_created_per_hour", "registrations_per_hour"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0")
        if self.max_frame_bytes > proto.ABSOLUTE_MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be at most {proto.ABSOLUTE_MAX_FRAME_BYTES}")
        if self.sqlite_synchronous not in ("FULL", "NORMAL"):
            raise ValueError("sqlite_synchronous must be FULL or NORMAL")
        if self.registration not in ("open", "closed"):
            raise ValueError("registration must be open or closed")
        if self.login_free_failures < 0 or self.presence_offline_delay_s < 0:
            raise ValueError("login_free_failures and presence_offline_delay_s must be 0 or more")

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "chorus.db"

    def welcome(self) -> proto.Welcome:
        """The limits a client learns in WELCOME (spec §6)."""
        return proto.Welcome(
            version=proto.PROTOCOL_VERSION,
            server="chorus/0.1",
            max_frame_bytes=self.max_frame_bytes,
            max_body_bytes=self.max_body_bytes,
            ping_interval_ms=int(self.ping_interval_s * 1000),
            rate_per_s=min(self.rate_per_s, 0xFFFF),  # u16 on the wire; beyond that it is unlimited anyway
            rate_burst=min(self.rate_burst, 0xFFFF),
            max_rooms=self.max_rooms_per_user,
            max_page=self.max_page,
        )

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "Config":
        """Load a TOML file (top-level keys = field names); raises ValueError on unknown keys."""
        with open(path, "rb") as f:
            values = tomllib.load(f)
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
        if "ws_allowed_origins" in values:
            values = {**values, "ws_allowed_origins": tuple(values["ws_allowed_origins"])}
        return cls(**values)


def _parse_type(f: dataclasses.Field):
    kind = str(f.type)
    if "tuple" in kind:
        return lambda s: tuple(x for x in s.split(",") if x)
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus-server",
        description="Chorus chat server. Options come from defaults, then --config FILE (TOML), then flags.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    for f in dataclasses.fields(Config):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_parse_type(f),
            default=argparse.SUPPRESS,
            help=f.metadata["help"] + f" (default: {f.default!r})",
        )
    return parser


def config_from_args(argv: list[str] | None = None) -> Config:
    """Build the Config from the command line; raises SystemExit on bad flags or files."""
    parser = argument_parser()
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    try:
        return Config.from_toml(path, **args) if path else Config.from_dict(args)
    except (OSError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
        parser.error(str(exc))
