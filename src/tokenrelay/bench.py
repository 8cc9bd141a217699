"""An endpoint benchmark for any OpenAI-compatible streaming Chat Completions endpoint.

The metrics are those of vLLM's serving benchmark (``benchmarks/benchmark_serving.py``,
``vllm bench serve``), so figures can be compared with the ones people already quote:

* **TTFT**, time to first token: from sending the request to the first chunk that
  carries content;
* **ITL**, inter-token latency: every gap between two consecutive content chunks (all
  requests' gaps pooled, so a stall weighs as much as it lasts);
* **TPOT**, time per output token, per request: ``(e2el - ttft) / (output_tokens - 1)``
  (requests with a single token have none);
* **E2EL**, end-to-end latency: from sending the request to the end of the body;
* output tokens/s: all output tokens over the wall duration; request throughput:
  completed requests over the wall duration.

Output tokens come from the usage chunk (the request asks for
``stream_options.include_usage``), else from counting content chunks. Percentiles
interpolate linearly between samples, as ``numpy.percentile`` does.

Example::

    report = asyncio.run(abench(base_url="http://127.0.0.1:8000/v1", model="qwen",
                                concurrency=8, requests=64))
    print(report.to_dict()["ttft_ms"]["p99"])
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ._openai_wire import ChatChunkParser, error_message
from .errors import StreamError, UsageError
from .providers.openai_compat import checked_base_url

__all__ = ["BenchReport", "RequestOutcome", "Stats", "abench", "chat_url", "summarize"]

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper."

#: The four latency metrics, in the order they are shown.
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(slots=True)
class RequestOutcome:
    """What one request measured (seconds, ``time.perf_counter`` deltas).

    Attributes:
        ok: the stream ended with its terminator and carried some content.
        ttft: time to the first content chunk.
        itl: the gaps between consecutive content chunks.
        e2el: time to the end of the body.
        chunks: how many chunks carried content.
        output_tokens: from the usage chunk when ``usage_reported``, else ``chunks``.
        error: what went wrong, one line, when not ``ok``.
        sent_at: when it was sent, seconds after the run started.
    """

    ok: bool = False
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2el: float | None = None
    chunks: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    error: str | None = None
    sent_at: float | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of one metric, in seconds (``None`` without samples)."""

    mean: float | None
    median: float | None
    p95: float | None
    p99: float | None
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            return cls(None, None, None, None, 0)
        ordered = sorted(values)
        return cls(math.fsum(ordered) / len(ordered), percentile(ordered, 50),
                   percentile(ordered, 95), percentile(ordered, 99), len(ordered))

    def to_ms(self) -> dict[str, float | None]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 4)

        return {"mean": ms(self.mean), "median": ms(self.median), "p95": ms(self.p95),
                "p99": ms(self.p99)}


def percentile(ordered: list[float], q: float) -> float:
    """The ``q``-th percentile of sorted values, linear interpolation (numpy's default)."""
    k = (len(ordered) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass(frozen=True, slots=True)
class BenchReport:
    """The summary of a run."""

    base_url: str
    model: str
    concurrency: int
    requests: int
    completed: int
    failed: int
    duration: float
    total_output_tokens: int
    total_chunks: int
    usage_reported: int
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    errors: dict[str, int]
    #: Requests/s of the Poisson arrivals; ``None``: all at once (as many as in flight).
    request_rate: float | None = None

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration if self.duration > 0 else 0.0

    @property
    def output_throughput(self) -> float:
        return self.total_output_tokens / self.duration if self.duration > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: times in ms, throughputs per second."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "concurrency": self.concurrency,
            "request_rate": self.request_rate,
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "duration_s": round(self.duration, 6),
            "total_output_tokens": self.total_output_tokens,
            "total_content_chunks": self.total_chunks,
            "usage_reported": self.usage_reported,
            "request_throughput": round(self.request_throughput, 4),
            "output_throughput": round(self.output_throughput, 4),
            "ttft_ms": self.ttft.to_ms(),
            "tpot_ms": self.tpot.to_ms(),
            "itl_ms": self.itl.to_ms(),
            "e2el_ms": self.e2el.to_ms(),
            "errors": dict(self.errors),
        }


