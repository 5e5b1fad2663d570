"""Config: defaults < TOML file < command-line flags; --help documents every option; every mistake is one line
naming the option as the operator wrote it, and a config whose replies the wire cannot carry is refused."""
from __future__ import annotations

import dataclasses

import pytest

from chorus import proto
from chorus.server import Config, config_from_args
from chorus.server._config import ConfigError, argument_parser, page_frame_bytes


def test_defaults_toml_and_flags_layer(tmp_path):
    path = tmp_path / "chorus.toml"
    path.write_text('port = 9100\nmax_body_bytes = 2048\nws_allowed_origins = ["https://chat.example"]\n'
                    "ping_interval_s = 20\n")
    config = config_from_args(["--config", str(path), "--max-body-bytes", "1024", "--log-level", "debug"])
    assert config.port == 9100  # from the file
    assert config.max_body_bytes == 1024  # the flag wins over the file
    assert config.ping_interval_s == 20.0 and isinstance(config.ping_interval_s, float)  # an int is a fine float
    assert config.ws_allowed_origins == ("https://chat.example",)
    assert config.log_level == "DEBUG"  # case does not matter
    assert config.max_frame_bytes == Config().max_frame_bytes  # untouched default


def usage_error(capsys, argv: list[str]) -> str:
    """The one line ``config_from_args`` prints for a mistake (exit status 2, no usage block)."""
    with pytest.raises(SystemExit) as exit:
        config_from_args(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith("chorus-server: error: ")
    return err.removeprefix("chorus-server: error: ").rstrip("\n")


@pytest.mark.parametrize("text, line", [
    ("prot = 1\n", "unknown option prot (did you mean port?)"),
    ("ws-port = 7421\n", "unknown option ws-port (did you mean ws_port?)"),
    ("max-page = 5\nbogus = 1\n", "unknown option bogus, max-page (did you mean max_page?)"),
    ('port = "x"\n', 'port: expected an integer, got "x"'),
    ("port = true\n", "port: expected an integer, got true"),  # a bool is not an int
    ("port = 1.5\n", "port: expected an integer, got 1.5"),
    ('ping_interval_s = "15"\n', 'ping_interval_s: expected a number, got "15"'),
    ("host = 127\n", "host: expected a string, got 127"),
    ('ws_allowed_origins = "https://a.example"\n', 'ws_allowed_origins: expected a list of strings, got '
                                                   '"https://a.example"'),
    ("ws_allowed_origins = [1]\n", "ws_allowed_origins: expected a list of strings, got a list"),
    ("ws_port = [7421]\n", "ws_port: expected an integer, got a list"),
    ("port = 99999\n", "port: must be 0..65535 (0 picks a free port), not 99999"),
    ('log_level = "LOUD"\n', 'log_level: must be one of DEBUG, INFO, WARNING, ERROR, not "LOUD"'),
])
def test_a_file_mistake_names_the_file_and_the_key(tmp_path, capsys, text, line):
    path = tmp_path / "chorus.toml"
    path.write_text(text)
    assert usage_error(capsys, ["--config", str(path)]) == f"{path}: {line}"


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path, capsys):
    path = tmp_path / "chorus.toml"
    path.write_text("port = 7420\nhost = \n")
    line = usage_error(capsys, ["--config", str(path)])
    assert line.startswith(f"{path}: not valid TOML: ") and "line 2" in line


def test_a_missing_config_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    assert usage_error(capsys, ["--config", str(missing)]) == \
        f"{missing}: cannot read the config file: No such file or directory"


@pytest.mark.parametrize("argv, line", [
    (["--port", "99999"], "--port: must be 0..65535 (0 picks a free port), not 99999"),
    (["--port", "x"], "--port: expected an integer, got 'x'"),
    (["--ping-interval-s", "soon"], "--ping-interval-s: expected a number, got 'soon'"),
    (["--log-level", "LOUD"], '--log-level: must be one of DEBUG, INFO, WARNING, ERROR, not "LOUD"'),
    (["--ws_port", "7421"], "unrecognized arguments: --ws_port 7421 (did you mean --ws-port?)"),
    (["--max-bdy-bytes", "10"], "unrecognized arguments: --max-bdy-bytes 10 (did you mean --max-body-bytes?)"),
    (["--ws-port", "7420"], "--ws-port and --port are both 7420; give the WebSocket bridge a port of its own"),
])
def test_a_flag_mistake_is_one_line_naming_the_flag(capsys, argv, line):
    assert usage_error(capsys, argv) == line


