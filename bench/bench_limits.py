#!/usr/bin/env python
"""Limit exactness across processes, and what sharing limits in Redis costs, in one run.

    .venv/bin/python bench/bench_limits.py            # ~1 minute
    .venv/bin/python bench/bench_limits.py --smoke    # seconds: that it runs (the tests)

One key with ``max_concurrent = 5`` and ``requests_per_minute = 60``, and 200 concurrent
attempts spread round-robin over the gateways of each setup, side by side:

* **3 replicas + Redis**: three ``tokenrelay serve --redis URL`` processes sharing a
  private ``redis-server`` (the shipped design);
* **1 process**: one ``tokenrelay serve``, limits in its memory (the reference: what N
  processes must admit, exactly);
* **3 replicas, no shared state**: three processes each counting alone (what a silent
  per-process limit does; ``serve --workers N`` refuses this, ``--redis`` fixes it).

Two phases per setup, each on a key of its own:

* *burst*: 200 streams (20 tokens at 20/s, ~1 s each) started at once: how many were
  admitted, and the most that ran at once at the upstream (goal: 5 and 5);
* *paced*: 200 attempts evenly over ``--paced-s`` seconds (streams of ~0.2 s, so that
  concurrency alone would let far more than 60 through): admitted in the minute (goal:
  60) and the most at once at the upstream (goal: ≤ 5).

"At the upstream" is counted by the mock upstream (``tokenrelay.testing.mock_upstream``, a thread
of this process) from when each request reached it to when its answer ended: the load
the limits protect, measured outside the gateways.

Then the **cost**: CPU per request of one gateway (utime+stime from /proc) answering 400
short non-streamed requests at concurrency 8 through a key with (non-binding) limits, in
memory against Redis, and redis-server's own CPU per request; and CPU per relayed chunk
of streamed 200-token answers (40 at concurrency 8) the same ways. "Redis" keeps the
stream log in memory (the limits alone); "Redis (+ log)" is what ``--redis`` gives, the
stream log in Redis too (its cost per chunk: bench_gateway --redis-store). A running stream's
shared limits cost one lease renewal per second, batched for all its process's streams,
and nothing per chunk: the per-chunk figures should be equal within noise.

Redis: ``--redis-url URL``, else a private Debian ``redis-server`` on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from bench_gateway import Proc, cpu_seconds, free_port
from bench_streamlog import redis_server

from tokenrelay.server.config import hash_key
from tokenrelay.testing import MockUpstream

BIN = Path(sys.executable).parent
TOKENRELAY = str(BIN / "tokenrelay")
KEYS = {"burst": "bench-burst-0123456789", "paced": "bench-paced-0123456789",
        "cost": "bench-cost-0123456789abc"}
LONG = "tokens=20,tps=20"    # ~1 s
SHORT = "tokens=20,tps=100"  # ~0.2 s
TINY = "tokens=1"            # the cost part: a request, next to no relaying
CHUNKS = 200
STREAMED = f"tokens={CHUNKS}"  # the cost part, per chunk: a streamed answer, no pacing
MODELS = {"long": LONG, "short": SHORT, "tiny": TINY, "streamed": STREAMED}


def gateway_config(path: Path, upstream: str, *, streams_memory: bool = False) -> Path:
    keys = "".join(
        f'[[keys]]\nid = "{name}"\nsha256 = "{hash_key(secret)}"\n'
        + ("max_concurrent = 100000\nrequests_per_minute = 1000000\n"
           "tokens_per_minute = 1000000000\n" if name == "cost"
           else "max_concurrent = 5\nrequests_per_minute = 60\n") + "\n"
        for name, secret in KEYS.items())
    models = "".join(f'[[models]]\nname = "{name}"\nbase_url = "{upstream}"\n'
                     f'upstream_model = "{spec}"\n\n'
                     for name, spec in MODELS.items())
    # streams_memory: the stream log stays in memory even with --redis (what the limits
    # cost, apart from the Redis stream log's own per-chunk cost: bench_gateway --redis-store).
    streams = '[streams]\nstore = "memory"\n\n' if streams_memory else ""
    path.write_text("serve_local = false\nserve_mock = false\naccess_log = false\n"
                    "[log]\nenabled = false\n\n" + streams + keys + models)
    return path


def start_gateways(workdir: Path, n: int, upstream: str, redis_url: str | None,
                   tag: str, *, streams_memory: bool = False) -> list[Proc]:
    config = gateway_config(workdir / f"{tag}.toml", upstream, streams_memory=streams_memory)
    procs = []
    for i in range(n):
        port = free_port()
        argv = [TOKENRELAY, "serve", "--port", str(port), "--config", str(config), "--quiet"]
        if redis_url:
            argv += ["--redis", redis_url]
        procs.append(Proc(f"{tag}-{i}", argv, port, "/healthz"))
    with ThreadPoolExecutor(n) as pool:  # started side by side: imports take seconds
        list(pool.map(lambda p: p.start(workdir), procs))
    return procs


def most_at_once(upstream: MockUpstream, model: str) -> int:
    """The most requests of ``model`` in progress at the upstream at any instant."""
    edges = []
    for r in upstream.chat_requests():
        if r.model != MODELS[model]:
            continue
        end = r.finished_at or r.aborted_at or time.monotonic()
        edges += [(r.started_at, 1), (end, -1)]
    running = most = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        running += step
        most = max(most, running)
    return most


async def attempt(client: httpx.AsyncClient, base: str, key: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client.stream("POST", base + "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {KEYS[key]}"}) as response:
        async for _ in response.aiter_raw():
            pass
        return response.status_code


async def phase(gateways: list[Proc], upstream: MockUpstream, *, key: str, model: str,
                attempts: int, spread_s: float) -> dict[str, Any]:
    upstream.reset()
    bases = [f"http://127.0.0.1:{g.port}" for g in gateways]
    limits = httpx.Limits(max_connections=attempts + 10, max_keepalive_connections=attempts)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(i: int) -> int:
            await asyncio.sleep(spread_s * i / attempts)
            return await attempt(client, bases[i % len(bases)], key, model)

        started = time.monotonic()
        statuses = await asyncio.gather(*[one(i) for i in range(attempts)])
        took = time.monotonic() - started
    refused: dict[str, int] = {}
    for status in statuses:
        if status != 200:
            refused[str(status)] = refused.get(str(status), 0) + 1
    return {"admitted": statuses.count(200), "refused": refused,
            "most_at_once": most_at_once(upstream, model),
            "reached_upstream": len([r for r in upstream.chat_requests()
                                     if r.model == MODELS[model]]),
            "seconds": round(took, 2)}


async def cost(gateway: Proc, redis_pid: int | None, requests: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{gateway.port}"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {KEYS['cost']}"}
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(10):  # warm up: connections, scripts loaded
            await client.post(base + "/v1/chat/completions", json=body, headers=headers)
        sem = asyncio.Semaphore(8)
        before = cpu_seconds(gateway.pid)
        redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0

        async def one() -> int:
            async with sem:
                r = await client.post(base + "/v1/chat/completions", json=body,
                                      headers=headers)
                return r.status_code

        statuses = await asyncio.gather(*[one() for _ in range(requests)])
        used = cpu_seconds(gateway.pid) - before
        redis_used = (cpu_seconds(redis_pid) - redis_before) if redis_pid else None
        assert statuses.count(200) == requests, statuses

        streams = max(8, requests // 10)
        streamed = {**body, "model": "streamed", "stream": True}
        before = cpu_seconds(gateway.pid)

        async def relayed() -> int:
            async with sem:
                chunks = 0
                async with client.stream("POST", base + "/v1/chat/completions",
                                         json=streamed, headers=headers) as r:
                    assert r.status_code == 200, r.status_code
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunks += 1
                return chunks

        counts = await asyncio.gather(*[relayed() for _ in range(streams)])
        relay_used = cpu_seconds(gateway.pid) - before
    assert all(n >= CHUNKS for n in counts), counts
    return {"gateway_cpu_us_per_request": round(used / requests * 1e6, 1),
            "redis_cpu_us_per_request": None if redis_used is None
            else round(redis_used / requests * 1e6, 1),
            "gateway_cpu_us_per_chunk": round(relay_used / sum(counts) * 1e6, 2)}


def redis_pid_of(url: str) -> int | None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    except Exception:  # noqa: BLE001 - a remote Redis: its CPU is not ours to read
        return None
    finally:
        client.close()


async def run(args: argparse.Namespace, redis_url: str, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"setups": {}, "attempts": args.attempts,
                               "paced_s": args.paced_s, "cost": {}}
    setups = [("3 replicas + Redis", 3, redis_url), ("1 process", 1, None)]
    if not args.smoke:
        setups.append(("3 replicas, no shared state", 3, None))
    with MockUpstream() as upstream:
        for i, (name, n, url) in enumerate(setups):
            gateways = start_gateways(workdir, n, upstream.url, url, f"s{i}")
            try:
                burst = await phase(gateways, upstream, key="burst", model="long",
                                    attempts=args.attempts, spread_s=0.0)
                paced = await phase(gateways, upstream, key="paced", model="short",
                                    attempts=args.attempts, spread_s=args.paced_s)
                if i < 2:  # one gateway with its limits in Redis, one in its memory
                    where = "Redis (+ log)" if url else "in memory"
                    results["cost"][where] = await cost(
                        gateways[0], redis_pid_of(redis_url) if url else None,
                        args.cost_requests)
                if i == 0:  # limits in Redis, the stream log in memory: the limits alone
                    (alone,) = start_gateways(workdir, 1, upstream.url, url, "cost",
                                              streams_memory=True)
                    try:
                        results["cost"]["Redis"] = await cost(
                            alone, redis_pid_of(redis_url), args.cost_requests)
                    finally:
                        alone.stop()
            finally:
                for g in gateways:
                    g.stop()
            results["setups"][name] = {"burst": burst, "paced": paced}
            print(f"{name:30} burst: {burst['admitted']:3} admitted, most at once"
                  f" {burst['most_at_once']:2} | paced: {paced['admitted']:3} admitted in"
                  f" {paced['seconds']:.1f}s, most at once {paced['most_at_once']:2}"
                  f"   (goal 5/5 | 60/≤5)")
    for where, figures in results["cost"].items():
        print(f"cost, limits {where:13}: gateway {figures['gateway_cpu_us_per_request']}"
              f" µs CPU/request, redis-server {figures['redis_cpu_us_per_request']}"
              f" µs/request; gateway {figures['gateway_cpu_us_per_chunk']} µs CPU/chunk"
              f" (streamed {CHUNKS}-token answers)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: that it runs")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--redis-url", help="an existing Redis (default: a private one)")
    parser.add_argument("--attempts", type=int, default=200)
    parser.add_argument("--paced-s", type=float, default=10.0)
    parser.add_argument("--cost-requests", type=int, default=400)
    args = parser.parse_args()
    if args.smoke:
        args.paced_s, args.cost_requests = 3.0, 60
    with redis_server(args.redis_url) as url, tempfile.TemporaryDirectory() as tmp:
        if url is None:
            sys.exit("bench_limits: no redis-server (scripts/test.sh installs it with apt)")
        results = asyncio.run(run(args, url, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
