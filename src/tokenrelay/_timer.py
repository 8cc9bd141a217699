"""Deadlines that are cheap to move: one timer per stream instead of one per chunk.

``asyncio.timeout_at`` around each await schedules and cancels a ``TimerHandle`` for every
chunk: ~10 µs each here, and the gateway paid it twice per relayed chunk (the stream's
idle deadline and the response's send timeout; bench/README.md). A :class:`LazyTimer`
keeps one handle: moving its deadline later only stores a float, and a handle that fires
before the current deadline re-arms itself for it. Deadlines here are seconds apart
(heartbeats, idle and send timeouts), so a handle is re-armed at most about once per
period, whatever the chunk rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["LazyTimer", "TaskDeadline"]

#: A handle may run this early (libuv's timers, hence uvloop's, have 1 ms granularity);
#: treating it as on time avoids re-arming a handle for a sub-millisecond remainder.
_SLACK = 0.001


def _nothing() -> None:
    pass


class LazyTimer:
    """Calls ``callback()`` once the loop time passes the armed deadline."""

    __slots__ = ("_callback", "_handle", "_handle_when", "_loop", "when")

    def __init__(self, callback: Callable[[], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._handle_when = 0.0
        #: The armed deadline (loop time), or None.
        self.when: float | None = None

    def arm(self, when: float) -> None:
        """Fire at loop time ``when`` (replacing any earlier deadline)."""
        self.when = when
        if self._handle is None or when < self._handle_when:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)
            self._handle_when = when

    def disarm(self) -> None:
        self.when = None

    def close(self) -> None:
        """Disarm and drop the handle (it would otherwise stay in the loop's heap).

        Also drops the callback: it is usually a bound method of the timer's owner, which
        holds the timer, and that cycle would leave both (and what the owner holds: a
        task, a response) to the cyclic collector instead of freeing them here.
        """
        self.when = None
        self._callback = _nothing
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if when is None:
            return
        if self._loop.time() + _SLACK < when:  # moved later since it was scheduled
            self._handle = self._loop.call_at(when, self._fire)
            self._handle_when = when
            return
        self.when = None
        self._expire()

    def _expire(self) -> None:
        self._callback()


class TaskDeadline(LazyTimer):
    """``asyncio.timeout_at`` for a hot loop: arm, await, disarm, without a timer each time.

    Usage (the await must directly follow ``arm``, and nothing else may be awaited while
    armed, so that an expiry can only interrupt that await)::

        deadline.arm(when)
        try:
            value = await something()
        except asyncio.CancelledError:
            if deadline.expired():
                raise TimeoutError from None
            raise
        finally:
            deadline.disarm()

    Like ``asyncio.Timeout`` it cancels the task and, when the cancellation arrives,
    ``expired()`` takes it back (``Task.uncancel``) unless someone else cancelled the
    task as well, in which case the cancellation stands.
    """

    __slots__ = ("_cancelling", "_fired", "_fixed", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None,
                 task: asyncio.Task[Any] | None = None) -> None:
        """``task``: the one task that will ever arm it (else the current one, each time)."""
        super().__init__(_nothing, loop)
        self._fixed = task
        self._task: asyncio.Task[Any] | None = task
        self._fired = False
        self._cancelling = 0

    def arm(self, when: float) -> None:
        if self._fixed is None:
            self._task = asyncio.current_task()
        LazyTimer.arm(self, when)

    def pin(self, task: asyncio.Task[Any] | None) -> None:
        """From now on ``task`` arms it (between two waits: not while armed)."""
        self._fixed = self._task = task

    def close(self) -> None:
        super().close()
        self._task = self._fixed = None

    def expired(self) -> bool:
        """After a CancelledError: whether it was this deadline's (then absorbed)."""
        if not self._fired:
            return False
        self._fired = False
        assert self._task is not None
        return self._task.uncancel() <= self._cancelling

    def _expire(self) -> None:
        task = self._task
        if task is None or task.done():
            return
        self._fired = True
        self._cancelling = task.cancelling()
        task.cancel()
