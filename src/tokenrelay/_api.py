"""The library's entry points: stream / astream / complete / acomplete / batch / abatch."""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import _portal
from ._stream import AsyncStream, Result
from ._sync_stream import Stream
from .config import Settings, resolve
from .errors import TokenrelayError, UsageError
from .events import StreamEvent, TextDelta
from .providers.base import Provider
from .request import Message, Request, RetryPolicy, Timeouts, build_request

__all__ = ["abatch", "acomplete", "astream", "batch", "complete", "stream"]

Prompt = str | Sequence[Message | dict[str, Any]]


@functools.lru_cache(maxsize=4)
def _log_for(path: str | None) -> Any:
    from .log import ExchangeLog

    return ExchangeLog(path)


def _logger(log: bool | str | None, settings: Settings) -> Callable[[Request, Result], Any] | None:
    enabled = settings.log_library if log is None else bool(log)
    if not enabled:
        return None
    exchange_log = _log_for(log if isinstance(log, str) else None)
    return lambda request, result: exchange_log.record(request, result, source="library")


F = TypeVar("F", bound=Callable[..., Any])


def _checked_keywords(func: F) -> F:
    """Refuse an unknown keyword naming the function the caller called and the closest
    option (``complete(max_token=5)`` used to fail inside ``astream()``, with no hint)."""
    parameters = inspect.signature(func).parameters
    allowed = {name for name, p in parameters.items()
               if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        allowed |= _ASTREAM_OPTIONS  # ``**options`` go to astream()

    def check(kwargs: dict[str, Any]) -> None:
        for key in kwargs:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.7)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{func.__name__}() got an unexpected keyword argument"
                                f" {key!r}{hint}")

    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def acall(*args: Any, **kwargs: Any) -> Any:
            check(kwargs)
            return await func(*args, **kwargs)

        return acall  # type: ignore[return-value]

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        check(kwargs)
        return func(*args, **kwargs)

    return call  # type: ignore[return-value]


def astream(
    prompt: Prompt,
    *,
    model: str | None = None,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    provider: Provider | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeouts: Timeouts | None = None,
    retry: RetryPolicy | None = None,
    raw: bool = False,
    raise_errors: bool = True,
    log: bool | str | None = None,
    extra: dict[str, Any] | None = None,
    response_format: Any = None,
    tools: Sequence[Any] | None = None,
    tool_choice: Any = None,
    max_tool_rounds: int = 5,
) -> AsyncStream:
    """Stream an answer, async. Use as ``async with`` and iterate it for events.

    Args:
        prompt: a string, or a list of messages (``{"role": ..., "content": ...}``).
        model: ``smollm2`` (embedded, the default offline), ``mock``, or any model of an
            OpenAI-compatible endpoint.
        system: a system prompt (replaces one in ``prompt``).
        temperature, max_tokens, top_p, stop, seed: sampling options.
        provider: a Provider instance to use instead of resolving ``model``.
        base_url, api_key: an OpenAI-compatible endpoint (else from env / ``.env``).
        timeouts: connect / first-token / idle / total deadlines.
        retry: retries before the first token.
        raw: also yield ``RawChunk`` events and keep ``result.raw_chunks``.
        raise_errors: raise a failure after its ``error`` and ``done`` events.
        log: record the exchange in the SQLite log (``True``, or a database path);
            default ``$TOKENRELAY_LOG``.
        extra: provider-specific options passed through.
        response_format: structured output: a Pydantic model class, a JSON schema dict or
            a ``ResponseFormat``. ``StructuredPartial`` events show the JSON filling in;
            ``result.parsed`` is the validated answer (see :mod:`tokenrelay.structured`).
        tools: Python functions the model may call (run by the stream, see
            :mod:`tokenrelay.tools`), ``Tool``s, or ``ToolSpec``s / dicts the caller runs.
        tool_choice: ``"auto"``, ``"none"``, ``"required"``, or a tool (name) to call.
        max_tool_rounds: rounds of tool calls the stream runs before it stops with
            ``finish_reason="tool_calls"``.

    Example::

        async with tokenrelay.astream("Why is the sky blue?", max_tokens=64) as s:
            async for text in s.text_stream():
                print(text, end="", flush=True)
        print(s.result.usage, s.result.metrics.time_to_first_token)
    """
    settings = Settings.load()
    structured = specs = runnable = None
    if response_format is not None:
        from .structured import StructuredOutput

        structured = StructuredOutput.of(response_format)
    if tools is not None or tool_choice is not None:
        from .tools import tool_choice_param, tools_of

        specs, runnable = tools_of(tools or ())
        tool_choice = tool_choice_param(tool_choice, specs)
    if not isinstance(max_tool_rounds, int) or max_tool_rounds < 0:
        raise UsageError("max_tool_rounds must be a whole number, 0 or more")
    request = build_request(
        prompt, model=model, system=system, temperature=temperature, max_tokens=max_tokens,
        top_p=top_p, stop=stop, seed=seed, extra=extra,
        response_format=None if structured is None else structured.response_format,
        tools=specs, tool_choice=tool_choice,
    )
    if provider is None:
        provider, resolved = resolve(
            model, base_url=base_url, api_key=api_key, settings=settings,
            connect_timeout=(timeouts or Timeouts()).connect,
        )
        request = request.model_copy(update={"model": resolved})
    options: dict[str, Any] = {
        "timeouts": timeouts, "retry": retry, "raw": raw, "raise_errors": raise_errors,
        "on_finish": _logger(log, settings), "structured": structured,
    }
    if runnable and max_tool_rounds:
        from ._tool_loop import ToolLoopStream

        return ToolLoopStream(request, provider, tools=runnable, max_rounds=max_tool_rounds,
                              **options)
    return AsyncStream(request, provider, **options)


