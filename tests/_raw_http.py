"""A loopback HTTP server that answers every request with bytes the test chooses.

For what a well-behaved server never sends: redirects, statuses outside 100-599, error
bodies full of internal details. ``connections`` counts accepted connections, so a
second instance can stand for a host the gateway must never reach::

    with RawServer(lambda path: b"HTTP/1.1 302 Found\\r\\nLocation: ...\\r\\n\\r\\n") as up:
        up.url  # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Self

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
