"""One exchange from the terminal's point of view: stream, render, footer, log.

``run`` and ``chat`` both go through :func:`stream_answer`. Ctrl-C while an answer
streams closes the stream (which aborts the upstream request or stops local decoding)
and returns the partial result with ``interrupted=True``; the caller decides whether
that ends the program (``run``) or returns to the prompt (``chat``).
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, cast

from .. import stream as open_stream
from .._stream import Result
from .._sync_stream import Stream
from ..config import Settings, choose_model
from ..events import StreamEvent, TextDelta
from ..log import ExchangeLog, default_log_path
from ..request import Message
from ._options import ModelOptions
from ._render import (
    BufferedSink,
    Indicator,
    JsonSink,
    MarkdownSink,
    RawSink,
    Sink,
    StructuredSink,
    Terminal,
    TextSink,
    ToolNotes,
    footer_text,
)

__all__ = ["Outcome", "Output", "events_of", "print_footer", "record", "stream_answer"]

Prompt = str | Sequence[Message | dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Output:
    """How an answer is shown."""

    json: bool = False  # every event as a JSON line
    raw: bool = False  # raw provider chunks (as JSON lines, or as events with --json)
    markdown: bool = False
    buffered: bool = False  # --no-stream
    stats: bool | None = None  # footer and indicator; None: when stderr is a terminal
    log: bool = True
    structured: bool = False  # --schema: the JSON object rather than text
    tools: bool = False  # --tool: tool calls and results noted on stderr


@dataclass(frozen=True, slots=True)
class Outcome:
    result: Result
    interrupted: bool


def events_of(stream: Stream) -> closing[Generator[StreamEvent, None, None]]:
    """The stream's events, as an iterator closed on the way out.

    Closing the iterator before the stream matters on Ctrl-C: it cancels the pump on the
    loop thread first, instead of closing the generator while the pump still runs it.
    """
    return closing(cast("Generator[StreamEvent, None, None]", iter(stream)))


def _sink(output: Output, term: Terminal, indicator: Indicator) -> Sink:
    sink: Sink
    if output.json:
        sink = JsonSink(indicator)
    elif output.raw:
        sink = RawSink(indicator)
    elif output.structured:
        sink = StructuredSink(indicator, term.out_console(), live=term.stdout_tty)
    elif output.markdown:
        sink = MarkdownSink(indicator, term.out_console())
    else:
        sink = TextSink(indicator)
    if output.tools and not output.json and not output.raw:
        sink = ToolNotes(sink, term)
    return BufferedSink(sink) if output.buffered else sink


@functools.lru_cache(maxsize=1)
def _exchange_log() -> ExchangeLog:
    return ExchangeLog(default_log_path())


def record(stream: Stream, term: Terminal) -> None:
    """Add the finished exchange to the SQLite log; a broken log only warns."""
    try:
        _exchange_log().record(stream.request, stream.result, source="cli")
    except Exception as exc:  # noqa: BLE001 -- the answer matters more than its log entry
        term.note(f"warning: could not write the exchange log: {exc}", style="yellow")


def print_footer(term: Terminal, result: Result, options: ModelOptions | None = None,
                 provider: Any = None) -> None:
    """The footer; with ``options``, it says why this model when the user named none,
    and which cap a ``length`` finish hit when the user set none (issue 11)."""
    note = cap = None
    if options is not None:
        note = choose_model(options.model, Settings.load(), options.base_url,
                            options.api_key).note
        if options.max_tokens is None:
            cap = getattr(provider, "default_max_tokens", None)
    term.note(footer_text(result, model_note=note, cap=cap))


def stream_answer(
    prompt: Prompt,
    options: ModelOptions,
    *,
    output: Output,
    term: Terminal,
    system: str | None = None,
) -> Outcome:
    """Stream one answer to the terminal.

    Raises:
        UsageError, ConfigurationError: before anything streamed (bad option, unknown
            model, missing model file). Failures of the stream itself are not raised:
            they are in ``outcome.result.error``, after the partial answer was shown.
    """
    stats = term.stderr_tty if output.stats is None else output.stats
    stream = open_stream(
        prompt, raw=output.raw, raise_errors=False, log=False,
        **options.stream_kwargs(system=system),
    )
    indicator = Indicator(term, enabled=stats)
    sink = _sink(output, term, indicator)
    interrupted = False
    try:
        with stream, events_of(stream) as events:
            indicator.start()
            for event in events:
                sink.feed(event)
                if isinstance(event, TextDelta):
                    indicator.token()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        indicator.stop()
        if output.log:  # also when the output broke (``| head``): the exchange happened
            record(stream, term)
    result = stream.result
    sink.finish(result)
    if stats:
        print_footer(term, result, options, stream.provider)
    return Outcome(result, interrupted)
