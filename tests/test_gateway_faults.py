"""Every mock-upstream fault through a live gateway → what the gateway's client sees.

The contract (STYLE.md 10, ARCHITECTURE.md "Errors"):

* a failure after the first token: the text frames, then exactly one
  ``data: {"error": ...}`` frame, then the end; never ``[DONE]``, never a fake ``stop``;
* a failure before the first token: retried when retryable, otherwise a real HTTP error
  status with an OpenAI error body (and ``Retry-After`` for a 429).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import LiveGateway, chat_body, gateway_config, mock_routes, poll, sse_payloads

from tokenrelay import RetryPolicy, Timeouts
from tokenrelay.testing.mock_upstream import MockUpstream, token_text

SPECS = {
    "reset": "fault=reset,after=3,tokens=8",
    "close": "fault=close,after=3,tokens=8",
    "malformed": "fault=malformed,after=3,tokens=8",
    "error": "fault=error,after=3,tokens=8",
    "stall": "fault=stall,after=3,tokens=8",
    "reset_first": "fault=reset,after=0,times=1,tokens=4",
    "rate_once": "fault=429,times=1,retry_after=0,tokens=4",
    "rate_forever": "fault=429,retry_after=3600",
    "broken": "fault=500",
    "ok": "tokens=4",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def live(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[LiveGateway]:
    tmp: Path = tmp_path_factory.mktemp("gateway")
    with LiveGateway(gateway_config(tmp, mock_routes(upstream.url, **SPECS))) as gateway:
        yield gateway


@pytest.fixture
def client(live: LiveGateway, upstream: MockUpstream,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    upstream.reset()
    # Retries as the defaults, only faster: the backoff is not what is tested here.
    monkeypatch.setattr(live.gateway, "retry", RetryPolicy(backoff=0.01, max_backoff=0.05))
    with httpx.Client(base_url=live.url, timeout=10) as http:
        yield http
    assert poll(lambda: live.active() == 0, 2), "a request kept its limits"


def post_stream(client: httpx.Client, model: str) -> tuple[httpx.Response, list[Any]]:
    """Stream a chat completion; the decoded ``data:`` payloads ("[DONE]" kept as is)."""
    with client.stream("POST", "/v1/chat/completions", json=chat_body(model)) as response:
        body = response.read()  # raises if the body does not end properly
    payloads = [p if p == "[DONE]" else json.loads(p) for p in sse_payloads(body)]
    return response, payloads


def texts(payloads: list[Any]) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or ""
                   for p in payloads if isinstance(p, dict) and p.get("choices"))


@pytest.mark.parametrize(("route", "code"), [
    ("reset", "connection_lost"),
    ("close", "truncated"),
    ("malformed", "malformed_chunk"),
    ("error", "server_error"),
    ("stall", "timeout_idle"),
])
def test_mid_stream_fault_is_text_then_one_error_frame_then_the_end(
        client: httpx.Client, live: LiveGateway, upstream: MockUpstream,
        monkeypatch: pytest.MonkeyPatch, route: str, code: str) -> None:
    monkeypatch.setattr(live.gateway, "timeouts", Timeouts(idle=0.5))
    started = time.monotonic()
    response, payloads = post_stream(client, route)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    *chunks, last = payloads
    assert texts(chunks) == token_text(3)
    assert all("error" not in p for p in chunks)
    assert last["error"]["code"] == code and last["error"]["message"]
    assert "[DONE]" not in payloads
    assert not [p for p in chunks if p["choices"][0]["finish_reason"] is not None]
    assert time.monotonic() - started < 5
    # Never retried after the first token: it would duplicate text.
    assert len(upstream.chat_requests()) == 1
    (row,) = live.wait_log(lambda r: r["model"] == route)
    assert (row["status"], row["answer"]) == ("error", token_text(3))
    assert row["error"].startswith(code)


def test_stall_error_frame_comes_after_the_idle_timeout_and_aborts_the_upstream(
        client: httpx.Client, live: LiveGateway, upstream: MockUpstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live.gateway, "timeouts", Timeouts(idle=0.5))
    started = time.monotonic()
    _, payloads = post_stream(client, "stall")
    took = time.monotonic() - started
    assert payloads[-1]["error"]["code"] == "timeout_idle" and 0.5 <= took < 3
    record = upstream.wait_for(lambda r: r.aborted_at is not None, 2)
    assert record is not None and record.tokens_sent == 3


def test_reset_before_the_first_token_is_retried_then_succeeds(
        client: httpx.Client, upstream: MockUpstream) -> None:
    response, payloads = post_stream(client, "reset-first")
    assert response.status_code == 200 and texts(payloads) == token_text(4)
    assert payloads[-1] == "[DONE]"
    assert [r.fault for r in upstream.chat_requests()] == ["reset", None]


def test_429_then_success_is_retried_before_the_first_token(
        client: httpx.Client, upstream: MockUpstream) -> None:
    response, payloads = post_stream(client, "rate-once")
    assert response.status_code == 200 and texts(payloads) == token_text(4)
    finishes = [p["choices"][0]["finish_reason"] for p in payloads
                if isinstance(p, dict) and p.get("choices")]
    assert finishes[-1] == "stop" and payloads[-1] == "[DONE]"
    assert [r.status for r in upstream.chat_requests()] == [429, 200]


@pytest.mark.parametrize("stream", [True, False])
def test_429_with_a_huge_retry_after_is_an_http_429_with_retry_after(
        client: httpx.Client, upstream: MockUpstream, stream: bool) -> None:
    started = time.monotonic()
    response = client.post("/v1/chat/completions", json=chat_body("rate-forever", stream=stream))
    assert time.monotonic() - started < 2  # not retried: 3600 s is over the cap
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3600"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited"
    assert "Retry-After" in error["message"]
    assert len(upstream.chat_requests()) == 1


def test_upstream_500_every_time_is_retried_then_a_502(
        client: httpx.Client, upstream: MockUpstream, live: LiveGateway) -> None:
    # error_status(): an upstream 500 is a 502 (README "Upstream errors"); an OpenAI SDK
    # client sees InternalServerError and retries it itself. The details stay in the log.
    response = client.post("/v1/chat/completions", json=chat_body("broken"))
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "server_error" and "'broken'" in error["message"]
    assert len(upstream.chat_requests()) == 1 + live.gateway.retry.max_retries
    (row,) = live.wait_log(lambda r: r["model"] == "broken")
    assert (row["status"], row["http_status"]) == ("error", 502)
    assert "500" in row["error"]


def test_mid_stream_error_without_streaming_is_a_502(
        client: httpx.Client, upstream: MockUpstream) -> None:
    response = client.post("/v1/chat/completions", json=chat_body("error", stream=False))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "server_error"
    assert len(upstream.chat_requests()) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat"])
def test_a_bug_in_an_endpoint_is_a_500_and_the_gateway_goes_on(
        client: httpx.Client, live: LiveGateway, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, path: str) -> None:
    # The streaming POSTs skip Starlette's middleware stack (server/app.py, GatewayApp):
    # an unexpected exception must still be a 500, logged, with nothing leaked.
    def broken(model: str) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(live.gateway.router, "lookup", broken)
    body = ({"model": "ok", "prompt": "hi"} if path == "/chat"
            else chat_body("ok"))
    response = client.post(path, json=body)
    assert response.status_code == 500
    assert "a bug" not in response.text
    assert any("a bug" in r.getMessage() or (r.exc_info and "a bug" in str(r.exc_info[1]))
               for r in caplog.records)
    monkeypatch.undo()
    response, payloads = post_stream(client, "ok")
    assert response.status_code == 200 and payloads[-1] == "[DONE]"


def test_a_healthy_route_after_the_faults(client: httpx.Client) -> None:
    response, payloads = post_stream(client, "ok")
    assert response.status_code == 200 and texts(payloads) == token_text(4)
    assert payloads[-1] == "[DONE]"
