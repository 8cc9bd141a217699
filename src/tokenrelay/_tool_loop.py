"""The tool loop: provider rounds with Python tools run between them, as one event stream.

``ToolLoopStream`` is an :class:`~tokenrelay._stream.AsyncStream` (so the sync ``Stream``
wraps it unchanged) whose ``_run`` drives one plain ``AsyncStream`` per round:

1. stream a round; its events pass through, except its ``usage`` and ``done`` (the loop
   reports usage summed over the rounds, and one ``done`` at the very end) and its text
   deltas, which are re-based on one text buffer so ``snapshot`` covers every round;
2. when the round finished with tool calls and every called tool is a Python function:
   run them concurrently (sync ones in worker threads), emit a ``tool_result`` per call
   in call order, append the assistant's ``tool_calls`` message and a ``role="tool"``
   message per result, and stream the next round;
3. stop at an answer, at a call of a tool it cannot run (a ``ToolSpec``: the caller's to
   handle), or after ``max_rounds`` rounds of tools — then ``finish_reason`` stays
   ``"tool_calls"`` and ``result.tool_calls`` holds the calls not run.

A tool that raises, or gets arguments that do not fit its signature, does not end the
stream: the error becomes its result (``is_error``) and the model sees it and can recover.
Retries stay per round and before that round's first token, so nothing is streamed twice.
The ``total`` timeout covers the whole loop, tools included.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_json

from ._stream import AsyncStream, Result, ToolCall, _timeout_error
from .errors import StructuredOutputError, TokenrelayError
from .events import (
    Done,
    ErrorEvent,
    FinishReason,
    Metrics,
    StreamEvent,
    TextBuffer,
    TextDelta,
    ToolCallDone,
    ToolResult,
    Usage,
    UsageEvent,
)
from .providers.base import Provider
from .request import Message, Request, RetryPolicy, Timeouts
from .structured import StructuredOutput
from .tools import Tool

__all__ = ["ToolLoopStream"]

_MAX_OUTPUT = 100_000  # characters of one tool result sent back to the model


def tool_output(value: Any) -> str:
    """What the model gets back: a string as it is, anything else as JSON."""
    if isinstance(value, str):
        text = value
    else:
        text = to_json(value, fallback=str).decode()
    if len(text) > _MAX_OUTPUT:
        text = text[:_MAX_OUTPUT] + f"… [truncated: {len(text)} characters]"
    return text


class ToolLoopStream(AsyncStream):
    """An :class:`AsyncStream` that runs ``tools`` when the model calls them and streams on.

    Args:
        tools: the runnable tools by name (the request's ``tools`` may hold more specs).
        max_rounds: rounds of tool calls run at most; a model still calling tools after
            them ends the stream with ``finish_reason="tool_calls"``.
        The rest as :class:`AsyncStream`.
    """

    def __init__(
        self,
        request: Request,
        provider: Provider,
        *,
        tools: Mapping[str, Tool],
        max_rounds: int = 5,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        raw: bool = False,
        raise_errors: bool = True,
        on_finish: Callable[[Request, Result], Any] | None = None,
        structured: StructuredOutput | None = None,
    ) -> None:
        super().__init__(request, provider, timeouts=timeouts, retry=retry, raw=raw,
                         raise_errors=raise_errors, on_finish=on_finish, structured=structured)
        self.tools = dict(tools)
        self.max_rounds = max_rounds
        self._buffer = TextBuffer()
        self._messages: list[Message] = list(request.messages)
        self._round: AsyncStream | None = None
        self._round_started = 0.0
        # (seconds from the start to the round's start, the round's result)
        self._rounds: list[tuple[float, Result]] = []

    @property
    def text(self) -> str:
        """The text so far, of every round."""
        return self._buffer.text()

    @property
    def messages(self) -> list[Message]:
        """The conversation so far: the request's messages, then each round's assistant
        ``tool_calls`` message and its ``role="tool"`` results."""
        return list(self._messages)

    # -- rounds ----------------------------------------------------------------------

    def _open_round(self, request: Request, deadline: float | None, now: float) -> AsyncStream:
        timeouts = self.timeouts
        if deadline is not None:
            left = deadline - now
            if left <= 0:
                raise _timeout_error("total", self.timeouts, True)
            timeouts = timeouts.model_copy(update={"total": left})
        self._round_started = time.monotonic()
        self._round = AsyncStream(
            request, self.provider, timeouts=timeouts, retry=self.retry, raw=self.raw,
            raise_errors=False, structured=self.structured,
        )
        self._round._owner = self._owner  # iterated by whoever iterates this loop
        return self._round

    def _end_round(self) -> Result:
        stream, self._round = self._round, None
        assert stream is not None
        result = stream.result
        self._rounds.append((self._round_started - self._started_at, result))
        return result

    async def _run(self) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        deadline = None if self.timeouts.total is None else loop.time() + self.timeouts.total
        rounds_of_tools = 0
        try:
            if self.request.model is None:  # the endpoint's first model, for every round
                await self.pick_model()
            request = self.request
            while True:
                stream = self._open_round(request, deadline, loop.time())
                arguments: dict[int, dict[str, Any]] = {}
                async for event in stream:
                    if isinstance(event, TextDelta):
                        yield TextDelta(event.delta, self._buffer, self._buffer.append(event.delta))
                    elif isinstance(event, UsageEvent | Done | ErrorEvent):
                        continue  # summed / reported once by the loop
                    else:
                        if isinstance(event, ToolCallDone):
                            arguments[event.index] = event.arguments
                        yield event
                result = self._end_round()
                if result.error is not None:
                    raise result.error
                calls = result.tool_calls
                if (result.finish_reason != "tool_calls" or not calls
                        or rounds_of_tools >= self.max_rounds
                        or any(c.name not in self.tools for c in calls)):
                    break
                rounds_of_tools += 1
                # Providers that give calls no id (local models) get one: the tool messages
                # must name the call they answer.
                calls = [ToolCall(c.index, c.id or f"call_{rounds_of_tools}_{c.index}", c.name,
                                  c.arguments) for c in calls]
                results: list[ToolResult] = []
                # aclosing: a consumer that stops between two results cancels the tools
                # still running now, not when the generator is garbage-collected.
                async with contextlib.aclosing(
                    self._run_tools(calls, arguments, deadline)
                ) as tool_results:
                    async for tool_result in tool_results:
                        results.append(tool_result)
                        yield tool_result
                request = self._next_request(request, result.text, calls, results)
            final = await self._finish(result.finish_reason, None)
            yield UsageEvent(final.usage)
            yield Done(final.finish_reason, final.usage, final.metrics)
        except TokenrelayError as exc:
            if not isinstance(exc, StructuredOutputError):
                exc.partial_text = self.text
            for event in await self._failed(exc):
                yield event
            if self.raise_errors:
                raise
        finally:
            await self._close_upstream()
            if self._result is None:
                await self._finish("cancelled", None)

    async def _run_tools(
        self, calls: list[ToolCall], arguments: dict[int, dict[str, Any]],
        deadline: float | None,
    ) -> AsyncGenerator[ToolResult, None]:
        # Concurrently, but reported in call order so the event stream is deterministic.
        tasks = [
            asyncio.ensure_future(self._call(call, arguments.get(call.index, {})))
            for call in calls
        ]
        try:
            for task in tasks:
                if deadline is None:
                    yield await task
                    continue
                try:
                    # Only around the wait, never across the yield (it would cancel the
                    # consumer instead). A sync tool's thread cannot be stopped: it is
                    # left to finish, unheard.
                    async with asyncio.timeout_at(deadline):
                        done = await task
                except builtins.TimeoutError as exc:
                    raise _timeout_error("total", self.timeouts, True) from exc
                yield done
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        tool = self.tools[call.name]
        call_id = call.id
        try:
            value = await tool.arun(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            output = f"Error: invalid arguments for {call.name}: {problems}"
            return ToolResult(call.index, call_id, call.name, arguments, output, True)
        except Exception as exc:  # noqa: BLE001 -- the model gets the error and may recover
            output = f"Error: {call.name} raised {type(exc).__name__}: {exc}"
            return ToolResult(call.index, call_id, call.name, arguments, output, True)
        return ToolResult(call.index, call_id, call.name, arguments, tool_output(value),
                          False, value)

    def _next_request(self, request: Request, text: str, calls: list[ToolCall],
                      results: list[ToolResult]) -> Request:
        assistant = Message(
            role="assistant",
            content=text,
            tool_calls=tuple(
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
                for call in calls
            ),
        )
        replies = [Message(role="tool", content=r.output, tool_call_id=r.id) for r in results]
        self._messages += [assistant, *replies]
        choice = request.tool_choice
        if choice == "required" or isinstance(choice, dict):
            # Forcing a tool again would call it forever: after a round of tools the model
            # chooses (as the OpenAI Agents SDK's reset_tool_choice does).
            choice = "auto"
        return request.model_copy(update={"messages": tuple(self._messages),
                                          "tool_choice": choice})

    # -- the end -----------------------------------------------------------------------

    async def _close_upstream(self) -> None:
        if self._round is not None:
            await self._round.aclose()
            self._end_round()

    async def _finish(self, reason: FinishReason, error: TokenrelayError | None) -> Result:
        if self._result is not None:
            return self._result
        rounds = [r for _, r in self._rounds]
        if rounds:
            usage = Usage(
                sum(r.usage.prompt_tokens for r in rounds),
                sum(r.usage.completion_tokens for r in rounds),
                estimated=any(r.usage.estimated for r in rounds),
            )
        else:
            try:
                prompt_tokens = self.provider.count_prompt_tokens(self.request)
            except Exception:  # noqa: BLE001 -- counting must never fail a result
                prompt_tokens = 0
            usage = Usage(prompt_tokens, 0, estimated=True)
        last = rounds[-1] if rounds else None
        self._result = Result(
            text=self.text,
            finish_reason=reason,
            usage=usage,
            metrics=self._metrics(),
            model=self.request.model or "",
            provider=self.provider.name,
            tool_calls=list(last.tool_calls) if last is not None else [],
            raw_chunks=[c for r in rounds for c in r.raw_chunks or ()] if self.raw else None,
            error=error,
            parsed=last.parsed if last is not None else None,
            resumes=sum(r.resumes for r in rounds),
        )
        if self._on_finish is not None:
            with contextlib.suppress(Exception):  # a broken log must not break the answer
                self._on_finish(self.request, self._result)
        return self._result

    def _metrics(self) -> Metrics:
        """Time to first token over the whole loop; the pace (latencies, tokens/s) of the
        last round that produced tokens, which is the answer the reader watched."""
        ttft = None
        for offset, r in self._rounds:
            if r.metrics.time_to_first_token is not None:
                ttft = offset + r.metrics.time_to_first_token
                break
        paced = [r for _, r in self._rounds if r.metrics.chunk_count]
        pace = paced[-1].metrics if paced else Metrics()
        return Metrics(
            time_to_first_token=ttft,
            inter_token_latency_p50=pace.inter_token_latency_p50,
            inter_token_latency_p95=pace.inter_token_latency_p95,
            tokens_per_second=pace.tokens_per_second,
            total_seconds=time.monotonic() - self._started_at,
            chunk_count=sum(r.metrics.chunk_count for _, r in self._rounds),
        )

