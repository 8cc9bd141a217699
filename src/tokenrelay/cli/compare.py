"""``tokenrelay compare PROMPT``: the same prompt streamed and not, side by side.

Both runs generate the same way; what differs is when the reader sees text. Streamed,
the first words show after the time to first token; non-streamed, nothing shows until
the whole answer is done. The runs are sequential so they do not compete for the CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import click
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .. import stream as open_stream
from .._stream import Result
from ..events import TextDelta
from ._exchange import events_of, record
from ._options import ModelOptions, model_options
from ._render import Indicator, Terminal, TextSink
from .run import read_prompt

__all__ = ["Run", "compare"]


@dataclass(frozen=True, slots=True)
class Run:
    """One mode's numbers, as the reader experiences them (wall clock, in this process)."""

    mode: str
    result: Result
    first_visible: float | None  # seconds until text appeared on screen
    total: float

    def to_dict(self) -> dict[str, object]:
        metrics = self.result.metrics
        return {
            "mode": self.mode,
            "first_visible_seconds": self.first_visible,
            "total_seconds": self.total,
            "time_to_first_token": metrics.time_to_first_token,
            "tokens_per_second": metrics.tokens_per_second,
            "usage": self.result.usage.to_dict(),
            "finish_reason": self.result.finish_reason,
            "text": self.result.text,
        }


def _one(prompt: str, options: ModelOptions, *, streamed: bool, term: Terminal,
         log: bool, show: bool = False) -> Run:
    """One run; ``show``: the streamed text goes to stdout as it arrives (issue 11: the
    point of the comparison is seeing it)."""
    label = "streaming…" if streamed else "waiting for the whole answer…"
    indicator = Indicator(term, enabled=True, label=label)
    sink = TextSink(indicator) if show and streamed else None
    started = time.monotonic()
    first_visible: float | None = None
    stream = open_stream(prompt, raise_errors=False, log=False, **options.stream_kwargs())
    try:
        with stream, events_of(stream) as events:
            indicator.start()
            for event in events:
                if isinstance(event, TextDelta):
                    if sink is not None:
                        sink.feed(event)
                    indicator.token()
                    if streamed and first_visible is None:
                        first_visible = time.monotonic() - started
    finally:
        indicator.stop()
        if sink is not None:
            sink.finish(stream.result)
        if log:
            record(stream, term)
    total = time.monotonic() - started
    result = stream.result
    if result.error is not None:
        raise result.error
    if not streamed and result.text:
        first_visible = total  # the whole answer appears at once, at the end
    return Run("streamed" if streamed else "non-streamed", result, first_visible, total)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _table(runs: list[Run]) -> Table:
    table = Table(title="streamed vs non-streamed", title_style="bold", expand=False)
    table.add_column("")
    for run in runs:
        table.add_column(run.mode, justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("first visible text", [_seconds(r.first_visible) for r in runs]),
        ("total time", [_seconds(r.total) for r in runs]),
        ("tokens (prompt/completion)", [
            ("~" if r.result.usage.estimated else "")
            + f"{r.result.usage.prompt_tokens}/{r.result.usage.completion_tokens}"
            for r in runs
        ]),
        ("tokens/s", [
            "-" if r.result.metrics.tokens_per_second is None
            else f"{r.result.metrics.tokens_per_second:.1f}"
            for r in runs
        ]),
        ("finish", [r.result.finish_reason for r in runs]),
    ]
    for name, values in rows:
        table.add_row(name, *values)
    return table


def _answers(runs: list[Run]) -> Table:
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in runs:
        grid.add_column(ratio=1)
    grid.add_row(*(Panel(Text(r.result.text), title=r.mode, title_align="left")
                   for r in runs))
    return grid


@click.command("compare")
@click.argument("prompt", nargs=-1)
@model_options
@click.option("--json", "as_json", is_flag=True, help="Both runs as one JSON object.")
@click.option("--no-log", is_flag=True, help="Do not record the exchanges in the log.")
def compare(prompt: tuple[str, ...], options: ModelOptions, as_json: bool,
            no_log: bool) -> None:
    """Stream PROMPT, then ask it again without streaming, and compare.

    The streamed answer shows as it is generated; then, for each mode, when the first
    text became visible against the total time, the tokens and tokens/s, and both
    answers side by side.
    """
    text = read_prompt(prompt)
    term = Terminal.detect()
    if not as_json:
        term.out_console().rule("streamed", style="dim")
    runs = [_one(text, options, streamed=s, term=term, log=not no_log, show=not as_json)
            for s in (True, False)]
    if as_json:
        click.echo(json.dumps({"prompt": text, "runs": [r.to_dict() for r in runs]},
                              ensure_ascii=False))
        return
    term.out_console().print(Group(_table(runs), _answers(runs)))
