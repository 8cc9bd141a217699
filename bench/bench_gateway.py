#!/usr/bin/env python
"""What the gateway costs: direct vs tokenrelay vs the LiteLLM proxy, side by side, one run.

    .venv/bin/python bench/bench_gateway.py            # ~8 minutes on 2 cores
    .venv/bin/python bench/bench_gateway.py --quick    # smaller counts, ~4 minutes
    .venv/bin/python bench/bench_gateway.py --smoke    # seconds: that it runs (the tests)
    .venv/bin/python bench/bench_gateway.py --parts relay --no-litellm   # one part only

Every process is separate: one mock upstream (``tokenrelay mock-upstream``), the gateway
(``tokenrelay serve``, its request log on as shipped; ``--no-reqlog``), the floor
(``bench/minimal_relay.py``: the same stack with nothing but parsing and re-serialising
each frame) and the bare floor (the same without Starlette: a bare ASGI callable), the LiteLLM proxy (from its own venv, default /tmp/litellm-venv,
``$LITELLM_BIN``; missing → that column is skipped with the reason), and this script as
the load generator (``tokenrelay.bench.abench``: vLLM's TTFT/ITL definitions). Both
gateways require an API key, as deployed ones do (LiteLLM refuses to start without one).
The mock's behaviour is chosen by the model name, which is all a gateway forwards, so the
gateway config maps ``fast``/``idle`` to the mock's ``tokens=…,tps=…`` names.

Parts (``--parts relay,paced,producing,profile,idle``, in this order):

* relay, at concurrency 1, 64 and 256 (100/256/384 requests of 100-token answers at
  2,000 tokens/s each): TTFT p50/p99 and what each gateway adds over the direct path;
  gateway CPU per relayed chunk (utime+stime of the gateway's process tree from
  /proc/PID/stat over the run, divided by the content chunks clients received), its
  kernel share, and how long the gateway waited for a CPU (other load on the machine);
* producing: the stream log's own cost on the hot path, in-process and without sockets
  (``Gateway.relay``, the path before the log, against ``Gateway.produce`` with the
  memory store, alternating): µs of CPU per chunk added by appending every frame;
* profile: py-spy samples of tokenrelay at c=1 and c=64 grouped by component
  (``$PY_SPY`` or /tmp/pyspy-venv/bin/py-spy), then single stages timed alone, and the
  CPU cost of reading the same upstream streams with httpx, httpx2 (if installed) and
  aiohttp;
* idle, last: RSS with 1,000 streams open, all waiting on a 60 s first token, how many
  of them reached the upstream (a connection-pool cap shows here) and whether the
  gateway still answers its health check;
* paced, at concurrency 64 and 256: the same answers at 50 tokens/s per stream, a served
  model's pace, arriving as a Poisson process (vLLM's ``--request-rate``) at c/2 s, so
  that neither the CPU is saturated nor the requests come in synchronised waves of c at
  once: *added TTFT* is then the gateway's latency, not queueing behind other work;
* ``--baseline SRC``: the gateway of another checkout (``git worktree add /tmp/old REV``,
  then ``--baseline /tmp/old/src``) as a fourth path, "before", in the same run;
* ``--redis-store``: the same gateway with its stream log on Redis (a ``redis-server``
  of its own, Debian's, on a free port) as the path "tr-redis": what a frame costs when
  its append is acknowledged by Redis before it goes out, against the memory store.

It prints figures and ratios against the goals; it never asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tokenrelay.bench import BenchReport, abench

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKENRELAY = str(BIN / "tokenrelay")
LITELLM = os.environ.get("LITELLM_BIN", "/tmp/litellm-venv/bin/litellm")
PY_SPY = os.environ.get("PY_SPY") or shutil.which("py-spy") or "/tmp/pyspy-venv/bin/py-spy"

TOKENS = 100
TPS = 2000
#: The mock upstream's behaviour is chosen by the model name; gateways forward only that.
FAST = f"tokens={TOKENS},tps={TPS}"
#: A served model's pace, for the paced part (added latency without CPU saturation).
PACED_TPS = 50
PACED = f"tokens={TOKENS},tps={PACED_TPS}"
IDLE_DELAY = 60.0
IDLE = f"tokens=4,delay={IDLE_DELAY:g}"
#: Both gateways require a key, as deployed ones do (LiteLLM refuses to start without one).
KEY = "sk-bench-" + os.urandom(16).hex()
GOALS = {"added_ttft_p50_ms": 2.0, "cpu_us_per_chunk": 50.0, "vs_litellm": 1 / 3}

console = Console(width=160)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- /proc -------------------------------------------------------------------------------

def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (LiteLLM may run workers as children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process tree, in seconds (/proc/PID/stat fields 14 and 15)."""
    user = system = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def runqueue_wait(pid: int) -> float:
    """Seconds the process tree's threads spent runnable but waiting for a CPU
    (/proc/PID/task/TID/schedstat, second field): how much other load delayed it."""
    total = 0
    for p in _tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                total += int(Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def rss_mib(pid: int) -> float:
    """Resident memory of a process tree, MiB."""
    total = 0
    for p in _tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total / 2**20


def established(local_port: int) -> int:
    """ESTABLISHED TCP sockets whose local port is ``local_port`` (server side)."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == local_port:
                count += 1
    return count


# -- processes ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def delete(url: str) -> None:
    request = urllib.request.Request(url, method="DELETE")
    with urllib.request.urlopen(request, timeout=5):
        pass


@dataclass
class Proc:
    name: str
    argv: list[str]
    port: int
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    popen: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, workdir: Path, timeout: float = 60.0) -> None:
        self.launch(workdir)
        self.wait_ready(timeout)

    def launch(self, workdir: Path) -> None:
        """Start the process, not waiting for it (several start at once)."""
        self.log = workdir / f"{self.name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, **self.env}, cwd=workdir,
                                          start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until it answers ``ready_path`` (``RuntimeError`` if it exits or times out)."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}): "
                                   + self.tail())
            try:
                get(f"http://127.0.0.1:{self.port}{self.ready_path}")
                return
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not answer in {timeout:g}s: "
                                       + self.tail()) from None
                time.sleep(0.05)

    def tail(self, lines: int = 8) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        pids = _tree(self.pid)[1:]
        self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        for pid in pids:  # children it started and left behind (none expected)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def upstream_proc() -> Proc:
    port = free_port()
    return Proc("upstream", [TOKENRELAY, "mock-upstream", "--port", str(port)], port,
                "/v1/models")


def tokenrelay_proc(workdir: Path, upstream: Proc, *, name: str = "tokenrelay",
                    baseline: Path | None = None, reqlog: bool = True,
                    redis_url: str | None = None) -> Proc:
    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(
        # As shipped: every request to the SQLite request log (LiteLLM, with no
        # database configured, logs nothing).
        (f'[log]\npath = "{workdir / (name + ".db")}"\n\n' if reqlog
         else "[log]\nenabled = false\n\n")
        + (f'[streams]\nstore = "redis"\nredis_url = "{redis_url}"\n\n' if redis_url
           else "")
        + "".join(f'[[models]]\nname = "{name}"\nbase_url = "{upstream.url}"\n'
                  f'upstream_model = "{model}"\n\n' for name, model in
                  (("fast", FAST), ("idle", IDLE), ("paced", PACED))))
    argv = [TOKENRELAY, "serve", "--port", str(port), "--config", str(config),
            "--route", f"up={upstream.url}"]
    env = {"TOKENRELAY_API_KEYS": KEY}
    if baseline is not None:
        # The other checkout's package first on the path (the venv's install is editable
        # through a .pth entry, which PYTHONPATH precedes).
        code = "import sys; from tokenrelay.cli import main; sys.argv[0] = 'tokenrelay'; main()"
        argv = [sys.executable, "-c", code, *argv[1:]]
        env["PYTHONPATH"] = str(baseline)
    return Proc(name, argv, port, "/healthz", env=env, api_key=KEY)


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A ``redis-server`` of this run's own (no persistence, loopback) and its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    popen = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--logfile", str(workdir / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and popen.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return popen, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    popen.kill()
    raise RuntimeError(f"redis-server ({binary}) did not start")


def floor_proc(upstream: Proc, *, raw: bool = False) -> Proc:
    """bench/minimal_relay.py: the stack alone, parsing and re-serialising each frame
    (``raw``: without Starlette either, a bare ASGI callable under uvicorn)."""
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "minimal_relay.py"), "--port", str(port),
            "--upstream", upstream.url] + (["--raw"] if raw else [])
    return Proc("bare" if raw else "floor", argv, port, "/healthz")


def litellm_proc(workdir: Path, upstream: Proc) -> Proc | str:
    """The LiteLLM proxy, or why it cannot run."""
    if not Path(LITELLM).exists():
        return (f"{LITELLM} not found: install it in its own venv: python -m venv"
                " /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'")
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text("model_list:\n" + "".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: \"openai/{model}\"\n"
        f"      api_base: \"{upstream.url}\"\n      api_key: \"sk-bench\"\n"
        for name, model in (("fast", FAST), ("idle", IDLE), ("paced", PACED)))
        + "litellm_settings:\n  telemetry: false\n  request_timeout: 600\n"
        + f"general_settings:\n  master_key: \"{KEY}\"\n")
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    argv = [LITELLM, "--config", str(config), "--port", str(port), "--host", "127.0.0.1",
            "--telemetry", "False"]
    return Proc("litellm", argv, port, "/health/liveliness", env=env, api_key=KEY)


# -- measuring ---------------------------------------------------------------------------

@dataclass
class Run:
    target: str
    concurrency: int
    report: BenchReport
    gateway_cpu: float | None  # seconds, process tree
    upstream_cpu: float
    client_cpu: float
    gateway_sys: float | None = None  # the kernel's part of gateway_cpu
    gateway_wait: float | None = None  # seconds runnable but waiting for a CPU

    def per_chunk_us(self, seconds: float | None) -> float | None:
        chunks = self.report.total_chunks
        return None if seconds is None or not chunks else seconds / chunks * 1e6


async def measure(target: str, url: str, model: str, *, concurrency: int, requests: int,
                  gateway: Proc | None, upstream: Proc,
                  request_rate: float | None = None) -> Run:
    key = gateway.api_key if gateway else None
    # A warm-up wave (connections, pools, lazy imports), at most 64 at once.
    n = min(concurrency, 64)
    await abench(base_url=url, model=model, concurrency=n, requests=n if n > 1 else 10,
                 max_tokens=TOKENS, api_key=key)
    g0 = cpu_times(gateway.pid) if gateway else (0.0, 0.0)
    w0 = runqueue_wait(gateway.pid) if gateway else 0.0
    u0 = cpu_seconds(upstream.pid)
    c0 = time.process_time()
    report = await abench(base_url=url, model=model, concurrency=concurrency,
                          requests=requests, max_tokens=TOKENS, api_key=key,
                          request_rate=request_rate)
    c1 = time.process_time()
    u1 = cpu_seconds(upstream.pid)
    g1 = cpu_times(gateway.pid) if gateway else (0.0, 0.0)
    w1 = runqueue_wait(gateway.pid) if gateway else 0.0
    run = Run(target, concurrency, report,
              None if gateway is None else sum(g1) - sum(g0), u1 - u0, c1 - c0,
              None if gateway is None else g1[1] - g0[1],
              None if gateway is None else w1 - w0)
    r = report
    console.print(
        f"  {target:<10} c={concurrency:<4} {r.completed}/{r.requests} ok  "
        f"{r.duration:6.2f}s  TTFT p50 {ms(r.ttft.median)}  p99 {ms(r.ttft.p99)}  "
        f"gateway CPU {fmt(run.per_chunk_us(run.gateway_cpu), 1)} µs/chunk"
        + (f"  errors: {list(r.errors.items())[:2]}" if r.errors else ""))
    return run


async def idle_streams(target: str, gateway: Proc, upstream: Proc, n: int) -> dict[str, Any]:
    """RSS of the gateway with ``n`` streams open, all waiting for a first token."""
    delete(f"http://127.0.0.1:{upstream.port}/_mock/requests")
    settle = 0.2 if os.environ.get("BENCH_SMOKE") else 1.0  # for RSS to settle
    await asyncio.sleep(settle)
    before = rss_mib(gateway.pid)
    task = asyncio.ensure_future(abench(base_url=gateway.url, model="idle", concurrency=n,
                                        requests=n, timeout=IDLE_DELAY * 3,
                                        api_key=gateway.api_key))
    started = time.monotonic()
    last = -1
    stable_since = time.monotonic()
    peak_rss = before
    clients = upstream_open = 0
    # Established client sockets prove nothing (the kernel completes handshakes for the
    # accept backlog): wait until the upstream sees every stream, or until the count it
    # sees has stopped growing for 5 s (a connection-pool cap), or 45 s at most.
    while time.monotonic() - started < 45:
        await asyncio.sleep(0.5)
        clients = established(gateway.port)
        records = get(f"http://127.0.0.1:{upstream.port}/_mock/requests", timeout=10)
        upstream_open = sum(1 for r in records if r["outcome"] == "open")
        peak_rss = max(peak_rss, rss_mib(gateway.pid))
        if upstream_open != last:
            last, stable_since = upstream_open, time.monotonic()
        elif upstream_open >= n or (upstream_open and time.monotonic() - stable_since > 5):
            break
    with_streams = rss_mib(gateway.pid)
    took = time.monotonic() - started
    # Is the gateway still responsive with the streams open? (a blocked event loop is not)
    t = time.perf_counter()
    try:
        await asyncio.to_thread(get, f"http://127.0.0.1:{gateway.port}{gateway.ready_path}", 5.0)
        health_ms: float | None = (time.perf_counter() - t) * 1000
    except (OSError, ValueError):
        health_ms = None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(2 * settle)
    after = rss_mib(gateway.pid)
    result: dict[str, Any] = {
        "target": target, "streams": n, "client_connections": clients,
        "upstream_open": upstream_open, "rss_before_mib": before,
        "rss_open_mib": max(with_streams, peak_rss), "rss_after_mib": after,
        "seconds_to_settle": took, "health_check_ms": health_ms}
    result["kib_per_stream"] = (result["rss_open_mib"] - before) * 1024 / n
    console.print(f"  {target:<10} {clients} client connections, {upstream_open} open at the"
                  f" upstream, RSS {before:.0f} → {result['rss_open_mib']:.0f} MiB"
                  f" ({result['kib_per_stream']:.1f} KiB/stream); health check "
                  + ("no answer in 5 s" if health_ms is None else f"{health_ms:.0f} ms"))
    return result


# -- profile -----------------------------------------------------------------------------

#: Component of a frame, by file; the deepest frame with a component owns a sample.
COMPONENTS = [
    ("httpx upstream read", ("(httpx/", "(httpcore/", "(h11/", "(anyio/", "(sniffio/")),
    # (before the provider shell: the first component that names a frame owns it)
    ("SSE decode + chunk parse", ("tokenrelay/providers/_sse.py",
                                  "tokenrelay/providers/_openai_wire.py")),
    ("provider shell (openai_compat)", ("tokenrelay/providers/",)),
    ("AsyncStream (_stream, events)", ("tokenrelay/_stream.py", "tokenrelay/events.py")),
    ("encoder (encode.py, orjson)", ("tokenrelay/server/encode.py",)),
    ("SSE response + relay (sse.py, gateway.py, app.py)", ("tokenrelay/server/sse.py",
                                                           "tokenrelay/server/gateway.py",
                                                           "tokenrelay/server/app.py")),
    ("metrics, limits, request log", ("tokenrelay/server/metrics.py", "(prometheus_client/",
                                      "tokenrelay/server/security.py",
                                      "tokenrelay/server/reqlog.py")),
    ("request parsing + validation", ("tokenrelay/server/schema.py", "(pydantic",
                                      "tokenrelay/request.py", "tokenrelay/config.py")),
    ("uvicorn send/receive", ("(uvicorn/", "tokenrelay/server/run.py")),
    ("starlette routing", ("(starlette/",)),
]


def component(frame: str) -> str | None:
    for name, needles in COMPONENTS:
        if any(n in frame for n in needles):
            return name
    return None


def profile_breakdown(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """Samples per component, and the hottest leaf functions, from py-spy's raw output."""
    by_component: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # Frames below the event loop's run() are uvicorn's and click's start-up: a sample
        # that ends there is uvloop's own C code (epoll, socket reads and writes,
        # callbacks) and belongs to the loop, not to uvicorn.
        loop_at = max((i for i, f in enumerate(frames) if "(asyncio/runners.py" in f
                       or "(asyncio/base_events.py" in f), default=-1)
        task_frames = frames[loop_at + 1:]
        owner = None
        for frame in reversed(task_frames):
            owner = component(frame)
            if owner:
                break
        if owner is None:
            if loop_at >= 0 and not task_frames:
                owner = "event loop (uvloop C: epoll, socket syscalls, callbacks)"
            elif task_frames and all("(asyncio/" in f for f in task_frames):
                owner = "asyncio primitives (timeouts, queues, events)"
            else:
                owner = "other"
        by_component[owner] += count
        leaves[frames[-1].split(" (")[0] + " (" + frames[-1].rsplit("/", 1)[-1]] += count
        total += count
    return by_component, leaves, total


async def profile(gateway: Proc, concurrency: int, requests: int,
                  workdir: Path) -> dict[str, Any] | str:
    if not Path(PY_SPY).exists():
        return (f"py-spy not found ({PY_SPY}); install it outside the project venv:"
                " python -m venv /tmp/pyspy-venv && /tmp/pyspy-venv/bin/pip install py-spy")
    raw = workdir / f"gateway-c{concurrency}.pyspy.txt"
    await abench(base_url=gateway.url, model="fast", concurrency=concurrency,
                 requests=concurrency, max_tokens=TOKENS, api_key=gateway.api_key)
    spy = await asyncio.create_subprocess_exec(
        PY_SPY, "record", "--pid", str(gateway.pid), "--rate", "500", "--format", "raw",
        "--output", str(raw), "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(1.0)
    g0 = cpu_seconds(gateway.pid)
    report = await abench(base_url=gateway.url, model="fast", concurrency=concurrency,
                          requests=requests, max_tokens=TOKENS, api_key=gateway.api_key)
    g1 = cpu_seconds(gateway.pid)
    spy.send_signal(signal.SIGINT)
    try:
        _, err = await asyncio.wait_for(spy.communicate(), 30)
    except TimeoutError:
        spy.kill()
        _, err = await spy.communicate()
    if not raw.exists():
        return f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}"
    by_component, leaves, total = profile_breakdown(raw)
    return {"samples": total, "cpu_us_per_chunk": (g1 - g0) / max(1, report.total_chunks) * 1e6,
            "components": dict(by_component.most_common()),
            "top_leaves": dict(leaves.most_common(15)), "raw": str(raw)}


# -- micro-benchmarks --------------------------------------------------------------------

MICRO = r"""
import asyncio, json, os, sys, time
sys.path[:0] = [p for p in sys.argv[3:] if p]
url, kind = sys.argv[1], sys.argv[2]
N_CONC, N_REQ = (8, 16) if os.environ.get("BENCH_SMOKE") else (64, 256)
body = json.dumps({"model": "tokens=100,tps=2000", "stream": True, "max_tokens": 100,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {"content-type": "application/json"}

async def with_httpx(module, shared):
    httpx = __import__(module)
    n_clients = 1 if shared else N_CONC
    per = N_CONC if shared else 1
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    clients = [httpx.AsyncClient(limits=limits, timeout=None) for _ in range(n_clients)]
    free = list(clients) * per
    async def one():
        client = free.pop()
        n = 0
        try:
            async with client.stream("POST", url, content=body, headers=HEADERS) as r:
                async for data in r.aiter_raw():
                    n += data.count(b"data: ")
        finally:
            free.append(client)
        return n
    return await run(one)

async def with_aiohttp():
    import aiohttp
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=N_CONC))
    async with session:
        return await run(one_with(session))

def one_with(session):
    async def one():
        n = 0
        async with session.post(url, data=body, headers=HEADERS) as r:
            async for data in r.content.iter_any():
                n += data.count(b"data: ")
        return n
    return one

async def run(one):
    sem = asyncio.Semaphore(N_CONC)
    async def guarded():
        async with sem:
            return await one()
    await asyncio.gather(*(guarded() for _ in range(N_CONC)))  # warm-up
    c0 = time.process_time()
    frames = sum(await asyncio.gather(*(guarded() for _ in range(N_REQ))))
    return (time.process_time() - c0) / frames * 1e6

import uvloop
uvloop.install()
variants = {"httpx": lambda: with_httpx("httpx", True),
            "httpx-per-conn": lambda: with_httpx("httpx", False),
            "httpx2": lambda: with_httpx("httpx2", True),
            "aiohttp": with_aiohttp}
print(json.dumps(asyncio.run(variants[kind]())))
"""


async def producing_costs(tokens: int, reps: int) -> dict[str, Any]:
    """The stream log's own cost on the hot path, in this process with nothing else:
    one 2,000-chunk answer of the in-process mock through ``Gateway.relay`` (no log, the
    path before issue 12) and through ``Gateway.produce`` (memory store: every frame
    appended before it is yielded), alternating, CPU time per chunk (median of ``reps``).
    No sockets: what is left is the generator's own work, where the two differ."""
    import statistics

    from tokenrelay.request import Message, Request
    from tokenrelay.server.config import ServerConfig
    from tokenrelay.server.encode import ChunkEncoder
    from tokenrelay.server.gateway import Gateway
    from tokenrelay.server.security import ANONYMOUS

    gw = Gateway(ServerConfig(serve_local=False, log={"enabled": False}))
    provider, model = gw.router.lookup(f"mock:tokens={tokens}")

    async def one(logged: bool) -> float:
        core = Request(messages=(Message(role="user", content="hi"),), model=model)
        lease = gw.limiter.acquire(ANONYMOUS, 10)
        stream = gw.open(core, provider)
        if logged:
            producer = await gw.create_stream(ANONYMOUS, endpoint="chat.completions",
                                              model="m", id_prefix="chatcmpl-", lease=lease)
            encoder = ChunkEncoder("m", include_usage=False, id=producer.stream_id)
            frames: Any = gw.produce(stream, encoder, producer, lease=lease,
                                     key_id=ANONYMOUS.id, endpoint="chat.completions",
                                     model="m").source
        else:
            encoder = ChunkEncoder("m", include_usage=False)
            frames = gw.relay(stream, encoder.encode, lease=lease, key_id=ANONYMOUS.id,
                              endpoint="chat.completions", model="m")
        started, n = time.process_time(), 0
        async for _ in frames:
            n += 1
        return (time.process_time() - started) / n * 1e6

    runs: dict[bool, list[float]] = {False: [], True: []}
    try:
        for rep in range(reps):
            for logged in ((False, True) if rep % 2 == 0 else (True, False)):
                runs[logged].append(await one(logged))
    finally:
        await gw.aclose()
    relay, produce = statistics.median(runs[False]), statistics.median(runs[True])
    console.print(f"[bold]Producing[/] (in-process, {tokens}-chunk answers, median of {reps}):"
                  f" relay {relay:.2f} µs/chunk, produce into the memory log {produce:.2f}"
                  f" µs/chunk: +{produce - relay:.2f} µs/chunk ({produce / relay:.2f}×"
                  " of the generator alone; the served chunk costs 20-60 µs in all)")
    return {"relay_us_per_chunk": relay, "produce_us_per_chunk": produce,
            "added_us_per_chunk": produce - relay}


def stage_costs(n: int = 20000) -> dict[str, float]:
    """µs per chunk of single stages of the relay path, in-process, no network."""
    from tokenrelay._stream import AsyncStream
    from tokenrelay.events import TextDelta
    from tokenrelay.providers._openai_wire import ChatChunkParser
    from tokenrelay.providers.base import Chunk, Provider
    from tokenrelay.request import Message, Request
    from tokenrelay.server.encode import ChunkEncoder

    frame = (b'data: {"id":"chatcmpl-mock1","object":"chat.completion.chunk","created":1,'
             b'"model":"m","system_fingerprint":null,"choices":[{"index":0,"delta":'
             b'{"content":" tok7"},"logprobs":null,"finish_reason":null}]}\n\n')
    out: dict[str, float] = {}
    parser = ChatChunkParser()
    t = time.perf_counter()
    for _ in range(n):
        parser.feed(frame)
    out["SSE decode + chunk parse (ChatChunkParser.feed, 1 frame/read)"] = \
        (time.perf_counter() - t) / n * 1e6

    encoder = ChunkEncoder("fast", include_usage=True)
    event = TextDelta(" tok7", "x")
    encoder.encode(event)
    t = time.perf_counter()
    for _ in range(n):
        encoder.encode(event)
    out["encoder (ChunkEncoder.encode)"] = (time.perf_counter() - t) / n * 1e6

    chunk = Chunk(" tok7")

    class Fixed(Provider):
        name = "fixed"

        async def stream(self, request: Request, *, raw: bool = False):  # type: ignore[override]
            for _ in range(n):
                yield chunk
            yield Chunk("", finish_reason="stop")

        def count_tokens(self, text: str, *, model: str | None = None) -> int:
            return 0

        def count_prompt_tokens(self, request: Request) -> int:
            return 0

    async def drain(with_stream: bool) -> float:
        request = Request(messages=(Message(role="user", content="hi"),), model="m")
        provider = Fixed()
        t = time.perf_counter()
        if with_stream:
            async for _ in AsyncStream(request, provider):
                pass
        else:
            async for _ in provider.stream(request):
                pass
        return (time.perf_counter() - t) / n * 1e6

    bare = asyncio.run(drain(False))
    out["AsyncStream (_run + _Accumulator, over a bare async generator)"] = \
        asyncio.run(drain(True)) - bare

    async def awaits(kind: str) -> float:
        from tokenrelay._timer import TaskDeadline

        loop = asyncio.get_running_loop()
        deadline = TaskDeadline(loop)
        t = time.perf_counter()
        for _ in range(n):
            if kind == "asyncio.timeout_at":
                async with asyncio.timeout_at(loop.time() + 60):
                    await asyncio.sleep(0)
            elif kind == "TaskDeadline":
                deadline.arm(loop.time() + 60)
                try:
                    await asyncio.sleep(0)
                finally:
                    deadline.disarm()
            else:
                await asyncio.sleep(0)
        deadline.close()
        return (time.perf_counter() - t) / n * 1e6

    def best(kind: str) -> float:  # the least disturbed of 5 runs
        return min(asyncio.run(awaits(kind)) for _ in range(5))

    bare = best("none")
    out["asyncio.timeout_at around one await (was paid twice per chunk)"] = \
        best("asyncio.timeout_at") - bare
    out["TaskDeadline arm/disarm around one await (_timer.py, paid twice now)"] = \
        best("TaskDeadline") - bare
    return out


def client_costs(upstream: Proc, workdir: Path) -> dict[str, float | str]:
    """CPU µs per frame of reading the same upstream streams with httpx and aiohttp."""
    script = workdir / "micro_client.py"
    script.write_text(MICRO)
    url = upstream.url + "/chat/completions"
    out: dict[str, float | str] = {}
    names = {"httpx": "httpx 0.28, one shared pool (OpenAIProvider until 2026-12-02)",
             "httpx-per-conn": "httpx 0.28, a client per connection",
             "httpx2": "httpx2 (pydantic fork, linear pool), shared pool",
             "aiohttp": "aiohttp, shared connector (OpenAIProvider now)"}
    for kind, label in names.items():
        done = subprocess.run([sys.executable, str(script), url, kind, ""],
                              capture_output=True, text=True, timeout=180, check=False)
        key = f"upstream read: {label} (client CPU µs per SSE frame, c=64)"
        if done.returncode == 0:
            out[key] = float(done.stdout.strip().splitlines()[-1])
        else:
            out[key] = "unavailable: " + (done.stderr.strip().splitlines() or ["?"])[-1][:120]
    return out


# -- report ------------------------------------------------------------------------------

def ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.2f}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


