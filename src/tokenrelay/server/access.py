"""The console's access log: one line per request, written when the request ends.

A model request (``/v1/chat/completions``, ``/v1/responses``, ``/chat``) is logged by the
gateway once its stream is over (``Gateway.finish``), with the model, time to first
token and token counts; everything else (the page, ``/v1/models``, 404s, rejected
requests) by :class:`AccessLog` or ``Gateway.rejected``. Nothing here runs per relayed
chunk: :class:`AccessLog` wraps ``send`` only for requests that are not streams.

A line reads (logfmt, so that ``grep``/``awk`` take it apart)::

    127.0.0.1 "POST /v1/chat/completions" 200 model=mock key=alice ttft=0.012s prompt_tokens=3 completion_tokens=5 time=0.030s

(``key=``: the id of the gateway key used, never the key; absent without keys.)

``tokenrelay serve --quiet`` (or ``access_log = false``) turns it off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["ACCESS_LOGGER", "AccessLog", "access_line", "log_access"]

#: The logger of the access lines (``tokenrelay serve`` prints it to stderr).
ACCESS_LOGGER = logging.getLogger("tokenrelay.access")

#: Set in the ASGI scope once a request's line is written, so that it is written once.
LOGGED = "tokenrelay.access_logged"


def access_line(scope: Mapping[str, Any], status: int, *, duration: float,
                model: str | None = None, key: str | None = None,
                outcome: str | None = None,
                ttft: float | None = None, prompt_tokens: int | None = None,
                completion_tokens: int | None = None) -> str:
    """One access line (pure: the tests check it without a server)."""
    client = scope.get("client")
    who = client[0] if client else "-"
    # The path as the client sent it, quoted like a common-log request line; control
    # characters cannot reach it (the HTTP parser refuses them in a request target).
    parts = [f'{who} "{scope.get("method", "-")} {scope.get("path", "")}" {status}']
    if model is not None:
        parts.append("model=" + (model if model and " " not in model else repr(model)))
    if key is not None:
        parts.append("key=" + key)
    if outcome and outcome != "ok":
        parts.append("outcome=" + outcome)
    if ttft is not None:
        parts.append(f"ttft={ttft:.3f}s")
    if prompt_tokens is not None:
        parts.append(f"prompt_tokens={prompt_tokens}")
    if completion_tokens is not None:
        parts.append(f"completion_tokens={completion_tokens}")
    parts.append(f"time={duration:.3f}s")
    return " ".join(parts)


def log_access(scope: MutableMapping[str, Any], status: int, *, duration: float, **fields: Any) -> None:
    """Write the request's line (once) if the access log is on."""
    if scope.get(LOGGED) or not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    scope[LOGGED] = True
    ACCESS_LOGGER.info("%s", access_line(scope, status, duration=duration, **fields))


class AccessLog:
    """Pure ASGI middleware: the access line of every request that is not a model stream.

    ``streams`` are the paths whose POSTs the gateway logs itself when they end (it alone
    knows the model, TTFT and tokens); their ``send`` is not wrapped, so that a relayed
    chunk costs nothing more.
    """

    def __init__(self, app: Any, streams: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.streams = streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not ACCESS_LOGGER.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        if scope["method"] == "POST" and scope["path"] in self.streams:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            log_access(scope, status, duration=time.monotonic() - started)
