"""The stream log's costs, memory store and Redis store side by side in one run.

* **append + read, CPU per frame**: ``c`` streams, each appending one frame per tick (a
  chat chunk of ~190 bytes, what the gateway relays per token) while one reader per
  stream follows it live. CPU time of this process (the gateway's side) per frame, and for
  Redis the added CPU per frame against the memory store; the redis-server's own CPU per
  frame is shown apart (it runs on another core in production).
* **resume latency**: reconnect → first replayed frame: ``reader(id, after=N)`` then the
  first ``read()``, on finished 500-frame streams at a random cursor; p50 / p99.
  Goal ≤ 5 / 10 ms.
* **memory held by 1,000 finished 500-token streams**: the memory store's Python heap
  (tracemalloc) and its own count (``total_bytes``, what ``max_bytes`` limits); Redis's
  ``used_memory`` growth.

Redis: ``--redis-url URL``, else a private ``redis-server`` (Debian's; scripts/test.sh
installs it) on a free port in a temp dir, stopped at the end. Without one, Redis rows
are skipped.

Run: ``.venv/bin/python bench/bench_streamlog.py`` (about a minute), ``--smoke`` (seconds:
tiny sizes, figures printed only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

from tokenrelay.server.streamlog import MemoryStreamLog, StreamLog

CLOCK = time.process_time


def chunk(seq: int) -> bytes:
    """A chat.completion.chunk frame as the gateway encodes one token (~190 bytes)."""
    return (b'id: %d\ndata: {"id":"chatcmpl-4f1c2a9be07d4c55a1d3f0e6b2c8a719","object":'
            b'"chat.completion.chunk","created":1764763200,"model":"mock","choices":[{"index":0,'
            b'"delta":{"content":" tok%d"},"finish_reason":null}]}\n\n' % (seq, seq % 1000))


# -- a private redis-server -----------------------------------------------------------------


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str | None]:
    if url:
        yield url
        return
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", tmp, "--save", "", "--appendonly", "no",
                                 "--logfile", os.path.join(tmp, "redis.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", port), timeout=0.5) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


async def redis_info(url: str, section: str) -> dict[str, Any]:
    import redis.asyncio as aioredis
    client = aioredis.Redis.from_url(url)
    try:
        return dict(await client.info(section))
    finally:
        await client.aclose()


def make_store(kind: str, url: str | None) -> StreamLog:
    if kind == "memory":
        return MemoryStreamLog(max_bytes=4 << 30)
    from tokenrelay.server.streamlog.redis_log import RedisStreamLog
    assert url is not None
    return RedisStreamLog.from_url(url, prefix=f"bench{random.getrandbits(32):x}:")


# -- the measurements -----------------------------------------------------------------------


async def append_read(store: StreamLog, streams: int, frames: int, *, read: bool) -> float:
    """CPU µs of this process per frame: append one per tick (and one live reader per
    stream following it through the store, when ``read``)."""
    producers = [await store.create(owner="bench", endpoint="chat") for _ in range(streams)]
    readers = [await store.reader(p.stream_id, owner=None) for p in producers] if read else []
    payloads = [chunk(i) for i in range(frames + 1)]
    received = 0

    async def produce(p: Any) -> None:
        for i in range(frames):
            await p.append((payloads[i],))
            if i % 8 == 7:
                await asyncio.sleep(0)  # let the readers interleave, as a network tick would
        await p.finish("completed", (payloads[frames],))

    async def consume(r: Any) -> None:
        nonlocal received
        while not r.ended:
            batch = await r.read()
            received += len(batch.frames)
        await r.aclose()

    gc.collect()
    t0 = CLOCK()
    await asyncio.gather(*(produce(p) for p in producers), *(consume(r) for r in readers))
    cpu = CLOCK() - t0
    assert received == (streams * (frames + 1) if read else 0), received
    return cpu / (streams * (frames + 1)) * 1e6


async def resume_latency(store: StreamLog, trials: int, frames: int = 500) -> list[float]:
    """ms from reconnect (reader at a random cursor) to the first replayed frame."""
    ids = []
    for _ in range(20):
        p = await store.create(owner="bench", endpoint="chat")
        for start in range(0, frames - 1, 50):
            await p.append([chunk(i) for i in range(start, min(start + 50, frames - 1))])
        await p.finish("completed", [chunk(frames - 1)])
        ids.append(p.stream_id)
    out = []
    for _ in range(trials):
        stream_id = random.choice(ids)
        after = random.randrange(-1, frames - 1)
        t0 = time.perf_counter()
        reader = await store.reader(stream_id, after=after, owner="bench")
        batch = await reader.read()
        out.append((time.perf_counter() - t0) * 1000)
        assert batch.first_seq == after + 1 and batch.frames
        await reader.aclose()
    return out


async def memory_held(kind: str, url: str | None, streams: int,
                      frames: int) -> tuple[float, float | None]:
    """Bytes held by ``streams`` finished streams of ``frames`` frames: (measured, counted)."""
    store = make_store(kind, url)
    try:
        if kind == "memory":
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
        else:
            assert url is not None
            before = (await redis_info(url, "memory"))["used_memory"]
        for _ in range(streams):
            p = await store.create(owner="bench", endpoint="chat")
            for start in range(0, frames - 1, 50):
                await p.append([chunk(i) for i in range(start, min(start + 50, frames - 1))])
            await p.finish("completed", [chunk(frames - 1)])
            del p
        if kind == "memory":
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            assert isinstance(store, MemoryStreamLog)
            return after - before, store.total_bytes
        after = (await redis_info(url, "memory"))["used_memory"]  # type: ignore[arg-type]
        return after - before, None
    finally:
        await store.aclose()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def cpu_rows(args: argparse.Namespace, url: str | None, kinds: list[str], frames: int,
                   *, read: bool) -> None:
    runs = 1 if args.smoke else 3
    for c in ([1, 8] if args.smoke else [1, 64]):
        row: dict[str, float] = {}
        server_cpu = 0.0
        for kind in kinds:
            store = make_store(kind, url)
            try:
                if kind == "redis":
                    cpu0 = await redis_info(url, "cpu")  # type: ignore[arg-type]
                row[kind] = min([await append_read(store, c, frames, read=read)
                                 for _ in range(runs)])
                if kind == "redis":
                    cpu1 = await redis_info(url, "cpu")  # type: ignore[arg-type]
                    spent = sum(cpu1[k] - cpu0[k] for k in ("used_cpu_user", "used_cpu_sys"))
                    server_cpu = spent / (runs * c * (frames + 1)) * 1e6
            finally:
                await store.aclose()
        line = f"  c = {c:>3}: memory {row['memory']:6.1f} µs/frame"
        if "redis" in row:
            line += (f" | redis {row['redis']:6.1f} µs/frame: added"
                     f" {row['redis'] - row['memory']:+.1f} µs/frame; redis-server"
                     f" {server_cpu:.1f} µs/frame")
        print(line)


async def run(args: argparse.Namespace, url: str | None) -> None:
    kinds = ["memory"] + (["redis"] if url else [])
    if not url:
        print("redis: no redis-server (install it, or --redis-url): Redis rows skipped")
    frames = 200 if args.smoke else args.frames
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"frame {len(chunk(0))} bytes{', smoke' if args.smoke else ''}\n")

    for read, title in ((False, ("append only: the producer's CPU per frame (a connected client"
                                 " gets its frames by hand-off)")),
                        (True, "append + a live reader through the store (a resumed client)")):
        print(title)
        await cpu_rows(args, url, kinds, frames, read=read)
        print()

    print("resume latency: reconnect → first replayed frame (500-frame streams, random cursor)")
    trials = 30 if args.smoke else args.trials
    for kind in kinds:
        store = make_store(kind, url)
        try:
            lat = await resume_latency(store, trials)
        finally:
            await store.aclose()
        print(f"  {kind:6}: p50 {statistics.median(lat):6.3f} ms, p99 {pct(lat, 0.99):6.3f} ms"
              f" ({trials} resumes; goal ≤ 5 / 10 ms)")

    n_streams = 20 if args.smoke else 1000
    print(f"\nmemory held by {n_streams:,} finished 500-token streams")
    for kind in kinds:
        held, counted = await memory_held(kind, url, n_streams, 500)
        extra = f" (counted against max_bytes: {counted / 2**20:.1f} MiB)" if counted else ""
        print(f"  {kind:6}: {held / 2**20:7.1f} MiB, {held / n_streams / 1024:.1f} KiB"
              f" per stream, {held / n_streams / 500:.0f} B per frame{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sizes")
    parser.add_argument("--redis-url", help="use this Redis instead of a private server")
    parser.add_argument("--frames", type=int, default=2000, help="frames per stream")
    parser.add_argument("--trials", type=int, default=500, help="resumes per store")
    args = parser.parse_args()
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with redis_server(args.redis_url) as url:
        if url is not None:
            try:
                import redis  # noqa: F401
            except ImportError:
                print('redis: the client is not installed (pip install "tokenrelay[redis]")')
                url = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(args, url))


if __name__ == "__main__":
    main()