def summarize(outcomes: list[RequestOutcome], duration: float, *, base_url: str = "",
              model: str = "", concurrency: int = 1,
              request_rate: float | None = None) -> BenchReport:
    """Pool the outcomes of a run into a :class:`BenchReport` (vLLM's definitions)."""
    ttfts: list[float] = []
    tpots: list[float] = []
    itls: list[float] = []
    e2els: list[float] = []
    total = reported = chunks = 0
    errors: Counter[str] = Counter()
    for o in outcomes:
        if not o.ok:
            errors[o.error or "unknown error"] += 1
            continue
        assert o.ttft is not None and o.e2el is not None
        total += o.output_tokens
        chunks += o.chunks
        reported += o.usage_reported
        ttfts.append(o.ttft)
        e2els.append(o.e2el)
        itls.extend(o.itl)
        if o.output_tokens > 1:
            tpots.append((o.e2el - o.ttft) / (o.output_tokens - 1))
    completed = len(ttfts)
    return BenchReport(
        base_url=base_url, model=model, concurrency=concurrency, requests=len(outcomes),
        completed=completed, failed=len(outcomes) - completed, duration=duration,
        total_output_tokens=total, total_chunks=chunks, usage_reported=reported,
        ttft=Stats.of(ttfts),
        tpot=Stats.of(tpots), itl=Stats.of(itls), e2el=Stats.of(e2els),
        errors=dict(errors.most_common()), request_rate=request_rate,
    )


def chat_url(base_url: str) -> str:
    """``…/v1`` → ``…/v1/chat/completions``; a URL already ending so is kept."""
    url = checked_base_url(base_url)
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class _Endpoint:
    """One endpoint's request body and the stream_options fallback, shared by workers."""

    def __init__(self, url: str, model: str, prompt: str, max_tokens: int | None) -> None:
        self.url = url
        self.model = model
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.with_usage = True
        self._bodies: dict[bool, bytes] = {}

    def body(self) -> bytes:
        body = self._bodies.get(self.with_usage)
        if body is None:
            obj: dict[str, Any] = {
                "model": self.model,
                "messages": [{"role": "user", "content": self.prompt}],
                "stream": True,
            }
            if self.with_usage:
                obj["stream_options"] = {"include_usage": True}
            if self.max_tokens is not None:
                obj["max_tokens"] = self.max_tokens
            body = self._bodies[self.with_usage] = json.dumps(obj).encode()
        return body


async def _one(session: aiohttp.ClientSession, endpoint: _Endpoint) -> RequestOutcome:
    """One request; closes ``session`` when its connection must not be used again."""
    outcome = RequestOutcome()
    while True:
        with_usage = endpoint.with_usage
        start = time.perf_counter()
        try:
            async with session.post(endpoint.url, data=endpoint.body()) as response:
                if response.status != 200:
                    data = await response.read()
                    if (with_usage and response.status in (400, 422)
                            and b"stream_options" in data):
                        # An older server: ask again without it and count chunks instead.
                        endpoint.with_usage = False
                        continue
                    outcome.error = _status_line(response.status, data)
                    return outcome
                parser = ChatChunkParser()
                last = start
                async for data in response.content.iter_any():
                    now = time.perf_counter()
                    for chunk in parser.feed(data):
                        if chunk.text or chunk.tool_calls:
                            outcome.chunks += 1
                            if outcome.ttft is None:
                                outcome.ttft = now - start
                            else:
                                outcome.itl.append(now - last)
                            last = now
                        if chunk.usage is not None:
                            outcome.output_tokens = chunk.usage.completion_tokens
                            outcome.usage_reported = True
                parser.end()
                outcome.e2el = time.perf_counter() - start
        except StreamError as exc:
            # Never reuse the connection of a broken stream: after a body cut short the
            # server closes it, but aiohttp pooled it as soon as the body ended and,
            # unlike httpcore, does not look before reusing it, so the next POST would
            # fail to write. The session holds just this connection; the worker opens
            # a new one.
            await session.close()
            outcome.error = exc.message
            return outcome
        # The sock_read/sock_connect timeouts are ServerTimeoutError, a ClientError and a
        # TimeoutError; a bare TimeoutError would otherwise end the worker, and the run.
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return outcome
        break
    if outcome.ttft is None:
        outcome.error = "the stream carried no content"
        return outcome
    if not outcome.usage_reported:
        outcome.output_tokens = outcome.chunks
    outcome.ok = True
    return outcome


