"""Per-event client cost: the official openai SDK vs tokenrelay, on the same bytes.

One realistic body of a streamed Chat Completion (2,000 content chunks shaped like the
ones api.openai.com sends with ``stream_options.include_usage``, then the finish chunk,
the usage chunk and ``[DONE]``) is served by an in-memory mock transport, one network
read per SSE frame, to:

  (a) ``openai.AsyncOpenAI().chat.completions.create(stream=True)``, iterated to the end;
  (b) ``tokenrelay.astream(..., provider=OpenAIProvider(transport=...))``, iterated to the
      end (events, accumulation, deadlines, metrics: the full path);
  (c) the pure ``ChatChunkParser`` alone.

No network, so this measures client CPU per event, the cost that multiplies with
concurrent streams in a gateway. Run: ``.venv/bin/python bench/bench_client_events.py``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

import tokenrelay
from tokenrelay.providers._openai_wire import ChatChunkParser
from tokenrelay.providers.openai_compat import OpenAIProvider

N_CHUNKS = 2000
REPEATS = 7
MODEL = "gpt-4o-mini"
BASE_URL = "http://bench.invalid/v1"
WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ",",
         " and", " then", " it", " naps", " in", " the", " warm", " sun", ".", " 🦊")


def make_frames(n: int = N_CHUNKS) -> list[bytes]:
    """The SSE frames of one stream, as the OpenAI API shapes them."""
    head = {
        "id": "chatcmpl-BenchXq3sYv0o7LpT9wCk2ZrNf4uH", "object": "chat.completion.chunk",
        "created": 1741570283, "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    }

    def frame(delta: dict[str, object] | None, finish: str | None = None,
              usage: dict[str, object] | None = None) -> bytes:
        choices = [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ]
        obj = {**head, "choices": choices, "usage": usage, "obfuscation": "q3Zk"}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    frames = [frame({"role": "assistant", "content": "", "refusal": None})]
    frames += [frame({"content": WORDS[i % len(WORDS)]}) for i in range(n)]
    frames.append(frame({}, "stop"))
    frames.append(frame(None, usage={
        "prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }))
    frames.append(b"data: [DONE]\n\n")
    return frames


FRAMES = make_frames()
HEADERS = {"content-type": "text/event-stream; charset=utf-8", "x-request-id": "req_bench"}


async def _body() -> AsyncIterator[bytes]:
    for frame in FRAMES:
        yield frame


def _handler(response_cls: Any) -> Any:
    def handler(request: Any) -> Any:
        return response_cls(200, headers=HEADERS, content=_body())

    return handler


async def run_openai_sdk() -> int:
    import httpx2  # the transport library of this openai SDK version
    import openai

    client = openai.AsyncOpenAI(
        api_key="k", base_url=BASE_URL, max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(_handler(httpx2.Response))),
    )
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True},
        )
        n, text = 0, []
        async for chunk in stream:
            n += 1
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)  # what a caller does with it
        return n
    finally:
        await client.close()


async def run_tokenrelay() -> int:
    provider = OpenAIProvider(base_url=BASE_URL, api_key="k",
                              transport=httpx.MockTransport(_handler(httpx.Response)))
    try:
        n = 0
        async with tokenrelay.astream("hi", provider=provider, model=MODEL) as s:
            async for _ in s:
                n += 1
        assert s.result.usage.completion_tokens == N_CHUNKS and not s.result.usage.estimated
        return n
    finally:
        await provider.aclose()


async def run_parser() -> int:
    parser = ChatChunkParser()
    n = 0
    for frame in FRAMES:
        n += len(parser.feed(frame))
    parser.end()
    return n


async def measure(fn: Callable[[], Awaitable[int]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


async def main() -> None:
    runners = {
        "openai SDK": run_openai_sdk,
        "tokenrelay.astream": run_tokenrelay,
        "ChatChunkParser only": run_parser,
    }
    for fn in runners.values():  # warm up: imports, first client, caches
        await fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(REPEATS):  # interleaved, so drift hits every contender alike
        for name, fn in runners.items():
            times[name].append(await measure(fn))
    per = len(FRAMES)
    print(f"{per} SSE events per stream ({N_CHUNKS} text chunks), {REPEATS} runs each;"
          f" Python {sys.version.split()[0]}, httpx {httpx.__version__}")
    print(f"{'':24} {'best µs/event':>14} {'median µs/event':>16}")
    best = {}
    for name, values in times.items():
        best[name] = min(values) / per * 1e6
        median = statistics.median(values) / per * 1e6
        print(f"{name:24} {best[name]:14.2f} {median:16.2f}")
    ratio = best["tokenrelay.astream"] / best["openai SDK"]
    print(f"ratio tokenrelay/openai (best): {ratio:.3f}  (goal <= 0.2)")


if __name__ == "__main__":
    asyncio.run(main())
