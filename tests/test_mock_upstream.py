"""``tokenrelay.testing.mock_upstream``: the fault-injecting OpenAI-compatible server itself."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _harness import Processes, sse_payloads

from tokenrelay import UsageError
from tokenrelay.testing.mock_upstream import Behaviour, MockUpstream, token_text

PROMPT = [{"role": "user", "content": "say three words"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


@pytest.fixture
def http(upstream: MockUpstream) -> Iterator[httpx.Client]:
    upstream.reset()
    with httpx.Client(base_url=upstream.url, timeout=5) as client:
        yield client


def stream(http: httpx.Client, model: str, headers: dict[str, str] | None = None,
           **body: Any) -> list[Any]:
    """The decoded ``data:`` payloads of a streamed answer."""
    with http.stream("POST", "/chat/completions", headers=headers,
                     json={"model": model, "messages": PROMPT, "stream": True, **body}) as r:
        assert r.status_code == 200
        payloads = sse_payloads(r.read())
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def text(payloads: list[Any]) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or ""
                   for p in payloads if isinstance(p, dict) and p.get("choices"))


def test_behaviour_parse() -> None:
    behaviour = Behaviour.parse("gpt-x;fault=reset;after=3,tps=50;delay=0.5;times=2")
    assert behaviour == Behaviour(fault="reset", fault_after=3, tokens_per_second=50,
                                  first_token_delay=0.5, fault_times=2)
    assert Behaviour.parse("fault=429,retry_after=7").status == 429
    assert Behaviour.parse("plain-model-name") == Behaviour()
    with pytest.raises(UsageError, match="unknown mock-upstream option 'fualt'"):
        Behaviour.parse("fualt=reset")
    with pytest.raises(UsageError, match="fault='boom'"):
        Behaviour.parse("fault=boom")


def test_stream_text_usage_and_records(http: httpx.Client, upstream: MockUpstream) -> None:
    payloads = stream(http, "tokens=5", stream_options={"include_usage": True})
    assert text(payloads) == token_text(5) == "tok0 tok1 tok2 tok3 tok4"
    assert payloads[-1] == "[DONE]"
    assert payloads[-2]["choices"] == [] and payloads[-2]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert payloads[-3]["choices"][0]["finish_reason"] == "stop"
    (record,) = upstream.requests
    # The server marks the record complete just after its last write, which the client
    # may read first: wait (bounded) for the bookkeeping.
    deadline = time.monotonic() + 5
    while record.outcome == "open" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (record.outcome, record.tokens_sent, record.status) == ("complete", 5, 200)
    assert record.started_at <= record.first_token_at <= record.finished_at  # type: ignore[operator]


def test_max_tokens_cuts_the_answer_and_no_usage_unless_asked(http: httpx.Client) -> None:
    payloads = stream(http, "tokens=5", max_tokens=2)
    assert text(payloads) == "tok0 tok1"
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in p for p in payloads if isinstance(p, dict))


def test_headers_win_over_the_model_name(http: httpx.Client, upstream: MockUpstream) -> None:
    payloads = stream(http, "tokens=9,fault=reset", headers={"x-mock-tokens": "3",
                                                             "x-mock-fault": "error",
                                                             "x-mock-after": "2"})
    assert text(payloads) == "tok0 tok1"
    assert payloads[-2]["error"]["type"] == "server_error" and payloads[-1] == "[DONE]"
    assert upstream.requests[0].fault == "error"


def test_non_streamed_completion(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json={"model": "tokens=4", "messages": PROMPT})
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == token_text(4)
    assert body["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(("fault", "error"), [
    ("reset", httpx.TransportError), ("close", None), ("malformed", None)])
def test_mid_stream_faults_on_the_wire(http: httpx.Client, fault: str,
                                       error: type[Exception] | None) -> None:
    lines: list[str] = []

    def read() -> None:
        with http.stream("POST", "/chat/completions", json={
                "model": f"fault={fault},after=2", "messages": PROMPT, "stream": True}) as r:
            lines.extend(line for line in r.iter_lines() if line)

    if error is None:
        read()
    else:
        with pytest.raises(error):
            read()
    assert text([json.loads(line[6:]) for line in lines[:3]]) == "tok0 tok1"
    assert "data: [DONE]" not in lines[:4]
    if fault == "malformed":
        assert lines[3] == 'data: {"choices": [{"delta": {"content": "x"'
    if fault == "close":
        assert len(lines) == 3  # role chunk and two tokens, then a clean end


def test_status_fault_only_the_first_times(http: httpx.Client) -> None:
    model = "fault=429,times=2,retry_after=7"
    answers = [http.post("/chat/completions", json={"model": model, "messages": PROMPT})
               for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 429, 200]
    assert answers[0].headers["retry-after"] == "7"
    assert answers[0].json()["error"]["type"] == "rate_limit_error"
    # Counted per model name + x-mock-* headers: another spelling has its own count.
    other = http.post("/chat/completions", json={"model": "b;" + model, "messages": PROMPT})
    assert other.status_code == 429


def test_bad_option_is_a_400_naming_it(http: httpx.Client) -> None:
    response = http.post("/chat/completions", headers={"x-mock-tps": "fast"},
                         json={"model": "m", "messages": PROMPT})
    assert response.status_code == 400 and "tps='fast'" in response.json()["error"]["message"]


def test_abort_is_seen_at_once_and_served_as_json(http: httpx.Client,
                                                  upstream: MockUpstream) -> None:
    with http.stream("POST", "/chat/completions", headers={"x-mock-tps": "20"},
                     json={"model": "tokens=1000", "messages": PROMPT, "stream": True}) as r:
        for line in r.iter_lines():
            if "tok2" in line:
                left = time.monotonic()
                break  # leaving the block closes the connection
    record = upstream.wait_for(lambda r: r.aborted_at is not None, 2)
    assert record is not None and 0 <= record.aborted_at - left < 0.5  # type: ignore[operator]
    assert record.outcome == "aborted" and 3 <= record.tokens_sent < 10

    records = httpx.get(upstream.base_url + "/_mock/requests").json()
    assert records[0]["aborted_at"] == record.aborted_at
    assert records[0]["behaviour"]["tokens_per_second"] == 20
    assert httpx.delete(upstream.base_url + "/_mock/requests").json() == {"cleared": 1}
    assert not upstream.requests


def test_models_and_keep_alive(http: httpx.Client, upstream: MockUpstream) -> None:
    assert [m["id"] for m in http.get("/models").json()["data"]] == ["mock-upstream"]
    assert http.get("/models").status_code == 200
    assert http.get("/nothing").status_code == 404


async def test_on_the_running_loop() -> None:
    server = MockUpstream(behaviour=Behaviour(tokens=2))
    async with server, httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/chat/completions", json={"model": "m", "messages": PROMPT})
    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1"


def test_the_command_serves_until_ctrl_c(processes: Processes) -> None:
    proc = processes.start(
        "mock-upstream", [sys.executable, "-m", "tokenrelay.cli", "mock-upstream", "--port", "0",
                          "--behaviour", "tokens=3"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ready=lambda p: "mock upstream on http://" in p.output())
    line = proc.output().splitlines()[0]
    assert line.startswith("tokenrelay: mock upstream on http://127.0.0.1:")
    url = line.split()[4]
    response = httpx.post(url + "/chat/completions", json={"model": "m", "messages": PROMPT},
                          timeout=5)
    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    assert processes.stop(proc, signal.SIGINT) == 0
    assert proc.output().splitlines()[-1].endswith("mock upstream stopped")