PATHS = ("direct", "bare", "floor", "tokenrelay", "before", "tr-redis", "litellm")


def report_runs(runs: list[Run], levels: list[tuple[int, int]],
                tps: int = TPS) -> dict[str, Any]:
    table = Table(title=f"Relay overhead: {TOKENS}-token answers at {tps} tokens/s per stream")
    for col in ("conc.", "path", "ok/failed", "req/s", "tok/s", "TTFT p50", "TTFT p99",
                "added p50", "added p99", "ITL p50", "ITL p99",
                "gateway CPU µs/chunk (of it kernel)", "gateway CPU s / waited for CPU s",
                "upstream CPU µs/chunk"):
        table.add_column(col, justify="right")
    summary: dict[str, Any] = {}
    for c, _ in levels:
        at = {r.target: r for r in runs if r.concurrency == c}
        direct = at.get("direct")
        for name in PATHS:
            run = at.get(name)
            if run is None:
                continue
            r = run.report
            added50 = added99 = None
            if direct is not None and name != "direct" and r.ttft.median is not None:
                added50 = r.ttft.median - direct.report.ttft.median  # type: ignore[operator]
                added99 = r.ttft.p99 - direct.report.ttft.p99  # type: ignore[operator]
            cpu = run.per_chunk_us(run.gateway_cpu)
            table.add_row(str(c), name, f"{r.completed}/{r.failed}",
                          f"{r.request_throughput:.1f}", f"{r.output_throughput:.0f}",
                          ms(r.ttft.median), ms(r.ttft.p99), ms(added50), ms(added99),
                          ms(r.itl.median), ms(r.itl.p99),
                          "–" if cpu is None else
                          f"{cpu:.1f} ({fmt(run.per_chunk_us(run.gateway_sys), 0)})",
                          "–" if run.gateway_cpu is None else
                          f"{run.gateway_cpu:.1f} / {fmt(run.gateway_wait, 1)}",
                          fmt(run.per_chunk_us(run.upstream_cpu), 1))
            summary[f"{name}@{c}"] = {
                "report": r.to_dict(), "added_ttft_p50_ms": None if added50 is None
                else added50 * 1000, "added_ttft_p99_ms": None if added99 is None
                else added99 * 1000, "gateway_cpu_us_per_chunk": cpu,
                "gateway_kernel_us_per_chunk": run.per_chunk_us(run.gateway_sys),
                "gateway_cpu_s": run.gateway_cpu, "gateway_runqueue_wait_s": run.gateway_wait,
                "upstream_cpu_us_per_chunk": run.per_chunk_us(run.upstream_cpu),
                "client_cpu_us_per_chunk": run.per_chunk_us(run.client_cpu)}
        table.add_section()
    console.print(table)

    goals = Table(title=f"Against the goals at {tps} tokens/s per stream (tokenrelay vs"
                        " direct and vs LiteLLM)")
    for col in ("conc.", "added TTFT p50 ms (goal ≤ 2)", "CPU µs/chunk (goal ≤ 50)",
                "CPU vs LiteLLM (goal ≤ 0.33)", "added TTFT p50 vs LiteLLM (goal ≤ 0.33)",
                "added TTFT p99 vs LiteLLM", "CPU vs minimal relay"):
        goals.add_column(col, justify="right")
    for c, _ in levels:
        tr, ll = summary.get(f"tokenrelay@{c}"), summary.get(f"litellm@{c}")
        if tr is None:
            continue
        cpu_ratio = ratio(tr["gateway_cpu_us_per_chunk"],
                          ll and ll["gateway_cpu_us_per_chunk"])
        lat_ratio = ratio(tr["added_ttft_p50_ms"], ll and ll["added_ttft_p50_ms"])
        lat99 = ratio(tr["added_ttft_p99_ms"], ll and ll["added_ttft_p99_ms"])
        fl = summary.get(f"floor@{c}")
        vs_floor = ratio(tr["gateway_cpu_us_per_chunk"], fl and fl["gateway_cpu_us_per_chunk"])
        goals.add_row(str(c), mark(tr["added_ttft_p50_ms"], GOALS["added_ttft_p50_ms"]),
                      mark(tr["gateway_cpu_us_per_chunk"], GOALS["cpu_us_per_chunk"], 1),
                      mark(cpu_ratio, GOALS["vs_litellm"]),
                      mark(lat_ratio, GOALS["vs_litellm"]), fmt(lat99), fmt(vs_floor))
        summary[f"ratios@{c}"] = {"cpu_vs_litellm": cpu_ratio,
                                  "added_ttft_p50_vs_litellm": lat_ratio,
                                  "added_ttft_p99_vs_litellm": lat99,
                                  "cpu_vs_minimal_relay": vs_floor}
    console.print(goals)
    side = [(a, b) for a, b in (("tokenrelay", "before"), ("tr-redis", "tokenrelay"))
            if any(f"{a}@{c}" in summary and f"{b}@{c}" in summary for c, _ in levels)]
    if side:
        # The issue-12 goals: the stream log's hot path ≤ 1.10× the gateway before it;
        # Redis adds ≤ 15 µs per chunk and ≤ 0.5 ms TTFT p50 over the memory store.
        pairs = Table(title=f"Side by side at {tps} tokens/s per stream (same run)")
        for col in ("conc.", "path vs path", "CPU µs/chunk", "CPU ratio", "added µs/chunk",
                    "TTFT p50 ms", "TTFT p50 diff ms"):
            pairs.add_column(col, justify="right")
        for c, _ in levels:
            for a, b in side:
                ra, rb = summary.get(f"{a}@{c}"), summary.get(f"{b}@{c}")
                if ra is None or rb is None:
                    continue
                ca, cb = ra["gateway_cpu_us_per_chunk"], rb["gateway_cpu_us_per_chunk"]
                ta = ra["report"]["ttft_ms"]["median"]  # (ms already)
                tb = rb["report"]["ttft_ms"]["median"]
                diff = None if ta is None or tb is None else ta - tb
                pairs.add_row(str(c), f"{a} vs {b}", f"{fmt(ca, 1)} / {fmt(cb, 1)}",
                              fmt(ratio(ca, cb)),
                              fmt(None if ca is None or cb is None else ca - cb, 1),
                              f"{fmt(ta)} / {fmt(tb)}", fmt(diff))
                summary[f"{a}_vs_{b}@{c}"] = {
                    "cpu_ratio": ratio(ca, cb),
                    "added_cpu_us_per_chunk": None if ca is None or cb is None else ca - cb,
                    "ttft_p50_diff_ms": diff}
        console.print(pairs)
    return summary


