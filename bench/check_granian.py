#!/usr/bin/env python
"""Does the gateway keep its promises under Granian? Each behaviour the gateway tests
check under uvicorn (tests/test_gateway_disconnect.py, test_gateway_hardening.py,
test_gateway_shutdown.py), checked here with the same app served by Granian.

    .venv/bin/python bench/check_granian.py          # ~40 s; prints one line per check

The app is ``create_app(config)`` unchanged (the mock model in-process), served by
``granian --interface asgi --workers 1 --loop uvloop`` on a free port (its header read
timeout and HTTP/1 buffer set to the gateway's header timeout and cap), each check against
a fresh server. The verdicts (and the reason ``tokenrelay serve --workers`` uses
uvicorn's processes) are in ARCHITECTURE.md, "Several processes".
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HI = [{"role": "user", "content": "hi"}]


def app() -> object:
    """Granian's factory target: the gateway with the config named by the environment."""
    from tokenrelay.server.app import create_app
    from tokenrelay.server.config import load_config

    return create_app(load_config(os.environ["CHECK_GRANIAN_CONFIG"]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, workdir: Path, *, tables: str = "", **config: Any) -> None:
        self.port = free_port()
        path = workdir / f"gw-{self.port}.toml"
        top = "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
        path.write_text(top + f'[log]\npath = "{workdir / "requests.db"}"\n' + tables)
        self.log = workdir / f"granian-{self.port}.log"
        env = {**os.environ, "CHECK_GRANIAN_CONFIG": str(path),
               "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        self.popen = subprocess.Popen(
            [str(Path(sys.executable).with_name("granian")), "--interface", "asgi",
             "--factory", "--host", "127.0.0.1", "--port", str(self.port), "--loop",
             "uvloop", "--http", "1", "--no-ws", "--workers", "1",
             # Granian's own settings closest to the gateway's: its header read timeout
             # set to header_timeout, its HTTP/1 buffer to the 64 KiB header cap.
             "--http1-header-read-timeout", str(int(config.get("header_timeout", 10) * 1000)),
             "--http1-buffer-size", str(64 * 1024), "check_granian:app"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=HERE,
            start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("granian did not start: " + self.log.read_text()[-2000:])

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


def post(port: int, body: dict[str, object], *, rcvbuf: int | None = None,
         path: str = "/v1/chat/completions") -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


def read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def metric(text: str, name: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text,
                                            re.MULTILINE))


# -- the checks -------------------------------------------------------------------------

def check_sse(workdir: Path) -> tuple[bool, str]:
    server = Server(workdir)
    try:
        sock = post(server.port, {"model": "mock:tokens=20,tps=10", "messages": HI,
                                  "stream": True})
        started = time.monotonic()
        sock.settimeout(5)
        first = sock.recv(65536)
        first_at = time.monotonic() - started
        rest = read_all(sock, 5)
        sock.close()
        ok = b"data: " in first and first_at < 0.5 and b"[DONE]" in rest
        return ok, f"first bytes after {first_at * 1e3:.0f} ms, [DONE] at the end: {ok}"
    finally:
        server.stop()


def check_disconnect(workdir: Path) -> tuple[bool, str]:
    server = Server(workdir)
    try:
        sock = post(server.port, {"model": "mock:tokens=200,tps=20", "messages": HI,
                                  "stream": True})
        sock.recv(65536)
        time.sleep(0.3)
        sock.close()
        time.sleep(1.0)
        text = server.metrics()
        cancelled = metric(text, "tokenrelay_cancellations_total")
        active = metric(text, "tokenrelay_active_streams")
        return cancelled >= 1 and active == 0, \
            f"cancellations {cancelled:g}, streams still active {active:g} one second later"
    finally:
        server.stop()


def check_slow_reader(workdir: Path) -> tuple[bool, str]:
    # As tests/test_gateway_disconnect.py: an upstream flooding 5,000 tokens/s, a client
    # with a 4 KiB receive window that reads nothing.
    port = free_port()
    upstream = subprocess.Popen(
        [str(Path(sys.executable).with_name("tokenrelay")), "mock-upstream", "--port",
         str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    server = None
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        server = Server(workdir, send_timeout=1, tables=(
            f'[[models]]\nname = "flood"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
            'upstream_model = "tokens=1000000,tps=5000"\n'))
        return _slow_reader(server)
    finally:
        if server is not None:
            server.stop()
        upstream.kill()
        upstream.wait(5)


def _slow_reader(server: Server) -> tuple[bool, str]:
    sock = post(server.port, {"model": "flood", "messages": HI, "stream": True},
                rcvbuf=4096)
    started = time.monotonic()
    active = 1.0
    while time.monotonic() < started + 20:
        time.sleep(1)
        active = metric(server.metrics(), "tokenrelay_active_streams")
        if active == 0:
            break
    took = time.monotonic() - started
    sock.close()
    return active == 0, (f"stream given up after {took:.0f}s" if active == 0 else
                         "the stream to a client that reads nothing still runs after 20s"
                         " (the server buffers what it cannot send)")


def check_header_cap(workdir: Path) -> tuple[bool, str]:
    server = Server(workdir)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: "
                     + b"a" * (70 * 1024) + b"\r\n\r\n")
        answer = read_all(sock, 5)
        sock.close()
        status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "connection closed"
        return status.startswith("HTTP/1.1 431"), f"70 KiB of headers: {status!r}"
    finally:
        server.stop()


def check_header_timeout(workdir: Path) -> tuple[bool, str]:
    server = Server(workdir, header_timeout=1)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127")
        started = time.monotonic()
        sock.settimeout(5)
        try:
            closed = sock.recv(100) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
        sock.close()
        took = time.monotonic() - started
        return closed and took < 3, (f"unfinished headers closed after {took:.1f}s" if closed
                                     else "unfinished headers still open after 5s"
                                     " (header_timeout = 1)")
    finally:
        server.stop()


def check_shutdown(workdir: Path) -> tuple[bool, str]:
    server = Server(workdir, drain_timeout_s=1.0)
    try:
        sock = post(server.port, {"model": "mock:tokens=200,tps=10", "messages": HI,
                                  "stream": True})
        first = sock.recv(65536)
        time.sleep(0.3)
        sent = time.monotonic()
        os.kill(server.popen.pid, signal.SIGTERM)
        rest = read_all(sock, 12)
        took = time.monotonic() - sent
        sock.close()
        body = first + rest
        ok = b"server_shutdown" in body and took < 4
        if ok:
            return True, f"one server_shutdown error frame after {took:.1f}s"
        end = body[-120:].decode(errors="replace").strip().replace("\n", " ")
        return False, (f"SIGTERM with drain_timeout_s = 1: the stream ended after {took:.1f}s"
                       f" without a server_shutdown frame (ends: …{end[-60:]!r})")
    finally:
        server.stop()


CHECKS: dict[str, Callable[[Path], tuple[bool, str]]] = {
    "SSE frames flushed as they come": check_sse,
    "client gone → upstream aborted": check_disconnect,
    "client not reading → dropped after send_timeout": check_slow_reader,
    "headers over 64 KiB → 431": check_header_cap,
    "unfinished headers → closed after header_timeout": check_header_timeout,
    "SIGTERM → drain, then one server_shutdown error": check_shutdown,
}


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="check-granian-"))
    failed = 0
    for name, check in CHECKS.items():
        try:
            ok, detail = check(workdir)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failure
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        failed += not ok
        print(f"{'pass' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    print(f"{failed} of {len(CHECKS)} failed under Granian; logs in {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
