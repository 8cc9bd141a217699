#!/usr/bin/env python
"""How many concurrent 50 token/s streams each gateway holds with added inter-token
latency p99 ≤ 20 ms: tokenrelay ``serve --workers 1`` and ``--workers 2`` against the
LiteLLM proxy with 1 and 2 workers (``litellm --num_workers N``), side by side in one run.

    .venv/bin/python bench/bench_capacity.py            # ≤ ~10 minutes on 2 cores
    .venv/bin/python bench/bench_capacity.py --smoke    # seconds: that it runs (the tests)
    .venv/bin/python bench/bench_capacity.py --no-litellm --json out.json
    .venv/bin/python bench/bench_capacity.py --nice -10   # as root, ahead of other work

At each step (16, 32, 64, 128, 256, 512 streams) every gateway still holding carries
``c`` streams at once of 100-token answers paced at 50 tokens/s by one
``tokenrelay mock-upstream`` (a token every 20 ms, 2 s an answer). The ``c`` streams start
evenly spread over one answer's length (stream ``i`` at ``i·2 s/c``) and each runs three
answers back to back, so after the first 2 s exactly ``c`` streams are open and their
tokens are spread evenly in time (no synchronised waves). Inter-token gaps are kept only
for tokens that arrived while all of them were open.

*Added ITL p99* is measured as ``bench/bench_gateway.py`` measures added latency, against
the direct path, but at the same moments: while the gateway carries its ``c`` streams,
``max(8, c/4)`` more streams, staggered the same way, read the same upstream directly,
and the added figure is the gateway's client-observed ITL p99 minus theirs (the
upstream's own pacing and jitter, the load generator's, and the machine's other load at
that moment). A gateway holds a step when every stream completed and its added ITL p99 ≤
20 ms. A step not held is measured once more (on a shared machine one burst of other work
can cost a single run its p99); a gateway's capacity is the largest step it held before
the first it did not hold twice (it is not tried further, which bounds the run). The ITL
p99 minus the nominal 20 ms pacing is printed too.

All processes share the machine's cores: for each step the CPU share of the gateway, the
mock upstream, this load generator and every other process (/proc/stat) is recorded.
The LiteLLM proxy runs from its own venv (``$LITELLM_BIN``, default
/tmp/litellm-venv/bin/litellm; missing → skipped with the reason). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway as bg
from bench_gateway import Proc, console, cpu_seconds, fmt, litellm_proc, tokenrelay_proc
from bench_workers import busy_seconds

from tokenrelay.bench import RequestOutcome, abench, percentile

GOAL_MS = 20.0
STEPS = (16, 32, 64, 128, 256, 512)
#: Answers each stream runs back to back (the first answer's length is the ramp-up).
ANSWERS = 3
#: A step not held is measured once more (the direct path too) before a gateway stops:
#: on a shared machine one burst of other work can cost a single run its p99.
ATTEMPTS = 2


def stagger(url: str, model: str, api_key: str | None, streams: int, answer_s: float,
            outcomes: list[RequestOutcome], started: float) -> list[Any]:
    """Coroutines for ``streams`` streams started evenly over ``answer_s`` from
    ``started``, each running ``ANSWERS`` answers back to back into ``outcomes``."""

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, started + i * answer_s / streams - time.perf_counter()))
        offset = time.perf_counter() - started
        await abench(base_url=url, model=model, concurrency=1, requests=ANSWERS,
                     max_tokens=bg.TOKENS, api_key=api_key,
                     on_result=lambda o: outcomes.append(_shift(o, offset)))

    return [one(i) for i in range(streams)]


def gaps_of(outcomes: list[RequestOutcome], lo: float, hi: float) -> dict[str, Any]:
    """ITL of the tokens that arrived between ``lo`` and ``hi`` (seconds from the step's
    start), and how many requests failed."""
    gaps: list[float] = []
    for o in outcomes:
        if not o.ok or o.sent_at is None or o.ttft is None:
            continue
        at = o.sent_at + o.ttft
        for gap in o.itl:
            at += gap
            if lo <= at <= hi:
                gaps.append(gap)
    gaps.sort()
    return {"requests": len(outcomes), "failed": sum(not o.ok for o in outcomes),
            "errors": sorted({o.error or "?" for o in outcomes if not o.ok})[:2],
            "gaps": len(gaps),
            "itl_p50_ms": percentile(gaps, 50) * 1e3 if gaps else None,
            "itl_p99_ms": percentile(gaps, 99) * 1e3 if gaps else None,
            "itl_max_ms": gaps[-1] * 1e3 if gaps else None}


def _shift(o: RequestOutcome, offset: float) -> RequestOutcome:
    """abench's ``sent_at`` counts from its own start; make it count from the step's."""
    if o.sent_at is not None:
        o.sent_at += offset
    return o


def reference_streams(streams: int) -> int:
    """Direct streams run alongside a gateway's ``streams``: enough for a p99 (8+ streams,
    1,600+ gaps), few enough not to load the upstream and the load generator much more."""
    return max(8, streams // 4)


async def step(proc: Proc, upstream: Proc, streams: int, answer_s: float) -> dict[str, Any]:
    """``streams`` streams through ``proc`` and, at the same time, a few directly from the
    upstream (the reference: the same moments of the machine's other load)."""
    # A short warm-up (connections, lazy imports) that is not measured.
    await abench(base_url=proc.url, model="paced", concurrency=min(streams, 16),
                 requests=min(streams, 16), max_tokens=bg.TOKENS, api_key=proc.api_key)
    b0, u0, c0 = busy_seconds(), cpu_seconds(upstream.pid), time.process_time()
    g0 = cpu_seconds(proc.pid)
    through: list[RequestOutcome] = []
    direct: list[RequestOutcome] = []
    started = time.perf_counter()
    await asyncio.gather(
        *stagger(proc.url, "paced", proc.api_key, streams, answer_s, through, started),
        *stagger(upstream.url, bg.PACED, None, reference_streams(streams), answer_s,
                 direct, started))
    duration = time.perf_counter() - started
    wall = duration * (os.cpu_count() or 1)
    b1, u1, c1 = busy_seconds(), cpu_seconds(upstream.pid), time.process_time()
    g1 = cpu_seconds(proc.pid)
    # Every stream is open from ``answer_s`` (the last one started) until the first one
    # ends (ANSWERS answers after t=0), give or take the gateway's added latency.
    lo, hi = answer_s, ANSWERS * answer_s
    out = gaps_of(through, lo, hi)
    out["duration_s"] = duration
    out["direct"] = ref = gaps_of(direct, lo, hi)
    d99 = ref["itl_p99_ms"]
    out["added_itl_p99_ms"] = (None if out["itl_p99_ms"] is None or d99 is None
                               else out["itl_p99_ms"] - d99)
    out["held"] = (out["failed"] == 0 and ref["failed"] == 0
                   and out["added_itl_p99_ms"] is not None
                   and out["added_itl_p99_ms"] <= GOAL_MS)
    ours = (g1 - g0) + (u1 - u0) + (c1 - c0)
    out["cpu_share"] = {"gateway": (g1 - g0) / wall, "upstream": (u1 - u0) / wall,
                        "load_generator": (c1 - c0) / wall,
                        "other_processes": max(0.0, (b1 - b0) - ours) / wall,
                        "idle": max(0.0, 1 - (b1 - b0) / wall)}
    return out


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192 <= hard or soft < hard < 8192:  # 512 streams: 2,000+ sockets here
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    if args.nice:
        # Inherited by every process started here (upstream, gateways): all of them
        # compete with the rest of the machine at the same priority, this one included.
        os.nice(args.nice)
    steps: tuple[int, ...] = STEPS
    if args.smoke:
        steps = (2, 4)
    answer_s = bg.TOKENS / bg.PACED_TPS
    pacing_ms = 1000 / bg.PACED_TPS
    console.print(f"[bold]bench_capacity[/] {time.strftime('%Y-%m-%d %H:%M')}  "
                  f"{platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}; "
                  f"{bg.TOKENS}-token answers at {bg.PACED_TPS} tokens/s, steps {steps}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                               "cores": os.cpu_count(), "tokens_per_s": bg.PACED_TPS,
                               "goal_added_itl_p99_ms": GOAL_MS, "steps": list(steps),
                               "load_average_start": os.getloadavg()[0],
                               "nice": os.nice(0)}
    upstream = bg.upstream_proc()
    procs: list[Proc] = [upstream]
    runs: dict[str, Any] = {}
    results["runs"] = runs
    gateways: dict[str, Proc] = {}
    try:
        for workers in (1, 2):
            gateway = tokenrelay_proc(workdir, upstream, name=f"tokenrelay-w{workers}")
            gateway.argv += ["--workers", str(workers), "--quiet"]
            gateways[f"tokenrelay-w{workers}"] = gateway
        if not args.no_litellm:
            for workers in (1, 2):
                made = litellm_proc(workdir, upstream)
                if isinstance(made, str):
                    console.print(f"[yellow]LiteLLM skipped: {made}[/]")
                    results["litellm_skipped"] = made
                    break
                made.name = f"litellm-w{workers}"
                made.argv += ["--num_workers", str(workers)]
                gateways[made.name] = made
        procs += gateways.values()
        for proc in procs:
            proc.launch(workdir)
        for proc in list(procs):
            try:
                proc.wait_ready(180)
            except RuntimeError as exc:
                if proc is upstream or not proc.name.startswith("litellm"):
                    raise
                console.print(f"[yellow]{proc.name} skipped: {exc}[/]")
                results[f"{proc.name}_skipped"] = str(exc)
                del gateways[proc.name]

        async def measured(name: str, c: int, attempt: int) -> dict[str, Any]:
            r = await step(gateways[name], upstream, c, answer_s)
            r["attempt"] = attempt
            runs[f"{name}@{c}" + (f"#{attempt}" if attempt > 1 else "")] = r
            share, ref = r["cpu_share"], r["direct"]
            console.print(
                f"  {name:<14} {r['requests'] - r['failed']}/{r['requests']} ok  ITL p50"
                f" {fmt(r['itl_p50_ms'])} p99 {fmt(r['itl_p99_ms'])} max"
                f" {fmt(r['itl_max_ms'], 0)} ms; direct ({ref['requests'] // ANSWERS}"
                f" streams) p99 {fmt(ref['itl_p99_ms'])}; added p99"
                f" {fmt(r['added_itl_p99_ms'])} ms (over pacing"
                f" {fmt(r['itl_p99_ms'] and r['itl_p99_ms'] - pacing_ms)})"
                f"  CPU gw {share['gateway']:.0%} up {share['upstream']:.0%}"
                f" loadgen {share['load_generator']:.0%} others"
                f" {share['other_processes']:.0%} idle {share['idle']:.0%}"
                + ("" if r["held"] else "  [red]not held[/]")
                + (f"  errors {r['errors'] + ref['errors']}"
                   if r["errors"] or ref["errors"] else ""))
            return r

        holding = set(gateways)
        capacity: dict[str, int] = {name: 0 for name in gateways}
        for c in steps:
            if not holding:
                break
            console.print(f"[bold]{c} streams[/]")
            for name in gateways:
                if name not in holding:
                    continue
                for attempt in range(1, ATTEMPTS + 1):
                    r = await measured(name, c, attempt)
                    if r["held"]:
                        break
                if r["held"]:
                    capacity[name] = c
                else:
                    holding.discard(name)
        results["capacity"] = capacity
    finally:
        for proc in reversed(procs):
            proc.stop()
    console.print(f"\n  streams held at {bg.PACED_TPS} tokens/s with added ITL p99 ≤"
                  f" {GOAL_MS:g} ms (steps {', '.join(map(str, steps))}; 0: not even the"
                  " first)")
    for name, held in results.get("capacity", {}).items():
        console.print(f"  {name:<16}{held:>6}")
    results["load_average_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        console.print(f"results written to {args.json}")
    console.print(f"logs in {workdir}; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="two tiny steps at 500 tokens/s, no LiteLLM: seconds")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument("--json", metavar="PATH", help="also write all figures as JSON")
    parser.add_argument("--nice", type=int, default=0,
                        help="add this to the scheduling priority of this run and every"
                             " process it starts (negative, as root: ahead of other work on"
                             " a shared machine) [0]")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.no_litellm = True
        # Answers of 0.2 s, not 2 s: every part runs, in a fraction of the time.
        bg.PACED_TPS = 500
        bg.PACED = f"tokens={bg.TOKENS},tps={bg.PACED_TPS}"
    asyncio.run(main(arguments))
