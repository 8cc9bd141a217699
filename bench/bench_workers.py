#!/usr/bin/env python
"""Several processes on one port: uvicorn's workers against Granian's, and the gateway
with ``--workers 2`` against ``--workers 1``, side by side in one run.

    .venv/bin/python bench/bench_workers.py             # ~4 minutes on 2 cores
    .venv/bin/python bench/bench_workers.py --smoke     # seconds: that it runs (the tests)
    .venv/bin/python bench/bench_workers.py --parts floor --json out.json

Parts:

* **floor**: the bare relay of ``bench/minimal_relay.py`` (a plain ASGI callable: parse
  and re-serialise each upstream frame, nothing else) served by uvicorn (httptools,
  uvloop; ``uvicorn.run(workers=N)``) and by Granian (its Rust HTTP/1 server and process
  manager, ``asginl`` interface, uvloop), each with 1 and 2 workers, at concurrency
  1 / 64 / 256: CPU per relayed chunk of the server's process tree (utime+stime from
  /proc, divided by the content chunks the clients received), the figure that decides
  which server ``tokenrelay serve --workers`` uses.
* **scale**: ``tokenrelay serve`` (as shipped: request log on, one API key) with
  ``--workers 1`` and ``--workers 2``, at saturation (c=256 streams of 100 chunks at
  2,000 tokens/s from the mock upstream): relayed chunks per second, and the share of
  the machine's CPU each of the gateway, the mock upstream and this load generator
  used, since all three run on the same cores.

The upstream is one ``tokenrelay mock-upstream``; the load generator is this process
(``tokenrelay.bench.abench``). Nothing is asserted; figures are printed (and ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import (
    FAST,
    ROOT,
    Proc,
    Run,
    console,
    fmt,
    free_port,
    measure,
    tokenrelay_proc,
    upstream_proc,
)

SERVERS = ("uvicorn", "granian")


def floor_proc(upstream: Proc, server: str, workers: int) -> Proc:
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "minimal_relay.py"), "--port", str(port),
            "--upstream", upstream.url, "--raw", "--server", server,
            "--workers", str(workers)]
    return Proc(f"{server}-w{workers}", argv, port, "/healthz")


def granian_missing() -> str | None:
    try:
        import granian  # noqa: F401
    except ImportError:
        return "granian is not installed (pip install granian; the test extra has it)"
    return None


async def floor_part(upstream: Proc, workdir: Path, levels: list[tuple[int, int]],
                     worker_counts: list[int]) -> dict[str, Any]:
    console.print("[bold]Floor[/]: bench/minimal_relay.py --raw, CPU per relayed chunk"
                  " of the server's process tree")
    out: dict[str, Any] = {}
    missing = granian_missing()
    servers = [s for s in SERVERS if not (s == "granian" and missing)]
    if missing:
        console.print(f"[yellow]Granian skipped: {missing}[/]")
        out["granian_skipped"] = missing
    for workers in worker_counts:
        for server in servers:
            proc = floor_proc(upstream, server, workers)
            proc.start(workdir)
            try:
                for c, n in levels:
                    run = await measure(f"{server}/{workers}", proc.url, FAST, concurrency=c,
                                        requests=n, gateway=proc, upstream=upstream)
                    out[f"{server}/w{workers}@{c}"] = summary(run)
            finally:
                proc.stop()
    console.print("\n  µs of server CPU per relayed chunk (lower is cheaper)")
    console.print("  " + f"{'workers':<8}{'c':>6}" + "".join(f"{s:>12}" for s in servers)
                  + f"{'granian/uvicorn':>18}")
    for workers in worker_counts:
        for c, _ in levels:
            row = [out.get(f"{s}/w{workers}@{c}", {}).get("cpu_us_per_chunk")
                   for s in servers]
            ratio = (row[1] / row[0]) if len(row) == 2 and row[0] and row[1] else None
            console.print("  " + f"{workers:<8}{c:>6}" + "".join(f"{fmt(v, 1):>12}" for v in row)
                          + f"{fmt(ratio):>18}")
    return out


def summary(run: Run) -> dict[str, Any]:
    r = run.report
    cores = os.cpu_count() or 1
    duration = r.duration or float("nan")
    return {
        "completed": r.completed, "requests": r.requests, "chunks": r.total_chunks,
        "failed": r.requests - r.completed, "duration_s": r.duration,
        "chunks_per_s": r.total_chunks / duration if r.duration else None,
        "cpu_us_per_chunk": run.per_chunk_us(run.gateway_cpu),
        "cpu_share": {"server": (run.gateway_cpu or 0) / duration / cores,
                      "upstream": run.upstream_cpu / duration / cores,
                      "load_generator": run.client_cpu / duration / cores},
        "ttft_p50_ms": None if r.ttft.median is None else r.ttft.median * 1e3,
    }


async def scale_part(upstream: Proc, workdir: Path, concurrency: int,
                     requests: int) -> dict[str, Any]:
    console.print(f"[bold]Scale[/]: tokenrelay serve --workers 1 vs 2, c={concurrency},"
                  f" {requests} requests of 100 chunks")
    out: dict[str, Any] = {}
    for workers in (1, 2):
        gateway = tokenrelay_proc(workdir, upstream, name=f"tokenrelay-w{workers}")
        gateway.argv += ["--workers", str(workers), "--quiet"]
        gateway.start(workdir)
        try:
            run = await measure(f"workers={workers}", gateway.url, "fast",
                                concurrency=concurrency, requests=requests, gateway=gateway,
                                upstream=upstream)
            out[f"w{workers}"] = summary(run)
        finally:
            gateway.stop()
    one, two = out["w1"], out["w2"]
    if one["chunks_per_s"] and two["chunks_per_s"]:
        out["speedup"] = two["chunks_per_s"] / one["chunks_per_s"]
    console.print(f"\n  {'':<12}{'chunks/s':>10}{'failed':>8}{'µs/chunk':>10}"
                  f"{'CPU: gateway':>14}{'upstream':>10}{'load gen':>10}")
    for name in ("w1", "w2"):
        s = out[name]
        share = s["cpu_share"]
        console.print(f"  {'--workers ' + name[1]:<12}{fmt(s['chunks_per_s'], 0):>10}"
                      f"{s['failed']:>8}{fmt(s['cpu_us_per_chunk'], 1):>10}"
                      f"{share['server']:>14.0%}{share['upstream']:>10.0%}"
                      f"{share['load_generator']:>10.0%}")
    console.print(f"  --workers 2 / --workers 1: {fmt(out.get('speedup'))}× (goal ≥ 1.5×;"
                  f" CPU shares are of all {os.cpu_count()} cores)")
    return out


async def main(args: argparse.Namespace) -> None:
    levels = [(1, 100), (64, 256), (256, 384)]
    worker_counts = [1, 2]
    scale_c, scale_n = 256, 1536
    if args.smoke:
        levels, worker_counts, scale_c, scale_n = [(1, 4), (8, 16)], [1], 8, 16
    console.print(f"[bold]bench_workers[/] {time.strftime('%Y-%m-%d %H:%M')}  "
                  f"{platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                               "cores": os.cpu_count(),
                               "load_average_start": os.getloadavg()[0]}
    upstream = upstream_proc()
    upstream.start(workdir)
    try:
        parts = set(args.parts.split(","))
        if "floor" in parts:
            results["floor"] = await floor_part(upstream, workdir, levels, worker_counts)
        if "scale" in parts:
            results["scale"] = await scale_part(upstream, workdir, scale_c, scale_n)
    finally:
        upstream.stop()
    results["load_average_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        console.print(f"results written to {args.json}")
    console.print(f"logs in {workdir}; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: seconds")
    parser.add_argument("--json", metavar="PATH", help="also write all figures as JSON")
    parser.add_argument("--parts", default="floor,scale",
                        help="comma-separated: floor, scale [floor,scale]")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parser.parse_args()))
