"""The OpenAI Responses API, ``POST /v1/responses``, over the tokenrelay core.

The request (``responses_schema.py``) becomes a core ``Request`` (the endpoint is in
``endpoints.py``), streamed by whatever provider serves the model (an upstream Chat Completions or Responses API, the embedded
model, the mock): the answer is core events, re-serialised by :class:`ResponsesEncoder`
as the documented Responses stream::

    response.created, response.in_progress
    a message:        response.output_item.added (message), response.content_part.added
                      (output_text), response.output_text.delta ..., response.output_text.done,
                      response.content_part.done, response.output_item.done
    a function call:  response.output_item.added (function_call),
                      response.function_call_arguments.delta ..., .done,
                      response.output_item.done
    the end:          response.completed, or response.incomplete (max_output_tokens,
                      content_filter), or error + response.failed

Each frame is ``event: <type>`` + ``data: <json>`` and carries a ``sequence_number``;
there is no ``data: [DONE]`` (OpenAI sends none on this API). The shapes follow the
``openai`` SDK's ``types/responses`` models, which parse them in the tests.

A foreground response is not stored (``store`` is answered as ``false``); a background
one (``background: true``, ``server/background.py``) is kept in the stream log, frame by
frame: it starts ``queued`` (``response.created``), turns ``in_progress`` when its producer
starts, and a cancel ends it with the open items ``incomplete`` and a ``response.cancelled``
event (OpenAI's SDK defines no event for it; its ``Response.status`` has ``cancelled``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from .._stream import Result
from ..events import Done, ErrorEvent, StreamEvent, TextDelta, ToolCallDelta, Usage, UsageEvent
from .encode import STREAM_CANCELLED, client_message, dumps, tool_call_id
from .responses_schema import ResponsesRequest

__all__ = ["ResponsesEncoder"]

# -- the answer ------------------------------------------------------------------------


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(text: str, status: str) -> dict[str, Any]:
    return {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant",
            "status": status, "content": [_text_part(text)]}


def _call_item(call_id: str | None, name: str | None, arguments: str,
               status: str) -> dict[str, Any]:
    return {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": status,
            "call_id": call_id or tool_call_id(), "name": name or "", "arguments": arguments}


#: The response object's fields the encoder sets itself (the others echo the request).
_OWN_FIELDS = frozenset({"id", "object", "created_at", "status", "completed_at", "error",
                         "incomplete_details", "model", "output", "usage"})

#: Finish reasons that end a response as ``incomplete``, and the reason it names.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponsesEncoder:
    """Core events in, Responses API SSE frames out, for one response (no I/O).

    ``encode(event)`` returns the frames the event completes, joined in one ``bytes`` (a
    first event that is an early failure then stays one frame for the gateway's relay);
    ``body(result)`` is the response object of a ``stream: false`` request.
    """

    def __init__(self, request: ResponsesRequest, *, model: str, route: str | None = None,
                 response_id: str | None = None, background: bool = False) -> None:
        self.id = response_id or "resp_" + uuid.uuid4().hex
        self.model = model
        #: The upstream route's name, if the model is one (its errors are generic).
        self.route = route
        self.created_at = int(time.time())
        self._echo = request.echo()
        self._echo["background"] = background
        if background:
            self._echo["store"] = True  # kept in the stream log, retrievable
        #: The sequence number of the next frame (its SSE ``id:`` and ``sequence_number``).
        self.next_seq = 0
        self._started = False
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the open message item
        self._calls: dict[int, dict[str, Any]] = {}  # core tool-call index → its item
        self._open_calls: list[int] = []
        self.usage: Usage | None = None

    @classmethod
    def resumed(cls, response: dict[str, Any], *, next_seq: int,
                route: str | None = None) -> ResponsesEncoder:
        """An encoder in the state another process's left ``response`` (the object
        rebuilt from its frames, ``response_snapshot.py``): a take-over goes on from frame
        ``next_seq`` with the same ids, its open message item taking the new text."""
        self = cls.__new__(cls)
        self.id = str(response["id"])
        self.model = str(response.get("model", ""))
        self.route = route
        created = response.get("created_at")
        self.created_at = created if isinstance(created, int) else int(time.time())
        self._echo = {k: v for k, v in response.items() if k not in _OWN_FIELDS}
        self.next_seq = next_seq
        self._started = True
        self.output = [_copy(item) for item in response.get("output") or []
                       if isinstance(item, dict)]
        last = self.output[-1] if self.output else None
        self._message = (last if last is not None and last.get("type") == "message"
                         and last.get("status") == "in_progress" and last.get("content")
                         else None)
        self._calls = {}
        self._open_calls = []
        self.usage = None
        return self

    # -- frames ---------------------------------------------------------------------

    def _frame(self, frames: list[bytes], kind: str, **fields: Any) -> None:
        seq = self.next_seq
        self.next_seq = seq + 1
        payload = dumps({"type": kind, "sequence_number": seq, **fields})
        frames.append(b"event: %s\nid: %d\ndata: %s\n\n" % (kind.encode(), seq, payload))

    def response(self, status: str, *, usage: Usage | None = None,
                 error: dict[str, Any] | None = None,
                 incomplete: str | None = None) -> dict[str, Any]:
        """The response object, with the output items as they are now."""
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": None if incomplete is None else {"reason": incomplete},
            "model": self.model,
            "output": [_copy(item) for item in self.output],
            "usage": None if usage is None else usage_object(usage),
            **self._echo,
        }

    def start(self, status: str = "in_progress") -> list[bytes]:
        """The first frames: ``response.created`` with ``status``, and
        ``response.in_progress`` unless the response is ``queued`` (see :meth:`progress`)."""
        frames: list[bytes] = []
        self._started = True
        self._frame(frames, "response.created", response=self.response(status))
        if status != "queued":
            self._frame(frames, "response.in_progress", response=self.response("in_progress"))
        return frames

    def progress(self) -> list[bytes]:
        """``response.in_progress``: a queued response starts being generated."""
        frames: list[bytes] = []
        self._frame(frames, "response.in_progress", response=self.response("in_progress"))
        return frames

    def cancel(self) -> list[bytes]:
        """The frames that end a cancelled response: its open items closed as
        ``incomplete``, then ``response.cancelled`` (the last one)."""
        frames: list[bytes] = []
        self._close_message(frames, "incomplete")
        self._close_calls(frames, "incomplete")
        self._frame(frames, "response.cancelled",
                    response=self.response("cancelled", usage=self.usage))
        return frames

    def encode(self, event: StreamEvent) -> bytes:
        """The frames ``event`` completes, joined (what a foreground stream sends)."""
        return b"".join(self.frames(event))

    def frames(self, event: StreamEvent) -> list[bytes]:
        """The frames ``event`` completes, one ``bytes`` per frame (numbered from
        :attr:`next_seq`: what a producer appends to the stream log)."""
        frames = [] if self._started else self.start()
        if isinstance(event, TextDelta):
            self._text(frames, event.delta)
        elif isinstance(event, ToolCallDelta):
            self._tool_call(frames, event)
        elif isinstance(event, UsageEvent):
            self.usage = event.usage
        elif isinstance(event, Done):
            if event.finish_reason not in ("error", "cancelled"):
                # (after an error the failure frames are out; cancelled: nobody listens)
                self._finish(frames, event.finish_reason, event.usage)
        elif isinstance(event, ErrorEvent):
            if event.code == STREAM_CANCELLED:
                # A cancel (background responses: producing.py ends a stopped stream
                # with this event): the open items end incomplete, response.cancelled.
                frames += self.cancel()
            else:
                self._fail(frames, event)
        # Other events add nothing to the wire: tool_call_done (its arguments came as
        # deltas), structured_partial (the text carries the JSON), raw chunks, tool results.
        return frames

    def _text(self, frames: list[bytes], delta: str) -> None:
        self._close_calls(frames, "completed")
        item = self._message
        if item is None:
            item = self._message = _message_item("", "in_progress")
            item["content"] = []
            self.output.append(item)
            self._frame(frames, "response.output_item.added", output_index=self._index(item),
                        item=_copy(item))
            item["content"].append(_text_part(""))
            self._frame(frames, "response.content_part.added", item_id=item["id"],
                        output_index=self._index(item), content_index=0, part=_text_part(""))
        item["content"][0]["text"] += delta
        self._frame(frames, "response.output_text.delta", item_id=item["id"],
                    output_index=self._index(item), content_index=0, delta=delta, logprobs=[])

    def _tool_call(self, frames: list[bytes], event: ToolCallDelta) -> None:
        self._close_message(frames, "completed")
        item = self._calls.get(event.index)
        if item is None:
            # Calls stay open until text comes or the answer ends: parallel calls may
            # stream their arguments interleaved (the events carry their output_index).
            item = self._calls[event.index] = _call_item(event.id, event.name, "",
                                                         "in_progress")
            self.output.append(item)
            self._open_calls.append(event.index)
            self._frame(frames, "response.output_item.added", output_index=self._index(item),
                        item=_copy(item))
        elif event.name and not item["name"]:
            item["name"] = event.name
        if event.arguments_delta:
            item["arguments"] += event.arguments_delta
            self._frame(frames, "response.function_call_arguments.delta", item_id=item["id"],
                        output_index=self._index(item), delta=event.arguments_delta)

    def _close_message(self, frames: list[bytes], status: str) -> None:
        item, self._message = self._message, None
        if item is None:
            return
        index, part = self._index(item), item["content"][0]
        item["status"] = status
        self._frame(frames, "response.output_text.done", item_id=item["id"],
                    output_index=index, content_index=0, text=part["text"], logprobs=[])
        self._frame(frames, "response.content_part.done", item_id=item["id"],
                    output_index=index, content_index=0, part=_copy(part))
        self._frame(frames, "response.output_item.done", output_index=index, item=_copy(item))

    def _close_calls(self, frames: list[bytes], status: str) -> None:
        for core_index in self._open_calls:
            item = self._calls[core_index]
            item["status"] = status
            index = self._index(item)
            self._frame(frames, "response.function_call_arguments.done", item_id=item["id"],
                        output_index=index, arguments=item["arguments"])
            self._frame(frames, "response.output_item.done", output_index=index,
                        item=_copy(item))
        self._open_calls.clear()

    def _finish(self, frames: list[bytes], reason: str, usage: Usage) -> None:
        incomplete = _INCOMPLETE.get(reason)
        status = "completed" if incomplete is None else "incomplete"
        # Close in output order: at most one of the two is open.
        self._close_message(frames, status)
        self._close_calls(frames, status)
        self._frame(frames, f"response.{status}",
                    response=self.response(status, usage=usage, incomplete=incomplete))

    def _fail(self, frames: list[bytes], event: ErrorEvent) -> None:
        message = client_message(event.code, event.message, self.route)
        self._frame(frames, "error", code=event.code, message=message, param=None)
        for item in self.output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        code = "rate_limit_exceeded" if event.code == "rate_limited" else "server_error"
        self._frame(frames, "response.failed", response=self.response(
            "failed", usage=self.usage, error={"code": code, "message": message}))

    def _index(self, item: dict[str, Any]) -> int:
        # Items are few (one message, a handful of calls): a scan beats bookkeeping.
        return next(i for i, other in enumerate(self.output) if other is item)

    # -- stream: false --------------------------------------------------------------

    def body(self, model: str, result: Result) -> dict[str, Any]:
        """The response object of a finished (non-streamed) result."""
        incomplete = _INCOMPLETE.get(result.finish_reason)
        status = "completed" if incomplete is None else "incomplete"
        if result.text:
            self.output.append(_message_item(result.text, status))
        for call in result.tool_calls:
            self.output.append(_call_item(call.id, call.name, call.arguments, status))
        return self.response(status, usage=result.usage, incomplete=incomplete)


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of an item (its content list too): events must not change later."""
    copy = dict(item)
    if "content" in copy:
        copy["content"] = [dict(part) for part in copy["content"]]
    return copy
