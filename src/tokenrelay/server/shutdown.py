"""Ending running answers when the server shuts down (SIGTERM).

uvicorn's own graceful shutdown lets a stream run on until ``timeout_graceful_shutdown``
and then cuts it: the client sees a network error and no reason. Here the gateway
gives streams in progress ``drain_timeout_s`` to finish; those still running then get
one error frame (``"code": "server_shutdown"``, a message saying the server is shutting
down) and their end, and non-streamed requests still waiting a 503 with that error.
uvicorn's own timeout is set a few seconds beyond the drain (``server/run.py``), so it
only ever cuts what could not be reached (a client that stopped reading).

The mechanism is a task cancellation carrying :data:`SHUTDOWN` as its message: the
endpoint's task is cancelled wherever it waits (on the upstream, usually), the core stream
aborts its upstream request as on any cancellation, and the endpoint, seeing the
message, takes the cancellation back and answers the shutdown error.

**Hand-off** (a shared stream log: Redis). A streamed answer still running at the deadline
is not ended: its production (``producing.py``) aborts its upstream, gives its lease up
after its last appended frame and lists the stream for the other processes
(``StreamLog.hand_off``), and breaks its client's connection (:class:`~.sse.BreakConnection`:
closed without the body's end), so the client resumes on another replica, which takes the
stream over (``takeover.py``) and finishes it. Streams with no client attached (background
responses, detached ones) are taken over by the other processes' sweepers
(``handoff.py``). A draining process takes nothing over itself.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["SHUTDOWN", "Drain"]

log = logging.getLogger("tokenrelay.server")

#: The message of the cancellation that ends a request at shutdown.
SHUTDOWN = "tokenrelay: server shutdown"


class Drain:
    """The endpoint tasks that answer a model, ended together at the drain deadline."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None
        #: Set once the drain deadline passed: requests still running are being ended.
        self.expired = False
        #: Set once shutdown began: this process takes no stream over any more.
        self.draining = False

    def add(self, task: asyncio.Task[object] | None) -> None:
        if task is not None:
            self._tasks.add(task)
            if self.expired:  # started after the deadline (a kept-alive connection)
                task.cancel(SHUTDOWN)

    def discard(self, task: asyncio.Task[object] | None) -> None:
        self._tasks.discard(task)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._tasks)

    def begin(self, timeout: float) -> None:
        """Shutdown began: end what is still running in ``timeout`` seconds."""
        self.draining = True
        if self._timer is None and not self.expired:
            loop = asyncio.get_running_loop()
            if self._tasks:
                log.warning("shutting down: %d answer(s) in progress get %gs to finish",
                            len(self._tasks), timeout)
            self._timer = loop.call_later(timeout, self.end_all)

    def end_all(self) -> None:
        self._timer = None
        self.expired = True
        if self._tasks:
            log.warning("shutting down: %d answer(s) still in progress at the drain"
                        " deadline: handed off (a shared stream log) or ended",
                        len(self._tasks))
        for task in list(self._tasks):
            task.cancel(SHUTDOWN)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def is_shutdown(exc: asyncio.CancelledError) -> bool:
    """Whether ``exc`` is the drain's cancellation (not a client gone, not a timeout)."""
    return bool(exc.args) and exc.args[0] == SHUTDOWN
