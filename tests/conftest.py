"""Shared fixtures: a real redis-server per test session (no mocks) and a local Twilio REST server per module."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from tests.helpers.fake_twilio import FakeTwilioApi

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, torn down at the end of the session."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is required (apt-get install redis-server); .ci/run installs it"
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    url = f"redis://127.0.0.1:{port}/0"
    os.environ.setdefault("TEST_REDIS_URL", url)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeTwilioApi]:
    """A local server speaking Twilio's REST wire format (the one paid API we fake), one per test module."""
    # imported here: the bot/policy imports behind them would slow every test session's start
    from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN
    from tests.helpers.fake_twilio import FakeTwilioApi

    with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as api:
        yield api
