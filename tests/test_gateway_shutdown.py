"""The gateway's end of life and of connections, against a real `tokenrelay serve` process.

SIGTERM: answers in progress get ``drain_timeout_s``, then one ``server_shutdown`` error
each and their end; the request log is written before the process exits. kill -9: what
was answered more than one batch (0.2 s) ago is on disk. A client that stopped reading
is dropped with a reset, not left in FIN-WAIT-1 holding the kernel's send buffer.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import (
    LiveGateway,
    Proc,
    Processes,
    chat_body,
    gateway_config,
    mock_routes,
    poll,
    sse_payloads,
)
from _raw_http import open_stream

from tokenrelay.testing.mock_upstream import MockUpstream

HI = [{"role": "user", "content": "hi"}]
DRAIN = 1.5
#: Slack for a loaded 2-core machine on top of the promised bound.
SLACK = 3.0
LONG = "mock:tokens=2000,tps=10"
#: A clean stop: SIGTERM handled, answers drained, the log written (not uvicorn's re-raise).
EXITED = (0,)


def serve(processes: Processes, tmp: Path, **settings: Any) -> tuple[Proc, Path]:
    """`tokenrelay serve --config FILE` as users run it, with its request log in ``tmp``."""
    db = tmp / "log" / "requests.db"
    proc = processes.serve({"serve_local": False, "log": {"path": str(db)}, **settings})
    return proc, db


def log_rows(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY id")]


def open_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


def read_to_end(sock: socket.socket, timeout: float) -> bytes:
    """Everything until the server closes the connection (or ``timeout``)."""
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            break
        if not piece:
            break
        received += piece
    return received


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """The body of a chunked response, and whether it ended with its last chunk."""
    body, rest = b"", raw.partition(b"\r\n\r\n")[2]
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            return body, True
        body, rest = body + rest[:size], rest[size + 2:]
    return body, False


def test_sigterm_ends_running_answers_with_one_shutdown_error_within_the_drain(
        processes: Processes, tmp_path: Path) -> None:
    server, db = serve(processes, tmp_path, drain_timeout_s=DRAIN)
    streams = {
        "chat": open_post(server.port, "/v1/chat/completions",
                          {"model": LONG, "messages": HI, "stream": True}),
        "simple": open_post(server.port, "/chat", {"model": LONG, "prompt": "hi"}),
        "responses": open_post(server.port, "/v1/responses",
                               {"model": LONG, "input": "hi", "stream": True}),
        "short": open_post(server.port, "/v1/chat/completions", {
            "model": "mock:tokens=8,tps=10", "messages": HI, "stream": True}),
    }
    waiting = {
        "first_token": open_post(server.port, "/v1/chat/completions", {
            "model": "mock:tokens=3,delay=60", "messages": HI, "stream": True}),
        "unstreamed": open_post(server.port, "/v1/chat/completions",
                                {"model": LONG, "messages": HI}),
    }
    try:
        answers, ended_in = _sigterm_while_running(server, streams, waiting)
    finally:
        for sock in [*streams.values(), *waiting.values()]:
            sock.close()
    assert ended_in < DRAIN + SLACK, ended_in
    assert server.popen.wait(DRAIN + SLACK + 5) in EXITED, server.output()
    _check_shutdown_answers(answers, db)


def _sigterm_while_running(server: Proc, streams: dict[str, socket.socket],
                           waiting: dict[str, socket.socket]) -> tuple[dict[str, bytes], float]:
    first = {name: sock.recv(65536) for name, sock in streams.items()}
    assert all(b"200 OK" in data for data in first.values()), first
    time.sleep(0.3)
    sent_at = time.monotonic()
    server.signal(signal.SIGTERM)
    answers = {name: first.get(name, b"") + read_to_end(sock, DRAIN + SLACK + 5)
               for name, sock in {**streams, **waiting}.items()}
    return answers, time.monotonic() - sent_at


def _check_shutdown_answers(answers: dict[str, bytes], db: Path) -> None:
    for name in ("chat", "simple", "responses"):
        body, complete = dechunk(answers[name])
        assert complete, (name, answers[name][-300:])
        payloads = sse_payloads(body)
        assert "[DONE]" not in payloads
        last = json.loads(payloads[-1])
        error = last.get("error", last)  # /chat's error event is the error object itself
        if name == "responses":
            assert last["type"] == "response.failed"
            error = json.loads(payloads[-2])
        assert error["code"] == "server_shutdown", (name, payloads[-2:])
        assert "shutting down" in error["message"]
        assert sum('"server_shutdown"' in p for p in payloads) == 1
    body, complete = dechunk(answers["short"])  # finished within the drain: untouched
    assert complete and sse_payloads(body)[-1] == "[DONE]"
    for name in ("first_token", "unstreamed"):
        head, _, body = answers[name].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), (name, answers[name][:300])
        assert json.loads(body)["error"]["code"] == "server_shutdown"
    # Flushed before the process exited: one row per request, shutdowns marked.
    rows = log_rows(db)
    assert len(rows) == 6, rows
    assert sum("server_shutdown" in (r["error"] or "") for r in rows) == 5


def test_sigterm_writes_every_answered_request_to_the_log(processes: Processes,
                                                         tmp_path: Path) -> None:
    server, db = serve(processes, tmp_path)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for _ in range(30):
            assert c.post("/v1/chat/completions", json={"model": "mock", "messages": HI},
                          ).status_code == 200
    server.signal(signal.SIGTERM)  # at once: the last batch is still pending
    assert server.popen.wait(15) in EXITED
    assert len(log_rows(db)) == 30


def test_kill_9_loses_nothing_answered_more_than_a_batch_ago(processes: Processes,
                                                             tmp_path: Path) -> None:
    server, db = serve(processes, tmp_path)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for _ in range(30):
            assert c.post("/v1/chat/completions", json={"model": "mock", "messages": HI},
                          ).status_code == 200
    time.sleep(0.2 + 0.5)  # the batch window, and time for its commit on a loaded machine
    server.signal(signal.SIGKILL)
    server.popen.wait(10)
    assert len(log_rows(db)) == 30


# -- a client that stopped reading ----------------------------------------------------------


def tcp_states(port: int) -> list[str]:
    """The kernel's TCP states of the sockets whose local port is ``port``."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                states.append(fields[3])
    return states


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_dropped_slow_reader_is_reset_not_left_in_fin_wait(tmp_path: Path,
                                                             loop: str) -> None:
    with MockUpstream() as upstream, LiveGateway(gateway_config(
            tmp_path, mock_routes(upstream.url, flood="tokens=1000000,tps=5000"), send_timeout=1),
            loop=loop) as live:
        sock = open_stream(live.port, chat_body("flood"), rcvbuf=4096)
        try:
            assert poll(lambda: live.gateway.limiter.total_active() == 1, 5)
            assert poll(lambda: live.gateway.limiter.total_active() == 0
                        and live.connections() == 0, 20), "the reader was never dropped"
            # The kernel's view: no socket of the gateway's port left holding unsent data
            # in FIN-WAIT-1 (state 04), as a plain close() leaves it for minutes.
            assert poll(lambda: "04" not in tcp_states(live.port), 2), tcp_states(live.port)
            # And the client was told with a reset, not an orderly end.
            sock.settimeout(2)  # what it has queued arrives at once; then the reset
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass
        finally:
            sock.close()
