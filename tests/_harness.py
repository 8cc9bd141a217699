"""The test harness: the gateway served as in production, other processes, and the small
helpers every live test needs (ports, polling, SSE parsing). One copy of each.

Two ways to run the gateway, both the production server (``tokenrelay.server.run``:
uvicorn with the httptools header-timeout protocol, the gateway's timeouts, uvloop):

* :class:`LiveGateway` in a thread of this process, for tests that look inside it (its
  event loop's tasks, the limiter, the request log) or hand it a scripted provider.
  Its config may be the TOML file users write, read by the same function as
  ``tokenrelay serve --config``. At exit the thread must have stopped, or the test fails.
* :meth:`Processes.serve`: ``tokenrelay serve --config FILE`` as a subprocess, exactly as a
  user starts it. :class:`Processes` starts any number of processes (several gateways, a
  ``redis-server``, ``nginx``), waits until each is ready, and at exit stops them all and
  fails the test if one would not stop. The ``processes`` fixture (conftest) gives one.

    with LiveGateway(config) as gw:                      # a thread
        httpx.get(gw.url + "/healthz")

    def test_two(processes):                             # subprocesses
        a = processes.serve({"models": [...]})
        b = processes.serve(a.config_path)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

T = TypeVar("T")

__all__ = [
    "LiveGateway", "Proc", "Processes", "chat_body", "closed_port", "fd_count", "free_port",
    "gateway_config", "mock_routes", "nginx_config", "nginx_path", "poll", "sse_events",
    "sse_payloads", "wait_port", "write_config",
]

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
#: The nginx configuration shipped for deployments; the tests run nginx with it.
DEPLOY_NGINX = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"


# -- ports, polling, SSE ----------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (prefer binding port 0 and
    passing the socket where the server accepts one: no race)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_port() -> int:
    """A port where a connection is refused (bound, then released without listening)."""
    return free_port()


def wait_port(port: int, timeout: float = START_TIMEOUT, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` accepts a connection within ``timeout`` seconds."""
    def accepts() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return bool(poll(accepts, timeout, 0.02))


