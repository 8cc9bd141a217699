"""The stream engine, through the public API, with the scripted MockProvider."""

from __future__ import annotations

import asyncio
import time

import pytest

import tokenrelay
from tokenrelay import (
    Done,
    ErrorEvent,
    RetryPolicy,
    StreamError,
    TextDelta,
    Timeouts,
    UsageEvent,
)
from tokenrelay.providers import MockProvider

FAST_RETRY = RetryPolicy(backoff=0.001, max_backoff=0.01)


def test_events_snapshot_usage_and_done() -> None:
    with tokenrelay.stream("hello there", model="mock") as s:
        events = list(s)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 5
    assert deltas[-1].snapshot == "Mock answer to: hello there"
    assert "".join(d.delta for d in deltas) == deltas[-1].snapshot
    assert isinstance(events[-1], Done)
    assert events[-1].finish_reason == "stop"
    assert next(e for e in events if isinstance(e, UsageEvent)).usage.completion_tokens == 5
    result = s.result
    assert result.text == "Mock answer to: hello there"
    assert result.usage.estimated is False
    assert result.metrics.chunk_count == 5
    assert result.metrics.time_to_first_token is not None


def test_text_stream_and_final() -> None:
    with tokenrelay.stream("x", provider=MockProvider("a b c")) as s:
        assert list(s.text_stream()) == ["a", " b", " c"]
        assert s.final().text == "a b c"


def test_usage_estimated_when_provider_sends_none() -> None:
    result = tokenrelay.complete("q w e", provider=MockProvider("one two three four",
                                                                report_usage=False))
    assert result.usage.estimated is True
    assert result.usage.completion_tokens == 4
    assert result.usage.prompt_tokens == 3


def test_metrics_with_paced_tokens() -> None:
    provider = MockProvider(tokens=11, tps=100, delay=0.05)
    result = tokenrelay.complete("x", provider=provider)
    m = result.metrics
    assert m.time_to_first_token is not None and m.time_to_first_token >= 0.04
    assert m.inter_token_latency_p50 is not None and m.inter_token_latency_p50 >= 0.005
    assert m.tokens_per_second is not None and 20 < m.tokens_per_second < 200
    assert m.total_seconds >= m.time_to_first_token


def test_break_cancels_and_keeps_partial_text() -> None:
    provider = MockProvider(tokens=100, tps=200)
    with tokenrelay.stream("x", provider=provider) as s:
        for i, _ in enumerate(s.text_stream()):
            if i == 2:
                break
    assert s.result.finish_reason == "cancelled"
    assert s.result.text == "Streaming shows each"
    assert provider.cancelled == 1
    assert provider.tokens_sent < 10
    assert s.result.usage.completion_tokens == 3 and s.result.usage.estimated


def test_close_before_iterating() -> None:
    s = tokenrelay.stream("x", provider=MockProvider(tokens=5))
    s.close()
    assert s.result.finish_reason == "cancelled"
    assert s.result.text == ""


async def test_async_break_and_task_cancel() -> None:
    provider = MockProvider(tokens=100, tps=100)
    async with tokenrelay.astream("x", provider=provider) as s:
        async for event in s:
            if isinstance(event, TextDelta) and len(event.snapshot) > 10:
                break
    assert s.result.finish_reason == "cancelled"
    assert provider.cancelled == 1

    provider2 = MockProvider(tokens=100, tps=50)
    s2 = tokenrelay.astream("x", provider=provider2)

    async def consume() -> None:
        async for _ in s2:
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s2.result.finish_reason == "cancelled"
    assert s2.result.text
    assert provider2.cancelled == 1


def test_error_mid_stream_raises_with_partial_text() -> None:
    with (
        pytest.raises(StreamError) as info,
        tokenrelay.stream("x", provider=MockProvider(tokens=10, fault="error", after=3)) as s,
    ):
        for _ in s:
            pass
    assert info.value.partial_text == "Streaming shows each"
    assert s.result.finish_reason == "error"
    assert s.result.text == "Streaming shows each"


def test_error_as_events_when_not_raising() -> None:
    provider = MockProvider(tokens=10, fault="error", after=2)
    with tokenrelay.stream("x", provider=provider, raise_errors=False) as s:
        events = list(s)
    assert isinstance(events[-2], ErrorEvent) and events[-2].code == "mock_error"
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "error"
    with pytest.raises(StreamError):
        s.final()


def test_truncated_stream_is_an_error_not_success() -> None:
    with pytest.raises(StreamError) as info:
        tokenrelay.complete("x", provider=MockProvider(tokens=10, fault="close", after=4))
    assert info.value.code == "truncated"
    assert info.value.partial_text == "Streaming shows each token"


def test_retry_before_first_token_honours_retry_after() -> None:
    provider = MockProvider("ok", fault=429, times=2, retry_after=0.05)
    start = time.monotonic()
    result = tokenrelay.complete("x", provider=provider, retry=FAST_RETRY)
    assert result.text == "ok"
    assert provider.calls == 3
    assert time.monotonic() - start >= 0.1  # two Retry-After waits


def test_retry_after_past_cap_is_refused() -> None:
    provider = MockProvider("ok", fault=429, retry_after=120)
    policy = RetryPolicy(max_retry_after=5)
    start = time.monotonic()
    with pytest.raises(tokenrelay.RateLimitError) as info:
        tokenrelay.complete("x", provider=provider, retry=policy)
    assert provider.calls == 1
    assert time.monotonic() - start < 1
    assert "exceeds" in str(info.value)


