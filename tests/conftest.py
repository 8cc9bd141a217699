"""Shared test setup: no network but loopback, and no settings leaking in from the host.

Test-specific helpers live next to the tests that use them (e.g. ``_upstream.py``, the
scripted loopback OpenAI-compatible server); only what every test needs goes here.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from _harness import Processes
from _redis import redis_server  # noqa: F401  (the session's redis-server, see _redis.py)

#: A skip whose reason starts with this cannot apply to a machine that runs CI (another
#: OS, say); any other skip is a failure under ``TOKENRELAY_STRICT_SKIPS=1``
#: (``scripts/test.sh`` sets it): CI installs everything the suite needs, so a skip there
#: is a test that quietly did not run.
NOT_APPLICABLE = "not applicable here:"
STRICT_SKIPS = os.environ.get("TOKENRELAY_STRICT_SKIPS") == "1"

# A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored
# across exec: every CLI the tests start would then ignore Ctrl-C. Catching it here makes
# children start with the default disposition, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# llama.cpp's OpenMP threads spin while they wait for each other (libgomp's default
# active wait). On a 2-core machine that is busy with anything else, a spinning thread
# keeps the core its partner needs: 128 tokens of the embedded model took 61-93 s with 2
# threads under load, 3.9-4.9 s with passive waits (1.5 s alone). Set before any test
# loads llama.cpp (libgomp reads it once, at load), and inherited by every CLI, server
# and benchmark the tests start. It changes how threads wait, not what they compute.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "TOKENRELAY_MODEL", "TOKENRELAY_GGUF",
        "TOKENRELAY_LOG", "TOKENRELAY_HOME", "TOKENRELAY_RESUME_GRACE")


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


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _strict_skip_message(reason: str) -> str:
    return (f"skipped in CI: {reason!r}. scripts/test.sh installs everything the suite"
            f" needs; install what this test needs there, or skip only for a reason that"
            f" cannot apply to this machine (pytest.skip('{NOT_APPLICABLE} ...')).")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report.longrepr)
        if not reason.startswith(NOT_APPLICABLE):
            report.outcome = "failed"
            report.longrepr = _strict_skip_message(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped:  # a module-level importorskip / skip
        reason = _skip_reason(report.longrepr)
        if not reason.startswith(NOT_APPLICABLE):
            report.outcome = "failed"
            report.longrepr = _strict_skip_message(reason)
