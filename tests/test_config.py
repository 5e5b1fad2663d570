"""Config: defaults < TOML file < command-line flags; --help documents every option."""
from __future__ import annotations

import dataclasses

import pytest

from server import Config, config_from_args
from server._config import argument_parser


def test_defaults_toml_and_flags_layer(tmp_path):
    path = tmp_path / "chorus.toml"
    path.write_text('port = 9100\nmax_body_bytes = 2048\nws_allowed_origins = ["https://chat.example"]\n')
    config = config_from_args(["--config", str(path), "--max-body-bytes", "1024", "--ping-interval-s", "2.5"])
    assert config.port == 9100  # from the file
    assert config.max_body_bytes == 1024  # the flag wins over the file
    assert config.ping_interval_s == 2.5
    assert config.ws_allowed_origins == ("https://chat.example",)
    assert config.max_frame_bytes == Config().max_frame_bytes  # untouched default


def test_unknown_toml_key_is_an_error(tmp_path, capsys):
    path = tmp_path / "chorus.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(SystemExit):
        config_from_args(["--config", str(path)])
    assert "unknown option(s): prot" in capsys.readouterr().err


def test_help_documents_every_option():
    text = argument_parser().format_help()
    for field in dataclasses.fields(Config):
        assert "--" + field.name.replace("_", "-") in text


def test_welcome_reflects_limits():
    welcome = Config(max_frame_bytes=4096, max_body_bytes=100, ping_interval_s=3, rate_per_s=10**6).welcome()
    assert (welcome.max_frame_bytes, welcome.max_body_bytes, welcome.ping_interval_ms) == (4096, 100, 3000)
    assert welcome.rate_per_s == 0xFFFF  # capped to the u16 field


@pytest.mark.parametrize("flags", [["--ping-interval-s", "0"], ["--max-frame-bytes", "99999999"],
                                   ["--sqlite-synchronous", "OFF"], ["--rate-per-s", "-1"]])
def test_nonsense_values_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        config_from_args(flags)
    assert "must be" in capsys.readouterr().err
