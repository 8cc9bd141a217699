"""``tokenrelay bench`` through the real entry point, against a live gateway on loopback.

The gateway (uvicorn on a thread) serves the scripted mock, so the numbers have known
bounds: 20 tokens at 200 tokens/s take at least ~95 ms. Timings are only checked for
consistency (TTFT within E2EL, percentiles in order), never against a budget.

The load generator (``abench``) is also driven directly against the fault-injecting
``MockUpstream`` on loopback, for the request it sends and how it classifies failures.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _harness import Processes, closed_port
from _pty import cli_env, strip_ansi, tokenrelay
from _upstream import Upstream

from tokenrelay.bench import BenchReport, RequestOutcome, abench
from tokenrelay.testing.mock_upstream import MockUpstream

MODEL = "mock:tokens=20,tps=200"
METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``tokenrelay serve`` as users start it; yields its API root ``http://127.0.0.1:PORT/v1``."""
    with Processes(tmp_path_factory.mktemp("gateway")) as processes:
        serve = processes.serve({"serve_local": False, "log": {"enabled": False}})
        yield serve.url + "/v1"


def bench(url: str, *args: str) -> tuple[int, Any, str]:
    done = tokenrelay("bench", "--base-url", url, *args, env=cli_env(), timeout=30)
    return done.returncode, done.stdout, strip_ansi(done.stderr)


