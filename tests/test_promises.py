"""README promises checked at their bound, not near it.

Each test names the promise. Bounds that are the product's own (the 500 ms abort) are
asserted with the measured value in the message; everything else is counted (requests,
delays drawn from a seeded generator, operations, tasks, descriptors), not timed.
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import (
    LiveGateway,
    Processes,
    chat_body,
    fd_count,
    free_port,
    gateway_config,
    mock_routes,
    poll,
)
from _pty import PtyProcess, cli_env, tokenrelay_argv
from _raw_http import open_stream, recv_until
from _upstream import Upstream

import tokenrelay
from tokenrelay import _partial_json, _stream
from tokenrelay.testing.mock_upstream import MockUpstream

#: "A client that disconnects aborts the upstream within 500 ms" (README).
ABORT_WITHIN = 0.5


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


# -- retries ---------------------------------------------------------------------------


def test_backoff_delays_are_the_seeded_jittered_exponential(
        monkeypatch: pytest.MonkeyPatch, upstream: MockUpstream) -> None:
    """Retries back off exponentially with jitter: delay_n = min(max, base * 2**n) * U(0.5, 1)."""
    upstream.reset()
    monkeypatch.setattr(_stream, "random", random.Random(42))
    drawn: list[float] = []
    real = _stream._backoff_delay

    def recording(*args: Any) -> float:
        drawn.append(real(*args))
        return drawn[-1]

    monkeypatch.setattr(_stream, "_backoff_delay", recording)
    policy = tokenrelay.RetryPolicy(max_retries=3, backoff=0.05, max_backoff=0.15)
    result = tokenrelay.complete("hi", model="tokens=2,fault=503,times=3", base_url=upstream.url,
                                 api_key="k", retry=policy)
    assert result.text == "tok0 tok1"
    rng = random.Random(42)
    expected = [min(0.15, 0.05 * 2**n) * (0.5 + rng.random() / 2) for n in range(3)]
    assert drawn == pytest.approx(expected, abs=1e-12)
    # And they were slept: each attempt starts no earlier than its delay after the last.
    starts = [r.started_at for r in upstream.chat_requests()]
    assert len(starts) == 4
    for gap, delay in zip([b - a for a, b in itertools.pairwise(starts)], expected, strict=True):
        assert gap >= delay * 0.99, (gap, delay)


@pytest.mark.parametrize("status", [408, 409])
def test_408_and_409_are_retried(status: int, upstream: MockUpstream) -> None:
    """408 Request Timeout and 409 Conflict are retried, as the OpenAI SDK does."""
    upstream.reset()
    result = tokenrelay.complete(
        "hi", model=f"tokens=2,fault={status},times=1", base_url=upstream.url, api_key="k",
        retry=tokenrelay.RetryPolicy(max_retries=1, backoff=0.01))
    assert result.text == "tok0 tok1"
    assert [r.status for r in upstream.chat_requests()] == [status, 200]


# -- the gateway -------------------------------------------------------------------------


@pytest.fixture
def live(upstream: MockUpstream, tmp_path: Path) -> Iterator[LiveGateway]:
    upstream.reset()
    models = mock_routes(upstream.url, slow="tokens=1000,tps=50", quick="tokens=3",
                         broken="tokens=5,fault=error,after=2", refused="fault=401")
    with LiveGateway(gateway_config(tmp_path, models, cors_origins=["https://app.example"],
                                    log={"path": str(tmp_path / "r.db"), "redact": True})) as gw:
        yield gw


def test_responses_disconnect_aborts_the_upstream_within_500_ms(
        live: LiveGateway, upstream: MockUpstream) -> None:
    body = json.dumps({"model": "slow", "input": "hi", "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=5)
    sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    recv_until(sock, b"response.output_text.delta")
    closed_at = time.monotonic()
    sock.close()
    record = upstream.wait_for(lambda r: r.aborted_at is not None, timeout=5)
    assert record is not None, "the upstream never saw the client leave"
    took = record.aborted_at - closed_at  # type: ignore[operator]
    assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the close"


@pytest.mark.parametrize("stream", [True, False])
def test_cors_headers_on_real_post_answers(live: LiveGateway, stream: bool) -> None:
    """An allowed page origin can read the answer of a POST itself, not only a preflight."""
    for origin, allowed in (("https://app.example", True), ("https://evil.example", False)):
        with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=10,
                          json=chat_body("quick", stream=stream),
                          headers={"origin": origin}) as r:
            r.read()
        assert r.status_code == 200
        if allowed:
            assert r.headers["access-control-allow-origin"] == origin
            assert "origin" in r.headers.get("vary", "").lower()
        else:
            assert "access-control-allow-origin" not in r.headers


def test_redact_keeps_prompts_and_answers_out_of_the_gateway_log(live: LiveGateway) -> None:
    secret_prompt = "my card number is 4111 1111 1111 1111"
    r = httpx.post(live.url + "/v1/chat/completions", timeout=10, json={
        "model": "quick", "messages": [{"role": "user", "content": secret_prompt}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    [row] = live.wait_log(lambda row: row["model"] == "quick")
    assert row["status"] == "ok" and row["completion_tokens"] == 3  # the row is there ...
    dump = json.dumps(row)
    assert "4111" not in dump and "tok0" not in dump  # ... without the text
    assert live.gateway.reqlog is not None and live.gateway.reqlog.redact


@pytest.fixture(scope="module")
def upstream_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``tokenrelay mock-upstream`` in a process of its own: its sockets are not ours."""
    with Processes(tmp_path_factory.mktemp("mock-upstream")) as processes:
        port = free_port()
        processes.start("mock-upstream",
                        tokenrelay_argv("mock-upstream", "--port", str(port)), port=port)
        yield f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("model", ["quick", "broken", "refused", "slow"])
