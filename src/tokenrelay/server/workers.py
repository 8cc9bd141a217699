"""``tokenrelay serve --workers N``: N gateway processes accepting on one listening socket.

One process relays on one core (the GIL); N processes use N. The parent reserves the
address (:func:`reserve`: bound with ``SO_REUSEPORT``, not listening; so the port,
``port = 0`` too, is known and a bad address fails once), then starts the workers
(``multiprocessing`` *spawn*: fresh interpreters, nothing of the parent's state or
threads). Each binds its own listening socket to that address (:func:`listener`, also
``SO_REUSEPORT``) and runs the production server of ``run.py`` (uvicorn, the gateway's
protocol and drain); the kernel spreads new connections over the listening sockets by a
hash of the connection. (One socket shared by all, as uvicorn's ``--workers`` does, let
whichever worker was awake accept a whole burst: 16 streams opened at once all went to
one of two workers here.) The parent only supervises:

* **SIGTERM** (or SIGINT) to the parent: SIGTERM to every worker, each of which drains
  as a single process does (answers in progress get ``drain_timeout_s``, then a
  ``server_shutdown`` error each); the parent waits for them and exits 0 when they did.
  A worker still alive ``drain_timeout_s`` + uvicorn's margin + 5 s later is killed.
* a worker that **dies** (a crash, the OOM killer) is replaced, at most one restart per
  second per slot; its live gauges are dropped from ``/metrics`` (its counters stay).
  A worker that exits with uvicorn's startup failure (3) stops the whole server: the
  same failure would repeat forever.
* the parent dying (SIGKILL) takes the workers with it (``PR_SET_PDEATHSIG``): no
  orphan keeps the port.

``/metrics``: before starting the workers the parent points ``PROMETHEUS_MULTIPROC_DIR``
at a private temporary directory (removed at exit), so every worker's ``/metrics`` covers
all of them (``metrics.py``).

Why uvicorn's processes and not Granian's, and why not uvicorn's own ``Multiprocess``
supervisor: ARCHITECTURE.md ("Several processes"). In short: Granian relays a chunk for
about the same CPU but fails the gateway's header cap, slow-reader reset and drain; and
uvicorn's supervisor pickles a ``uvicorn.Config`` (the gateway's protocol class is made
at run time and does not pickle) and builds plain ``uvicorn.Server`` s, which have no drain.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigurationError
from .metrics import MULTIPROC_ENV, WORKERS_ENV

__all__ = ["STARTUP_FAILURE", "Supervisor", "listener", "reserve"]

log = logging.getLogger("tokenrelay.server")

#: The exit status of a worker whose server could not start (uvicorn's own).
STARTUP_FAILURE = 3
#: Seconds between two starts of one worker slot (a worker crashing in a loop).
RESTART_INTERVAL = 1.0
_PR_SET_PDEATHSIG = 1


def _reuse_port_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def reserve(host: str, port: int) -> socket.socket:
    """The address the workers will share, bound but not listening: the kernel gives it no
    connection, and nothing else can take the port meanwhile.

    It is bound *without* ``SO_REUSEPORT`` first, so an address some other process holds
    (another ``serve --workers`` on the same port, whose listeners do allow reuse) is an
    error, never a silent share of its traffic; the option is set after the bind, for the
    workers' listeners to join.

    Raises:
        ConfigurationError: the address cannot be used (in use, not local, no permission).
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigurationError(
            f"cannot listen on {host} port {port}: {reason}"
            " (pick another --port, or stop the process using it)") from exc


def listener(family: int, address: Any, backlog: int) -> socket.socket:
    """A worker's own listening socket on the reserved address."""
    sock = _reuse_port_socket(family)
    sock.bind(address)
    sock.listen(backlog)
    return sock


def _worker_entry(target: Callable[..., None], args: tuple[Any, ...], parent: int) -> None:
    """A worker's first steps: die with the parent, then run ``target(*args)``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's SIGTERM still reaches us
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        return
    target(*args)


class Supervisor:
    """Runs ``target(*args)`` in ``workers`` processes until SIGTERM/SIGINT.

    Args:
        target: a module-level function (it is pickled by name), run in each worker.
        args: its arguments (picklable: a ``ServerConfig`` is, an address is).
        workers: how many processes.
        stop_timeout: seconds the workers get to exit after SIGTERM before SIGKILL.
    """

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], workers: int, *,
                 stop_timeout: float) -> None:
        self.target = target
        self.args = args
        self.workers = workers
        self.stop_timeout = stop_timeout
        self._context = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._started_at: list[float] = []
        self._stopping = False
        self.metrics_dir: str | None = None

    def _start(self, slot: int) -> None:
        proc = self._context.Process(
            target=_worker_entry, name=f"tokenrelay-worker-{slot + 1}",
            args=(self.target, self.args, os.getpid()))
        proc.start()
        if slot < len(self._procs):
            self._procs[slot] = proc
            self._started_at[slot] = time.monotonic()
        else:
            self._procs.append(proc)
            self._started_at.append(time.monotonic())

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def run(self) -> int:
        """Start the workers, keep them running, stop them on SIGTERM/SIGINT; the exit
        status for the parent (0: every worker stopped cleanly)."""
        self.metrics_dir = tempfile.mkdtemp(prefix="tokenrelay-metrics-")
        saved_env = {name: os.environ.get(name) for name in (MULTIPROC_ENV, WORKERS_ENV)}
        os.environ[MULTIPROC_ENV] = self.metrics_dir  # the workers inherit it
        os.environ[WORKERS_ENV] = str(self.workers)
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        status = 0
        try:
            for slot in range(self.workers):
                self._start(slot)
            status = self._supervise()
            return self._stop_all() or status
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _supervise(self) -> int:
        while not self._stopping:
            sentinels = [p.sentinel for p in self._procs]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            if self._stopping:
                break
            for slot, proc in enumerate(self._procs):
                if proc.exitcode is None:
                    continue
                self._forget(proc)
                if proc.exitcode == STARTUP_FAILURE:
                    log.error("worker %d (pid %d) could not start; stopping", slot + 1,
                              proc.pid)
                    return 1
                log.warning("worker %d (pid %d) died (exit %s); starting another",
                            slot + 1, proc.pid, proc.exitcode)
                wait = self._started_at[slot] + RESTART_INTERVAL - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not self._stopping:
                    self._start(slot)
        return 0

    def _forget(self, proc: Any) -> None:
        """A dead worker's live gauges (streams in progress) leave ``/metrics``."""
        if self.metrics_dir is not None and proc.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)

    def _stop_all(self) -> int:
        """SIGTERM to every worker (each drains), wait, SIGKILL what is left."""
        for proc in self._procs:
            if proc.exitcode is None and proc.pid is not None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.stop_timeout
        status = 0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error("worker pid %d did not stop in %gs; killing it", proc.pid,
                          self.stop_timeout)
                proc.kill()
                proc.join(5)
                status = 1
            elif proc.exitcode != 0:
                status = 1
        return status
