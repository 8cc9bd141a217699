"""A Responses API stream's stored frames → the ``Response`` object (pure, no I/O).

``GET /v1/responses/{id}`` answers from the stream log (``server/background.py``): a
finished response is its final event's ``response`` (``response.completed``,
``.incomplete``, ``.failed``, ``.cancelled``); one still running is the latest lifecycle
event's ``response`` (``created`` / ``in_progress``) with its output items rebuilt from the
events so far, exactly as OpenAI's SDK accumulates them (``ResponseStreamState``).

The frames are the gateway's own (written by its producers, in this or another process),
but they may come from Redis: anything that does not parse as expected is skipped, never
trusted to index a list.
"""

from __future__ import annotations

from typing import Any

import orjson

from .encode import dumps

__all__ = ["FINAL_EVENTS", "ResponseSnapshot", "frame", "parse_frame", "response_error_frame"]

#: The events that end a response, and the status each one gives it.
FINAL_EVENTS = {"response.completed": "completed", "response.incomplete": "incomplete",
                "response.failed": "failed", "response.cancelled": "cancelled"}
_LIFECYCLE = frozenset({"response.created", "response.queued", "response.in_progress"})


def frame(kind: str, seq: int, **fields: Any) -> bytes:
    """One Responses SSE frame numbered ``seq`` (its SSE ``id:`` and ``sequence_number``),
    as :class:`~.responses.ResponsesEncoder` writes them."""
    payload = dumps({"type": kind, "sequence_number": seq, **fields})
    return b"event: %s\nid: %d\ndata: %s\n\n" % (kind.encode(), seq, payload)


def response_error_frame(seq: int, code: str, message: str) -> bytes:
    """An ``error`` event numbered ``seq`` (a reader ends a stream with it: no encoder)."""
    return frame("error", seq, code=code, message=message, param=None)


def parse_frame(data: bytes) -> dict[str, Any] | None:
    """The event object of one stored frame (None: not a ``data:`` frame of an object)."""
    start = data.find(b"\ndata: ")
    if start < 0:
        if not data.startswith(b"data: "):
            return None
        start = -1
    try:
        event = orjson.loads(data[start + 7:].strip())
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class ResponseSnapshot:
    """The response object after the frames fed so far."""

    def __init__(self) -> None:
        #: The latest lifecycle (or final) event's response object.
        self.response: dict[str, Any] | None = None
        #: The output items rebuilt from the events (while no final event came).
        self.items: list[dict[str, Any]] = []
        #: The final status once a final event came.
        self.final: str | None = None
        #: The last ``error`` event's code and message (a response's ``error`` shape).
        self.error: dict[str, Any] | None = None

    def feed(self, data: bytes) -> None:
        event = parse_frame(data)
        if event is None:
            return
        kind = event.get("type")
        if kind in _LIFECYCLE or kind in FINAL_EVENTS:
            response = event.get("response")
            if isinstance(response, dict):
                self.response = response
                if kind in FINAL_EVENTS:
                    self.final = FINAL_EVENTS[kind]
            return
        if kind == "error":
            self.error = {"code": "server_error", "message": str(event.get("message", ""))}
            return
        index = event.get("output_index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            return
        if kind == "response.output_item.added":
            item = event.get("item")
            if index == len(self.items) and isinstance(item, dict):
                self.items.append(dict(item))
            return
        if index >= len(self.items):
            return
        item = self.items[index]
        if kind == "response.output_item.done":
            done = event.get("item")
            if isinstance(done, dict):
                self.items[index] = done
        elif kind == "response.content_part.added":
            part = event.get("part")
            content = item.setdefault("content", [])
            if isinstance(part, dict) and isinstance(content, list):
                content.append(dict(part))
        elif kind == "response.output_text.delta":
            part = _part(item, event.get("content_index"))
            delta = event.get("delta")
            if part is not None and isinstance(delta, str):
                part["text"] = str(part.get("text", "")) + delta
        elif kind == "response.function_call_arguments.delta":
            delta = event.get("delta")
            if isinstance(delta, str):
                item["arguments"] = str(item.get("arguments", "")) + delta

    def object(self, *, status: str | None = None) -> dict[str, Any] | None:
        """The response object (None before the first frame): the final one as it was
        sent, or the latest with the output so far (``status`` overrides its status)."""
        if self.response is None:
            return None
        if self.final is not None:
            return self.response
        response = {**self.response, "output": [_copy(item) for item in self.items]}
        if status is not None:
            response["status"] = status
        return response

    def ended(self, status: str, *, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response as it ends now with ``status`` (a producer gone, a cancel that no
        producer answered): items still in progress become ``incomplete``."""
        response = self.object(status=status) or {}
        for item in response.get("output", []):
            if isinstance(item, dict) and item.get("status") == "in_progress":
                item["status"] = "incomplete"
        if error is not None:
            response["error"] = error
        return response


def _part(item: dict[str, Any], index: object) -> dict[str, Any] | None:
    content = item.get("content")
    if (not isinstance(content, list) or not isinstance(index, int)
            or isinstance(index, bool) or not 0 <= index < len(content)):
        return None
    part = content[index]
    return part if isinstance(part, dict) else None


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    copy = dict(item)
    if isinstance(copy.get("content"), list):
        copy["content"] = [dict(p) if isinstance(p, dict) else p for p in copy["content"]]
    return copy