def mark(value: float | None, goal: float, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f} " + ("[green]✓[/]" if value <= goal else "[red]✗[/]")


def report_idle(results: list[dict[str, Any]]) -> None:
    table = Table(title="Memory with open idle streams (all waiting on a first token)")
    for col in ("gateway", "streams", "client conns", "open at upstream", "RSS idle MiB",
                "RSS open MiB", "KiB/stream", "RSS after MiB", "health check ms"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["target"], str(r["streams"]), str(r["client_connections"]),
                      str(r["upstream_open"]), f"{r['rss_before_mib']:.1f}",
                      f"{r['rss_open_mib']:.1f}", f"{r['kib_per_stream']:.1f}",
                      f"{r['rss_after_mib']:.1f}",
                      "no answer (5 s)" if r["health_check_ms"] is None
                      else f"{r['health_check_ms']:.0f}")
    console.print(table)


def report_profile(profs: dict[int, dict[str, Any] | str], stages: dict[str, Any]) -> None:
    done = {c: p for c, p in profs.items() if isinstance(p, dict)}
    for c, p in profs.items():
        if isinstance(p, str):
            console.print(f"[yellow]profile at c={c} skipped: {p}[/]")
    if done:
        table = Table(title="Where tokenrelay's CPU goes per relayed chunk (py-spy samples"
                            " × measured CPU/chunk of the profiled run)")
        table.add_column("component")
        for c, p in done.items():
            table.add_column(f"c={c} share", justify="right")
            table.add_column(f"c={c} µs/chunk", justify="right")
        names: list[str] = []
        for p in done.values():
            names += [n for n in p["components"] if n not in names]
        for name in names:
            cells = []
            for p in done.values():
                share = p["components"].get(name, 0) / (p["samples"] or 1)
                cells += [f"{share:.1%}", f"{share * p['cpu_us_per_chunk']:.1f}"]
            table.add_row(name, *cells)
        table.add_row("[bold]total[/]", *[x for p in done.values() for x in (
            f"{p['samples']} samples", f"{p['cpu_us_per_chunk']:.1f}")])
        console.print(table)
        for c, p in done.items():
            leaves = Table(title=f"Hottest functions at c={c} (self time)")
            leaves.add_column("function")
            leaves.add_column("share", justify="right")
            for name, count in p["top_leaves"].items():
                leaves.add_row(name, f"{count / (p['samples'] or 1):.1%}")
            console.print(leaves)
    if stages:
        table = Table(title="Single stages, measured alone (µs per chunk or frame)")
        table.add_column("stage")
        table.add_column("µs", justify="right")
        for name, value in stages.items():
            table.add_row(name, value if isinstance(value, str) else f"{value:.2f}")
        console.print(table)


