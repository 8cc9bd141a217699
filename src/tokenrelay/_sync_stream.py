"""``Stream``: the sync twin of :class:`~tokenrelay._stream.AsyncStream`.

It runs the same ``AsyncStream`` on the background event loop thread (``_portal.py``) and
hands events over through a queue, with backpressure, so there is one implementation of
everything below it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

from . import _portal
from ._stream import AsyncStream, Result
from .events import StreamEvent, TextDelta
from .providers.base import Provider
from .request import Request

__all__ = ["Stream"]

_END = object()
_WINDOW = 256
_BATCH = 32


class Stream:
    """A sync stream of events: the same stream as :class:`AsyncStream`.

    Use it as a context manager; leaving the block, ``close()``, ``break`` or Ctrl-C
    stops generation::

        with tokenrelay.stream("Why is the sky blue?") as stream:
            for text in stream.text_stream():
                print(text, end="", flush=True)
        print(stream.result.usage)
    """

    def __init__(self, astream: AsyncStream) -> None:
        self._astream = astream
        self._iterating = False
        self._closed = False
        self._pump: _portal.Handle | None = None

    @property
    def request(self) -> Request:
        return self._astream.request

    @property
    def provider(self) -> Provider:
        return self._astream.provider

    @property
    def text(self) -> str:
        return self._astream.text

    @property
    def result(self) -> Result:
        return self._astream.result

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._iterating:
            raise RuntimeError("a stream can be iterated only once")
        self._iterating = True
        return self._events()

    def _events(self) -> Iterator[StreamEvent]:
        import queue

        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        astream = self._astream
        loop = _portal.get_loop()
        # Backpressure: the pump runs ahead of a slow consumer by at most _WINDOW events;
        # credits come back in batches to keep cross-thread wake-ups rare.
        credits = asyncio.Semaphore(_WINDOW)

        async def pump() -> None:
            try:
                async for event in astream:
                    await credits.acquire()
                    q.put(event)
            except BaseException as exc:  # handed to the consumer thread
                q.put(_Raised(exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                q.put(_END)

        def give_back(n: int) -> None:
            for _ in range(n):
                credits.release()

        handle = self._pump = _portal.submit(pump())
        taken = 0
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, _Raised):
                    if isinstance(item.exc, asyncio.CancelledError):
                        break
                    raise item.exc
                taken += 1
                if taken == _BATCH:
                    loop.call_soon_threadsafe(give_back, taken)
                    taken = 0
                yield item
        finally:
            # Loop broken, generator closed, KeyboardInterrupt: stop the pump (this
            # closes the provider iterator on the loop thread) and wait for it.
            if not handle.finished.is_set():
                handle.cancel()
            self.close()

    def text_stream(self) -> Iterator[str]:
        """Only the new text of each delta."""
        for event in self:
            if isinstance(event, TextDelta):
                yield event.delta

    def final(self) -> Result:
        """Consume the rest of the stream and return the result (raises its error)."""
        if not self._iterating:
            for _ in self:
                pass
        result = self.result
        if result.error is not None:
            raise result.error
        return result

    def close(self) -> None:
        """Stop the stream: abort the upstream request / local decoding."""
        if self._closed:
            return
        self._closed = True
        pump = self._pump
        if pump is not None and not pump.finished.is_set():
            pump.cancel()  # close() inside the loop: the pump is iterating the stream
        _portal.run(self._astream.aclose())


@dataclass(slots=True)
class _Raised:
    exc: BaseException
