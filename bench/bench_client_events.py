"""Client CPU per content event: the openai SDK vs tokenrelay's async and sync faces.

Over a real socket: ``tokenrelay mock-upstream`` (its own process, so its CPU is not
counted) streams N chat.completion chunks as fast as it can to, in turn:

  * ``openai.AsyncOpenAI().chat.completions.create(stream=True)`` and the SDK's sync
    ``openai.OpenAI()``, each iterated to the end, the text of each delta taken;
  * ``tokenrelay.astream`` and the sync ``tokenrelay.stream`` (events, accumulation,
    deadlines, metrics: the full path), iterated to the end;

The figure is this process's CPU time (every thread: the sync face's event loop thread
counts) divided by the content events, median of the runs, contenders interleaved so that
load from elsewhere hits each alike. Ratios are to the SDK's async client, side by side in
one run; that is what holds on a shared machine, not the absolute figures.

    .venv/bin/python bench/bench_client_events.py            # 4,000 chunks, 5 runs each
    .venv/bin/python bench/bench_client_events.py --smoke    # seconds: the test suite's
    .venv/bin/python bench/bench_client_events.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tokenrelay
from tokenrelay.providers.openai_compat import OpenAIProvider

GOAL = 0.25  # issue 13: both faces at most a quarter of the SDK's CPU per event


@contextmanager
def mock_upstream() -> Iterator[str]:
    """``tokenrelay mock-upstream`` on a free port, in a process of its own."""
    argv = [sys.executable, "-m", "tokenrelay.cli", "mock-upstream", "--port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"(http://\S+)", line)
        if found is None:
            raise RuntimeError(f"mock-upstream did not start: {line!r}")
        yield found.group(1).rstrip("/") + ("" if found.group(1).endswith("/v1") else "/v1")
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def contenders(url: str, model: str) -> dict[str, Callable[[], int]]:
    """Each runs one stream to its end and returns the content events it saw."""
    import openai

    messages = [{"role": "user", "content": "hi"}]
    sync_sdk = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    provider = OpenAIProvider(base_url=url, api_key="k")
    loop = asyncio.new_event_loop()
    async_sdk = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0)

    def sdk_async() -> int:
        async def run() -> int:
            stream = await async_sdk.chat.completions.create(
                model=model, messages=messages, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True})
            n, text = 0, []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
                    n += 1
            return n

        return loop.run_until_complete(run())

    def sdk_sync() -> int:
        stream = sync_sdk.chat.completions.create(
            model=model, messages=messages, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        n, text = 0, []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                n += 1
        return n

    def tr_async() -> int:
        async def run() -> int:
            n, text = 0, []
            async with tokenrelay.astream("hi", provider=provider, model=model) as s:
                async for event in s:
                    if event.type == "text_delta":
                        text.append(event.delta)
                        n += 1
            return n

        return loop.run_until_complete(run())

    def tr_sync() -> int:
        n, text = 0, []
        with tokenrelay.stream("hi", provider=provider, model=model) as s:
            for event in s:
                if event.type == "text_delta":
                    text.append(event.delta)  # type: ignore[union-attr]
                    n += 1
        return n

    return {"openai SDK (async)": sdk_async, "openai SDK (sync)": sdk_sync,
            "tokenrelay.astream": tr_async, "tokenrelay.stream (sync)": tr_sync}


def measure(chunks: int, runs: int, tps: float | None = None) -> dict[str, Any]:
    model = f"tokens={chunks}" + ("" if tps is None else f",tps={tps:g}")
    with mock_upstream() as url:
        fns = contenders(url, model)
        for fn in fns.values():  # warm-up: imports, connection pools, the estimator
            assert fn() == chunks
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(runs):
            for name, fn in fns.items():
                started = time.process_time()
                seen = fn()
                cpu[name].append((time.process_time() - started) / seen * 1e6)
                assert seen == chunks, (name, seen)
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    base = medians["openai SDK (async)"]
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "chunks": chunks,
            "runs": runs, "tps": tps, "python": sys.version.split()[0],
            "us_per_event": medians, "runs_us": cpu,
            "ratio_to_sdk_async": {name: m / base for name, m in medians.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tps", type=float, default=None,
                        help="pace the upstream (chunks per second): one frame per read, each"
                             " a wake-up of its own; default as fast as it can")
    parser.add_argument("--smoke", action="store_true", help="seconds: 300 chunks, 1 run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.chunks, args.runs = 300, 1
    report = measure(args.chunks, args.runs, args.tps)
    pace = "as fast as it can" if args.tps is None else f"{args.tps:g} chunks/s"
    print(f"{args.chunks} content chunks over loopback from tokenrelay mock-upstream ({pace}),"
          f" median of {args.runs}; client CPU (all threads) per content event")
    print(f"{'':26} {'µs/event':>9} {'× SDK (async)':>14}")
    for name, value in report["us_per_event"].items():
        print(f"{name:26} {value:9.1f} {report['ratio_to_sdk_async'][name]:14.2f}")
    print(f"goal: both tokenrelay faces <= {GOAL}× the SDK")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
