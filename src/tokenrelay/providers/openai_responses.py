"""Upstreams that speak the OpenAI Responses API (``POST /v1/responses``): OpenAI itself,
and any server that mirrors it (a tokenrelay gateway does).

The endpoint, key, HTTP client (one per event loop) and error translation are those of
:class:`~tokenrelay.providers.openai_compat.OpenAIProvider`; only the wire format differs,
and it is parsed by the pure :class:`ResponsesEventParser` (``feed(bytes) -> list[Chunk]``).

Usage::

    from tokenrelay.providers.openai_responses import OpenAIResponsesProvider

    provider = OpenAIResponsesProvider(base_url="https://api.openai.com/v1", api_key=KEY)
    async with tokenrelay.astream("hi", provider=provider, model="gpt-4.1-mini") as s: ...

In the gateway, a route with ``api = "responses"`` uses it.

Request mapping: leading system messages become ``instructions`` (later ones stay system
messages in ``input``); assistant tool calls become ``function_call`` items and tool
messages ``function_call_output`` items; ``max_tokens`` is ``max_output_tokens``;
``response_format`` is ``text.format``; tools are function tools (``strict: false``: the
core's tool specs carry no strictness). ``seed`` is not sent (the API has none), ``stop``
is refused (it has no stop sequences either), and ``store`` is ``false`` unless
``request.extra`` says otherwise.

Answer mapping: ``output_text`` deltas are text (refusals too: the core has no separate
channel for them); function calls are tool calls, indexed 0, 1, ... in the order they
appear; ``response.completed`` carries the usage and ends with ``tool_calls`` (when the
model called functions) or ``stop``; ``response.incomplete`` ends with ``length`` (or
``content_filter``); ``error`` / ``response.failed`` are a ``StreamError``.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from ..errors import StreamError, UsageError
from ..events import Usage
from ..request import Request
from ._openai_wire import ReplayFilter, error_message, event_seq
from ._resume import HTTPResume, stream_id
from ._sse import SSEDecoder
from .base import Chunk, ToolCallChunk
from .openai_compat import OpenAIProvider

__all__ = ["OpenAIResponsesProvider", "ResponsesEventParser", "response_to_chunks"]

#: ``incomplete_details.reason`` → the core's finish reason.
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
#: The events that name the response (its id) before any output.
_OPENING = frozenset({"response.created", "response.queued", "response.in_progress"})


def _usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    try:
        return Usage(int(obj.get("input_tokens") or 0), int(obj.get("output_tokens") or 0))
    except (TypeError, ValueError):
        return None


def _finish(response: dict[str, Any], called: bool) -> str:
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return _INCOMPLETE.get(str(reason), "length")
    return "tool_calls" if called else "stop"


class ResponsesEventParser:
    """SSE bytes of a streamed ``/responses`` answer in, :class:`Chunk` objects out.

    What it guards against (each an error, never a silent success): an ``error`` event or
    ``response.failed`` → ``StreamError`` with the upstream's code; a payload that is not
    JSON → ``StreamError(code="malformed_chunk")``; EOF before ``response.completed`` /
    ``.incomplete`` → ``StreamError(code="truncated")``.

    Function calls get dense tool-call indexes (0, 1, ...) in the order their output
    items were added, whatever their ``output_index``.

    Args:
        raw: attach each parsed event to ``Chunk.raw`` (and emit a chunk for every event).
    """

    __slots__ = ("_calls", "_error", "_raw", "_replay", "_sse", "_texts", "done", "last_seq",
                 "response_id", "started")

    def __init__(self, *, raw: bool = False) -> None:
        self._sse = SSEDecoder()
        self._raw = raw
        self._error: StreamError | None = None
        self._replay: ReplayFilter | None = None
        #: The ``sequence_number`` of the last event received (None before any).
        self.last_seq: int | None = None
        #: The response's id, from its ``response.created`` (or queued / in_progress) event.
        self.response_id: str | None = None
        # output_index → [tool-call index, arguments received]
        self._calls: dict[int, list[Any]] = {}
        # (output_index, content_index) → text received
        self._texts: dict[tuple[int, int], str] = {}
        #: A terminal event (completed / incomplete) was seen.
        self.done = False
        #: Some text or tool call was produced.
        self.started = False

    def position(self) -> int | None:
        """The ``sequence_number`` of the last event received, to resume after."""
        return self.last_seq

    def reconnect(self, after: int) -> None:
        """A new connection replays the response's events after ``after``
        (``starting_after``): a fresh SSE decoder, the answer's state kept, events up to
        ``after`` skipped, a gap refused."""
        self._sse = SSEDecoder()
        self._error = None
        self._replay = ReplayFilter(after)

    def feed(self, data: bytes) -> list[Chunk]:
        """Parse one network read; return the chunks it completed."""
        if self._error is not None:
            raise self._error
        chunks: list[Chunk] = []
        for payload, _event, _, _ in self._sse.feed(data):
            if self.done or payload == "[DONE]":
                continue  # nothing counts after the end
            try:
                obj = _loads(payload)
                seq = obj.get("sequence_number")
                if self._replay is not None:
                    if self._replay.check(seq):
                        continue  # received before the reconnect
                    self._replay = None
                if seq is not None:
                    self.last_seq = event_seq(seq)
                chunk = self._event(obj)
            except StreamError as exc:
                if not chunks:
                    raise
                # Hand out what came before the failure first; the error comes next call.
                self._error = exc
                break
            if chunk is not None:
                chunks.append(chunk)
        return chunks

    def _event(self, obj: dict[str, Any]) -> Chunk | None:
        kind = obj.get("type")
        try:
            chunk = self._chunk(kind, obj)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:
            raise StreamError(
                f"the provider sent a {kind} event of an unexpected shape: {str(obj)[:200]!r}",
                code="malformed_chunk",
            ) from exc
        if chunk is None and self._raw:
            chunk = Chunk()
        if chunk is not None and self._raw:
            chunk.raw = obj
        return chunk

    def _chunk(self, kind: Any, obj: dict[str, Any]) -> Chunk | None:
        if kind in _OPENING:
            response_id = (obj.get("response") or {}).get("id")
            if isinstance(response_id, str):
                self.response_id = response_id
            return None
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            return self._text(obj, obj["delta"])
        if kind == "response.output_text.done" or kind == "response.refusal.done":
            # Catch up on text a server sent only whole (no deltas, or fewer).
            full = obj.get("text") if kind.endswith("text.done") else obj.get("refusal")
            seen = self._texts.get((obj["output_index"], obj.get("content_index", 0)), "")
            if isinstance(full, str) and full.startswith(seen) and len(full) > len(seen):
                return self._text(obj, full[len(seen):])
            return None
        if kind == "response.output_item.added":
            item = obj["item"]
            if item.get("type") != "function_call":
                return None
            call = self._calls[obj["output_index"]] = [len(self._calls), ""]
            self.started = True
            piece = ToolCallChunk(call[0], item.get("call_id"), item.get("name"),
                                  item.get("arguments") or "")
            call[1] = piece.arguments
            return Chunk(tool_calls=[piece])
        if kind == "response.function_call_arguments.delta":
            return self._arguments(obj["output_index"], obj["delta"])
        if kind == "response.function_call_arguments.done":
            return self._catch_up(obj["output_index"], obj.get("arguments"))
        if kind == "response.output_item.done":
            item = obj["item"]
            if item.get("type") == "function_call":
                return self._catch_up(obj["output_index"], item.get("arguments"))
            return None
        if kind in ("response.completed", "response.incomplete"):
            self.done = True
            response = obj["response"]
            called = bool(self._calls) or any(
                isinstance(i, dict) and i.get("type") == "function_call"
                for i in response.get("output") or [])
            return Chunk(finish_reason=_finish(response, called),
                         usage=_usage(response.get("usage")))
        if kind == "error" or kind == "response.failed":
            if kind == "response.failed":
                err = (obj.get("response") or {}).get("error")
            else:  # {"type": "error", "code", "message"}, or the error nested in "error"
                err = obj.get("error") if isinstance(obj.get("error"), dict) else {
                    "message": obj.get("message"), "code": obj.get("code")}
            message, code = error_message({"error": err or {"message": "unknown error"}})
            raise StreamError(f"the provider failed mid-stream: {message}",
                              code=code or "upstream_error")
        return None  # created, in_progress, content parts, reasoning, ...: nothing to add

    def _text(self, obj: dict[str, Any], text: str) -> Chunk | None:
        key = (obj["output_index"], obj.get("content_index", 0))
        self._texts[key] = self._texts.get(key, "") + text
        if not text:
            return None
        self.started = True
        return Chunk(text=text)

    def _arguments(self, output_index: int, delta: str) -> Chunk | None:
        call = self._calls.get(output_index)
        if call is None:
            raise KeyError(output_index)  # arguments of an item never added
        call[1] += delta
        if not delta:
            return None
        return Chunk(tool_calls=[ToolCallChunk(call[0], arguments=delta)])

    def _catch_up(self, output_index: int, full: Any) -> Chunk | None:
        call = self._calls.get(output_index)
        if call is None or not isinstance(full, str):
            return None
        if full.startswith(call[1]) and len(full) > len(call[1]):
            return self._arguments(output_index, full[len(call[1]):])
        return None

    def end(self) -> None:
        """The body ended. Raises ``StreamError(code="truncated")`` before the end event."""
        self._sse.end()
        if self._error is not None:
            raise self._error
        if not self.done:
            raise StreamError(
                "the stream ended before response.completed; the answer may be truncated"
                " (a proxy or the server cut the connection)",
                code="truncated",
            )


def _loads(payload: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError as exc:
        raise StreamError(f"the provider sent a malformed event ({exc}): {payload[:200]!r}",
                          code="malformed_chunk") from exc
    if not isinstance(obj, dict):
        raise StreamError(f"the provider sent an event that is not a JSON object:"
                          f" {payload[:200]!r}", code="malformed_chunk")
    return obj


def response_to_chunks(obj: Any, *, raw: bool = False) -> list[Chunk]:
    """Chunks of a non-streamed response object (a server that ignored ``stream``)."""
    if not isinstance(obj, dict) or obj.get("object") != "response":
        if isinstance(obj, dict) and obj.get("error"):
            message, code = error_message(obj)
            raise StreamError(f"the provider failed: {message}", code=code or "upstream_error")
        raise StreamError(f"the provider answered with JSON that is not a response object:"
                          f" {str(obj)[:200]}", code="malformed_chunk")
    if obj.get("status") == "failed":
        message, code = error_message({"error": obj.get("error") or {}})
        raise StreamError(f"the provider failed: {message}", code=code or "upstream_error")
    text: list[str] = []
    calls: list[ToolCallChunk] = []
    try:
        for item in obj.get("output") or []:
            if item.get("type") == "message":
                text += [p.get("text") or p.get("refusal") or "" for p in item["content"]]
            elif item.get("type") == "function_call":
                calls.append(ToolCallChunk(len(calls), item.get("call_id"), item.get("name"),
                                           item.get("arguments") or ""))
    except (AttributeError, TypeError, KeyError) as exc:
        raise StreamError(f"the provider answered with a response of an unexpected shape:"
                          f" {exc}", code="malformed_chunk") from exc
    return [Chunk("".join(text), calls or None, _finish(obj, bool(calls)),
                  _usage(obj.get("usage")), obj if raw else None)]


def responses_body(request: Request) -> dict[str, Any]:
    """The ``/responses`` body of a core request (``stream: true``)."""
    if not request.model:
        raise UsageError("no model given: pass model=... (the name the server knows)")
    if request.stop:
        raise UsageError("the Responses API has no stop sequences: drop stop=..., or use a"
                         " Chat Completions provider")
    messages = list(request.messages)
    instructions = []
    while messages and messages[0].role == "system":
        instructions.append(messages.pop(0).content)
    items: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            items.append({"type": "function_call_output", "call_id": m.tool_call_id or "",
                          "output": m.content})
            continue
        if m.content or not m.tool_calls:
            items.append({"role": m.role, "content": m.content})
        for call in m.tool_calls or ():
            fn = call.get("function") or {}
            items.append({"type": "function_call", "call_id": call.get("id") or "",
                          "name": fn.get("name") or "", "arguments": fn.get("arguments") or ""})
    body: dict[str, Any] = {"model": request.model, "input": items, "store": False}
    if instructions:
        body["instructions"] = "\n\n".join(instructions)
    if request.max_tokens is not None:
        body["max_output_tokens"] = request.max_tokens
    for name in ("temperature", "top_p"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    fmt = request.response_format
    if fmt is not None:
        body["text"] = {"format": {"type": "json_schema", "name": fmt.name,
                                   "schema": fmt.schema_, "strict": fmt.strict}}
    if request.tools:
        body["tools"] = [{"type": "function", "name": t.name, "description": t.description,
                          "parameters": t.parameters, "strict": False}
                         for t in request.tools]
    choice = request.tool_choice
    if isinstance(choice, dict):
        # Chat Completions' {"type": "function", "function": {"name": N}} → {"type", "name"}
        named = (choice.get("function") or {}).get("name") or choice.get("name")
        body["tool_choice"] = {"type": "function", "name": named}
    elif choice is not None:
        body["tool_choice"] = choice
    body.update(request.extra)
    if body.get("background") and "store" not in request.extra:
        body["store"] = True  # a background response is stored (the API requires it)
    body["stream"] = True  # this provider only streams; complete() is built on it
    return body


class OpenAIResponsesProvider(OpenAIProvider):
    """Streams from a ``/responses`` endpoint (the OpenAI Responses API).

    Takes the arguments of :class:`~tokenrelay.providers.openai_compat.OpenAIProvider`
    (``base_url``, ``api_key``, ``connect_timeout``, ``max_connections``, ``headers``) and shares its client handling, ``/models`` and error translation.

    Example::

        provider = OpenAIResponsesProvider(base_url="https://api.openai.com/v1",
                                           api_key=os.environ["OPENAI_API_KEY"])
        result = tokenrelay.complete("hi", provider=provider, model="gpt-4.1-mini")
    """

    name = "openai-responses"

    def __repr__(self) -> str:
        return f"OpenAIResponsesProvider(base_url={self.base_url!r})"

    path = "/responses"
    uses_stream_options = False

    def can_continue(self) -> bool:
        return False  # the Responses API has no assistant prefill

    def _body(self, request: Request, *, stream_options: bool) -> bytes:
        if request.continue_from is not None:
            raise UsageError("a /responses upstream cannot continue a partial answer")
        return json.dumps(responses_body(request), separators=(",", ":"),
                          ensure_ascii=False).encode()

    def _parser(self, *, raw: bool) -> ResponsesEventParser:
        return ResponsesEventParser(raw=raw)

    def _from_json(self, obj: Any, *, raw: bool) -> list[Chunk]:
        return response_to_chunks(obj, raw=raw)

    # -- resuming (providers/_resume.py) ---------------------------------------------

    replay = "responses"

    def _stops_on_abandon(self, request: Request) -> bool:
        # A background response runs to its end on purpose: never cancelled for the caller.
        return self.resume_grace is not None and not request.extra.get("background")

    def _resumption(self, response: aiohttp.ClientResponse, parser: Any,
                    request: Request) -> HTTPResume | None:
        """A tokenrelay gateway's answer (``x-tokenrelay-stream-id``), or a background
        response (``background: true``: OpenAI keeps it; its id is in
        ``response.created``); None for any other."""
        handle = super()._resumption(response, parser, request)
        if handle is not None or not request.extra.get("background"):
            return handle
        sid = stream_id(getattr(parser, "response_id", None))
        if sid is None:
            return None
        return HTTPResume(self, sid, parser, replay=self.replay, stop_on_abandon=False)