# -- main --------------------------------------------------------------------------------

async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192 <= hard or soft < hard < 8192:
        # 1,000 streams are 2,000+ sockets per process here; children inherit this.
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    # Bounded so the whole run stays under ~8 minutes with LiteLLM at ~1.5 ms CPU/chunk.
    levels = [(1, 40), (64, 128), (256, 256)] if args.quick else [(1, 100), (64, 256),
                                                                  (256, 384)]
    idle_n = 300 if args.quick else 1000
    if args.smoke:  # every part runs, on counts that take seconds (the test suite's)
        levels, idle_n = [(1, 4), (8, 16)], 20
    console.print(f"[bold]bench_gateway[/] {time.strftime('%Y-%m-%d %H:%M')}  "
                  f"{platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}"
                  " (other processes on the machine skew every figure)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    upstream = upstream_proc()
    procs: list[Proc] = [upstream]
    redis_popen: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                               "cores": os.cpu_count()}
    try:
        gateway = tokenrelay_proc(workdir, upstream, reqlog=not args.no_reqlog)
        floor = floor_proc(upstream)
        bare = floor_proc(upstream, raw=True)
        procs += [gateway, floor, bare]
        for proc in procs:  # all at once: none needs another to start
            proc.launch(workdir)
        for proc in procs:
            proc.wait_ready()
        # (name, base URL, model for the fast answers, the same at a served model's pace)
        targets: list[tuple[str, str, str, str, Proc | None]] = [
            ("direct", upstream.url, FAST, PACED, None),
            ("tokenrelay", gateway.url, "fast", "paced", gateway)]
        targets[1:1] = [("bare", bare.url, FAST, PACED, bare),
                        ("floor", floor.url, FAST, PACED, floor)]
        if args.baseline:
            before = tokenrelay_proc(workdir, upstream, name="before",
                                     baseline=Path(args.baseline).resolve(),
                                     reqlog=not args.no_reqlog)
            procs.append(before)
            before.start(workdir)
            targets.append(("before", before.url, "fast", "paced", before))
        if args.redis_store:
            redis_popen, redis_url = start_redis(workdir)
            on_redis = tokenrelay_proc(workdir, upstream, name="tr-redis",
                                       reqlog=not args.no_reqlog, redis_url=redis_url)
            procs.append(on_redis)
            on_redis.start(workdir)
            targets.append(("tr-redis", on_redis.url, "fast", "paced", on_redis))
        litellm: Proc | None = None
        if not args.no_litellm:
            made = litellm_proc(workdir, upstream)
            if isinstance(made, str):
                console.print(f"[yellow]LiteLLM skipped: {made}[/]")
                results["litellm_skipped"] = made
            else:
                try:
                    made.start(workdir, timeout=180)
                    litellm = made
                    procs.append(made)
                    targets.append(("litellm", made.url, "fast", "paced", made))
                except RuntimeError as exc:
                    console.print(f"[yellow]LiteLLM skipped: {exc}[/]")
                    results["litellm_skipped"] = str(exc)
        console.print(f"upstream pid {upstream.pid}, " + ", ".join(
            f"{name} pid {proc.pid}" for name, _, _, _, proc in targets if proc is not None))

        parts = set(args.parts.split(","))
        if "relay" in parts:
            runs: list[Run] = []
            for c, n in levels:
                for name, url, model, _, proc in targets:
                    runs.append(await measure(name, url, model, concurrency=c, requests=n,
                                              gateway=proc, upstream=upstream))
            results["runs"] = report_runs(runs, levels)
        if "paced" in parts:
            # Poisson arrivals at c / (answer duration) per second: by Little's law c
            # streams in flight on average, at most c, and no synchronised waves.
            answer_s = TOKENS / PACED_TPS
            console.print(f"[bold]Paced[/] ({PACED_TPS} tokens/s per stream, Poisson"
                          f" arrivals at c/{answer_s:g} per second)")
            paced_levels = [(64, 128), (256, 256)] if args.quick else [(64, 192), (256, 512)]
            if args.smoke:
                paced_levels = [(2, 2)]
            paced: list[Run] = []
            for c, n in paced_levels:
                for name, url, _, model, proc in targets:
                    paced.append(await measure(name, url, model, concurrency=c, requests=n,
                                               gateway=proc, upstream=upstream,
                                               request_rate=c / answer_s))
            results["paced"] = report_runs(paced, paced_levels, PACED_TPS)

        profs: dict[int, dict[str, Any] | str] = {}
        stages: dict[str, Any] = {}
        if "producing" in parts:
            results["producing"] = await producing_costs(
                200 if args.smoke else 2000, 2 if args.smoke else 8)
        if "profile" in parts and not args.no_profile:
            console.print("[bold]Profile[/] (tokenrelay at concurrency 1 and 64)")
            counts = ((1, 50), (64, 192)) if args.quick else ((1, 100), (64, 320))
            for c, n in ((1, 5), (8, 16)) if args.smoke else counts:
                profs[c] = await profile(gateway, c, n, workdir)
            stages = await asyncio.to_thread(stage_costs, 500 if args.smoke else 20000)
            stages.update(await asyncio.to_thread(client_costs, upstream, workdir))
            report_profile(profs, stages)
            results["profile"] = profs
            results["stages"] = stages
        if "idle" in parts:
            # Last, and LiteLLM first: a burst this large can wedge tokenrelay's event loop
            # (see the report), which would skew anything measured after it.
            console.print(f"[bold]Idle streams[/] ({idle_n} waiting on a {IDLE_DELAY:g}s"
                          " first token)")
            idle = []
            if litellm is not None:
                idle.append(await idle_streams("litellm", litellm, upstream, idle_n))
            idle.append(await idle_streams("tokenrelay", gateway, upstream, idle_n))
            report_idle(idle)
            results["idle"] = idle
    finally:
        for proc in reversed(procs):
            proc.stop()
        if redis_popen is not None:
            redis_popen.terminate()
            redis_popen.wait(10)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        console.print(f"results written to {args.json}")
    console.print(f"logs and profile in {workdir}; load average now"
                  f" {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller request counts")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny counts, no LiteLLM: seconds, to check the script still runs")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM column")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy and stages")
    parser.add_argument("--no-reqlog", action="store_true",
                        help="run tokenrelay with its request log off (on by default, as shipped)")
    parser.add_argument("--json", metavar="PATH", help="also write all figures as JSON")
    parser.add_argument("--parts", default="relay,paced,producing,idle,profile",
                        help="comma-separated parts to run: relay, paced, producing,"
                             " profile, idle [relay,paced,producing,idle,profile]")
    parser.add_argument("--redis-store", action="store_true",
                        help="also measure tokenrelay with its stream log on Redis"
                             " ('tr-redis'; starts a redis-server of its own)")
    parser.add_argument("--baseline", metavar="SRC",
                        help="also measure the gateway from another checkout's src/ (e.g."
                             " a `git worktree` of an older commit), as the 'before' path")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.no_litellm = True
        # Paced answers of 0.2 s, not 2 s: the part runs, in a fraction of the time.
        PACED_TPS = 500
        PACED = f"tokens={TOKENS},tps={PACED_TPS}"
        os.environ["BENCH_SMOKE"] = "1"  # the client micro-benchmark's counts
    asyncio.run(main(arguments))
