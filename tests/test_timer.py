"""The lazy deadlines of the hot loops (``_timer.py``): same semantics as asyncio.timeout.

The tests run on a loop with a virtual clock: it jumps to the next timer instead of
sleeping, so every time below is exact and a busy machine cannot reorder a deadline and
a wake-up (real clocks failed "the cancellation arriving with the deadline" 20 times out
of 20 with one busy thread in the process: its margin was 5 ms).
"""

from __future__ import annotations

import asyncio
import functools
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tokenrelay._timer import LazyTimer, TaskDeadline


class _JumpingSelector(selectors.DefaultSelector):
    """Polls without blocking; where the loop would sleep, its clock jumps instead."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready and timeout:
            self._loop.now += timeout
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 1000.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def virtual_clock(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run the async ``test`` on a :class:`VirtualClockLoop`."""
    @functools.wraps(test)
    def run() -> None:
        loop = VirtualClockLoop()
        try:
            loop.run_until_complete(test())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return run


@virtual_clock
async def test_the_clock_is_virtual() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    started = loop.time()
    await asyncio.sleep(3600)
    assert loop.time() - started == pytest.approx(3600)


async def _guarded(deadline: TaskDeadline, when: float, awaitable: asyncio.Future[object]) -> object:
    deadline.arm(when)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if deadline.expired():
            raise TimeoutError from None
        raise
    finally:
        deadline.disarm()


@virtual_clock
async def test_an_expired_deadline_is_a_timeout_error_and_the_task_is_not_left_cancelled() -> None:
    loop = asyncio.get_running_loop()
    deadline = TaskDeadline(loop)
    never: asyncio.Future[object] = loop.create_future()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await _guarded(deadline, started + 0.05, never)
    assert loop.time() - started == pytest.approx(0.05)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # the task goes on normally
    deadline.close()


@virtual_clock
async def test_moving_the_deadline_later_keeps_one_timer_that_rearms() -> None:
    loop = asyncio.get_running_loop()
    deadline = TaskDeadline(loop)
    started = loop.time()
    # Each await finishes before its deadline; each arm moves the deadline later.
    for _ in range(20):
        fut: asyncio.Future[object] = loop.create_future()
        loop.call_later(0.01, fut.set_result, "ok")
        assert await _guarded(deadline, loop.time() + 0.05, fut) == "ok"
    assert loop.time() - started == pytest.approx(0.2)  # 20 x 10 ms: it was re-armed
    never: asyncio.Future[object] = loop.create_future()
    with pytest.raises(TimeoutError):
        await _guarded(deadline, loop.time() + 0.05, never)
    deadline.close()


@virtual_clock
async def test_an_outside_cancellation_is_not_taken_for_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    deadline = TaskDeadline(loop)
    never: asyncio.Future[object] = loop.create_future()
    task = asyncio.ensure_future(_guarded(deadline, loop.time() + 60, never))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline.close()


@virtual_clock
async def test_a_cancellation_arriving_with_the_deadline_stands() -> None:
    loop = asyncio.get_running_loop()
    deadline = TaskDeadline(loop)
    never: asyncio.Future[object] = loop.create_future()
    task = asyncio.ensure_future(_guarded(deadline, loop.time() + 0.05, never))
    await asyncio.sleep(0.045)
    loop.call_at(deadline.when or 0, task.cancel)  # at the very moment it expires
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline.close()


@virtual_clock
async def test_a_disarmed_deadline_never_fires() -> None:
    loop = asyncio.get_running_loop()
    deadline = TaskDeadline(loop)
    fut: asyncio.Future[object] = loop.create_future()
    loop.call_later(0.01, fut.set_result, 1)
    await _guarded(deadline, loop.time() + 0.03, fut)
    await asyncio.sleep(0.06)  # past the old deadline, with nothing armed: no cancel
    deadline.close()


@virtual_clock
async def test_lazy_timer_fires_once_per_arm_and_close_cancels() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    timer = LazyTimer(lambda: fired.append(loop.time()), loop)
    timer.arm(loop.time() + 0.02)
    timer.arm(loop.time() + 0.04)  # later: the first handle re-arms itself
    await asyncio.sleep(0.1)
    assert len(fired) == 1
    timer.arm(loop.time() + 0.02)
    timer.close()
    await asyncio.sleep(0.05)
    assert len(fired) == 1
