"""``tokenrelay bench``: benchmark an OpenAI-compatible streaming endpoint.

The metrics and their definitions are vLLM's serving benchmark's (see
:mod:`tokenrelay.bench`). The progress bar goes to stderr; the table (or ``--json``) to
stdout, so ``tokenrelay bench ... --json | jq .ttft_ms`` works.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from ..bench import DEFAULT_PROMPT, METRICS, BenchReport, RequestOutcome, abench
from ..errors import ProviderError, UsageError

__all__ = ["bench"]

_NAMES = {
    "ttft": "TTFT (time to first token)",
    "tpot": "TPOT (time per output token)",
    "itl": "ITL (inter-token latency)",
    "e2el": "E2EL (end-to-end latency)",
}


def _headers(values: tuple[str, ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"invalid --header {value!r}: write it as 'Name: value'")
        headers[name.strip()] = text.strip()
    return headers


def _table(report: BenchReport) -> Any:
    from rich.table import Table

    summary = Table(title="tokenrelay bench", show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("Endpoint", f"{report.base_url}  (model {report.model})"),
        ("Concurrency", str(report.concurrency)),
        ("Request rate", "all at once (as slots free up)" if report.request_rate is None
         else f"{report.request_rate:g} req/s (Poisson arrivals)"),
        ("Completed / failed", f"{report.completed} / {report.failed}"),
        ("Duration", f"{report.duration:.2f} s"),
        ("Output tokens", f"{report.total_output_tokens}"
         + ("" if report.usage_reported == report.completed else
            f"  ({report.completed - report.usage_reported} requests counted by chunks)")),
        ("Request throughput", f"{report.request_throughput:.2f} req/s"),
        ("Output throughput", f"{report.output_throughput:.1f} tok/s"),
    ]
    for row in rows:
        summary.add_row(*row)

    latencies = Table(show_lines=False)
    latencies.add_column("metric (ms)")
    for col in ("mean", "median", "p95", "p99"):
        latencies.add_column(col, justify="right")
    for name in METRICS:
        stats = getattr(report, name).to_ms()
        latencies.add_row(_NAMES[name], *(
            "–" if stats[col] is None else f"{stats[col]:.2f}"
            for col in ("mean", "median", "p95", "p99")))
    return summary, latencies


@click.command("bench")
@click.option("--base-url", required=True, metavar="URL",
              help="The endpoint's API root, e.g. http://127.0.0.1:8000/v1.")
@click.option("-m", "--model", required=True, metavar="MODEL", help="The model to request.")
@click.option("-c", "--concurrency", type=click.IntRange(1, 100_000), default=1, metavar="N",
              show_default=True, help="Requests in flight at once.")
@click.option("-n", "--requests", type=click.IntRange(1, 10_000_000), default=100, metavar="M",
              show_default=True, help="Requests in all.")
@click.option("--request-rate", type=click.FloatRange(0, min_open=True), metavar="R",
              help="Poisson arrivals at R requests/s, still at most N in flight"
                   " (default: all at once, as slots free up).")
@click.option("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="The user message.")
@click.option("--max-tokens", type=click.IntRange(1), metavar="K",
              help="max_tokens of each request.")
@click.option("--api-key", metavar="KEY", envvar="TOKENRELAY_BENCH_API_KEY",
              help="Sent as a bearer token (default: $TOKENRELAY_BENCH_API_KEY).")
@click.option("-H", "--header", "header", multiple=True, metavar="'NAME: VALUE'",
              help="An extra request header (repeatable).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=300.0,
              show_default=True, metavar="SECONDS",
              help="Longest wait for the next byte of a response.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(base_url: str, model: str, concurrency: int, requests: int,
          request_rate: float | None, prompt: str,
          max_tokens: int | None, api_key: str | None, header: tuple[str, ...],
          timeout: float, as_json: bool) -> None:
    """Benchmark an OpenAI-compatible streaming endpoint (vLLM's serving metrics).

    Sends REQUESTS streamed chat completions, CONCURRENCY at a time, and reports time
    to first token, time per output token, inter-token latency and end-to-end latency
    (mean, median, p95, p99), output tokens/s and requests/s.

    \b
    Examples:
      tokenrelay bench --base-url http://127.0.0.1:8000/v1 -m qwen -c 16 -n 200
      tokenrelay bench --base-url http://127.0.0.1:8000/v1 -m mock -c 64 -n 640 --json
      tokenrelay bench --base-url http://127.0.0.1:8000/v1 -m qwen -c 64 --request-rate 20
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    headers = _headers(header)
    err = Console(stderr=True)
    progress = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                        console=err, transient=True)
    task = progress.add_task("bench", total=requests, failed=0)
    failed = 0

    def on_result(outcome: RequestOutcome) -> None:
        nonlocal failed
        failed += not outcome.ok
        progress.update(task, advance=1, failed=failed)

    with progress:
        report = asyncio.run(abench(
            base_url=base_url, model=model, concurrency=concurrency, requests=requests,
            prompt=prompt, max_tokens=max_tokens, api_key=api_key, headers=headers,
            timeout=timeout, on_result=on_result, request_rate=request_rate))

    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        out = Console()
        for table in _table(report):
            out.print(table)
        for message, count in list(report.errors.items())[:5]:
            err.print(f"[red]{count} × {message}[/]", highlight=False)
    if report.completed == 0:
        first = next(iter(report.errors), "no request completed")
        raise ProviderError(f"all {report.failed} requests failed: {first}")
