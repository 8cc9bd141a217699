"""Terminal rendering: where the answer goes (stdout) and where everything else goes (stderr).

Only answer text (or JSON lines) is written to stdout. The typing indicator, the live
token count and the footer go to stderr, and only when stderr is a terminal (or when
forced with ``--stats``).

When stdout and stderr are the same terminal, the two would interleave on one screen:
the indicator then runs until the first output, is erased, and the text streams
alone; the footer follows the answer. When stdout goes elsewhere (a file, a pipe), the
indicator keeps running on stderr with a live token count until the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console
from rich.json import JSON
from rich.live import Live
from rich.markdown import Markdown
from rich.spinner import Spinner
from rich.text import Text

from .._stream import Result
from ..events import (
    Done,
    RawChunk,
    StreamEvent,
    StructuredPartial,
    TextDelta,
    ToolCallDone,
    ToolResult,
    event_to_dict,
)

__all__ = [
    "BufferedSink",
    "Indicator",
    "JsonSink",
    "MarkdownSink",
    "RawSink",
    "Sink",
    "StructuredSink",
    "Terminal",
    "TextSink",
    "ToolNotes",
    "footer_text",
    "seconds",
]


def _same_tty(a: TextIO, b: TextIO) -> bool:
    try:
        if not (a.isatty() and b.isatty()):
            return False
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError):
        return False
    return (sa.st_rdev, sa.st_ino) == (sb.st_rdev, sb.st_ino)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


@dataclass(slots=True)
class Terminal:
    """What the process writes to, decided once per command."""

    stdout_tty: bool
    stderr_tty: bool
    same_tty: bool
    err: Console

    @classmethod
    def detect(cls) -> Terminal:
        return cls(
            stdout_tty=_isatty(sys.stdout),
            stderr_tty=_isatty(sys.stderr),
            same_tty=_same_tty(sys.stdout, sys.stderr),
            err=Console(stderr=True, highlight=False),
        )

    def out_console(self) -> Console:
        return Console(file=sys.stdout, highlight=False)

    def note(self, text: str, *, style: str = "dim") -> None:
        """One line on stderr (not wrapped by rich: the terminal wraps it if it must)."""
        self.err.print(Text(text, style=style), soft_wrap=True)


class Indicator:
    """A spinner on stderr: "thinking…" until the first token, then a live token count.

    ``before_output()`` is called before anything is written to stdout; when stdout is
    the same terminal the spinner is erased for good so the answer streams cleanly.
    """

    def __init__(self, term: Terminal, *, enabled: bool, label: str = "thinking…") -> None:
        self._term = term
        self._enabled = enabled and term.stderr_tty
        self._spinner = Spinner("dots", Text(label, style="dim"), style="cyan")
        self._live: Live | None = None
        self._tokens = 0
        self._first_at: float | None = None

    def start(self) -> None:
        if not self._enabled or self._live is not None:
            return
        # redirect_stdout=False: rich would otherwise route sys.stdout (the answer)
        # through the stderr console while the spinner runs.
        self._live = Live(self._spinner, console=self._term.err, transient=True,
                          refresh_per_second=12.5, redirect_stdout=False,
                          redirect_stderr=False)
        self._live.start(refresh=True)

    def token(self) -> None:
        """One more chunk of text arrived."""
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
        self._tokens += 1
        if self._live is not None:
            label = f"{self._tokens} token" + ("s" if self._tokens != 1 else "")
            elapsed = now - self._first_at
            if self._tokens > 1 and elapsed > 0:
                label += f" · {(self._tokens - 1) / elapsed:.1f} tok/s"
            self._spinner.update(text=Text(label, style="dim"))

    def before_output(self) -> None:
        if self._term.same_tty:
            self._enabled = False
            self.stop()

    def stop(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()


def seconds(value: float | None) -> str:
    """A duration for people: ``21ms``, ``1.34s``, ``-``."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def footer_text(result: Result, *, model_note: str | None = None,
                cap: int | None = None) -> str:
    """The one-line summary after an answer.

    Example: ``mock · 5 prompt + 12 completion tokens · first token 21ms · 19.8 tok/s ·
    0.61s · stop`` (``~`` marks counts estimated by tokenrelay rather than reported by the
    provider).

    Args:
        model_note: why this model, when the user named none (``TOKENRELAY_MODEL``, ...).
        cap: the output cap a ``length`` finish hit, when the user set none (the
            embedded model's default cap).
    """
    usage, metrics = result.usage, result.metrics
    mark = "~" if usage.estimated else ""
    model = result.model or result.provider
    parts = [
        f"{model} ({model_note})" if model_note else model,
        (f"{mark}{usage.prompt_tokens} prompt + {mark}{usage.completion_tokens} completion"
         " tokens"),
        f"first token {seconds(metrics.time_to_first_token)}",
    ]
    if metrics.tokens_per_second is not None:
        parts.append(f"{metrics.tokens_per_second:.1f} tok/s")
    parts.append(seconds(metrics.total_seconds))
    if result.resumes:  # the connection broke and the answer went on (issue 12)
        parts.append(f"resumed {result.resumes}×")
    finish: str = result.finish_reason
    if finish == "length" and cap is not None:
        finish += f": stopped at the {cap}-token cap (--max-tokens to raise)"
    parts.append(finish)
    return " · ".join(parts)