@pytest.mark.parametrize("flags", [["--ping-interval-s", "0"], ["--max-frame-bytes", "99999999"],
                                   ["--sqlite-synchronous", "OFF"], ["--rate-per-s", "-1"], ["--host", " "],
                                   ["--max-rooms-per-user", "70000"], ["--ping-interval-s", "inf"],
                                   ["--ping-interval-s", "5000000"], ["--reconnect-hint-ms", "5000000000"],
                                   ["--argon2-memory-kib", "4"], ["--argon2-time-cost", "0"],
                                   ["--registration", "maybe"], ["--login-free-failures", "-1"],
                                   ["--max-missed-pings", "0"], ["--data-dir", ""]])
def test_nonsense_values_are_refused(flags, capsys):
    line = usage_error(capsys, flags)
    assert line.startswith(flags[0] + ": must "), line  # names the flag, then what it must be


def test_a_file_key_under_a_flag_is_named_as_the_flag(tmp_path, capsys):
    path = tmp_path / "chorus.toml"
    path.write_text("port = 9100\n")
    # The file's port is fine; the flag over it is not, so the flag is what the line names (no file prefix).
    assert usage_error(capsys, ["--config", str(path), "--port", "-1"]) == \
        "--port: must be 0..65535 (0 picks a free port), not -1"


def test_from_dict_and_the_constructor_check_types_and_ranges():
    with pytest.raises(ConfigError) as error:
        Config.from_dict({"port": "7420"})
    assert str(error.value) == 'port: expected an integer, got "7420"'
    with pytest.raises(ValueError, match="port: expected an integer, got true"):  # still a ValueError
        Config(port=True)
    with pytest.raises(ConfigError, match=r"^unknown option ws-port \(did you mean ws_port\?\)$"):
        Config.from_dict({"ws-port": 1})
    assert Config.from_dict({"ws_allowed_origins": ["https://a.example"]}).ws_allowed_origins == ("https://a.example",)
    assert Config(ws_port=None).ws_port is None  # int | None takes None from code (TOML has no null)


def test_help_documents_every_option():
    text = argument_parser().format_help()
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text


def test_welcome_reflects_limits():
    welcome = Config(max_frame_bytes=4096, max_body_bytes=100, ping_interval_s=3, rate_per_s=10**6).welcome()
    assert (welcome.max_frame_bytes, welcome.max_body_bytes, welcome.ping_interval_ms) == (4096, 100, 3000)
    assert welcome.rate_per_s == 0xFFFF  # capped to the u16 field


# --- encodability (issue 9 item 1): what the config shapes must fit its wire fields -----------------------

def test_page_frame_bytes_is_the_size_of_a_real_page():
    """The helper's layout against the encoder's: a full page of maximal names and bodies, uncompressed."""
    name = "n" * proto.MAX_NAME_BYTES
    for max_page, max_body_bytes in ((1, 0), (3, 50), (20, 4096)):
        messages = tuple(proto.StoredMessage(2**64 - 1, 2**64 - 1, name, 2**64 - 1, "b" * max_body_bytes)
                         for _ in range(max_page))
        for page in (proto.HistoryPage(proto.Conversation.room(name), messages, True),
                     proto.SyncPage(proto.Conversation.direct(name), messages, False)):
            frame = proto.encode(page, compress_threshold=None)
            assert len(frame) - proto.HEADER_BYTES == page_frame_bytes(max_page, max_body_bytes)


def test_a_page_too_big_for_a_frame_is_refused_with_what_to_change(capsys):
    need = page_frame_bytes(100, 20000)
    assert need > proto.DEFAULT_MAX_FRAME_BYTES
    assert usage_error(capsys, ["--max-body-bytes", "20000"]) == (
        f"a full history page (100 messages of 20000 bytes) needs a {need}-byte frame, more than the 1048576 "
        f"allowed; lower --max-body-bytes or --max-page, or raise --max-frame-bytes to {need} or more")
    with pytest.raises(ConfigError, match="max_page: must be at most 1000"):
        Config(max_page=70000)  # crashed on the first HELLO: WELCOME's max_page is a u16
    with pytest.raises(ConfigError, match="max_body_bytes: must be at most 65535"):
        Config(max_body_bytes=70000, max_frame_bytes=proto.ABSOLUTE_MAX_FRAME_BYTES)