def poll(condition: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """``condition()`` once truthy, or its last (falsy) value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def sse_events(body: bytes | str) -> list[dict[str, str]]:
    """The events of an event-stream body (already de-chunked): each a dict of its
    ``event``, ``id`` and ``data`` fields (``data`` lines joined by newlines); comments
    and frames without fields are left out."""
    text = body.decode() if isinstance(body, bytes) else body
    events = []
    for frame in re.split(r"\r\n\r\n|\n\n|\r\r", text):
        event: dict[str, str] = {}
        data: list[str] = []
        for line in re.split(r"\r\n|\n|\r", frame):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name in ("event", "id", "retry"):
                event[name] = value
        if data:
            event["data"] = "\n".join(data)
        if event:
            events.append(event)
    return events


def sse_payloads(body: bytes | str) -> list[str]:
    """The ``data`` of each event of an event-stream body."""
    return [e["data"] for e in sse_events(body) if "data" in e]


def sse_json(body: bytes | str) -> list[Any]:
    """The JSON ``data`` of each event, ``[DONE]`` left out."""
    return [json.loads(p) for p in sse_payloads(body) if p != "[DONE]"]


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write a gateway config as the TOML file a user would (``None`` values left out)."""
    import tomli_w

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    path.write_text(tomli_w.dumps(clean(config)))
    return path


def mock_routes(upstream_url: str, **specs: str) -> list[dict[str, str]]:
    """Gateway routes ``name → mock upstream``, each with its behaviour in the model name
    (``up_slow="tokens=1000,tps=50"`` is the route ``up-slow``)."""
    return [{"name": name.replace("_", "-"), "base_url": upstream_url, "upstream_model": spec}
            for name, spec in specs.items()]


def gateway_config(tmp: Path, models: list[dict[str, str]], **options: Any) -> Any:
    """A test gateway's ``ServerConfig``: the routes, the scripted ``mock``, no embedded
    model, the request log in ``tmp``."""
    from tokenrelay.server import ServerConfig

    return ServerConfig.model_validate({"models": models, "serve_local": False,
                                        "log": {"path": str(tmp / "requests.db")}, **options})


def chat_body(model: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A chat completions body asking ``model`` to answer "hi"."""
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            **extra}


def fd_count() -> int:
    """This process's open file descriptors."""
    return len(os.listdir("/proc/self/fd"))


# -- the gateway in a thread --------------------------------------------------------------


class LiveGateway:
    """The production gateway server on ``127.0.0.1:<free port>`` in a thread, in ``with``.

    Args:
        config: a ``ServerConfig``, or the path of a TOML config (read as
            ``tokenrelay serve --config`` reads it). Host and port are replaced.
        app: the ASGI app; default ``create_app(config)`` (pass one to script it).
        loop: ``uvloop`` (production) or ``asyncio``.
        http: uvicorn's protocol: ``httptools`` (production, with the gateway's header
            timeouts) or ``h11``.
    """

    def __init__(self, config: Any, *, app: Any = None, loop: str = "uvloop",
                 http: str = "httptools") -> None:
        from tokenrelay.server.app import Gateway, create_app
        from tokenrelay.server.run import bind, build_server

        if isinstance(config, str | Path):
            from tokenrelay.cli.serve import server_config

            config = server_config(str(config))
        self.config = config.model_copy(update={"host": "127.0.0.1", "port": 0})
        self.app: Any = create_app(self.config) if app is None else app
        self.gateway: Gateway = self.app.state.gateway
        self.server = build_server(self.config, self.app, log_config=None, http=http)
        self.loop_kind = loop
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sock = bind(self.config)
        self.host = "127.0.0.1"
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        assert self.loop is not None
        try:
            self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # noqa: BLE001 - re-raised by __exit__
            self._error = exc

    def __enter__(self) -> Self:
        if self.loop_kind == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"gateway:{self.port}")
        self._thread.start()
        thread = self._thread
        if not poll(lambda: self.server.started or not thread.is_alive(), START_TIMEOUT) \
                or not self.server.started:
            self.server.should_exit = True
            self._stop()
            raise RuntimeError(f"the gateway did not start: {self._error!r}")
        return self

    def _stop(self) -> None:
        assert self._thread is not None and self.loop is not None
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():  # connections that never close
            self.server.force_exit = True
            self._thread.join(STOP_TIMEOUT)
        alive = self._thread.is_alive()
        if not alive:
            self.loop.close()
        self.sock.close()
        if alive:
            raise AssertionError(f"the gateway thread on port {self.port} did not stop"
                                 f" within {2 * STOP_TIMEOUT:g}s")

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self._stop()
        if self._error is not None and not isinstance(self._error, SystemExit):
            raise self._error

    # -- looking inside, from the test thread -------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 5) -> T:
        """Run ``coro`` on the server's event loop."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def task_count(self) -> int:
        """asyncio tasks alive in the server's loop (not counting the one asking)."""
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return self.call(count())

    def connections(self) -> int:
        """Client connections uvicorn holds."""
        return len(self.server.server_state.connections)

    def active(self) -> int:
        return self.gateway.limiter.total_active()

    def log_rows(self) -> list[dict[str, Any]]:
        assert self.gateway.reqlog is not None
        return self.gateway.reqlog.rows(1000)

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], count: int = 1,
                 timeout: float = 5) -> list[dict[str, Any]]:
        """Rows matching ``predicate``, once there are ``count`` of them (or the timeout)."""
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            found[:] = [r for r in self.log_rows() if predicate(r)]
            return len(found) >= count

        poll(enough, timeout)
        return found


# -- nginx ----------------------------------------------------------------------------------


def nginx_path() -> str | None:
    """Debian's nginx (``scripts/test.sh`` installs it with apt), or None."""
    import shutil

    found = shutil.which("nginx")
    if found is None and os.path.exists("/usr/sbin/nginx"):
        found = "/usr/sbin/nginx"
    return found


def nginx_config(directory: Path, port: int, replicas: Iterable[int],
                 template: Path = DEPLOY_NGINX) -> Path:
    """``deploy/nginx.conf`` made runnable here: listening on ``127.0.0.1:port``, its
    upstream the given replica ports on 127.0.0.1, one worker process, nothing outside
    ``directory`` (pid, logs, temp files), in the foreground. Every proxy directive stays
    as shipped, so the tests test the deployment's file.
    """
    text = template.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n"
                      for p in replicas)
    replaced = {
        r"(?m)^ *server replica1:8000[^\n]*\n(?: *server replica\d:8000[^\n]*\n)*": servers,
        r"(?m)^ *listen 8080;": f"        listen 127.0.0.1:{port};",
        r"(?m)^worker_processes auto;": "worker_processes 1;",
    }
    for pattern, new in replaced.items():
        text, n = re.subn(pattern, lambda _m, new=new: new, text, count=1)
        assert n == 1, f"{pattern!r} not found in {template}: the harness must follow it"
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / name).mkdir(parents=True, exist_ok=True)
    head = (f"daemon off;\npid {directory / 'nginx.pid'};\n"
            f"error_log {directory / 'error.log'} info;\n"
            + ("user root;\n" if os.geteuid() == 0 else ""))
    paths = (f"    access_log {directory / 'access.log'};\n"
             f"    client_body_temp_path {directory / 'body'};\n"
             f"    proxy_temp_path {directory / 'proxy'};\n"
             f"    fastcgi_temp_path {directory / 'fastcgi'};\n"
             f"    uwsgi_temp_path {directory / 'uwsgi'};\n"
             f"    scgi_temp_path {directory / 'scgi'};\n")
    text, n = re.subn(r"(?m)^http \{\n", lambda _m: "http {\n" + paths, text, count=1)
    assert n == 1, f"no http block in {template}"
    path = directory / "nginx.conf"
    path.write_text(head + text)
    return path


