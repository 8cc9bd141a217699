"""The stream: provider chunks in, typed events out.

``AsyncStream`` is where the behaviour shared by every provider lives:

* accumulation (text snapshot, tool calls) and the final :class:`Result`;
* usage: the provider's when it reports it, otherwise counted and marked estimated;
* metrics: time to first token, inter-token latency, tokens/s;
* retries, only before the first token, with exponential backoff and jitter,
  ``Retry-After`` honoured up to a cap;
* resumes after it, where the server keeps the answer (the provider hands a
  ``ResumeHandle`` with the first chunk): a broken connection is reopened from the last
  event received, bounded by the same ``RetryPolicy``;
* deadlines: first token, idle between chunks, total (connect is the provider's);
* cancellation: ``aclose()``, leaving the ``async with`` block, breaking the loop or
  cancelling the task closes the provider iterator, which aborts the upstream
  request or stops local decoding; the result keeps the partial text.

``Stream`` (``_sync_stream.py``) is the sync twin: it runs the same ``AsyncStream`` on a
background event loop thread (see ``_portal.py``) and hands events over through a queue.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from ._timer import TaskDeadline
from .errors import (
    APIStatusError,
    ProviderError,
    StreamError,
    TimeoutError,
    TokenrelayError,
)
from .events import (
    Done,
    ErrorEvent,
    FinishReason,
    Metrics,
    RawChunk,
    StreamEvent,
    TextBuffer,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    Usage,
    UsageEvent,
)
from .providers.base import Chunk, Provider, ResumeHandle
from .request import Request, RetryPolicy, Timeouts

if TYPE_CHECKING:
    from .structured import ArgumentsParser, StructuredOutput, StructuredPartials

__all__ = ["AsyncStream", "Result", "ToolCall"]

_log = logging.getLogger("tokenrelay")

_FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter"}


@dataclass(slots=True)
class ToolCall:
    index: int
    id: str | None
    name: str
    arguments: str


@dataclass(slots=True)
class Result:
    """The outcome of one stream.

    Attributes:
        text: everything generated (partial when cancelled or failed).
        finish_reason: stop | length | tool_calls | content_filter | cancelled | error.
        usage: token usage; ``usage.estimated`` when counted by tokenrelay.
        metrics: timing (time to first token, inter-token latency, tokens/s, ...).
        raw_chunks: the raw provider chunks, when the stream was opened with ``raw=True``.
        error: the failure, when ``finish_reason == "error"``.
        parsed: with ``response_format=``, the validated answer (a model instance, or
            the JSON value for a schema dict).
        resumes: how many times a broken connection was reopened and the answer went on
            from where it stood (a tokenrelay gateway, OpenAI background responses).
    """

    text: str
    finish_reason: FinishReason
    usage: Usage
    metrics: Metrics
    model: str
    provider: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    raw_chunks: list[Any] | None = None
    error: TokenrelayError | None = None
    parsed: Any = None
    resumes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "model": self.model,
            "provider": self.provider,
            "usage": self.usage.to_dict(),
            "metrics": self.metrics.to_dict(),
            "resumes": self.resumes,
            "error": None if self.error is None else {
                "code": self.error.code, "message": self.error.message
            },
        }


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class _Accumulator:
    """Pure state: chunks in, events out. No I/O, no clock of its own."""

    __slots__ = (
        "_arguments",
        "_keep_raw",
        "_plain",
        "buffer",
        "chunk_count",
        "finish_reason",
        "first_token_at",
        "last_token_at",
        "parsed",
        "raw_chunks",
        "structured",
        "token_times",
        "tool_calls",
        "usage",
    )

    def __init__(self, *, keep_raw: bool, structured: StructuredPartials | None = None) -> None:
        #: Neither raw chunks nor structured partials to make: text chunks take a shortcut.
        self._plain = not keep_raw and structured is None
        self.buffer = TextBuffer()
        #: With response_format: the partial-JSON state of the answer, and its result.
        self.structured = structured
        self.parsed: Any = None
        self._arguments: dict[int, ArgumentsParser] = {}
        self.tool_calls: dict[int, ToolCall] = {}
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.token_times: list[float] = []
        self.chunk_count = 0
        self._keep_raw = keep_raw
        self.raw_chunks: list[Any] | None = [] if keep_raw else None

    @property
    def started(self) -> bool:
        return self.first_token_at is not None

    @property
    def text(self) -> str:
        return self.buffer.text()

    def _tick(self, now: float) -> None:
        """A chunk with content arrived at ``now``: count it and time it."""
        self.chunk_count += 1
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.token_times.append(now)

    def feed(self, chunk: Chunk, now: float) -> list[StreamEvent]:
        text = chunk.text
        if (text and self._plain and chunk.tool_calls is None and chunk.usage is None
                and chunk.finish_reason is None):
            # Almost every chunk: text and nothing else, no raw chunks or structured output.
            self._tick(now)
            return [TextDelta(text, self.buffer, self.buffer.append(text))]
        events: list[StreamEvent] = []
        if self._keep_raw and chunk.raw is not None:
            self.raw_chunks.append(chunk.raw)  # type: ignore[union-attr]
            events.append(RawChunk(chunk.raw))
        if chunk.text or chunk.tool_calls:
            self._tick(now)
        if chunk.text:
            end = self.buffer.append(chunk.text)
            events.append(TextDelta(chunk.text, self.buffer, end))
            if self.structured is not None:
                partial = self.structured.feed(chunk.text)
                if partial is not None:
                    events.append(partial)
        if chunk.tool_calls:
            for piece in chunk.tool_calls:
                call = self.tool_calls.get(piece.index)
                if call is None:
                    call = self.tool_calls[piece.index] = ToolCall(
                        piece.index, piece.id, piece.name or "", ""
                    )
                else:
                    call.id = call.id or piece.id
                    if piece.name:
                        call.name = call.name or piece.name
                call.arguments += piece.arguments
                arguments = self._arguments.get(piece.index)
                if arguments is None:
                    from .structured import ArgumentsParser

                    arguments = self._arguments[piece.index] = ArgumentsParser()
                events.append(
                    ToolCallDelta(piece.index, call.id, call.name or None, piece.arguments,
                                  call.arguments, arguments.feed(piece.arguments))
                )
        if chunk.usage is not None:
            self.usage = chunk.usage
            events.append(UsageEvent(chunk.usage))
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        return events

    def tool_call_done_events(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for call in sorted(self.tool_calls.values(), key=lambda c: c.index):
            try:
                args = json.loads(call.arguments) if call.arguments.strip() else {}
            except ValueError as exc:
                raise StreamError(
                    f"tool call {call.name!r} has malformed JSON arguments: {exc}",
                    code="malformed_tool_call",
                ) from exc
            events.append(ToolCallDone(call.index, call.id, call.name, args))
        return events

    def metrics(self, started_at: float, now: float) -> Metrics:
        ttft = None if self.first_token_at is None else self.first_token_at - started_at
        gaps = sorted(b - a for a, b in zip(self.token_times, self.token_times[1:]))
        tps = None
        if self.first_token_at is not None and self.last_token_at is not None:
            n = self.usage.completion_tokens if self.usage else self.chunk_count
            span = self.last_token_at - self.first_token_at
            if span > 0 and n > 1:
                # Decode rate: tokens after the first over the time they took.
                tps = (n - 1) / span
        return Metrics(
            time_to_first_token=ttft,
            inter_token_latency_p50=_percentile(gaps, 0.5),
            inter_token_latency_p95=_percentile(gaps, 0.95),
            tokens_per_second=tps,
            total_seconds=now - started_at,
            chunk_count=self.chunk_count,
        )


def _backoff_delay(policy: RetryPolicy, attempt: int, retry_after: float | None) -> float:
    delay = min(policy.max_backoff, policy.backoff * (2**attempt))
    delay = delay * (0.5 + random.random() / 2)  # jitter: spread retries of many clients
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


class AsyncStream:
    """An async stream of events. Use it as an async context manager::

        async with tokenrelay.astream("Why is the sky blue?") as stream:
            async for event in stream:
                ...
        print(stream.result.usage)

    Iterate it once: for events (``async for event in stream``) or for text
    (``stream.text_stream()``); ``await stream.final()`` consumes what is left.
    """

    def __init__(
        self,
        request: Request,
        provider: Provider,
        *,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        raw: bool = False,
        raise_errors: bool = True,
        on_finish: Callable[[Request, Result], Any] | None = None,
        structured: StructuredOutput | None = None,
    ) -> None:
        self.request = request
        self.provider = provider
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.raw = raw
        self.raise_errors = raise_errors
        self._on_finish = on_finish
        #: With response_format: how the answer is parsed and validated.
        self.structured = structured
        self._acc = _Accumulator(
            keep_raw=raw, structured=None if structured is None else structured.partials()
        )
        self._result: Result | None = None
        self._iterating = False
        self._agen: AsyncIterator[StreamEvent] | None = None
        self._upstream: Any = None
        #: The answer's resume handle, from its first chunk (servers that keep answers).
        self._resume: ResumeHandle | None = None
        self._abandon = False  # the handle still needs abandon() if the stream ends early
        self._started_at = time.monotonic()
        #: The one task that iterates this stream, once ``pin_task`` said so.
        self._owner: asyncio.Task[Any] | None = None
        #: The running iteration's timeout timer (bound to ``_owner``).
        self._deadline: TaskDeadline | None = None

    # -- public surface --------------------------------------------------------------

    @property
    def text(self) -> str:
        """The text so far."""
        return self._acc.text

    @property
    def result(self) -> Result:
        """The final result; only once the stream has ended (or been closed)."""
        if self._result is None:
            raise RuntimeError("the stream has not finished: iterate it or await final()")
        return self._result

    @property
    def error(self) -> TokenrelayError | None:
        """The error this stream ended with; None while it runs and after a clean end."""
        result = self._result
        return None if result is None else result.error

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def pin_task(self) -> None:
        """Promise that only the current task will iterate this stream.

        The timeouts then cancel that task without asking ``asyncio.current_task()`` for
        every chunk: on Python 3.11 each call is a ``getpid()`` system call (the running
        loop's fork check), one per relayed chunk in the gateway before it pinned its
        streams (strace, 2026-12-03).
        """
        self._owner = asyncio.current_task()
        if self._deadline is not None:  # iterated by another task from now on (the
            self._deadline.pin(self._owner)  # gateway hands a stream to a background one)

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        if self._agen is None:
            if self._iterating:
                raise RuntimeError("a stream can be iterated only once")
            self._iterating = True
            self._agen = self._run()
        return self._agen

    async def text_stream(self) -> AsyncIterator[str]:
        """Only the new text of each delta."""
        async for event in self:
            if isinstance(event, TextDelta):
                yield event.delta

    async def final(self) -> Result:
        """Consume the rest of the stream and return the result (raises its error)."""
        if self._result is None:
            async for _ in self:
                pass
        result = self.result
        if result.error is not None:
            raise result.error
        return result

    async def aclose(self) -> None:
        """Stop the stream: abort the upstream request / local decoding, keep the partial text."""
        if self._agen is not None:
            agen, self._agen = self._agen, None
            await agen.aclose()  # type: ignore[attr-defined]
        if self._result is None:
            await self._close_upstream()
            await self._finish("cancelled", None)

    # -- internals -------------------------------------------------------------------

    async def pick_model(self) -> None:
        """Ask the provider for its default model when the request names none (an
        endpoint's first listed model; see ``config.choose_model``)."""
        model = await self.provider.default_model()
        if model is not None:
            self.request = self.request.model_copy(update={"model": model})

    async def _close_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            await upstream.aclose()

    async def _run(self) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        total_deadline = (
            None if self.timeouts.total is None else loop.time() + self.timeouts.total
        )
        attempt = 0
        acc = self._acc
        resuming = False
        resume_tries = resume_total = resume_mark = 0
        timer = self._deadline = TaskDeadline(loop, self._owner)  # None: current task, per arm
        try:
            while True:
                first_token, idle = self.timeouts.first_token, self.timeouts.idle
                try:
                    if self.request.model is None:  # once: the endpoint's first model
                        await self.pick_model()
                    if resuming:
                        assert self._resume is not None
                        self._upstream = self._resume.reopen(raw=self.raw).__aiter__()
                    else:
                        self._upstream = self.provider.stream(
                            self.request, raw=self.raw).__aiter__()
                    next_chunk = self._upstream.__anext__
                    while True:
                        # The deadline of this wait (inline: it runs once per chunk).
                        before_first = acc.first_token_at is None
                        if before_first:
                            per, kind = first_token, "first_token"
                        else:
                            per, kind = idle, "idle"
                        deadline = None if per is None else loop.time() + per
                        if total_deadline is not None and (
                            deadline is None or total_deadline <= deadline
                        ):
                            deadline, kind = total_deadline, "total"
                        # One lazily re-armed timer per stream (_timer.py): an
                        # asyncio.timeout_at per chunk cost ~10 µs, a third of the
                        # gateway's own work per relayed chunk.
                        if deadline is not None:
                            timer.arm(deadline)
                        try:
                            chunk = await next_chunk()
                        except StopAsyncIteration:
                            break
                        except asyncio.CancelledError:
                            if deadline is not None and timer.expired():
                                raise _timeout_error(kind, self.timeouts, acc.started) from None
                            raise
                        except TokenrelayError:
                            raise
                        except builtins.TimeoutError as exc:
                            raise _timeout_error(kind, self.timeouts, acc.started) from exc
                        finally:
                            timer.disarm()
                        if before_first and chunk.resume is not None:
                            self._resume, self._abandon = chunk.resume, True
                        for event in acc.feed(chunk, time.monotonic()):
                            yield event
                    if acc.finish_reason is None:
                        raise StreamError(
                            "the stream ended without its terminator (no finish_reason / [DONE]);"
                            " the answer is truncated",
                            code="truncated",
                        )
                    break
                except ProviderError as exc:
                    await self._close_upstream()
                    handle = self._resume
                    if acc.started and handle is not None and _resumable(exc):
                        # The connection broke (or the reconnect failed) after the first
                        # token, and the server keeps the answer: go on from where it stood.
                        if acc.chunk_count > resume_mark:
                            resume_tries = 0  # the last reconnect brought something new
                        resume_mark = acc.chunk_count
                        resume_tries += 1
                        resume_total += 1
                        policy = self.retry
                        if (resume_tries > policy.max_retries
                                or resume_total > policy.max_resumes or not handle.ready()):
                            raise _not_resumed(exc, handle, gave_up=True) from exc
                        delay = 0.0 if resume_tries == 1 else _backoff_delay(
                            policy, resume_tries - 2, getattr(exc, "retry_after", None))
                        if total_deadline is not None and loop.time() + delay >= total_deadline:
                            raise _not_resumed(exc, handle, gave_up=True) from exc
                        _log.info("resuming stream %s after: %s", handle.stream_id, exc)
                        resuming = True
                        if delay:
                            await asyncio.sleep(delay)
                        continue
                    if resuming and handle is not None and isinstance(exc, APIStatusError):
                        # The server refused the reconnect (e.g. 404: it no longer has
                        # the answer): the break is what failed the stream.
                        raise _not_resumed(exc, handle, gave_up=False) from exc
                    if acc.started or not exc.retryable or attempt >= self.retry.max_retries:
                        raise
                    if self._resume is not None:  # a first attempt that will not be resumed
                        await self._abandon_resume()
                        self._resume = None
                    retry_after = getattr(exc, "retry_after", None)
                    if retry_after is not None and retry_after > self.retry.max_retry_after:
                        exc.message += (
                            f" (Retry-After {retry_after:g}s exceeds the"
                            f" {self.retry.max_retry_after:g}s cap; not retrying)"
                        )
                        exc.args = (exc.message,)
                        raise
                    delay = _backoff_delay(self.retry, attempt, retry_after)
                    if total_deadline is not None and loop.time() + delay >= total_deadline:
                        raise
                    attempt += 1
                    await asyncio.sleep(delay)
            await self._close_upstream()
            for event in acc.tool_call_done_events():
                yield event
            reason = acc.finish_reason if acc.finish_reason in _FINISH_REASONS else "stop"
            if acc.structured is not None and reason != "tool_calls":
                acc.parsed = acc.structured.finish(acc.text)  # StructuredOutputError
            result = await self._finish(reason, None)  # type: ignore[arg-type]
            if not acc.usage or acc.usage is not result.usage:
                yield UsageEvent(result.usage)
            yield Done(result.finish_reason, result.usage, result.metrics)
        except TokenrelayError as exc:
            exc.partial_text = acc.text
            for event in await self._failed(exc):
                yield event
            if self.raise_errors:
                raise
        finally:
            # Reached on normal end, on error, and on GeneratorExit / CancelledError
            # (loop broken, aclose(), task cancelled): abort the upstream first.
            timer.close()
            await self._close_upstream()
            if self._result is None:
                await self._finish("cancelled", None)

    async def _failed(self, exc: TokenrelayError) -> list[StreamEvent]:
        """Abort the upstream, finish with ``exc``; the ``error`` and ``done`` events."""
        await self._close_upstream()
        result = await self._finish("error", exc)
        return [ErrorEvent(exc.code, exc.message, exc.retryable),
                Done("error", result.usage, result.metrics)]

    async def _abandon_resume(self) -> None:
        """The answer ends here, early: tell a server that keeps it for us to stop."""
        handle = self._resume
        if handle is not None and self._abandon:
            self._abandon = False
            try:
                await handle.abandon()
            except Exception:  # noqa: BLE001 - best effort; the server's grace ends it
                _log.debug("abandoning stream %s failed", handle.stream_id, exc_info=True)

    async def _finish(self, reason: FinishReason, error: TokenrelayError | None) -> Result:
        if self._result is not None:
            return self._result
        acc = self._acc
        usage = acc.usage
        if usage is None:
            if self.provider.counting_ready():
                usage = self._count()
            else:
                # A cold tokenizer load (cl100k_base: ~0.26 s) would stall the loop, and a
                # stalled loop closes no sockets: the upstream just aborted would go on
                # sending. Count in a thread; the loop finishes closing meanwhile.
                counting = asyncio.ensure_future(asyncio.to_thread(self._count))
                try:
                    usage = await asyncio.shield(counting)
                except asyncio.CancelledError:
                    # Cancelled again while counting: the result still gets its usage.
                    usage = self._count()
                    self._set_result(reason, error, usage)
                    raise
        result = self._set_result(reason, error, usage)
        if self._abandon and reason in ("cancelled", "error"):
            # After the result is set: a second cancellation arriving while this request
            # is out must not leave the stream without one.
            await self._abandon_resume()
        return result

    def _count(self) -> Usage:
        """Usage counted by the provider's tokenizer (``estimated``)."""
        acc = self._acc
        try:
            prompt_tokens = self.provider.count_prompt_tokens(self.request)
            completion_tokens = (
                self.provider.count_tokens(acc.text, model=self.request.model)
                + sum(self.provider.count_tokens(c.arguments) for c in acc.tool_calls.values())
            )
        except Exception:  # noqa: BLE001 - counting must never turn a result into a failure
            _log.warning("token counting failed; usage reported as 0", exc_info=True)
            prompt_tokens, completion_tokens = 0, 0
        return Usage(prompt_tokens, completion_tokens, estimated=True)

    def _set_result(self, reason: FinishReason, error: TokenrelayError | None,
                    usage: Usage) -> Result:
        if self._result is not None:
            return self._result
        acc = self._acc
        acc.usage = usage
        now = time.monotonic()
        self._result = Result(
            text=acc.text,
            finish_reason=reason,
            usage=usage,
            metrics=acc.metrics(self._started_at, now),
            model=self.request.model or "",
            provider=self.provider.name,
            tool_calls=sorted(acc.tool_calls.values(), key=lambda c: c.index),
            raw_chunks=acc.raw_chunks,
            error=error,
            parsed=acc.parsed,
            resumes=0 if self._resume is None else self._resume.resumes,
        )
        if self._on_finish is not None:
            try:
                self._on_finish(self.request, self._result)
            except Exception:  # noqa: BLE001 - a broken log must not break the answer
                _log.warning("the on_finish hook failed", exc_info=True)
        return self._result


#: Errors of a stream whose connection broke (as opposed to one the server ended on
#: purpose with an error frame): reset / closed mid-stream, cut without its terminator.
_BREAKS = frozenset({"connection_lost", "truncated"})


def _resumable(exc: ProviderError) -> bool:
    """Whether ``exc``, after the first token, calls for a reconnect (given a handle): the
    connection broke or stalled (idle timeout), or a reconnect could not get through
    (connection refused, 429, 5xx)."""
    if isinstance(exc, TimeoutError):
        return exc.kind in ("idle", "connect")
    if isinstance(exc, StreamError):
        return exc.code in _BREAKS
    return exc.retryable


def _not_resumed(exc: ProviderError, handle: ResumeHandle, *, gave_up: bool) -> StreamError:
    """The error a broken answer ends with when resuming it was refused or given up
    (``RetryPolicy``: ``max_retries`` in a row without progress, ``max_resumes`` in all)."""
    why = ("gave up resuming it (the retry policy's limit)" if gave_up
           else "the server refused to resume it")
    return StreamError(
        f"the connection broke mid-stream and {why}; last error: {exc.message} (stream"
        f" {handle.stream_id}, resumed {handle.resumes} time(s))",
        code="connection_lost",
    )


def _timeout_error(kind: str, timeouts: Timeouts, started: bool) -> TimeoutError:
    if kind == "total":
        return TimeoutError(
            f"the stream took longer than the total timeout of {timeouts.total:g}s",
            kind="total",
        )
    if kind == "idle":
        return TimeoutError(
            f"no chunk for {timeouts.idle:g}s after the stream started (idle timeout);"
            " the provider stalled",
            kind="idle",
        )
    return TimeoutError(
        f"no first token within {timeouts.first_token:g}s (first-token timeout)",
        kind="first_token",
    )
