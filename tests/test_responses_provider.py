"""``OpenAIResponsesProvider``: the Responses wire format, parsed and sent.

* the pure parser on recorded OpenAI event streams (``tests/fixtures/responses_*.sse``),
  whole and split into 1-byte reads;
* the request body it sends;
* the provider against a loopback server replaying those recordings;
* round trips through a live tokenrelay gateway: its ``/v1/responses`` as the upstream,
  and a gateway route with ``api = "responses"`` in front of another gateway.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from _harness import LiveGateway, gateway_config
from _scripted import ScriptedProvider, tool_call_chunks
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from tokenrelay._stream import AsyncStream, Result
from tokenrelay.errors import RateLimitError, StreamError, UsageError
from tokenrelay.events import ToolCallDone
from tokenrelay.providers.base import Chunk
from tokenrelay.providers.openai_responses import (
    OpenAIResponsesProvider,
    ResponsesEventParser,
    response_to_chunks,
    responses_body,
)
from tokenrelay.request import Message, Request, ResponseFormat, RetryPolicy, ToolSpec

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["text", "incomplete", "function_call", "error", "failed"]
NO_RETRY = RetryPolicy(max_retries=0)


def fixture(name: str) -> bytes:
    return (FIXTURES / f"responses_{name}.sse").read_bytes()


def parse(data: bytes, *, step: int | None = None) -> tuple[list[Chunk], StreamError | None]:
    """Feed ``data`` whole or ``step`` bytes at a time; the chunks and the error, if any."""
    parser = ResponsesEventParser()
    chunks: list[Chunk] = []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    try:
        for piece in pieces:
            chunks += parser.feed(piece)
        parser.end()
    except StreamError as exc:
        return chunks, exc
    return chunks, None


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def user(content: str = "hi") -> Message:
    return Message(role="user", content=content)


# -- the recordings ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fixtures_are_valid_openai_events(name: str) -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    frames = [f for f in fixture(name).decode().split("\n\n") if f.strip()]
    for n, frame in enumerate(frames):
        event_line, data_line = frame.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}" and data["sequence_number"] == n
        adapter.validate_python(data)


# -- the parser ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1, 7])
def test_parser_text(step: int | None) -> None:
    chunks, error = parse(fixture("text"), step=step)
    assert error is None
    assert text(chunks) == "Hello, world! 👋"
    assert [c.text for c in chunks[:-1]] == ["Hello", ",", " world", "! ", "👋"]
    assert (chunks[-1].finish_reason, chunks[-1].usage) == ("stop", chunks[-1].usage)
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (12, 5)


def test_parser_function_calls_get_dense_indexes() -> None:
    chunks, error = parse(fixture("function_call"), step=5)
    assert error is None
    pieces = [p for c in chunks for p in c.tool_calls or []]
    # The reasoning item holds output_index 0: the calls are 1 and 2, tool calls 0 and 1.
    firsts = [(p.index, p.id, p.name) for p in pieces if p.id]
    assert firsts == [(0, "call_Wx7pQ2mN", "get_weather"), (1, "call_Rt5vL9kC", "get_weather")]
    arguments = {i: "".join(p.arguments for p in pieces if p.index == i) for i in (0, 1)}
    assert arguments == {0: '{"city":"Paris"}', 1: '{"city":"Tokyo"}'}
    assert chunks[-1].finish_reason == "tool_calls" and text(chunks) == ""
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 41


def test_parser_incomplete_is_length() -> None:
    chunks, error = parse(fixture("incomplete"))
    assert error is None and text(chunks) == "Once upon a time"
    assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize(("name", "partial", "code"), [
    ("error", "The answer", "server_error"),
    ("failed", "Partial", "rate_limit_exceeded"),
])
def test_parser_failures_keep_the_text_before_them(name: str, partial: str, code: str) -> None:
    for step in (None, 3):
        chunks, error = parse(fixture(name), step=step)
        assert text(chunks) == partial
        assert error is not None and error.code == code and "mid-stream" in error.message


def test_parser_end_before_the_terminal_event_is_truncated() -> None:
    data = fixture("text")
    cut = data[:data.index(b"event: response.completed")]
    chunks, error = parse(cut)
    assert text(chunks) == "Hello, world! 👋"
    assert error is not None and error.code == "truncated"


def test_parser_malformed_and_catch_up() -> None:
    _, error = parse(b"event: response.created\ndata: {nope\n\n")
    assert error is not None and error.code == "malformed_chunk"
    _, error = parse(b'data: {"type":"response.function_call_arguments.delta",'
                     b'"output_index":3,"delta":"x"}\n\n')
    assert error is not None and error.code == "malformed_chunk"
    # A server that sends text only whole, in .done events (no deltas): still the text.
    whole = (b'data: {"type":"response.output_text.delta","output_index":0,'
             b'"content_index":0,"delta":"He"}\n\n'
             b'data: {"type":"response.output_text.done","output_index":0,'
             b'"content_index":0,"text":"Hello"}\n\n'
             b'data: {"type":"response.completed","response":{"status":"completed"}}\n\n')
    chunks, error = parse(whole)
    assert error is None and text(chunks) == "Hello" and chunks[-1].finish_reason == "stop"


def test_unstreamed_response_object() -> None:
    body = {"object": "response", "status": "completed", "usage": {
        "input_tokens": 3, "output_tokens": 2}, "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "Hi"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}
    [chunk] = response_to_chunks(body)
    assert chunk.text == "Hi" and chunk.finish_reason == "tool_calls"
    assert chunk.tool_calls is not None and chunk.tool_calls[0].id == "c"
    with pytest.raises(StreamError, match="boom"):
        response_to_chunks({"object": "response", "status": "failed",
                            "error": {"code": "server_error", "message": "boom"}})


# -- the request body ---------------------------------------------------------------------


def test_request_body() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    request = Request(
        messages=(Message(role="system", content="Be brief."), user("weather?"),
                  Message(role="assistant", content="Looking.", tool_calls=(call,)),
                  Message(role="tool", content="21C", tool_call_id="c1"),
                  Message(role="system", content="Answer in French.")),
        model="gpt", max_tokens=50, temperature=0.2, top_p=0.9, seed=7,
        response_format=ResponseFormat(name="w", schema={"type": "object"}),
        tools=(ToolSpec(name="f", description="d"),),
        tool_choice={"type": "function", "function": {"name": "f"}},
        extra={"store": True, "reasoning": {"effort": "low"}})
    assert responses_body(request) == {
        "model": "gpt", "instructions": "Be brief.", "store": True,
        "reasoning": {"effort": "low"}, "stream": True,
        "input": [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": "Looking."},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "21C"},
                  {"role": "system", "content": "Answer in French."}],
        "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9,
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"},
                            "strict": True}},
        "tools": [{"type": "function", "name": "f", "description": "d",
                   "parameters": {"type": "object", "properties": {}}, "strict": False}],
        "tool_choice": {"type": "function", "name": "f"},
    }
    with pytest.raises(UsageError, match="stop sequences"):
        responses_body(Request(messages=(user(),), model="gpt", stop="x"))


# -- the provider against recorded upstream answers -------------------------------------


class _Replay(BaseHTTPRequestHandler):
    """``POST /v1/responses``: the model ``fixture:NAME`` replays a recording one event per
    write; ``status:CODE`` is an OpenAI error body; ``json`` a response object."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection does

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        kind, _, arg = body["model"].partition(":")
        if kind == "status":
            data = json.dumps({"error": {"message": "Rate limit reached", "type": "requests",
                                         "param": None, "code": "rate_limit_exceeded"}})
            self.send_response(int(arg))
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "3600")
            self.end_headers()
            self.wfile.write(data.encode())
            return
        if kind == "json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"object": "response", "status": "completed",
                                         "output": [{"type": "message", "content": [
                                             {"type": "output_text", "text": "Hi"}]}]}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for frame in fixture(arg).split(b"\n\n"):
            if frame.strip():
                self.wfile.write(frame + b"\n\n")
                self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def replay() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Replay)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def run(provider: OpenAIResponsesProvider, model: str, **options: Any
              ) -> tuple[Result, list[Any]]:
    request = Request(messages=(user(),), model=model, **options)
    async with AsyncStream(request, provider, retry=NO_RETRY, raise_errors=False) as stream:
        events = [event async for event in stream]
    await provider.aclose()
    return stream.result, events


