"""A live gateway on loopback for the gateway tests, and raw-socket clients for it.

The gateway is ``create_app(config)`` under a real uvicorn (httptools) on its own event
loop thread: streaming behaviour (disconnects, heartbeats, slow readers) only shows over
real sockets, ``httpx.ASGITransport`` buffers whole bodies (STYLE.md 14). The upstream
is :class:`tokenrelay.mock_upstream.MockUpstream`, on a thread of its own.

(``_live.py`` starts the same production server with ``Server.run``; this one keeps the
event loop at hand to count its tasks and can pick asyncio or uvloop.)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Self, TypeVar

import uvicorn

from tokenrelay.server import Gateway, ServerConfig, create_app
from tokenrelay.server.run import uvicorn_config

T = TypeVar("T")

PROMPT = [{"role": "user", "content": "hi"}]


def routes(upstream_url: str, **specs: str) -> list[dict[str, str]]:
    """Gateway routes ``name → mock upstream``, each with its behaviour in the model name."""
    return [{"name": name.replace("_", "-"), "base_url": upstream_url, "upstream_model": spec}
            for name, spec in specs.items()]


def config(tmp: Path, models: list[dict[str, str]], **options: Any) -> ServerConfig:
    """A test gateway config: the routes, the scripted ``mock``, a log in ``tmp``."""
    return ServerConfig.model_validate({"models": models, "serve_local": False,
                                        "log": {"path": str(tmp / "requests.db")}, **options})


class LiveGateway:
    """The gateway app under uvicorn on 127.0.0.1, any free port, in a thread."""

    def __init__(self, config: ServerConfig, *, loop: str = "asyncio") -> None:
        self.app = create_app(config)
        self.gateway: Gateway = self.app.state.gateway
        self.loop_kind = loop
        self.loop: asyncio.AbstractEventLoop | None = None
        # The production uvicorn settings (the httptools protocol with the gateway's
        # timeouts); only the event loop is ours, to look inside it.
        self.server = uvicorn.Server(uvicorn_config(config, self.app, log_config=None))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.loop_kind == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        loop = self.loop

        def run() -> None:
            loop.run_until_complete(self.server.serve(sockets=[self.sock]))

        self._thread = threading.Thread(target=run, name="gateway", daemon=True)
        self._thread.start()
        thread = self._thread
        if not poll(lambda: self.server.started or not thread.is_alive(), 10) or \
                not self.server.started:
            self.server.should_exit = True
            raise RuntimeError("the gateway did not start (see the log above)")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        assert self._thread is not None and self.loop is not None
        self._thread.join(5)
        if self._thread.is_alive():  # connections that never close
            self.server.force_exit = True
            self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()
        self.sock.close()

    # -- looking inside, from the test thread -------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 5) -> T:
        """Run ``coro`` on the server's event loop."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def task_count(self) -> int:
        """asyncio tasks alive in the server's loop (not counting the one asking)."""
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return self.call(count())

    def connections(self) -> int:
        """Client connections uvicorn holds."""
        return len(self.server.server_state.connections)

    def active(self) -> int:
        return self.gateway.limiter.total_active()

    def log_rows(self) -> list[dict[str, Any]]:
        assert self.gateway.reqlog is not None
        return self.gateway.reqlog.rows(1000)

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], count: int = 1,
                 timeout: float = 5) -> list[dict[str, Any]]:
        """Rows matching ``predicate``, once there are ``count`` of them (or the timeout)."""
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            found[:] = [r for r in self.log_rows() if predicate(r)]
            return len(found) >= count

        poll(enough, timeout)
        return found


# -- helpers -------------------------------------------------------------------------------


def poll(condition: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """``condition()`` once truthy, or its last (falsy) value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


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


def sse_payloads(body: bytes) -> list[str]:
    """The ``data:`` payloads of an event-stream body (already de-chunked)."""
    payloads = []
    for frame in body.decode().split("\n\n"):
        data = [line[5:].strip() for line in frame.split("\n") if line.startswith("data:")]
        if data:
            payloads.append("\n".join(data))
    return payloads
