"""``tokenrelay logs``: the exchanges of the CLI, the library and the gateway (SQLite, see
``tokenrelay.log``), one list, readable at 80 columns."""

from __future__ import annotations

import json
import time

import click
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..errors import UsageError
from ..log import LogEntry, LogReader, default_log_path, gateway_log_path
from ._render import Terminal, seconds

__all__ = ["logs"]

_PROMPT_CHARS = 300  # a prompt longer than any terminal line: rich cuts it to fit


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _short_when(timestamp: float) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(timestamp))


def _tokens(entry: LogEntry, sep: str = "+") -> str:
    if entry.prompt_tokens is None and entry.completion_tokens is None:
        return "-"
    mark = "~" if entry.usage_estimated else ""
    return f"{mark}{entry.prompt_tokens or 0}{sep}{mark}{entry.completion_tokens or 0}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


_FINISH_STYLE = {"stop": "green", "ok": "green", "length": "yellow", "cancelled": "yellow",
                 "error": "red", "interrupted": "red"}


_SOURCE = {"cli": "cli", "library": "lib", "gateway": "gw"}


def _list_table(entries: list[LogEntry], width: int) -> Table:
    """One line per entry at any width: every column but the prompt keeps its size,
    the prompt takes what is left and is cut with "…" (issue 11: at 80 columns the
    prompt wrapped to one word per line). Below 100 columns the timing columns go."""
    wide = width >= 100
    table = Table(header_style="bold", box=None, pad_edge=False, expand=True,
                  collapse_padding=True)
    columns: list[tuple[str, str, int | None]] = [
        ("id", "right", None), ("when", "left", None), ("src", "left", None),
        ("model", "left", 16), ("finish", "left", None), ("tokens", "right", None)]
    if wide:
        columns += [("first token", "right", None), ("tok/s", "right", None)]
    for name, justify, max_width in columns:
        table.add_column(name, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                         overflow="ellipsis", max_width=max_width)
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", ratio=1, min_width=10)
    for e in entries:
        cells: list[object] = [
            e.ref, _when(e.created_at) if wide else _short_when(e.created_at),
            _SOURCE.get(e.source, e.source), e.model,
            Text(e.finish_reason, style=_FINISH_STYLE.get(e.finish_reason, "")),
            _tokens(e),
        ]
        if wide:
            cells += [seconds(e.time_to_first_token), _rate(e.tokens_per_second)]
        cells.append(_one_line(e.prompt, _PROMPT_CHARS))
        table.add_row(*cells)  # type: ignore[arg-type]
    return table


def _detail(entry: LogEntry) -> Group:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    for name, value in (
        ("id", entry.ref),
        ("when", _when(entry.created_at)),
        ("source", entry.source),
        ("model", f"{entry.model} ({entry.provider})" if entry.provider else entry.model),
        ("finish", entry.finish_reason),
        ("tokens", _tokens(entry, " + ").replace(" + ", " prompt + ", 1) + " completion"),
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


def _open(gateway_db: str | None = None) -> LogReader:
    return LogReader(default_log_path(), gateway_db or gateway_log_path())


_SOURCES = ("cli", "library", "gateway")


@click.group("logs", invoke_without_command=True)
@click.option("-n", "--count", default=20, show_default=True, type=click.IntRange(min=1),
              help="How many of the latest exchanges.")
@click.option("-q", "--query", metavar="TEXT",
              help="Only exchanges whose prompt, messages, answer or model contain TEXT.")
@click.option("-s", "--source", "sources", multiple=True, type=click.Choice(_SOURCES),
              help="Only these sources (repeatable).")
@click.option("--refused", is_flag=True,
              help="Also the gateway's refused requests (401, 429, ...: no model ran).")
@click.option("--json", "as_json", is_flag=True, help="As JSON (one object per line).")
@click.option("--gateway-db", metavar="PATH",
              help="The gateway's request log, when its config moved it [requests.db"
                   " beside the log].")
@click.pass_context
def logs(ctx: click.Context, count: int, query: str | None, sources: tuple[str, ...],
         refused: bool, as_json: bool, gateway_db: str | None) -> None:
    """List the latest exchanges of the CLI, library and gateway, newest first.

    `logs show ID` shows one fully (ID as listed: 12, or g12 for the gateway).
    Each is recorded with prompt, answer (partial when stopped or failed), model,
    usage (tokens: prompt+completion), timings, finish reason and error. The CLI's
    log is under $TOKENRELAY_HOME, else the user data directory (`tokenrelay logs
    path`); the gateway's requests.db beside it is read read-only.

    \b
    tokenrelay logs -q "sky"             search
    tokenrelay logs -s gateway --json    the gateway's requests, as JSON lines
    tokenrelay -c "and in French?"       continue the latest conversation
    """
    if ctx.invoked_subcommand is not None:
        return
    reader = _open(gateway_db)
    entries = reader.list(count, query=query, sources=sources, refused=refused)
    term = Terminal.detect()
    if reader.gateway_error:
        term.note(f"warning: could not read the gateway's log: {reader.gateway_error}",
                  style="yellow")
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry.to_dict(), ensure_ascii=False))
        return
    if not entries:
        term.note(f"no exchanges match {query!r}" if query else "no exchanges logged yet")
        return
    console = term.out_console()
    console.print(_list_table(entries, console.width))


@logs.command("show")
@click.argument("entry_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="As one JSON object.")
@click.pass_context
def show(ctx: click.Context, entry_id: str, as_json: bool) -> None:
    """Show exchange ID fully (12, or g12 for the gateway): messages, answer, usage
    and timings."""
    # `tokenrelay logs --json show 3` means the same as `logs show 3 --json`.
    parent = ctx.parent.params if ctx.parent else {}
    as_json = as_json or bool(parent.get("as_json"))
    entry = _open(parent.get("gateway_db")).get(entry_id)
    if entry is None:
        raise UsageError(f"no exchange {entry_id} in the log; `tokenrelay logs` lists them")
    if as_json:
        click.echo(json.dumps(entry.to_dict(), ensure_ascii=False))
        return
    Terminal.detect().out_console().print(_detail(entry))


@logs.command("path")
@click.option("--gateway", is_flag=True, help="The gateway's request log instead.")
def path(gateway: bool) -> None:
    """Print where the log database is."""
    click.echo(str(gateway_log_path() if gateway else default_log_path()))
