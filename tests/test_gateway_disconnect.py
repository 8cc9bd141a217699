"""Clients that go away, or stop reading, against a live gateway over real sockets.

What must hold (DESIGN.md "Cancellation", server/sse.py): the client leaving aborts the
upstream request at once, the request is logged as cancelled with its partial answer,
its limits are released, and nothing (tasks, sockets) is left behind.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from _harness import LiveGateway, chat_body, fd_count, gateway_config, mock_routes, poll
from _raw_http import open_stream, recv_all, recv_until

from tokenrelay.testing.mock_upstream import MockUpstream, RequestRecord, token_text

SPECS = {
    "slow": "tokens=1000,tps=20",
    "delayed": "tokens=5,delay=3",
    "hb": "tokens=3,delay=1.5",
    "flood": "tokens=1000000,tps=5000",
    "quick": "tokens=3",
    "midstall": "tokens=50,fault=stall,after=2",
    "lateerror": "tokens=5,delay=1,fault=error,after=0",
}
#: How soon the upstream must see a client's disconnect.
ABORT_WITHIN = 0.5

MakeGateway = Callable[..., LiveGateway]


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


@pytest.fixture
def make_gateway(upstream: MockUpstream, tmp_path: Path) -> Iterator[MakeGateway]:
    upstream.reset()
    with ExitStack() as stack:
        def make(loop: str = "uvloop", **options: Any) -> LiveGateway:
            models = mock_routes(upstream.url, **SPECS)
            return stack.enter_context(LiveGateway(gateway_config(tmp_path, models, **options),
                                                   loop=loop))

        yield make


def aborted(model: str) -> Callable[[RequestRecord], bool]:
    return lambda r: r.model == model and r.aborted_at is not None


def close_now(sock: socket.socket) -> float:
    closed_at = time.monotonic()
    sock.close()
    return closed_at


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_disconnect_mid_stream_aborts_the_upstream_and_logs_the_partial_answer(
        make_gateway: MakeGateway, upstream: MockUpstream, loop: str) -> None:
    live = make_gateway(loop)
    sock = open_stream(live.port, chat_body("slow"))
    recv_until(sock, b'" tok2"')
    closed_at = close_now(sock)

    record = upstream.wait_for(aborted(SPECS["slow"]), 3)
    assert record is not None, "the upstream never saw the client leave"
    took = record.aborted_at - closed_at  # type: ignore[operator]
    assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the close"
    (row,) = live.wait_log(lambda r: r["status"] == "cancelled")
    assert row["answer"].startswith(token_text(3)) and row["http_status"] == 200
    assert row["model"] == "slow" and row["error"] is None
    assert poll(lambda: live.active() == 0, 3)


@pytest.mark.parametrize("heartbeat", [15.0, 0.3], ids=["before-headers", "after-headers"])
def test_disconnect_while_waiting_for_the_first_token_aborts_the_upstream(
        make_gateway: MakeGateway, upstream: MockUpstream, heartbeat: float) -> None:
    # heartbeat 15: the gateway still holds back the status line (wait_first, to keep a
    # real HTTP status for early failures); 0.3: the stream is open and pinging.
    live = make_gateway(heartbeat=heartbeat)
    sock = open_stream(live.port, chat_body("delayed"))
    assert upstream.wait_for(lambda r: r.model == SPECS["delayed"], 3)
    if heartbeat < 1:
        recv_until(sock, b": ping")
    else:
        time.sleep(0.3)
    closed_at = close_now(sock)

    record = upstream.wait_for(aborted(SPECS["delayed"]), 3)
    assert record is not None and record.tokens_sent == 0
    took = record.aborted_at - closed_at  # type: ignore[operator]
    assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the close"
    (row,) = live.wait_log(lambda r: r["status"] == "cancelled")
    assert not row["answer"] and row["time_to_first_token"] is None
    assert poll(lambda: live.active() == 0, 3)


@pytest.mark.parametrize("model", ["slow", "mock:tokens=100,tps=20"])
def test_disconnect_during_a_non_streamed_request_stops_the_generation(
        make_gateway: MakeGateway, upstream: MockUpstream, model: str) -> None:
    live = make_gateway()
    sock = open_stream(live.port, chat_body(model, stream=False))
    assert poll(lambda: live.active() == 1, 3)
    time.sleep(0.3)  # generating: 20 tokens/s, for seconds
    closed_at = close_now(sock)

    assert poll(lambda: live.active() == 0, 2), "the generation went on for nobody"
    (row,) = live.wait_log(lambda r: r["status"] == "cancelled")
    assert row["http_status"] == 499 and row["duration"] < 2
    if model == "slow":
        record = upstream.wait_for(aborted(SPECS["slow"]), 3)
        assert record is not None
        took = record.aborted_at - closed_at  # type: ignore[operator]
        assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the close"
        assert row["answer"].startswith("tok0")


def test_a_burst_of_disconnects_leaves_no_tasks_or_sockets_behind(
        make_gateway: MakeGateway, upstream: MockUpstream) -> None:
    live = make_gateway()
    # Warm up: one whole stream, so that whatever is created lazily (the upstream client
    # and its keep-alive connection, the log's worker thread) is in the baseline.
    with open_stream(live.port, chat_body("quick")) as sock:
        assert b"data: [DONE]" in recv_all(sock)
    assert poll(lambda: live.connections() == 0, 3)
    tasks, fds = live.task_count(), fd_count()

    started = time.monotonic()
    clients = [open_stream(live.port, chat_body("slow")) for _ in range(30)]
    for sock in clients:
        recv_until(sock, b'" tok1"', timeout=10)
    assert live.active() == 30
    for sock in clients:
        closed_at = close_now(sock)

    def all_aborted() -> list[RequestRecord] | None:
        records = [r for r in upstream.chat_requests() if r.model == SPECS["slow"]]
        return records if all(r.aborted_at for r in records) else None

    records = poll(all_aborted, 5)
    assert records and len(records) == 30, "the upstream did not see every client leave"
    assert max(r.aborted_at for r in records) - closed_at < 2  # type: ignore[operator]
    assert poll(lambda: live.active() == 0, 5)
    assert len(live.wait_log(lambda r: r["status"] == "cancelled", count=30)) == 30
    # Back to the baseline: no task, connection or file descriptor left behind.
    assert poll(lambda: live.task_count() <= tasks, 5), live.task_count()
    assert poll(lambda: live.connections() == 0, 5)
    assert poll(lambda: fd_count() <= fds + 2, 5), (fd_count(), fds)
    assert time.monotonic() - started < 15


def test_a_client_that_stops_reading_is_dropped(make_gateway: MakeGateway,
                                                upstream: MockUpstream,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    live = make_gateway(send_timeout=1)
    # A tiny receive window that is never read: the gateway's sends block, and after
    # send_timeout it must give up instead of holding the stream (and its limits).
    # (The kernel buffers some MB on loopback first: at ~5000 tokens/s that takes a few s.)
    sock = open_stream(live.port, chat_body("flood"), rcvbuf=4096)
    try:
        record = upstream.wait_for(aborted(SPECS["flood"]), 15)
        assert record is not None, "the upstream was never aborted"
        assert 1000 < record.tokens_sent < 1000000
        assert poll(lambda: live.active() == 0, 3)
        (row,) = live.wait_log(lambda r: r["model"] == "flood")
        assert row["status"] == "cancelled" and row["answer"].startswith(token_text(100))
        # Dropped, not lingering: uvicorn's close() would wait forever for the unread
        # buffer to drain; the server's protocol aborts the connection (server/run.py).
        assert poll(lambda: live.connections() == 0, 3), "the connection lingers"
        # One warning line, not uvicorn's "Exception in ASGI application" traceback.
        dropped = [r for r in caplog.records if "read nothing for 1s" in r.getMessage()]
        assert len(dropped) == 1 and dropped[0].name == "tokenrelay.server"
        assert not [r for r in caplog.records if r.exc_info], caplog.text
    finally:
        sock.close()


def test_heartbeats_are_sent_while_the_upstream_stalls_mid_stream(
        make_gateway: MakeGateway, upstream: MockUpstream) -> None:
    live = make_gateway(heartbeat=0.3)
    with open_stream(live.port, chat_body("midstall")) as sock:
        received = recv_until(sock, b"tok1")
        started = time.monotonic()
        while received.count(b": ping") < 2:  # a ping every 0.3 s of silence
            received += recv_until(sock, b": ping", timeout=2)
        assert time.monotonic() - started < 2
    body = received.partition(b"\r\n\r\n")[2]
    assert body.index(b"tok1") < body.index(b": ping")
    assert b"[DONE]" not in body
    # The client left during the stall: the upstream request is aborted.
    assert poll(lambda: live.active() == 0, 3)


def test_a_failure_after_the_stream_opened_is_one_error_frame(make_gateway: MakeGateway) -> None:
    # The first token is slow (1 s): the gateway opens the stream after wait_first (0.3 s)
    # with a 200 and pings; the upstream then fails before any token. Too late for an
    # HTTP status: one error frame, then the end, never [DONE] or a made-up stop.
    live = make_gateway(heartbeat=0.3)
    with open_stream(live.port, chat_body("lateerror")) as sock:
        raw = recv_all(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b": stream open" in body and b": ping" in body
    assert body.count(b"data: ") == 1
    error = body[body.index(b"data: "):]
    assert b'"error"' in error and b"[DONE]" not in body and b'"finish_reason"' not in body
    assert body.index(b": stream open") < body.index(b"data: ")


def test_heartbeats_are_sent_before_the_first_token(make_gateway: MakeGateway) -> None:
    live = make_gateway(heartbeat=0.3)
    with open_stream(live.port, chat_body("hb")) as sock:
        raw = recv_all(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    headers = head.lower()
    assert b"content-type: text/event-stream" in headers
    assert b"cache-control: no-store" in headers and b"x-accel-buffering: no" in headers
    before_data = body[:body.index(b"data: ")]
    assert before_data.count(b": ping") >= 2  # 1.5 s of silence, a ping every 0.3 s
    assert b"data: [DONE]" in body