async def test_provider_text(replay: ThreadingHTTPServer) -> None:
    url = f"http://127.0.0.1:{replay.server_address[1]}/v1"
    provider = OpenAIResponsesProvider(base_url=url, api_key="sk-test")
    result, _ = await run(provider, "fixture:text", max_tokens=20)
    assert result.error is None and result.text == "Hello, world! 👋"
    assert result.finish_reason == "stop" and not result.usage.estimated
    path, headers, body = replay.requests[-1]  # type: ignore[attr-defined]
    assert path == "/v1/responses" and headers["Authorization"] == "Bearer sk-test"
    assert body["stream"] is True and body["max_output_tokens"] == 20
    assert body["input"] == [{"role": "user", "content": "hi"}]


async def test_provider_function_calls(replay: ThreadingHTTPServer) -> None:
    provider = OpenAIResponsesProvider(base_url=f"http://127.0.0.1:{replay.server_address[1]}/v1")
    result, events = await run(provider, "fixture:function_call")
    assert result.finish_reason == "tool_calls"
    assert [(c.id, c.name) for c in result.tool_calls] == [
        ("call_Wx7pQ2mN", "get_weather"), ("call_Rt5vL9kC", "get_weather")]
    done = [e for e in events if isinstance(e, ToolCallDone)]
    assert [e.arguments for e in done] == [{"city": "Paris"}, {"city": "Tokyo"}]