_ASTREAM_OPTIONS = frozenset(inspect.signature(astream).parameters) - {"prompt"}
astream = _checked_keywords(astream)


@_checked_keywords
@functools.wraps(astream, assigned=("__doc__",))
def stream(prompt: Prompt, **options: Any) -> Stream:
    """Stream an answer. Use as ``with`` and iterate it for events (see :func:`astream`).

    Example::

        with tokenrelay.stream("Why is the sky blue?", max_tokens=64) as s:
            for text in s.text_stream():
                print(text, end="", flush=True)
        print(s.result.usage)
    """
    return Stream(astream(prompt, **options))


@_checked_keywords
async def acomplete(
    prompt: Prompt,
    *,
    on_text: Callable[[str], Any] | None = None,
    on_event: Callable[[StreamEvent], Any] | None = None,
    **options: Any,
) -> Result:
    """The whole answer at once (built on :func:`astream`), raising its error.

    Args:
        on_text: called with each new piece of text as it arrives.
        on_event: called with every event.
    """
    async with astream(prompt, **options) as s:
        async for event in s:
            if on_event is not None:
                on_event(event)
            if on_text is not None and isinstance(event, TextDelta):
                on_text(event.delta)
        return await s.final()


@_checked_keywords
def complete(
    prompt: Prompt,
    *,
    on_text: Callable[[str], Any] | None = None,
    on_event: Callable[[StreamEvent], Any] | None = None,
    **options: Any,
) -> Result:
    """The whole answer at once; callbacks see it stream. See :func:`acomplete`."""
    with stream(prompt, **options) as s:
        for event in s:
            if on_event is not None:
                on_event(event)
            if on_text is not None and isinstance(event, TextDelta):
                on_text(event.delta)
        return s.final()


@_checked_keywords
async def abatch(
    prompts: Sequence[Prompt], *, concurrency: int = 4, **options: Any
) -> list[Result]:
    """Run many prompts at once, at most ``concurrency`` at a time, results in order.

    A prompt that fails gives a Result with ``finish_reason == "error"`` and ``error``
    set instead of failing the batch.
    """
    if concurrency < 1:
        raise UsageError("concurrency must be at least 1")
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: Prompt) -> Result:
        async with semaphore:
            s = astream(prompt, raise_errors=False, **options)
            async with s:
                try:
                    await s.final()
                except TokenrelayError:
                    pass
            return s.result

    return list(await asyncio.gather(*(one(p) for p in prompts)))


@_checked_keywords
def batch(prompts: Sequence[Prompt], *, concurrency: int = 4, **options: Any) -> list[Result]:
    """Sync :func:`abatch`."""
    return _portal.run(abatch(prompts, concurrency=concurrency, **options))
