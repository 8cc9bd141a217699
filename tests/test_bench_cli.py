"""``tokenrelay bench`` through the real entry point, against a live gateway on loopback.

The gateway (uvicorn on a thread) serves the scripted mock, so the numbers have known
bounds: 20 tokens at 200 tokens/s take at least ~95 ms. Timings are only checked for
consistency (TTFT within E2EL, percentiles in order), never against a budget.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _pty import cli_env, strip_ansi, tokenrelay

MODEL = "mock:tokens=20,tokens_per_second=200"
METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """A live gateway; yields its API root ``http://127.0.0.1:PORT/v1``."""
    uvicorn = pytest.importorskip("uvicorn")
    from tokenrelay.server import ServerConfig, create_app

    app = create_app(ServerConfig(serve_local=False, log={"enabled": False}))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


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
