"""Gateway test helpers: configs routing to the mock upstream, raw-socket clients.

The live gateway itself is :class:`_harness.LiveGateway` (re-exported here with ``poll``
and ``sse_payloads`` for the tests that import them from this module): streaming
behaviour (disconnects, heartbeats, slow readers) only shows over real sockets,
``httpx.ASGITransport`` buffers whole bodies (STYLE.md 14). The upstream is
:class:`tokenrelay.mock_upstream.MockUpstream`, on a thread of its own.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from _harness import LiveGateway, poll, sse_payloads

from tokenrelay.server import ServerConfig

__all__ = ["LiveGateway", "chat_body", "config", "fd_count", "open_stream", "poll",
           "recv_all", "recv_until", "routes", "sse_payloads"]

PROMPT = [{"role": "user", "content": "hi"}]


def routes(upstream_url: str, **specs: str) -> list[dict[str, str]]:
    """Gateway routes ``name → mock upstream``, each with its behaviour in the model name."""
    return [{"name": name.replace("_", "-"), "base_url": upstream_url, "upstream_model": spec}
            for name, spec in specs.items()]


def config(tmp: Path, models: list[dict[str, str]], **options: Any) -> ServerConfig:
    """A test gateway config: the routes, the scripted ``mock``, a log in ``tmp``."""
    return ServerConfig.model_validate({"models": models, "serve_local": False,
                                        "log": {"path": str(tmp / "requests.db")}, **options})


# -- helpers -------------------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def chat_body(model: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": PROMPT, "stream": stream, **extra}


def open_stream(port: int, body: dict[str, Any], *, rcvbuf: int | None = None,
                timeout: float = 5) -> socket.socket:
    """A raw socket that has sent ``POST /v1/chat/completions`` and reads nothing yet."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window is small from the handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def recv_until(sock: socket.socket, marker: bytes, timeout: float = 5) -> bytes:
    """Read until ``marker`` was received (``AssertionError`` on timeout or EOF)."""
    received = b""
    deadline = time.monotonic() + timeout
    while marker not in received:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no {marker!r} within {timeout}s: {received[-300:]!r}")
        if not data:
            raise AssertionError(f"EOF before {marker!r}: {received[-300:]!r}")
        received += data
    return received


def recv_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Read until the server ends the (chunked) response or closes."""
    received = b""
    deadline = time.monotonic() + timeout
    while not received.endswith(b"\r\n0\r\n\r\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the response did not end within {timeout}s")
        if not data:
            break
        received += data
    return received
