"""Shared test setup: no network but loopback, and no settings leaking in from the host.

Test-specific helpers live next to the tests that use them (e.g. ``_upstream.py``, the
scripted loopback OpenAI-compatible server); only what every test needs goes here.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from _harness import Processes
from _redis import redis_server  # noqa: F401  (the session's redis-server, see _redis.py)

_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "TOKENRELAY_MODEL", "TOKENRELAY_GGUF",
        "TOKENRELAY_LOG", "TOKENRELAY_HOME")


def _is_local(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths, socketpairs
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _block_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Connections to anything but loopback fail (tests must never reach the internet)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guard(address: Any) -> None:
        if not _is_local(address):
            raise OSError(f"network access is blocked in tests (tried {address!r})")

    def connect(self: socket.socket, address: Any) -> None:
        guard(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        guard(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No API key, base URL or log from the developer's environment or ``.env``."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENRELAY_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # Settings.load() reads ./.env


@pytest.fixture
def processes(tmp_path: Any) -> Iterator[Processes]:
    """Start processes for this test (``processes.serve(config)``: ``tokenrelay serve``);
    all are stopped at the end, and the test fails if one would not stop."""
    with Processes(tmp_path / "processes") as group:
        yield group
