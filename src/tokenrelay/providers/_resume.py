"""Resuming an answer whose connection broke, where the server keeps it (issue 12).

Two kinds of server keep a streamed answer after its connection is gone:

* a **tokenrelay gateway** names every streamed answer in the response header
  ``x-tokenrelay-stream-id`` and numbers its SSE frames 0, 1, 2, … (``id:``); ``GET
  …/chat/completions/{id}/stream`` with ``Last-Event-ID: N`` replays what came after frame N
  and follows live. It keeps producing after a disconnect only as long as the request asked
  (``x-tokenrelay-resume-grace: SECONDS``), so the client that asked is the one that must
  say stop (``POST …/{id}/cancel``) when it gives up early;
* **OpenAI background responses** (``background: true``) run to the end with no client;
  ``GET /responses/{id}?stream=true&starting_after=N`` replays the events whose
  ``sequence_number`` is after N. They are never cancelled on the caller's behalf: the
  caller asked for a response that outlives the connection.

The handle (:class:`HTTPResume`) holds the answer's parser, so a reconnect continues the
same state (text so far, tool calls) and skips any event it already has. When and how
often to reconnect is the stream's decision (``RetryPolicy``, ``_stream.py``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from .base import Chunk, ResumeHandle

if TYPE_CHECKING:
    from .openai_compat import OpenAIProvider

__all__ = ["GRACE_HEADER", "STREAM_ID_HEADER", "HTTPResume", "ResumableParser",
           "stream_id"]

#: The request header asking a tokenrelay gateway to keep producing after a disconnect.
GRACE_HEADER = "x-tokenrelay-resume-grace"
#: The response header naming a tokenrelay gateway's streamed answer.
STREAM_ID_HEADER = "x-tokenrelay-stream-id"
# What a stream id may look like before it goes into a URL path (the gateway's own ids
# are 128 random bits and a prefix; OpenAI's ``resp_…`` fit too).
_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")


def stream_id(value: Any) -> str | None:
    """``value`` if it is a well-formed stream id, else None (it comes off the network
    and is put into a URL)."""
    if isinstance(value, str) and _STREAM_ID.fullmatch(value):
        return value
    return None


class ResumableParser(Protocol):
    """What a wire-format parser offers for resuming (``ChatChunkParser``,
    ``ResponsesEventParser``)."""

    started: bool
    done: bool

    def feed(self, data: bytes) -> list[Chunk]: ...
    def end(self) -> None: ...
    def position(self) -> int | None: ...
    def reconnect(self, after: int) -> None: ...


class HTTPResume(ResumeHandle):
    """The resume handle of an HTTP provider's answer.

    Args:
        provider: the provider that opened the answer (it knows the URLs and headers).
        stream_id: the server's id of the answer.
        parser: the answer's parser, whose state a reconnect continues.
        replay: ``"chat"`` (``…/chat/completions/{id}/stream`` + ``Last-Event-ID``) or
            ``"responses"`` (``/responses/{id}?stream=true&starting_after=N``).
        stop_on_abandon: cancel the answer on the server when the caller gives up (the
            gateway keeps it only because we asked for a grace period).
    """

    def __init__(self, provider: OpenAIProvider, stream_id: str, parser: ResumableParser,
                 *, replay: str, stop_on_abandon: bool) -> None:
        self.provider = provider
        self.stream_id = stream_id
        self.parser = parser
        self.replay = replay
        self.stop_on_abandon = stop_on_abandon
        self.resumes = 0
        self._abandoned = False

    def __repr__(self) -> str:
        return (f"HTTPResume({self.stream_id!r}, replay={self.replay!r},"
                f" position={self.parser.position()!r}, resumes={self.resumes})")

    def ready(self) -> bool:
        return self.parser.position() is not None

    def reopen(self, *, raw: bool = False) -> AsyncIterator[Chunk]:
        return self.provider.resumed(self, raw=raw)

    async def abandon(self) -> None:
        if self.stop_on_abandon and not self._abandoned:
            self._abandoned = True
            await self.provider.cancel_stream(self)