def test_json_figures_are_consistent(gateway: str) -> None:
    started = time.monotonic()
    code, out, err = bench(gateway, "-m", MODEL, "--concurrency", "4", "--requests", "12",
                           "--max-tokens", "64", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert time.monotonic() - started < 30

    assert report["requests"] == 12
    assert report["completed"] == 12 and report["failed"] == 0
    assert report["errors"] == {}
    assert report["concurrency"] == 4
    # The gateway answers stream_options.include_usage: tokens come from usage chunks.
    assert report["usage_reported"] == 12
    assert report["total_output_tokens"] == 12 * 20
    duration = report["duration_s"]
    assert duration > 0
    assert report["request_throughput"] == pytest.approx(12 / duration, rel=1e-3)
    assert report["output_throughput"] == pytest.approx(240 / duration, rel=1e-3)

    for name in METRICS:
        stats = report[name]
        assert set(stats) == {"mean", "median", "p95", "p99"}
        assert all(v is not None and v >= 0 for v in stats.values()), name
        assert stats["median"] <= stats["p95"] <= stats["p99"], name
    # Per request TTFT <= E2EL, so every order statistic keeps that order.
    for stat in ("mean", "median", "p95", "p99"):
        assert report["ttft_ms"][stat] <= report["e2el_ms"][stat]
    # 19 paced gaps of 5 ms each: sleeps never end early.
    assert report["e2el_ms"]["median"] >= 19 * 5 * 0.9
    assert report["tpot_ms"]["median"] > 0
    # The whole run cannot be shorter than its slowest request.
    assert report["e2el_ms"]["p99"] <= duration * 1000 + 1


def test_table_on_stdout_progress_on_stderr(gateway: str) -> None:
    code, out, err = bench(gateway, "-m", MODEL, "-c", "2", "-n", "4")
    assert code == 0, err
    text = strip_ansi(out)
    for label in ("TTFT", "TPOT", "ITL", "E2EL", "Completed / failed", "4 / 0",
                  "Output throughput"):
        assert label in text
    assert "TTFT" not in err


def test_failures_are_counted_and_exit_non_zero(gateway: str) -> None:
    code, out, err = bench(gateway, "-m", "no-such-model", "-c", "2", "-n", "3", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["completed"] == 0 and report["failed"] == 3
    assert report["ttft_ms"]["median"] is None
    (message, count), = report["errors"].items()
    assert count == 3 and "404" in message
    assert err.strip().splitlines()[-1].startswith("error: all 3 requests failed: HTTP 404")


def test_bad_header_is_a_usage_error(gateway: str) -> None:
    code, _, err = bench(gateway, "-m", MODEL, "-H", "no-colon")
    assert code == 2
    assert "Name: value" in err


# -- abench against the fault-injecting mock upstream ---------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


async def run(url: str, model: str, **kwargs: Any) -> tuple[BenchReport, list[RequestOutcome]]:
    seen: list[RequestOutcome] = []
    kwargs.setdefault("concurrency", 2)
    kwargs.setdefault("requests", 3)
    report = await abench(base_url=url, model=model, timeout=5, on_result=seen.append,
                          **kwargs)
    return report, seen


async def test_request_headers_body_and_usage(upstream: MockUpstream) -> None:
    upstream.reset()
    report, seen = await run(upstream.url, "tokens=7", concurrency=2, requests=5,
                             api_key="sk-bench", max_tokens=5, prompt="hi there",
                             headers={"X-Extra": "1"})
    assert len(seen) == 5 and all(o.ok for o in seen)
    assert report.completed == 5 and report.failed == 0 and report.errors == {}
    # max_tokens cuts the 7 tokens to 5; the usage chunk says so.
    assert report.usage_reported == 5 and report.total_output_tokens == 25
    assert report.total_chunks == 25 and report.itl.count == 5 * 4
    calls = upstream.chat_requests()
    assert len(calls) == 5
    for call in calls:
        assert call.method == "POST" and call.path == "/v1/chat/completions"
        h = call.headers
        assert h["authorization"] == "Bearer sk-bench"
        assert h["content-type"] == "application/json"
        assert h["accept"] == "text/event-stream"
        assert h["accept-encoding"] == "identity"
        assert h["user-agent"] == "tokenrelay-bench"
        assert h["x-extra"] == "1"
        assert call.body == {"model": "tokens=7", "stream": True, "max_tokens": 5,
                             "messages": [{"role": "user", "content": "hi there"}],
                             "stream_options": {"include_usage": True}}
        assert call.outcome == "complete"


async def test_concurrency_is_the_number_of_requests_in_flight(upstream: MockUpstream) -> None:
    upstream.reset()
    report, seen = await run(upstream.url, "tokens=3,delay=0.2", concurrency=4, requests=8)
    assert report.completed == 8
    # Each request's span on the client's clock: from sending it to the end of its body.
    spans = sorted((o.sent_at, o.sent_at + o.e2el) for o in seen
                   if o.sent_at is not None and o.e2el is not None)
    assert len(spans) == 8

    def in_flight(at: float) -> int:
        return sum(start <= at < end for start, end in spans)

    # Counted, not timed: never more than four at once, and four at once (each takes
    # >= 0.2 s and the four workers start together).
    assert max(in_flight(start) for start, _ in spans) == 4
    # The fifth is sent only once one of the first four is over.
    assert spans[4][0] >= min(end for _, end in spans[:4])


async def test_request_rate_spreads_arrivals_as_a_poisson_process(upstream: MockUpstream) -> None:
    upstream.reset()
    rate, n = 40.0, 24
    report, seen = await run(upstream.url, "tokens=2", concurrency=8, requests=n,
                             request_rate=rate, seed=7)
    assert report.completed == n and report.request_rate == rate
    # The schedule is the seeded exponential gaps (mean 1/rate = 25 ms), not a burst: the
    # k-th request is sent no earlier than the k-th arrival (sleeps never end early). A
    # lower bound is exact however busy the machine; how late a request is, is not
    # asserted.
    rng = random.Random(7)
    arrivals = list(itertools.accumulate([0.0] + [rng.expovariate(rate) for _ in range(n - 1)]))
    sent = sorted(o.sent_at for o in seen if o.sent_at is not None)
    assert len(sent) == n
    assert all(s >= a for s, a in zip(sent, arrivals, strict=True)), (sent, arrivals)
    assert sent[-1] >= arrivals[-1] > 0.3  # ~24 x 25 ms: spread, not all at once
    assert report.to_dict()["request_rate"] == rate


async def test_without_stream_options_chunks_are_counted() -> None:
    with Upstream() as server:
        report, _ = await run(server.url, "no_stream_options", concurrency=1, requests=2)
        bodies = [c.body for c in server.calls]
    assert report.completed == 2 and report.usage_reported == 0
    assert report.total_output_tokens == report.total_chunks == 2 * 4
    # Asked once with stream_options, then never again.
    assert ["stream_options" in b for b in bodies] == [True, False, False]


@pytest.mark.parametrize(("model", "expected"), [
    ("fault=401", "HTTP 401: mock-upstream: injected 401"),
    ("tokens=5,fault=error,after=2",
     "the provider failed mid-stream: mock-upstream: injected error after 2 tokens"),
    ("tokens=5,fault=malformed,after=2", "the provider sent a malformed chunk"),
    ("tokens=5,fault=close,after=2", "the stream ended without its terminator"),
    ("tokens=0", "the stream carried no content"),
    ("tokens=5,fault=reset,after=2", "ClientPayloadError"),
    ("tokens=5,fault=stall,after=2", "SocketTimeoutError"),
])
async def test_failures_are_classified(upstream: MockUpstream, model: str,
                                       expected: str) -> None:
    kwargs = {"timeout": 0.3} if "stall" in model else {}
    report = await abench(base_url=upstream.url, model=model, concurrency=2, requests=3,
                          **kwargs)
    assert report.completed == 0 and report.failed == 3
    (message, count), = report.errors.items()
    assert count == 3
    assert message.startswith(expected), message
    assert report.ttft.count == 0 and report.ttft.median is None


async def test_connection_refused_is_a_failure() -> None:
    port = closed_port()
    report, seen = await run(f"http://127.0.0.1:{port}/v1", "m", concurrency=2, requests=2)
    assert report.failed == 2 and not any(o.ok for o in seen)
    (message, count), = report.errors.items()
    assert count == 2 and message.startswith("ClientConnectorError"), message
