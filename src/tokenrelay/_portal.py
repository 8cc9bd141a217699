"""One background event loop thread that runs the sync API's async machinery.

The sync ``Stream`` and ``complete()`` are thin shells: the work happens on this loop,
so there is one implementation of streaming, retries, deadlines and cancellation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="tokenrelay-loop", daemon=True
            )
            thread.start()
            _loop = loop
        return _loop


class Handle:
    """A coroutine running on the background loop."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.finished = threading.Event()

        async def wrapper() -> Any:
            try:
                return await coro
            finally:
                self.finished.set()

        self.future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
            wrapper(), get_loop()
        )

    def cancel(self, timeout: float = 10.0) -> None:
        """Cancel the coroutine and wait until its cleanup (``finally`` blocks) ran."""
        self.future.cancel()
        self.finished.wait(timeout)


def submit(coro: Coroutine[Any, Any, Any]) -> Handle:
    """Schedule ``coro`` on the background loop."""
    return Handle(coro)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and wait for it.

    A KeyboardInterrupt while waiting cancels the coroutine (which closes whatever it
    opened) before it propagates.
    """
    handle = submit(coro)
    try:
        return handle.future.result()  # type: ignore[no-any-return]
    except KeyboardInterrupt:
        handle.cancel()
        raise