def test_tasks_and_fds_return_to_the_baseline_on_uvloop(
        upstream_process: str, tmp_path: Path, model: str) -> None:
    """After normal ends, errors before and after the first token, and disconnects."""
    models = mock_routes(upstream_process, slow="tokens=1000,tps=50", quick="tokens=3",
                         broken="tokens=5,fault=error,after=2", refused="fault=401")
    with LiveGateway(gateway_config(tmp_path, models)) as live:
        _back_to_baseline(live, model)


def _back_to_baseline(live: LiveGateway, model: str) -> None:
    assert type(live.loop).__module__.startswith("uvloop")

    def one() -> None:
        if model == "slow":
            sock = open_stream(live.port, chat_body(model))
            recv_until(sock, b'" tok1"')  # then the client leaves
            sock.close()
            return
        with httpx.Client(timeout=10) as client:  # read to the end, then hang up
            client.post(live.url + "/v1/chat/completions", json=chat_body(model)).read()

    # Warm-up: one round builds what is made once (the upstream connection pool, the
    # log's writer); the baseline counts it.
    one()
    assert poll(lambda: live.active() == 0 and live.connections() == 0, 5)
    assert live.wait_log(lambda row: True), "the warm-up was not logged"  # WAL files open
    tasks, fds = live.task_count(), fd_count()
    for _ in range(10):
        one()
    assert poll(lambda: live.active() == 0, 5), live.active()
    assert poll(lambda: live.connections() == 0, 5), live.connections()
    assert poll(lambda: live.task_count() <= tasks, 5), (live.task_count(), tasks)
    assert poll(lambda: fd_count() <= fds, 5), (fd_count(), fds)


# -- the CLI ---------------------------------------------------------------------------


def test_ctrl_c_inside_chat_stops_the_upstream_while_the_process_lives() -> None:
    with Upstream() as server:
        tty = PtyProcess(tokenrelay_argv("chat", "--base-url", server.url, "-m", "slow"),
                         env=cli_env())
        try:
            tty.expect("> ")
            tty.sendline("a long story please")
            tty.expect("t3 ")
            tty.ctrl_c()
            tty.expect("> ")  # back at the prompt
            seen = server.wait_disconnect(timeout=5)
            assert seen is not None, "the upstream did not see the answer stop"
            assert tty.proc.poll() is None, "the chat exited"
            # The upstream stopped sending while the chat lives: no more bytes arrive.
            assert "t199" not in tty.text
            tty.sendline("/exit")
            assert tty.wait() == 0
        finally:
            tty.close()


# -- the partial-JSON parser -----------------------------------------------------------


def _lines_run(feed: Any) -> int:
    """Lines of _partial_json executed by ``feed()`` (an operation count, not a clock)."""
    target = _partial_json.__file__
    count = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == target else None

    sys.settrace(tracer)
    try:
        feed()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("shape", ["array", "object", "nested", "string"])
def test_partial_json_parsing_is_linear(shape: str) -> None:
    """feed() is O(len(delta)): a document four times longer fed a character at a time
    (``value`` read after each feed, but for one long string) costs four times the work."""
    def document(n: int) -> str:
        if shape == "array":
            return json.dumps([i * 1.5 for i in range(n)])
        if shape == "object":
            return json.dumps({f"k{i}": [True, None, i] for i in range(n)})
        if shape == "nested":
            return "[" * n + "]" * n
        return json.dumps("ab\\u00e9\n" * n)

    def cost(n: int) -> int:
        text = document(n)

        def feed() -> None:
            parser = _partial_json.PartialJSONParser()
            for ch in text:
                parser.feed(ch)
                if shape != "string":
                    parser.value  # noqa: B018 - reading it is part of the cost
            parser.finish()

        return _lines_run(feed)

    small, large = cost(200), cost(800)
    assert 3.5 < large / small < 4.5, f"{small} -> {large} lines for 4x the input"
