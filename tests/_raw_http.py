"""Raw HTTP on both ends: a server that answers with bytes the test chooses, and a client
socket that reads exactly as slowly as the test wants.

``RawServer`` is a loopback HTTP server that answers every request with bytes the test chooses.

For what a well-behaved server never sends: redirects, statuses outside 100-599, error
bodies full of internal details. ``connections`` counts accepted connections, so a
second instance can stand for a host the gateway must never reach::

    with RawServer(lambda path: b"HTTP/1.1 302 Found\\r\\nLocation: ...\\r\\n\\r\\n") as up:
        up.url  # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Self

Responder = Callable[[str], bytes]


def response(status: int, body: bytes = b"", *, reason: str = "X",
             headers: dict[str, str] | None = None,
             content_type: str = "application/json") -> bytes:
    """A complete HTTP/1.1 response that closes its connection."""
    head = [f"HTTP/1.1 {status} {reason}", f"content-type: {content_type}",
            f"content-length: {len(body)}", "connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class RawServer:
    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.connections = 0
        self.paths: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="raw-http")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    path = self._read_request(conn)
                    self.paths.append(path)
                    conn.sendall(self.responder(path))
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(65536)  # until the client closes (or the timeout)
                except OSError:
                    pass

    @staticmethod
    def _read_request(conn: socket.socket) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(65536)
            if not piece:
                break
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(body) < length:
            piece = conn.recv(65536)
            if not piece:
                break
            body += piece
        return lines[0].split(" ")[1] if " " in lines[0] else ""


# -- a client that reads when the test says ---------------------------------------------


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
