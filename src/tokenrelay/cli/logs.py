"""``tokenrelay logs``: the exchanges the CLI recorded (SQLite, see ``tokenrelay.log``)."""

from __future__ import annotations

import json
import time

import click
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..errors import UsageError
from ..log import ExchangeLog, LogEntry, default_log_path
from ._render import Terminal, seconds

__all__ = ["logs"]

_PROMPT_WIDTH = 48


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _tokens(entry: LogEntry) -> str:
    if entry.prompt_tokens is None and entry.completion_tokens is None:
        return "-"
    mark = "~" if entry.usage_estimated else ""
    return f"{mark}{entry.prompt_tokens or 0}/{mark}{entry.completion_tokens or 0}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


_FINISH_STYLE = {"stop": "green", "length": "yellow", "cancelled": "yellow", "error": "red"}


def _list_table(entries: list[LogEntry]) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    for name, justify in (("id", "right"), ("when", "left"), ("model", "left"),
                          ("finish", "left"), ("tokens", "right"), ("first token", "right"),
                          ("tok/s", "right"), ("prompt", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "prompt")  # type: ignore[arg-type]
    for e in entries:
        table.add_row(
            str(e.id), _when(e.created_at), e.model,
            Text(e.finish_reason, style=_FINISH_STYLE.get(e.finish_reason, "")),
            _tokens(e), seconds(e.time_to_first_token), _rate(e.tokens_per_second),
            _one_line(e.prompt, _PROMPT_WIDTH),
        )
    return table


def _detail(entry: LogEntry) -> Group:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    for name, value in (
        ("id", str(entry.id)),
        ("when", _when(entry.created_at)),
        ("source", entry.source),
        ("model", f"{entry.model} ({entry.provider})"),
        ("finish", entry.finish_reason),
        ("tokens", _tokens(entry) + " (prompt/completion)"),
        ("first token", seconds(entry.time_to_first_token)),
        ("tokens/s", _rate(entry.tokens_per_second)),
        ("total", seconds(entry.total_seconds)),
    ):
        facts.add_row(name, value)
    if entry.error:
        facts.add_row("error", Text(entry.error, style="red"))
    parts: list[object] = [facts]
    for m in entry.messages:
        parts.append(Panel(Text(m["content"]), title=m["role"], title_align="left",
                           border_style="dim"))
    parts.append(Panel(Text(entry.answer), title="answer", title_align="left",
                       border_style="cyan"))
    return Group(*parts)  # type: ignore[arg-type]


def _open() -> ExchangeLog:
    return ExchangeLog(default_log_path())


@click.group("logs", invoke_without_command=True)
@click.option("-n", "--count", default=20, show_default=True, type=click.IntRange(min=1),
              help="How many of the latest exchanges.")
@click.option("--json", "as_json", is_flag=True, help="As JSON (one object per line).")
@click.pass_context
def logs(ctx: click.Context, count: int, as_json: bool) -> None:
    """List the latest exchanges (newest first); `logs show ID` shows one fully.

    Every exchange of the CLI is recorded, unless --no-log: prompt, answer (partial when
    stopped or failed), model, usage, timings, finish reason and error. The database is
    under $TOKENRELAY_HOME, else the user data directory (`tokenrelay logs path`).
    """
    if ctx.invoked_subcommand is not None:
        return
    entries = _open().list(count)
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry.to_dict(), ensure_ascii=False))
        return
    term = Terminal.detect()
    if not entries:
        term.note("no exchanges logged yet")
        return
    term.out_console().print(_list_table(entries))


@logs.command("show")
@click.argument("entry_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
@click.pass_context
def show(ctx: click.Context, entry_id: int, as_json: bool) -> None:
    """Show exchange ID fully: messages, answer, usage and timings."""
    # `tokenrelay logs --json show 3` means the same as `logs show 3 --json`.
    as_json = as_json or bool(ctx.parent and ctx.parent.params.get("as_json"))
    entry = _open().get(entry_id)
    if entry is None:
        raise UsageError(f"no exchange {entry_id} in the log; `tokenrelay logs` lists them")
    if as_json:
        click.echo(json.dumps(entry.to_dict(), ensure_ascii=False))
        return
    Terminal.detect().out_console().print(_detail(entry))


@logs.command("path")
def path() -> None:
    """Print where the log database is."""
    click.echo(str(default_log_path()))
