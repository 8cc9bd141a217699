"""Finishing the streams another process handed off when it shut down (issue 10).

At its drain deadline a process sharing the stream log (Redis) gives its running streams
up unfinished (``producing.py``, ``StreamLog.hand_off``): each one's lease released after
its last frame and its id put on the log's hand-off list. A stream whose client was
attached is taken over by that client's resume, on whichever process the load balancer
sends it to (``delivery.py`` → ``takeover.py``). A stream nobody reads (a background
response, a chat stream detached within its resume grace) has no such reader: the
:class:`Sweeper` of every other process looks at the list every :data:`SWEEP_S` and takes
those streams over (``StreamTakeOver.attempt``: one process wins the lease; the others
see it held and let it be), so a background response still completes, with nobody
polling it. The two race harmlessly: whoever acquires the lease first produces the rest,
every reader anywhere reads it.

An entry leaves the list once its stream has a producer again, has ended, is gone, or
cannot be continued (tools, a structured answer, a route without ``continue_prefix``):
its readers end that one with the typed ``producer_lost`` when they come, as for a
process that died. A draining process does not sweep.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .sse import BreakConnection
from .streamlog import StreamLogError
from .takeover import StreamTakeOver

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["SWEEP_S", "Sweeper"]

log = logging.getLogger("tokenrelay.server")

#: How often a process looks at the hand-off list (one round trip to Redis).
SWEEP_S = 0.5
#: Streams taken over at once by one sweep.
_BATCH = 64


class Sweeper:
    """Takes over, in this process, streams handed off by processes that shut down."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.takeover = StreamTakeOver(gateway)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self.gateway.streams.shared:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tokenrelay-handoff-sweeper")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        failing = False
        while not self.gateway.drain.draining:
            await asyncio.sleep(SWEEP_S)
            if self.gateway.drain.draining:
                return
            try:
                await self.sweep()
                failing = False
            except StreamLogError as exc:
                if not failing:  # (once per outage: Redis's own health says the rest)
                    log.warning("hand-off sweep: %s", exc)
                failing = True

    async def sweep(self) -> int:
        """One look at the list; how many streams it named."""
        ids = await self.gateway.streams.handed_off(_BATCH)
        if ids:
            await asyncio.gather(*(self._take(stream_id) for stream_id in ids))
        return len(ids)

    async def _take(self, stream_id: str) -> None:
        log_ = self.gateway.streams
        try:
            info = await log_.info(stream_id, owner=None)
            if info is not None and not info.ended and not info.producer_alive:
                await self.takeover.attempt(stream_id, info.endpoint)
            await log_.forget_handed_off(stream_id)
        except StreamLogError as exc:
            log.info("hand-off sweep: stream %s: %s (tried again)", stream_id, exc)
        except BreakConnection:
            pass  # this process began shutting down meanwhile
        except Exception:  # (a bug: say so, and keep sweeping the others)
            log.exception("hand-off sweep: stream %s", stream_id)
