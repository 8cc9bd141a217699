"""A real ``redis-server`` for tests: its own free port on 127.0.0.1 and its own temp dir.

``scripts/test.sh`` installs Debian's ``redis-server``; without it the tests that need it
skip. The ``redis_server`` fixture (registered in conftest.py) starts one server per test
session and stops it at teardown; a test that kills or pauses a server starts its own::

    server = RedisServer.start(tmp_path)
    try:
        ... server.url ...
        server.kill()          # SIGKILL; server.pause() / resume(): SIGSTOP / SIGCONT
    finally:
        server.stop()

Tests sharing the session server keep apart by key prefix (``redis_prefix()``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import free_port

__all__ = ["RedisServer", "redis_prefix", "redis_server", "redis_server_path"]


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process: no persistence, loopback only, logs in its dir."""

    def __init__(self, directory: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.directory = directory
        self.port = port
        self.process = process

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, directory: Path, *, port: int | None = None,
              timeout: float = 15.0) -> RedisServer:
        """Start a server in ``directory`` (on ``port``, default a free one); wait for PONG."""
        binary = redis_server_path()
        if binary is None:
            pytest.skip("redis-server is not installed (scripts/test.sh installs it with apt)")
        directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            chosen = port or free_port()
            process = subprocess.Popen(
                [binary, "--port", str(chosen), "--bind", "127.0.0.1", "--dir", str(directory),
                 "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--protected-mode", "yes", "--logfile", str(directory / "redis.log"),
                 "--maxmemory", "512mb"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                if _ping(chosen):
                    return cls(directory, chosen, process)
                time.sleep(0.05)
            process.kill()
            process.wait()
            if port is not None:
                break
        log = directory / "redis.log"
        raise RuntimeError("redis-server did not start: "
                           + (log.read_text()[-2000:] if log.exists() else "no log"))

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (after :meth:`kill` / :meth:`stop`): empty."""
        self.stop()
        fresh = RedisServer.start(self.directory, port=self.port)
        self.process = fresh.process

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def redis_prefix() -> str:
    """A key prefix of its own, for a test sharing the session's server."""
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the test session (skips when it is not installed)."""
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()