def test_retries_exhausted_and_non_retryable() -> None:
    provider = MockProvider("ok", fault=503, times=10)
    with pytest.raises(tokenrelay.ServerError):
        tokenrelay.complete("x", provider=provider, retry=RetryPolicy(max_retries=2, backoff=0))
    assert provider.calls == 3
    provider = MockProvider("ok", fault=401)
    with pytest.raises(tokenrelay.AuthenticationError):
        tokenrelay.complete("x", provider=provider, retry=FAST_RETRY)
    assert provider.calls == 1


def test_never_retries_after_first_token() -> None:
    provider = MockProvider(tokens=10, fault="error", after=2)
    with pytest.raises(StreamError):
        tokenrelay.complete("x", provider=provider, retry=FAST_RETRY)
    assert provider.calls == 1


@pytest.mark.parametrize(
    ("provider", "timeouts", "kind"),
    [
        (MockProvider(tokens=5, delay=5), Timeouts(first_token=0.2), "first_token"),
        (MockProvider(tokens=5, fault="stall", after=2), Timeouts(idle=0.2), "idle"),
        (MockProvider(tokens=50, tps=20), Timeouts(total=0.3), "total"),
    ],
)
def test_timeouts_are_distinct(provider: MockProvider, timeouts: Timeouts, kind: str) -> None:
    start = time.monotonic()
    with pytest.raises(tokenrelay.TimeoutError) as info:
        tokenrelay.complete("x", provider=provider, timeouts=timeouts, retry=FAST_RETRY)
    assert info.value.kind == kind
    assert time.monotonic() - start < 2
    assert provider.cancelled == 1


def test_max_tokens_and_stop() -> None:
    result = tokenrelay.complete("x", provider=MockProvider(tokens=20), max_tokens=3)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 3
    result = tokenrelay.complete("x", provider=MockProvider("one two. three"), stop=".")
    assert result.text == "one two"


def test_callbacks_and_raw() -> None:
    pieces: list[str] = []
    kinds: list[str] = []
    result = tokenrelay.complete("x", provider=MockProvider("a b"), raw=True,
                                 on_text=pieces.append, on_event=lambda e: kinds.append(e.type))
    assert pieces == ["a", " b"]
    assert kinds.count("raw_chunk") == 3 and kinds[-1] == "done"
    assert result.raw_chunks == [{"token": "a"}, {"token": " b"}, {"finish_reason": "stop"}]


def test_batch_runs_concurrently_under_a_limit() -> None:
    active = 0
    peak = 0

    class Counting(MockProvider):
        async def stream(self, request, *, raw=False):  # type: ignore[no-untyped-def]
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            try:
                async for chunk in super().stream(request, raw=raw):
                    yield chunk
            finally:
                active -= 1

    provider = Counting(tokens=5, tps=100)
    results = tokenrelay.batch([f"p{i}" for i in range(6)], concurrency=2, provider=provider)
    assert len(results) == 6 and all(r.finish_reason == "stop" for r in results)
    assert peak == 2

    failing = MockProvider(tokens=5, fault="error", after=1)
    results = tokenrelay.batch(["a", "b"], provider=failing)
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert all(isinstance(r.error, StreamError) for r in results)


def test_invalid_options_are_usage_errors() -> None:
    with pytest.raises(tokenrelay.UsageError, match="temperature"):
        tokenrelay.stream("x", model="mock", temperature=5)
    with pytest.raises(tokenrelay.UsageError, match="unknown model"):
        tokenrelay.stream("x", model="gpt-nonexistent")
    with pytest.raises(tokenrelay.UsageError, match="mock option"):
        tokenrelay.stream("x", model="mock:bogus=1")


def test_messages_and_system() -> None:
    seen = {}

    def answer(request):  # type: ignore[no-untyped-def]
        seen["roles"] = [m.role for m in request.messages]
        return "ok"

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}]
    tokenrelay.complete(messages, system="be brief", provider=MockProvider(answer))
    assert seen["roles"] == ["system", "user", "assistant", "user"]


def test_library_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tokenrelay.log import ExchangeLog

    db = tmp_path / "log.db"
    tokenrelay.complete("logged prompt", model="mock", log=str(db))
    with pytest.raises(StreamError):
        tokenrelay.complete("bad", provider=MockProvider(tokens=5, fault="error", after=2), log=str(db))
    entries = ExchangeLog(db).list()
    assert [e.finish_reason for e in entries] == ["error", "stop"]
    assert entries[0].answer == "Streaming shows" and "mock_error" in (entries[0].error or "")
    assert entries[1].prompt == "logged prompt"


@pytest.mark.parametrize(
    ("provider", "timeouts", "kind"),
    [
        (MockProvider(tokens=5, delay=5), Timeouts(first_token=0.2), "first_token"),
        (MockProvider(tokens=5, fault="stall", after=2), Timeouts(idle=0.2), "idle"),
    ],
)
def test_a_pinned_stream_times_out_the_same_without_asking_for_its_task(
        provider: MockProvider, timeouts: Timeouts, kind: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pin_task(): the timeouts cancel the pinned task; asyncio.current_task() is not
    asked again per chunk (each call is a getpid() syscall on Python 3.11)."""
    from tokenrelay import _timer

    async def main() -> tuple[str, int]:
        calls = 0
        real = asyncio.current_task

        def counting(loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task[object] | None:
            nonlocal calls
            calls += 1
            return real(loop)

        async with tokenrelay.astream("x", provider=provider, timeouts=timeouts,
                                      retry=FAST_RETRY) as stream:
            stream.pin_task()
            monkeypatch.setattr(_timer.asyncio, "current_task", counting)
            with pytest.raises(tokenrelay.TimeoutError) as info:
                async for _ in stream:
                    pass
            monkeypatch.undo()
        return info.value.kind, calls

    start = time.monotonic()
    got, calls = asyncio.run(main())
    assert got == kind and time.monotonic() - start < 2
    assert calls == 0
    assert provider.cancelled == 1
