"""The typed events of a token stream.

Every stream, whatever the provider, yields one union of frozen dataclasses. Each has a
``type`` tag, so consumers can ``match`` on them::

    for event in stream:
        match event:
            case TextDelta(delta=d):
                print(d, end="", flush=True)
            case Done(finish_reason=reason):
                ...
            case _:
                pass

Delta events carry the running snapshot, as openai-python's ``_events.py`` does, so a
consumer that only wants "the text so far" never has to accumulate it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

__all__ = [
    "Done",
    "ErrorEvent",
    "FinishReason",
    "Metrics",
    "RawChunk",
    "StreamEvent",
    "StructuredPartial",
    "TextBuffer",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallDone",
    "ToolResult",
    "Usage",
    "UsageEvent",
]

FinishReason: TypeAlias = Literal[
    "stop", "length", "tool_calls", "content_filter", "cancelled", "error"
]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one exchange.

    ``estimated`` is true when the provider did not report usage and tokenrelay counted
    the tokens itself with the model's tokenizer (or an offline tiktoken encoding).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "estimated": self.estimated,
        }


@dataclass(frozen=True, slots=True)
class Metrics:
    """Timing of one stream, in seconds (``None`` when there was nothing to time)."""

    time_to_first_token: float | None = None
    inter_token_latency_p50: float | None = None
    inter_token_latency_p95: float | None = None
    tokens_per_second: float | None = None
    total_seconds: float = 0.0
    chunk_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_to_first_token": self.time_to_first_token,
            "inter_token_latency_p50": self.inter_token_latency_p50,
            "inter_token_latency_p95": self.inter_token_latency_p95,
            "tokens_per_second": self.tokens_per_second,
            "total_seconds": self.total_seconds,
            "chunk_count": self.chunk_count,
        }


class TextBuffer:
    """The text of one stream, shared by its ``TextDelta`` events.

    Each event keeps only a reference and an end offset, so queued or retained events cost
    O(1) memory each; a snapshot string is built only when someone reads it (and cached).
    Building a new string per token instead made memory quadratic in the answer length
    when a slow consumer let events queue up (100k tokens took 21 GB).
    """

    __slots__ = ("_cache", "_cache_parts", "_parts", "length")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.length = 0
        self._cache = ""
        self._cache_parts = 0

    def append(self, text: str) -> int:
        self._parts.append(text)
        self.length += len(text)
        return self.length

    def text(self, end: int | None = None) -> str:
        if self._cache_parts != len(self._parts):
            self._cache += "".join(self._parts[self._cache_parts :])
            self._cache_parts = len(self._parts)
        if end is None or end >= len(self._cache):
            return self._cache
        return self._cache[:end]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text from the model; ``snapshot`` is the whole text so far."""

    delta: str
    _text: TextBuffer | str = field(default="", repr=False, compare=False)
    _end: int = field(default=-1, repr=False, compare=False)
    type: Literal["text_delta"] = "text_delta"

    @property
    def snapshot(self) -> str:
        if isinstance(self._text, str):
            return self._text
        return self._text.text(self._end)


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A growing tool call: the new argument text and the arguments so far.

    ``partial_arguments`` is the arguments JSON parsed so far (a dict once ``{`` came;
    unfinished strings shown as far as they go), ``None`` before that or once the
    arguments stopped being valid JSON. Parallel calls interleave: ``index`` tells them apart.
    """

    index: int
    id: str | None
    name: str | None
    arguments_delta: str
    arguments_snapshot: str
    partial_arguments: Any = None
    type: Literal["tool_call_delta"] = "tool_call_delta"


@dataclass(frozen=True, slots=True)
class ToolCallDone:
    """A finished tool call with its parsed arguments."""

    index: int
    id: str | None
    name: str
    arguments: dict[str, Any]
    type: Literal["tool_call_done"] = "tool_call_done"


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool the stream ran itself (``tools=[python_function]``) and what came back.

    ``output`` is the text sent back to the model: the return value (JSON unless it is a
    string) or, when the tool raised or got bad arguments, the error (``is_error``).
    ``value`` is the Python return value (``None`` on error).
    """

    index: int
    id: str | None
    name: str
    arguments: dict[str, Any]
    output: str
    is_error: bool = False
    value: Any = field(default=None, repr=False, compare=False)
    type: Literal["tool_result"] = "tool_result"


@dataclass(frozen=True, slots=True)
class StructuredPartial:
    """The structured output so far, while its JSON is still arriving.

    ``value`` is a snapshot of the partial JSON (unfinished strings shown as far as they
    go, keys without a value yet left out) and ``path`` the place the last delta changed
    (``()``: the root). Snapshots share finished members with each other: treat them as
    read-only.
    """

    value: Any
    path: tuple[str | int, ...] = ()
    _model: Any = field(default=None, repr=False, compare=False)
    type: Literal["structured_partial"] = "structured_partial"

    @property
    def partial(self) -> Any:
        """``value`` as an unvalidated instance of the requested Pydantic model
        (``model_construct``: fields not yet arrived are unset, nested models stay
        dicts); ``None`` for a JSON-schema ``response_format`` or a non-object value."""
        if self._model is None or not isinstance(self.value, dict):
            return None
        return self._model.model_construct(**self.value)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """Token usage, as reported by the provider or counted (``usage.estimated``)."""

    usage: Usage
    type: Literal["usage"] = "usage"


@dataclass(frozen=True, slots=True)
class RawChunk:
    """One raw provider chunk (an SSE ``data:`` payload, a llama.cpp token, ...).

    Only emitted when the stream was opened with ``raw=True``.
    """

    data: Any
    type: Literal["raw_chunk"] = "raw_chunk"


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """A failure. In the event stream it is followed by a ``done`` with reason ``error``."""

    code: str
    message: str
    retryable: bool = False
    type: Literal["error"] = "error"


@dataclass(frozen=True, slots=True)
class Done:
    """The end of a stream, with the final usage and timing."""

    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    metrics: Metrics = field(default_factory=Metrics)
    type: Literal["done"] = "done"


StreamEvent: TypeAlias = (
    TextDelta
    | ToolCallDelta
    | ToolCallDone
    | ToolResult
    | StructuredPartial
    | UsageEvent
    | RawChunk
    | ErrorEvent
    | Done
)


def event_to_dict(event: StreamEvent) -> dict[str, Any]:
    """A JSON-ready dict of an event (used by ``tokenrelay --json``)."""
    match event:
        case TextDelta():
            return {"type": event.type, "delta": event.delta}
        case ToolCallDelta():
            return {
                "type": event.type,
                "index": event.index,
                "id": event.id,
                "name": event.name,
                "arguments_delta": event.arguments_delta,
                "partial_arguments": event.partial_arguments,
            }
        case ToolCallDone():
            return {
                "type": event.type,
                "index": event.index,
                "id": event.id,
                "name": event.name,
                "arguments": event.arguments,
            }
        case ToolResult():
            return {
                "type": event.type,
                "index": event.index,
                "id": event.id,
                "name": event.name,
                "arguments": event.arguments,
                "output": event.output,
                "is_error": event.is_error,
            }
        case StructuredPartial():
            return {"type": event.type, "value": event.value, "path": list(event.path)}
        case UsageEvent():
            return {"type": event.type, "usage": event.usage.to_dict()}
        case RawChunk():
            return {"type": event.type, "data": event.data}
        case ErrorEvent():
            return {
                "type": event.type,
                "code": event.code,
                "message": event.message,
                "retryable": event.retryable,
            }
        case Done():
            return {
                "type": event.type,
                "finish_reason": event.finish_reason,
                "usage": event.usage.to_dict(),
                "metrics": event.metrics.to_dict(),
            }
    raise TypeError(f"not a stream event: {event!r}")  # pragma: no cover