async def test_provider_failures(replay: ThreadingHTTPServer) -> None:
    provider = OpenAIResponsesProvider(base_url=f"http://127.0.0.1:{replay.server_address[1]}/v1")
    result, _ = await run(provider, "fixture:error")
    assert isinstance(result.error, StreamError) and result.error.code == "server_error"
    assert result.text == "The answer" and result.finish_reason == "error"
    result, _ = await run(provider, "status:429")
    assert isinstance(result.error, RateLimitError) and result.error.retry_after == 3600
    result, _ = await run(provider, "fixture:incomplete")
    assert result.finish_reason == "length"
    result, _ = await run(provider, "json")
    assert result.text == "Hi" and result.finish_reason == "stop"


# -- round trips through a live gateway ---------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    """The upstream: a tokenrelay gateway serving ``mock`` and a scripted ``tool`` model."""
    with LiveGateway(gateway_config(tmp_path_factory.mktemp("upstream"), [])) as live:
        live.gateway.models["tool"] = (ScriptedProvider(lambda r: tool_call_chunks(
            ("call_1", (r.tools or [ToolSpec(name="none")])[0].name, {"city": "Paris"}))),
            "tool")
        yield live


async def test_round_trip_through_the_gateway_responses_endpoint(gateway: LiveGateway) -> None:
    provider = OpenAIResponsesProvider(base_url=gateway.url + "/v1")
    result, _ = await run(provider, "mock")
    assert result.text == "Mock answer to: hi" and result.finish_reason == "stop"
    assert result.usage.completion_tokens == 4 and not result.usage.estimated
    result, _ = await run(provider, "mock", max_tokens=2)
    assert (result.text, result.finish_reason) == ("Mock answer", "length")
    result, _ = await run(provider, "mock:fault=error,after=2")
    assert isinstance(result.error, StreamError) and result.error.code == "mock_error"
    assert result.text == "Mock answer"
    result, _ = await run(provider, "mock:fault=429,retry_after=3600")
    assert isinstance(result.error, RateLimitError)


async def test_round_trip_keeps_the_whole_request(gateway: LiveGateway) -> None:
    call = {"id": "c0", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city":"Oslo"}'}}
    sent = Request(
        messages=(Message(role="system", content="Be brief."), user("weather?"),
                  Message(role="assistant", content="", tool_calls=(call,)),
                  Message(role="tool", content="3C", tool_call_id="c0"),
                  user("and Paris?")),
        model="tool", temperature=0.3,
        tools=(ToolSpec(name="get_weather", description="Weather",
                        parameters={"type": "object", "properties": {
                            "city": {"type": "string"}}}),),
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format=ResponseFormat(name="w", schema={"type": "object"}, strict=False))
    provider = OpenAIResponsesProvider(base_url=gateway.url + "/v1")
    async with AsyncStream(sent, provider, retry=NO_RETRY) as stream:
        events = [event async for event in stream]
    await provider.aclose()
    assert stream.result.finish_reason == "tool_calls"
    assert [e.arguments for e in events if isinstance(e, ToolCallDone)] == [{"city": "Paris"}]
    scripted = gateway.gateway.models["tool"][0]
    assert isinstance(scripted, ScriptedProvider)
    received = scripted.requests[-1]
    assert received.messages == sent.messages
    assert (received.tools, received.tool_choice, received.response_format) == (
        sent.tools, sent.tool_choice, sent.response_format)
    assert received.temperature == 0.3


def test_gateway_route_with_api_responses(gateway: LiveGateway, tmp_path: Path) -> None:
    models = [{"name": "relayed", "base_url": gateway.url + "/v1", "upstream_model": "mock",
               "api": "responses"},
              {"name": "relayed-tool", "base_url": gateway.url + "/v1",
               "upstream_model": "tool", "api": "responses"}]
    with LiveGateway(gateway_config(tmp_path, models)) as front, openai.OpenAI(
            base_url=front.url + "/v1", api_key="x", max_retries=0, timeout=10) as sdk:
        assert isinstance(front.gateway.models["relayed"][0], OpenAIResponsesProvider)
        chunks = list(sdk.chat.completions.create(model="relayed", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Mock answer to: hi"
        tools: Any = [{"type": "function", "function": {"name": "get_weather"}}]
        completion = sdk.chat.completions.create(
            model="relayed-tool", tools=tools, messages=[{"role": "user", "content": "hi"}])
        [call] = completion.choices[0].message.tool_calls or []
        assert (call.id, call.function.name) == ("call_1", "get_weather")  # type: ignore[union-attr]
        with sdk.responses.stream(model="relayed", input="hi") as stream:
            assert stream.get_final_response().output_text == "Mock answer to: hi"