def test_a_consistent_bigger_frame_is_accepted():
    need = page_frame_bytes(100, 20000)
    config = Config(max_body_bytes=20000, max_frame_bytes=need)
    assert config.outbound_frame_bytes == need
    with pytest.raises(ConfigError, match=f"raise max_frame_bytes to {need} or more"):
        Config(max_body_bytes=20000, max_frame_bytes=need - 1)
    # Below 1 MiB a small max_frame_bytes limits what clients send, not what they accept (spec §2.3).
    assert Config(max_frame_bytes=256).outbound_frame_bytes == proto.DEFAULT_MAX_FRAME_BYTES


def test_a_page_beyond_any_frame_offers_no_impossible_fix():
    with pytest.raises(ConfigError) as error:
        Config(max_page=1000, max_body_bytes=65535, max_frame_bytes=proto.ABSOLUTE_MAX_FRAME_BYTES)
    assert str(error.value).endswith("lower max_body_bytes or max_page")


def test_the_largest_accepted_values_encode():
    """At every bound the config accepts, WELCOME and a full page still encode (and one past is refused)."""
    body = (proto.ABSOLUTE_MAX_FRAME_BYTES - page_frame_bytes(proto.MAX_LIST_ITEMS, 0)) // proto.MAX_LIST_ITEMS
    config = Config(max_page=proto.MAX_LIST_ITEMS, max_body_bytes=body, max_frame_bytes=proto.ABSOLUTE_MAX_FRAME_BYTES,
                    max_rooms_per_user=0xFFFF, ping_interval_s=0xFFFF_FFFF // 1000, reconnect_hint_ms=0xFFFF_FFFF)
    proto.encode(config.welcome())
    proto.encode(proto.GoAway(proto.CloseReason.SHUTDOWN, config.reconnect_hint_ms, "bye"))
    page = proto.HistoryPage(proto.Conversation.room("n" * 32),
                             (proto.StoredMessage(1, 1, "n" * 32, 1, "b" * body),) * config.max_page, False)
    proto.encode(page, max_frame_bytes=config.outbound_frame_bytes, compress_threshold=None)
    for past in ({"max_rooms_per_user": 0x10000}, {"ping_interval_s": 0xFFFF_FFFF / 1000 + 0.001},
                 {"reconnect_hint_ms": 0x1_0000_0000}, {"max_body_bytes": body + 1}):
        with pytest.raises(ConfigError):
            dataclasses.replace(config, **past)


def test_node_mode_options_from_flags_and_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('store = "postgresql://chorus:s3cret@db.example/chorus"\nbroker = "redis://127.0.0.1:6379/0"\n'
                    'reuse_port = true\nnode_id = "a1"\n')
    config = config_from_args(["--config", str(path)])
    assert (config.store, config.broker, config.reuse_port, config.node_id) == (
        "postgresql://chorus:s3cret@db.example/chorus", "redis://127.0.0.1:6379/0", True, "a1")
    assert config.storage == "postgresql://chorus:***@db.example/chorus"  # what logs and the start-up line show
    assert config_from_args(["--reuse-port"]).reuse_port is True  # a switch, without a value
    assert config_from_args([]).reuse_port is False
    assert Config().storage.endswith("chorus.db")


@pytest.mark.parametrize(("values", "line"), [
    ({"store": "mysql://root:hunter2@db/x"}, 'store: must be a PostgreSQL URL starting with postgresql:// or '
                                             'postgres://, not "mysql://root:***@db/x"'),
    ({"broker": "nats://127.0.0.1"}, "broker: must be a Redis URL starting with redis:// or rediss:// or unix://"),
    ({"reuse_port": 1}, "reuse_port: expected true or false, got 1"),
    ({"node_id": ""}, "node_id: must be 1..32 bytes of printable text"),
    ({"node_id": "a\nb"}, "node_id: must be 1..32 bytes of printable text"),
    ({"pg_pool_size": 0}, "pg_pool_size: must be above 0, not 0"),
])
def test_node_mode_mistakes_are_one_line_without_the_password(values, line):
    with pytest.raises(ConfigError) as exc:
        Config.from_dict(values)
    assert str(exc.value).startswith(line)
    assert "hunter2" not in str(exc.value)