def _status_line(status: int, data: bytes) -> str:
    try:
        message, _ = error_message(json.loads(data))
    except ValueError:
        message = data.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status}: {message}"[:300]


async def abench(
    *,
    base_url: str,
    model: str,
    concurrency: int = 1,
    requests: int = 100,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int | None = None,
    api_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    on_result: Callable[[RequestOutcome], None] | None = None,
    request_rate: float | None = None,
    seed: int = 0,
) -> BenchReport:
    """Send ``requests`` streamed chat completions, ``concurrency`` at a time.

    By default every request is sent as soon as a slot is free, so a run starts with a
    burst of ``concurrency`` requests (vLLM's default, ``--request-rate inf``). With
    ``request_rate`` the requests arrive as a Poisson process of that many per second
    (exponential gaps from ``random.Random(seed)``, as vLLM's ``--request-rate``), still
    at most ``concurrency`` in flight: a request that arrives with every slot busy waits
    for one, and its times count from when it is sent.

    Args:
        base_url: the API root (``http://host:port/v1``) or the full
            ``…/chat/completions`` URL.
        model: the model name sent in each request.
        concurrency: requests in flight at once (a connection each).
        requests: how many requests in all.
        prompt: the user message.
        max_tokens: sent as ``max_tokens`` when given.
        api_key: sent as ``Authorization: Bearer``.
        headers: extra request headers (e.g. a mock upstream's behaviour).
        timeout: seconds a request may wait for its next byte before it fails.
        on_result: called with each finished request (progress display).
        request_rate: requests per second of Poisson arrivals; ``None``: no pacing.
        seed: the arrival schedule's random seed (the same schedule for every run).
    """
    if concurrency < 1 or requests < 1:
        raise UsageError("concurrency and requests must be at least 1")
    if request_rate is not None and not request_rate > 0:
        raise UsageError("request_rate must be a positive number of requests per second")
    arrivals: list[float] = []
    if request_rate is not None:
        rng = random.Random(seed)
        at = 0.0
        for _ in range(requests):
            arrivals.append(at)
            at += rng.expovariate(request_rate)
    endpoint = _Endpoint(chat_url(base_url), model, prompt, max_tokens)
    sent = {"Content-Type": "application/json", "Accept": "text/event-stream",
            "Accept-Encoding": "identity", "User-Agent": "tokenrelay-bench", **(headers or {})}
    if api_key:
        sent["Authorization"] = f"Bearer {api_key}"
    workers = min(concurrency, requests)
    outcomes: list[RequestOutcome] = []
    remaining = requests
    # Only a read timeout: sock_read is the longest wait for the next byte, and a
    # stream may last as long as it keeps sending (total=None).
    client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=timeout)

    # One session with one connection per worker, so ``concurrency`` connections in all
    # and no pool to queue in. Measured here (c=64, 256 requests of 100 tokens from
    # ``tokenrelay mock-upstream``, bench CPU / content chunks) it costs the same as one
    # shared session with limit=concurrency: ~33 µs per chunk at one frame per read
    # (tps=200), 8-10 µs when reads carry ~7 frames (tps=2000). The httpx client it
    # replaced (an AsyncClient per worker) cost 65 and 20 (bench/README.md).
    def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), headers=sent, timeout=client_timeout,
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())

    async def worker() -> None:
        nonlocal remaining
        session = open_session()
        try:
            while remaining > 0:
                index = requests - remaining
                remaining -= 1
                if arrivals:
                    wait = started + arrivals[index] - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if session.closed:  # _one dropped a broken connection
                    session = open_session()
                sent_at = time.perf_counter() - started
                outcome = await _one(session, endpoint)
                outcome.sent_at = sent_at
                outcomes.append(outcome)
                if on_result is not None:
                    on_result(outcome)
        finally:
            await session.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    duration = time.perf_counter() - started
    return summarize(outcomes, duration, base_url=base_url, model=model,
                     concurrency=concurrency, request_rate=request_rate)