class Sink:
    """Where the events of one answer go. ``feed`` each event, then ``finish``."""

    def __init__(self, indicator: Indicator, out: TextIO | None = None) -> None:
        self._indicator = indicator
        self._out = out or sys.stdout

    def _write(self, text: str) -> None:
        self._indicator.before_output()
        self._out.write(text)
        self._out.flush()

    def feed(self, event: StreamEvent) -> None:
        raise NotImplementedError

    def finish(self, result: Result | None) -> None:
        """The stream ended (``result`` is None only if it never started)."""


class TextSink(Sink):
    """Plain text, flushed per delta; a final newline so the shell prompt starts clean."""

    def __init__(self, indicator: Indicator, out: TextIO | None = None) -> None:
        super().__init__(indicator, out)
        self._last = ""

    def feed(self, event: StreamEvent) -> None:
        if isinstance(event, TextDelta) and event.delta:
            self._write(event.delta)
            self._last = event.delta

    def finish(self, result: Result | None) -> None:
        if self._last and not self._last.endswith("\n"):
            self._write("\n")
        self._last = ""


class MarkdownSink(Sink):
    """The answer rendered as Markdown with rich, live, on stdout."""

    _INTERVAL = 0.1  # re-parse at most 10 times a second: parsing is O(length)

    def __init__(self, indicator: Indicator, console: Console) -> None:
        super().__init__(indicator)
        self._console = console
        self._live: Live | None = None
        self._parts: list[str] = []
        self._parsed_at = 0.0

    def _markdown(self) -> Markdown:
        return Markdown("".join(self._parts))

    def feed(self, event: StreamEvent) -> None:
        if not isinstance(event, TextDelta):
            return
        self._parts.append(event.delta)
        if self._live is None:
            self._indicator.before_output()
            self._live = Live(console=self._console, refresh_per_second=8,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        now = time.monotonic()
        if now - self._parsed_at >= self._INTERVAL:
            self._parsed_at = now
            self._live.update(self._markdown())

    def finish(self, result: Result | None) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.update(self._markdown())
            live.stop()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


class JsonSink(Sink):
    """One JSON event per line (``--json``), always ending with a ``done`` event."""

    def __init__(self, indicator: Indicator, out: TextIO | None = None) -> None:
        super().__init__(indicator, out)
        self._done = False

    def feed(self, event: StreamEvent) -> None:
        self._done = isinstance(event, Done)
        self._write(_dumps(event_to_dict(event)) + "\n")

    def finish(self, result: Result | None) -> None:
        # Stopped (Ctrl-C) before the stream's own done: say how it ended all the same.
        if not self._done and result is not None:
            self.feed(Done(result.finish_reason, result.usage, result.metrics))


class RawSink(Sink):
    """Each raw provider chunk as one JSON line (``--raw``): a chunk inspector."""

    def feed(self, event: StreamEvent) -> None:
        if not isinstance(event, RawChunk):
            return
        data = event.data
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        if isinstance(data, str):
            try:  # an SSE data payload is already JSON: print it as it came
                json.loads(data)
                self._write(data.strip() + "\n")
                return
            except ValueError:
                pass
        self._write(_dumps(data) + "\n")


class BufferedSink(Sink):
    """``--no-stream``: hold every event back, then hand them all over at the end."""

    def __init__(self, inner: Sink) -> None:
        super().__init__(inner._indicator)
        self._inner = inner
        self._events: list[StreamEvent] = []

    def feed(self, event: StreamEvent) -> None:
        self._events.append(event)

    def finish(self, result: Result | None) -> None:
        events, self._events = self._events, []
        for event in events:
            self._inner.feed(event)
        self._inner.finish(result)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class StructuredSink(Sink):
    """``--schema``: the JSON object filling in.

    On a terminal it is re-rendered live, pretty-printed, on stdout (the final, validated
    value replaces it at the end); otherwise only the final JSON is printed. An answer that
    failed validation is printed as it came (the error follows on stderr).
    """

    _INTERVAL = 0.05  # re-render at most 20 times a second

    def __init__(self, indicator: Indicator, console: Console, *, live: bool,
                 out: TextIO | None = None) -> None:
        super().__init__(indicator, out)
        self._console = console
        self._live_wanted = live
        self._live: Live | None = None
        self._value: Any = None
        self._shown_at = 0.0
        self._stale = False

    def feed(self, event: StreamEvent) -> None:
        if not isinstance(event, StructuredPartial) or not self._live_wanted:
            return
        self._value = event.value
        self._stale = True
        if self._live is None:
            self._indicator.before_output()
            self._live = Live(console=self._console, refresh_per_second=8,
                              vertical_overflow="visible", redirect_stdout=False,
                              redirect_stderr=False)
            self._live.start()
        now = time.monotonic()
        if now - self._shown_at >= self._INTERVAL:
            self._shown_at, self._stale = now, False
            self._live.update(JSON.from_data(self._value, indent=2, default=str))

    def finish(self, result: Result | None) -> None:
        final: Any = None
        if result is not None and result.parsed is not None:
            from pydantic_core import to_jsonable_python

            final = to_jsonable_python(result.parsed, fallback=str)
        live, self._live = self._live, None
        if live is not None:
            if final is not None:
                live.update(JSON.from_data(final, indent=2, default=str))
            elif self._stale:
                live.update(JSON.from_data(self._value, indent=2, default=str))
            live.stop()
            return
        if final is not None:
            self._write(json.dumps(final, indent=2, ensure_ascii=False) + "\n")
        elif result is not None and result.text:
            self._write(result.text if result.text.endswith("\n") else result.text + "\n")


class ToolNotes(Sink):
    """``--tool``: each tool call and its result as a line on stderr; the rest of the
    events go on to the answer's sink."""

    def __init__(self, inner: Sink, term: Terminal) -> None:
        super().__init__(inner._indicator)
        self._inner = inner
        self._term = term

    def feed(self, event: StreamEvent) -> None:
        if isinstance(event, ToolCallDone):
            args = json.dumps(event.arguments, ensure_ascii=False)
            self._term.note(_one_line(f"→ {event.name}({args})"), style="cyan")
        elif isinstance(event, ToolResult):
            style = "yellow" if event.is_error else "dim"
            self._term.note(_one_line(f"← {event.name}: {event.output}"), style=style)
        self._inner.feed(event)

    def finish(self, result: Result | None) -> None:
        self._inner.finish(result)
