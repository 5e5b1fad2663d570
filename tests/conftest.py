"""Shared fixtures: a real server on a loopback port with a real SQLite file."""
from __future__ import annotations

import os

import pytest

from chorus.server import Config, serve

#: argon2 at its default cost takes ~30 ms a hash; tests register hundreds of users.
FAST_HASH = {"argon2_time_cost": 1, "argon2_memory_kib": 1024}


def test_config(tmp_path, **overrides) -> Config:
    values = {"host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data"), **FAST_HASH}
    values.update(overrides)
    return Config.from_dict(values)


@pytest.fixture
def make_config(tmp_path):
    return lambda **overrides: test_config(tmp_path, **overrides)


@pytest.fixture
async def start_server(nursery, tmp_path):
    """``await start_server(**config_overrides)`` → a running ``server.Server`` (cancelled after the test)."""

    async def start(**overrides):
        return await nursery.start(serve, test_config(tmp_path, **overrides))

    return start


@pytest.fixture
async def server(start_server):
    return await start_server()


def service_required(name: str, reason: str):
    """Skip when a service is missing, except under CI where missing services are failures."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is required under CI: {reason}")
    pytest.skip(f"{name} not available: {reason}")
