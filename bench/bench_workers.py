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
  2,000 tokens/s from the mock upstream), in alternating rounds (the best of each
  reported): relayed chunks per second, and the share of the machine's CPU used by the
  gateway, the mock upstream, this load generator and every other process on the
  machine (/proc/stat), since all of them run on the same cores.

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
    TOKENS,
    Proc,
    Run,
    console,
    cpu_seconds,
    fmt,
    free_port,
    measure,
    tokenrelay_proc,
    upstream_proc,
)

from tokenrelay.bench import abench

CLK_TCK = os.sysconf("SC_CLK_TCK")

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


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (/proc/stat, all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


async def saturate(name: str, gateway: Proc, upstream: Proc, concurrency: int,
                   requests: int) -> dict[str, Any]:
    """Relayed chunks per second with ``concurrency`` streams always open, and who used
    the machine's CPU meanwhile (this load generator, the upstream, the gateway, and
    everything else on the machine)."""
    await abench(base_url=gateway.url, model="fast", concurrency=min(concurrency, 64),
                 requests=min(concurrency, 64), max_tokens=TOKENS, api_key=gateway.api_key)
    b0, g0, u0, c0 = busy_seconds(), cpu_seconds(gateway.pid), cpu_seconds(upstream.pid), \
        time.process_time()
    r = await abench(base_url=gateway.url, model="fast", concurrency=concurrency,
                     requests=requests, max_tokens=TOKENS, api_key=gateway.api_key)
    b1, g1, u1, c1 = busy_seconds(), cpu_seconds(gateway.pid), cpu_seconds(upstream.pid), \
        time.process_time()
    cores = os.cpu_count() or 1
    wall = r.duration * cores
    ours = (g1 - g0) + (u1 - u0) + (c1 - c0)
    out = {"completed": r.completed, "requests": r.requests, "chunks": r.total_chunks,
           "failed": r.requests - r.completed, "duration_s": r.duration,
           "chunks_per_s": r.total_chunks / r.duration if r.duration else None,
           "cpu_us_per_chunk": (g1 - g0) / r.total_chunks * 1e6 if r.total_chunks else None,
           "upstream_us_per_chunk": (u1 - u0) / r.total_chunks * 1e6 if r.total_chunks else None,
           "load_generator_us_per_chunk": ((c1 - c0) / r.total_chunks * 1e6
                                           if r.total_chunks else None),
           "cpu_share": {"gateway": (g1 - g0) / wall, "upstream": (u1 - u0) / wall,
                         "load_generator": (c1 - c0) / wall,
                         "other_processes": max(0.0, (b1 - b0) - ours) / wall,
                         "idle": max(0.0, 1 - (b1 - b0) / wall)}}
    console.print(f"  {name:<10} {r.completed}/{r.requests} ok  {r.duration:6.2f}s  "
                  f"{fmt(out['chunks_per_s'], 0)} chunks/s  gateway "
                  f"{fmt(out['cpu_us_per_chunk'], 1)} µs/chunk")
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


async def scale_part(upstream: Proc, workdir: Path, concurrency: int, requests: int,
                     rounds: int) -> dict[str, Any]:
    console.print(f"[bold]Scale[/]: tokenrelay serve --workers 1 vs 2, c={concurrency},"
                  f" {requests} requests of {TOKENS} chunks, {rounds} alternating rounds")
    gateways = {}
    for workers in (1, 2):
        gateway = tokenrelay_proc(workdir, upstream, name=f"tokenrelay-w{workers}")
        gateway.argv += ["--workers", str(workers), "--quiet"]
        gateways[workers] = gateway
    out: dict[str, Any] = {"rounds": []}
    try:
        for gateway in gateways.values():
            gateway.start(workdir)
        for _ in range(rounds):  # alternating: the machine's other load hits both alike
            out["rounds"].append({f"w{w}": await saturate(f"workers={w}", g, upstream,
                                                          concurrency, requests)
                                  for w, g in gateways.items()})
    finally:
        for gateway in gateways.values():
            gateway.stop()
    for name in ("w1", "w2"):  # the best round of each: the least disturbed
        out[name] = max((r[name] for r in out["rounds"]),
                        key=lambda s: s["chunks_per_s"] or 0)
    one, two = out["w1"], out["w2"]
    if one["chunks_per_s"] and two["chunks_per_s"]:
        out["speedup"] = two["chunks_per_s"] / one["chunks_per_s"]
    # The most a second worker can give on this machine, from what a chunk costs each
    # process (measured above): N workers relay at most N/g chunks/s, and the machine
    # at most cores/(g + u + l), with the upstream (u) and load generator (l) on it too.
    g, u, l = (two[k] for k in ("cpu_us_per_chunk", "upstream_us_per_chunk",
                                "load_generator_us_per_chunk"))
    if g and u and l:
        cores = os.cpu_count() or 1
        machine = cores / (g + u + l)
        out["ceiling_speedup"] = min(2 / g, machine) / min(1 / g, machine)
    console.print(f"\n  best of {rounds}  {'chunks/s':>10}{'failed':>8}{'µs/chunk':>10}"
                  f"{'CPU: gateway':>14}{'upstream':>10}{'load gen':>10}{'others':>8}"
                  f"{'idle':>6}")
    for name in ("w1", "w2"):
        s = out[name]
        share = s["cpu_share"]
        console.print(f"  {'--workers ' + name[1]:<12}{fmt(s['chunks_per_s'], 0):>10}"
                      f"{s['failed']:>8}{fmt(s['cpu_us_per_chunk'], 1):>10}"
                      f"{share['gateway']:>14.0%}{share['upstream']:>10.0%}"
                      f"{share['load_generator']:>10.0%}{share['other_processes']:>8.0%}"
                      f"{share['idle']:>6.0%}")
    console.print(f"  --workers 2 / --workers 1: {fmt(out.get('speedup'))}× (goal ≥ 1.5×;"
                  f" CPU shares are of all {os.cpu_count()} cores)")
    if "ceiling_speedup" in out:
        console.print(f"  the most --workers 2 can give here with the upstream and the load"
                      f" generator on the same {os.cpu_count()} cores: "
                      f"{fmt(out['ceiling_speedup'])}× (per chunk: gateway {fmt(g, 1)},"
                      f" upstream {fmt(u, 1)}, load generator {fmt(l, 1)} µs)")
    return out


async def main(args: argparse.Namespace) -> None:
    levels = [(1, 100), (64, 512), (256, 768)]
    worker_counts = [1, 2]
    scale_c, scale_n, rounds = 256, 1536, 3
    if args.smoke:
        levels, worker_counts, scale_c, scale_n, rounds = [(1, 4), (8, 16)], [1], 8, 16, 1
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
            results["scale"] = await scale_part(upstream, workdir, scale_c, scale_n, rounds)
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
