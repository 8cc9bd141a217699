"""One ``aiohttp.ClientSession`` per event loop, for a provider shared across loops.

A session and its pooled connections belong to the loop that opened them, and one cached
provider serves callers on several loops (the sync API's background loop, each
``asyncio.run``, the gateway's). aiohttp also reports a session that is collected unclosed
("Unclosed client session", through the loop's exception handler): sessions whose loop
is gone are closed here, quietly, instead.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

__all__ = ["LoopSessions"]


class LoopSessions:
    """One ``aiohttp.ClientSession`` per event loop, made by ``factory`` on first use.

    A session holds its loop, so a mapping keyed weakly by loop would keep every loop
    alive; instead each session is closed when its loop shuts down (``asyncio.run`` and
    ``asyncio.Runner`` close the loop's async generators first: a suspended one per session
    closes it then, with the loop still able to close its sockets), the sessions of loops
    closed otherwise are dropped when the next session is made, the rest at exit.
    """

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._closers: dict[asyncio.AbstractEventLoop, Any] = {}
        self._lock = threading.Lock()
        _ALL_SESSIONS.add(self)
        # A provider dropped with sessions still open (a test's, a script's): close them
        # quietly instead of aiohttp's "Unclosed client session" report at collection.
        weakref.finalize(self, _drop_each, self._sessions, self._closers)

    def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            with self._lock:
                for other in [lp for lp in self._sessions if lp.is_closed()]:
                    _drop(self._sessions.pop(other))
                    _stop(self._closers.pop(other, None))
                session = self._sessions[loop] = self._factory()
                self._closers[loop] = _close_at_shutdown(session)
        return session

    async def aclose(self) -> None:
        """Close the running loop's session; other loops' sessions are left to them."""
        with self._lock:
            loop = asyncio.get_running_loop()
            session = self._sessions.pop(loop, None)
            _stop(self._closers.pop(loop, None))
        if session is not None:
            await session.close()

    def _drop_all(self) -> None:
        with self._lock:
            sessions = dict(self._sessions)
            self._sessions.clear()
            closers = dict(self._closers)
            self._closers.clear()
        for loop, session in sessions.items():
            closer = closers.get(loop)
            if loop.is_closed() or not loop.is_running():
                _drop(session)
                _stop(closer)
                continue
            done = threading.Event()

            def close(session: aiohttp.ClientSession = session, closer: Any = closer,
                      done: threading.Event = done) -> None:
                _drop(session)
                _stop(closer)
                done.set()

            try:
                loop.call_soon_threadsafe(close)
            except RuntimeError:  # closed meanwhile
                continue
            done.wait(0.5)


_ALL_SESSIONS: weakref.WeakSet[LoopSessions] = weakref.WeakSet()


async def _closer(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    try:
        yield
    finally:  # the loop's shutdown_asyncgens(), or this generator collected
        _drop(session)


def _close_at_shutdown(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    """A generator the running loop closes at its shutdown, closing ``session``.

    Started here (the loop's first-iteration hook registers it with the loop); the caller
    keeps it, or it would be collected and close the session at once.
    """
    closer = _closer(session)
    try:
        closer.asend(None).send(None)  # type: ignore[attr-defined]
    except StopIteration:
        pass
    return closer


def _stop(closer: Any) -> None:
    """Close a ``_closer`` now (its ``finally`` does not await: this takes one step)."""
    if closer is None:
        return
    try:
        closer.aclose().send(None)
    except (StopIteration, RuntimeError):  # RuntimeError: it is closing already
        pass


def _drop_each(sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession],
               closers: dict[asyncio.AbstractEventLoop, Any]) -> None:
    for session in list(sessions.values()):
        _drop(session)
    for closer in list(closers.values()):
        _stop(closer)


def _drop(session: aiohttp.ClientSession) -> None:
    """Close a session without awaiting (its loop is closed or about to stop).

    aiohttp only offers an async close; ``_close()`` is the synchronous part of it
    (closing the transports), and marks the connector closed so that neither object
    reports itself "unclosed" when collected.
    """
    connector = session.connector
    session.detach()
    if connector is not None and not connector.closed:
        connector._close()


@atexit.register
def _close_sessions_at_exit() -> None:
    for sessions in list(_ALL_SESSIONS):
        sessions._drop_all()