# -- processes ------------------------------------------------------------------------------


def tokenrelay_argv(*args: str) -> list[str]:
    """The real entry point: the console script beside the interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("tokenrelay")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "tokenrelay.cli"]
    return [*base, *args]


@dataclass
class Proc:
    """A process of a :class:`Processes` group."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    config_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """What the process wrote (stdout and stderr) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)


class Processes:
    """Processes started for one test; all stopped (and checked stopped) by ``close()``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, name: str, argv: Iterable[str], *, port: int | None = None,
              ready: Callable[[Proc], bool] | None = None, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, timeout: float = START_TIMEOUT) -> Proc:
        """Start ``argv``; wait until ``ready(proc)`` (default: ``port`` accepts).

        Raises:
            RuntimeError: it exited or was not ready in time (its output included).
        """
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        log = log_path.open("wb")
        argv = list(argv)
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=cwd or self.workdir,
                                 env=dict(os.environ if env is None else env),
                                 start_new_session=True)
        log.close()
        proc = Proc(name, argv, popen, log_path, port)
        self.procs.append(proc)
        if ready is None:
            def ready(p: Proc) -> bool:
                return p.port is None or wait_port(p.port, 0.05)
        if not poll(lambda: not proc.alive() or ready(proc), timeout, 0.02) or not proc.alive():
            self.stop(proc)
            raise RuntimeError(f"{name} did not start (exit {proc.popen.returncode}):\n"
                               f"{proc.output()[-3000:]}")
        return proc

    def serve(self, config: Any = None, *args: str, name: str = "serve",
              env: Mapping[str, str] | None = None, timeout: float = START_TIMEOUT) -> Proc:
        """``tokenrelay serve --config FILE --port 0`` as users run it; ready once it
        printed its address and answers ``/healthz``.

        Args:
            config: a TOML path, or a mapping written to a TOML file here; ``None``:
                no config file.
            args: more ``tokenrelay serve`` options.
        """
        argv = tokenrelay_argv("serve", "--port", "0")
        config_path: Path | None = None
        if isinstance(config, str | Path):
            config_path = Path(config)
        elif config is not None:
            config_path = write_config(self.workdir / f"{name}-{len(self.procs)}.toml", config)
        if config_path is not None:
            argv += ["--config", str(config_path)]
        argv += list(args)

        def ready(p: Proc) -> bool:
            if p.port is None:
                found = re.search(r"serving on http://[^\s]*:(\d+)", p.output())
                if found is None:
                    return False
                p.port = int(found.group(1))
            import urllib.request

            try:
                with urllib.request.urlopen(p.url + "/healthz", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        proc = self.start(name, argv, ready=ready, env=env, timeout=timeout)
        proc.config_path = config_path
        return proc

    def nginx(self, replicas: Iterable[int], *, name: str = "nginx",
              timeout: float = START_TIMEOUT) -> Proc:
        """Debian's nginx with ``deploy/nginx.conf`` (see :func:`nginx_config`) in front of
        the replicas on these 127.0.0.1 ports, on a free port; its files in a directory
        of its own (``proc.extra["dir"]``: ``error.log``, ``access.log``).
        """
        binary = nginx_path()
        if binary is None:
            import pytest

            pytest.skip("nginx is not installed (scripts/test.sh installs it with apt)")
        directory = self.workdir / f"{name}-{len(self.procs)}"
        directory.mkdir(parents=True)
        port = free_port()
        conf = nginx_config(directory, port, list(replicas))
        proc = self.start(name, [binary, "-p", str(directory), "-c", str(conf),
                                 "-e", str(directory / "error.log")],
                          port=port, timeout=timeout)
        proc.config_path = conf
        proc.extra["dir"] = directory
        return proc

    def stop(self, proc: Proc, signum: int = signal.SIGTERM,
             timeout: float = STOP_TIMEOUT) -> int:
        """Stop ``proc`` (``signum``, then SIGKILL after ``timeout``); its exit code.

        Raises:
            AssertionError: it ignored SIGKILL too (a process left behind).
        """
        if proc.alive():
            try:
                proc.popen.send_signal(signum)
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                try:
                    proc.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{proc.name} (pid {proc.pid}) did not stop") from None
        # Children it started in its session go too.
        try:
            os.killpg(proc.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return int(proc.popen.returncode)

    def close(self) -> None:
        """Stop every process, the last started first."""
        errors = []
        for proc in reversed(self.procs):
            try:
                self.stop(proc)
            except AssertionError as exc:
                errors.append(str(exc))
        self.procs.clear()
        if errors:
            raise AssertionError("; ".join(errors))
