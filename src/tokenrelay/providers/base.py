"""The provider contract: one async method that turns a Request into Chunks.

A provider knows a wire format and an endpoint. It does not accumulate text, time
anything, retry or enforce deadlines other than its own connect timeout: the stream
above it does all of that the same way for every provider.

Contract of ``Provider.stream``:

* yield :class:`Chunk` objects as the provider produces them;
* the last chunk carries a ``finish_reason``; an iterator that ends without one is
  treated as a truncated stream (``StreamError``), never as success;
* raise the errors of :mod:`tokenrelay.errors` (translate library exceptions once);
* closing the iterator (``aclose()``, task cancellation) must stop generation:
  close the upstream connection or stop local decoding.

A provider whose server keeps a stream after its connection breaks (a tokenrelay gateway,
OpenAI background responses) hands a :class:`ResumeHandle` to the stream with the first
chunk of the answer (``Chunk.resume``); the stream reopens it when the connection breaks
(issue 12).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..events import Usage
from ..request import Request

__all__ = ["Chunk", "ModelInfo", "Provider", "ResumeHandle", "ToolCallChunk"]


@dataclass(slots=True)
class ToolCallChunk:
    """A piece of a tool call, as OpenAI-compatible servers stream them."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Chunk:
    """What a provider yields: new text, tool-call pieces, usage and/or the finish."""

    text: str = ""
    tool_calls: list[ToolCallChunk] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    raw: Any = None
    #: Set on the first chunk of an answer the server can resume (else None).
    resume: ResumeHandle | None = None


class ResumeHandle(ABC):
    """How to pick up an answer whose connection broke, where the server keeps it.

    The stream above the provider decides whether and when to reopen it (its
    ``RetryPolicy``); the handle knows where the answer stands and how to ask for the rest.
    """

    #: The server's id of the stream.
    stream_id: str
    #: Reconnections that the server answered (a resumed connection was opened).
    resumes: int = 0

    @abstractmethod
    def ready(self) -> bool:
        """Whether a position to resume from is known (an event id was received)."""

    @abstractmethod
    def reopen(self, *, raw: bool = False) -> AsyncIterator[Chunk]:
        """The rest of the answer, from after the last event received: no event twice.

        Raises like ``Provider.stream``: a ``ConnectionError`` / retryable status when the
        server could not be reached, another status error when it no longer has the stream,
        a ``StreamError`` when the resumed connection breaks or fails.
        """

    async def abandon(self) -> None:
        """The caller stops reading before the end (closed, failed): tell the server to stop
        producing if it keeps the answer only for us. Best effort, bounded; never raises."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    provider: str
    description: str = ""
    default: bool = False


class Provider(ABC):
    """Base of every provider."""

    #: Short name shown by ``tokenrelay models`` and in logs.
    name: str = "provider"

    @abstractmethod
    def stream(self, request: Request, *, raw: bool = False) -> AsyncIterator[Chunk]:
        """Stream the answer to ``request``; see the module docstring for the contract.

        Args:
            request: the validated request (``request.model`` is already resolved).
            raw: attach each raw provider chunk to ``Chunk.raw``.
        """

    def count_tokens(self, text: str, *, model: str | None = None) -> int:
        """Tokens in ``text`` by this provider's tokenizer (used when usage is missing)."""
        from ..usage import estimate_tokens

        return estimate_tokens(text, model=model)

    def count_prompt_tokens(self, request: Request) -> int:
        """Prompt tokens of ``request``, estimated (chat framing included roughly)."""
        return sum(self.count_tokens(m.content, model=request.model) + 4 for m in request.messages) + 3

    def counting_ready(self) -> bool:
        """Whether counting runs without a slow first load (else streams count in a thread)."""
        from ..usage import encoding_ready

        return encoding_ready()

    def can_continue(self) -> bool:
        """Whether ``Request.continue_from`` works here: the model goes on after a partial
        assistant answer (the embedded model and the mock; an OpenAI-compatible upstream
        when its route says how, ``continue_prefix``). Others refuse such a request."""
        return False

    async def list_models(self) -> list[ModelInfo]:
        return []

    async def default_model(self) -> str | None:
        """The model to ask for when the caller named none (``request.model is None``):
        an endpoint's first listed model. ``None``: this provider needs no name (mock,
        local). The stream calls it once, before the request.
        """
        return None

    async def aclose(self) -> None:
        """Release connections, models and threads."""
