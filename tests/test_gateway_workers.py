"""``tokenrelay serve --workers 2`` as users start it: two processes on one port, one
``/metrics`` for both, a dead worker replaced, SIGTERM to the parent drains both.

One server for the module; the SIGTERM test ends it. The last test starts its own, with
per-key limits shared through Redis.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from _harness import Proc, Processes, poll, sse_payloads, tokenrelay_argv
from _redis import RedisServer, redis_prefix

from tokenrelay.server.config import hash_key

HI = [{"role": "user", "content": "hi"}]
DRAIN = 8.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    workdir = tmp_path_factory.mktemp("workers")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TOKENRELAY_HOME=str(workdir / "home"), TOKENRELAY_REPLICA="w-test")
    with Processes(workdir / "processes") as group:
        yield group.serve({"drain_timeout_s": DRAIN,
                           "log": {"path": str(workdir / "requests.db")}},
                          "--workers", "2", "--quiet", env=env, timeout=30)


def workers(parent: int) -> list[int]:
    """The worker processes of a ``--workers`` parent (not multiprocessing's tracker)."""
    found = []
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(int(pid))
    return sorted(found)


def connections(pid: int, port: int, state: str = "01") -> int:
    """TCP sockets of ``pid`` on local ``port`` in ``state`` (01: established, 0A:
    listening)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
            inodes.add(fields[9])
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text,
                                            re.MULTILINE))


async def stream(session: aiohttp.ClientSession, url: str, model: str) -> list[str]:
    async with session.post(url + "/v1/chat/completions",
                            json={"model": model, "messages": HI, "stream": True}) as r:
        assert r.status == 200
        return sse_payloads(await r.read())


def client() -> aiohttp.ClientSession:
    # A connection per stream (no keep-alive reuse), so the kernel spreads them.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def test_two_workers_share_the_port_and_one_metrics_covers_both(server: Proc) -> None:
    pids = workers(server.pid)
    assert len(pids) == 2, pids
    # The server answers once one worker listens; the other may still be importing.
    assert await asyncio.to_thread(
        poll, lambda: all(connections(p, server.port, "0A") for p in pids), 30), \
        {p: connections(p, server.port, "0A") for p in pids}
    n = 16
    async with client() as session:
        running = [asyncio.ensure_future(stream(session, server.url, "mock:tokens=16,tps=4"))
                   for _ in range(n)]
        # Any worker answers /metrics, each with every worker's streams.
        assert await asyncio.to_thread(
            poll, lambda: metric(server.url, "tokenrelay_active_streams") == n, 10)
        held = {p: connections(p, server.port) for p in pids}
        assert sum(held.values()) >= n and all(held.values()), \
            f"one worker took every connection: {held}"
        for _ in range(6):
            assert metric(server.url, "tokenrelay_active_streams") == n
        results = await asyncio.gather(*running)
    assert all(r[-1] == "[DONE]" for r in results)
    assert poll(lambda: metric(server.url, "tokenrelay_requests_total") == n, 3)
    assert metric(server.url, 'tokenrelay_info{replica="w-test",workers="2"}') == 1


async def test_a_killed_worker_is_replaced_and_leaves_metrics(server: Proc) -> None:
    pids = workers(server.pid)
    async with client() as session:
        running = [asyncio.ensure_future(stream(session, server.url, "mock:tokens=50,tps=5"))
                   for _ in range(8)]
        assert await asyncio.to_thread(
            poll, lambda: metric(server.url, "tokenrelay_active_streams") == 8, 10)
        held = {p: connections(p, server.port) for p in pids}
        victim = max(held, key=lambda p: held[p])
        os.kill(victim, signal.SIGKILL)
        survivor_streams = sum(v for p, v in held.items() if p != victim)
        # Replaced within seconds (listening again); its streams leave the gauge.
        assert await asyncio.to_thread(
            poll, lambda: len(workers(server.pid)) == 2 and victim not in workers(server.pid)
            and all(connections(p, server.port, "0A") for p in workers(server.pid)), 15), \
            workers(server.pid)
        assert await asyncio.to_thread(
            poll, lambda: metric(server.url, "tokenrelay_active_streams") == survivor_streams,
            5), (held, metric(server.url, "tokenrelay_active_streams"))
        # The dead worker's streams broke; the others run on (stopped here, 8 s early).
        broken = [t for t in running if t.done()]
        assert len(broken) == held[victim] and all(t.exception() for t in broken), held
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    assert "died (exit -9); starting another" in server.output()


def test_a_second_server_on_the_same_port_is_refused(server: Proc,
                                                    processes: Processes) -> None:
    """The workers' listeners allow port reuse among themselves; another ``serve
    --workers`` on that port must fail, not quietly take half of its connections."""
    with pytest.raises(RuntimeError) as failed:
        processes.start("second", tokenrelay_argv(
            "serve", "--port", str(server.port), "--workers", "2", "--no-log"),
            ready=lambda proc: False, timeout=20)
    assert f"cannot listen on 127.0.0.1 port {server.port}: Address already in use" \
        in str(failed.value)


async def test_sigterm_to_the_parent_drains_every_worker(server: Proc) -> None:
    pids = workers(server.pid)
    environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
    multiproc = next(v.split(b"=", 1)[1].decode() for v in environ
                     if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    assert Path(multiproc).is_dir()
    async with client() as session:
        running = [asyncio.ensure_future(stream(session, server.url, "mock:tokens=20,tps=10"))
                   for _ in range(10)]
        assert await asyncio.to_thread(
            poll, lambda: sum(connections(p, server.port) for p in pids) == 10, 5)
        assert all(connections(p, server.port) for p in pids)
        sent = time.monotonic()
        server.signal(signal.SIGTERM)
        results = await asyncio.gather(*running)
    # Streams (2 s) shorter than the drain end whole, on both workers.
    assert all(r[-1] == "[DONE]" and len(r) == 22 for r in results), [r[-2:] for r in results]
    assert await asyncio.to_thread(server.popen.wait, DRAIN + 10) == 0, server.output()[-2000:]
    assert time.monotonic() - sent < DRAIN
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not Path(multiproc).exists(), "the metrics directory is left behind"
    assert server.output().count("answer(s) in progress get") == 2, server.output()[-2000:]


async def test_workers_share_per_key_limits_through_redis(processes: Processes,
                                                         redis_server: RedisServer,
                                                         tmp_path: Path) -> None:
    """``--workers 2 --redis URL``: a key's 3 concurrent streams are 3 over both workers
    (without Redis ``serve`` refuses to start: tests/test_shared_limits_gateway.py)."""
    raw = "sk-workers-" + os.urandom(8).hex()
    server = processes.serve(
        {"log": {"enabled": False}, "redis": {"prefix": redis_prefix()},
         "keys": [{"id": "k", "sha256": hash_key(raw), "max_concurrent": 3}]},
        "--workers", "2", "--quiet", "--redis", redis_server.url, timeout=30)
    pids = workers(server.pid)
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            headers={"authorization": f"Bearer {raw}"}) as session:
        body = {"model": "mock:tokens=40,tps=4", "messages": HI, "stream": True}
        responses = await asyncio.gather(*(session.post(server.url + "/v1/chat/completions",
                                                        json=body) for _ in range(30)))
        try:
            # 30 connections are spread over both workers (SO_REUSEPORT; all on one: a
            # chance of 2^-29): per-process limits would admit 6.
            statuses = sorted(r.status for r in responses)
            assert statuses == [200] * 3 + [429] * 27, statuses
            assert len(pids) == 2
        finally:
            for response in responses:
                response.close()
