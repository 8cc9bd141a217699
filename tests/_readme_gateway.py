"""Run the README's gateway block and its client examples, in a network namespace.

Started by ``tests/test_readme.py`` as ``unshare --net python _readme_gateway.py
--commands CMD... --python SOURCE...``: loopback is brought up, then

1. the first ``tokenrelay serve`` (no keys) and ``tokenrelay mock-upstream`` start in the
   background, each waited for on its port;
2. the other commands (``tokenrelay bench ...``) run to completion;
3. the Python examples run against that gateway;
4. the servers stop, and each further ``tokenrelay serve ...`` line (the one with
   ``--api-key``) starts, must answer ``/healthz``, refuse ``/v1/models`` without the key
   and list them with it, and stops.

Prints "all README gateway examples ran" when every step passed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request


def loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def port_of(command: str) -> int:
    found = re.search(r"--port\s+(\d+)", command)
    return int(found.group(1)) if found else 8000


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing answered {url} within {timeout:g}s") from None
            time.sleep(0.3)


def start(command: str) -> subprocess.Popen[bytes]:
    print(f"$ {command} &", flush=True)
    return subprocess.Popen(["bash", "-c", f"exec {command}"], stdin=subprocess.DEVNULL,
                            start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run(command: str) -> None:
    print(f"$ {command}", flush=True)
    done = subprocess.run(["bash", "-c", command], stdin=subprocess.DEVNULL, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"{command!r} exited with {done.returncode}")


def status(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"}
                                     if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            json.loads(response.read())
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", nargs="+", required=True)
    parser.add_argument("--python", nargs="*", default=[])
    args = parser.parse_args()
    loopback_up()
    servers = [c for c in args.commands if re.match(r"tokenrelay (serve|mock-upstream)\b", c)]
    others = [c for c in args.commands if c not in servers]
    serves = [c for c in servers if c.startswith("tokenrelay serve")]
    first_serve, later_serves = serves[0], serves[1:]
    running = []
    try:
        for command in [first_serve] + [c for c in servers if c not in serves]:
            running.append(start(command))
            wait_http(f"http://127.0.0.1:{port_of(command)}/"
                      + ("healthz" if "serve" in command else "v1/models"))
        for command in others:
            run(command)
        for source in args.python:
            print("$ python <README example>", flush=True)
            done = subprocess.run([sys.executable, "-c", source], timeout=600, check=False,
                                  capture_output=True, text=True)
            if done.returncode != 0 or not done.stdout.strip():
                raise SystemExit(f"README example failed:\n{source}\n{done.stderr}")
            print(done.stdout[:200], flush=True)
    finally:
        for process in running:
            stop(process)
    for command in later_serves:
        process = start(command)
        try:
            wait_http("http://127.0.0.1:8000/healthz")
            key = os.environ.get("KEY")
            if "--api-key" in command:
                assert status("http://127.0.0.1:8000/v1/models") == 401
                assert status("http://127.0.0.1:8000/v1/models", key) == 200
        finally:
            stop(process)
    print("all README gateway examples ran", flush=True)


if __name__ == "__main__":
    main()
