"""Our events → the OpenAI wire format (and the simple ``/chat`` format), as SSE frames.

Chunks are re-serialised from tokenrelay events against the OpenAI schema, never copied
from upstream bytes: whatever the provider (an upstream API, the embedded model, the mock),
clients get the same well-formed ``chat.completion.chunk`` objects.

Every encoder numbers the frames of its stream 0, 1, 2, … (one sequence per stream, the
same for every endpoint) and writes each frame's number as its SSE ``id:`` (the
Responses encoder also as the event's ``sequence_number``). ``next_seq`` is the number of
the next frame: the frames that ``encode`` returns are numbered from its value before the
call up to its value after, which is what a producer appending them to the stream log
(``server/streamlog/``) needs to know.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from ..errors import APIStatusError, TimeoutError, TokenrelayError
from ..events import (
    Done,
    ErrorEvent,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Usage,
)

try:  # orjson: ~5x faster than json.dumps on these small objects
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - the [server] extra installs orjson
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = [
    "PRODUCER_LOST",
    "STREAM_CANCELLED",
    "STREAM_LOG_MESSAGE",
    "STREAM_LOG_UNAVAILABLE",
    "ChunkEncoder",
    "SimpleEncoder",
    "completion_body",
    "dumps",
    "error_body",
    "error_from_exc",
    "error_status",
    "tool_call_id",
]


def tool_call_id() -> str:
    """An id for a tool call whose provider gave none (the local model): clients need
    one to send the result back."""
    return "call_" + uuid.uuid4().hex[:24]


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


#: Upstream HTTP statuses a gateway client sees as they are; every other upstream status
#: (a redirect, 401/403: the gateway's own upstream key, 404, 500, anything outside
#: 100-599) is a 502. README.md "Upstream errors" documents this table.
UPSTREAM_STATUS_PASSED = {
    400: 400,  # the request itself was refused (e.g. a prompt over the context length)
    413: 413,
    422: 422,
    408: 504,  # the upstream timed out reading the request
    429: 429,  # rate limited: Retry-After is passed on
    503: 503,  # overloaded: Retry-After is passed on
    504: 504,
}


def error_status(exc: TokenrelayError) -> int:
    """The HTTP status a gateway client should see for a core error (always a valid
    one: an upstream status is mapped by ``UPSTREAM_STATUS_PASSED``)."""
    if isinstance(exc, APIStatusError):
        return UPSTREAM_STATUS_PASSED.get(exc.status_code, 502)
    if isinstance(exc, TimeoutError):
        return 504
    code = getattr(exc, "code", "")
    if code == "invalid_request":
        return 400
    if code == SERVER_SHUTDOWN:
        return 503
    return 502


def error_body(message: str, *, type: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


#: The error code of a stream the gateway ended because it is shutting down.
SERVER_SHUTDOWN = "server_shutdown"
SHUTDOWN_MESSAGE = ("the server is shutting down and ended this answer before it was"
                    " complete; send the request again in a moment")
#: The error code of a stream stopped before its end: cancelled (``POST …/cancel``), its
#: client gone without a resume grace, or the grace over with nobody resuming.
STREAM_CANCELLED = "cancelled"
#: The error code a reader gets when the process producing its stream died (Redis store).
PRODUCER_LOST = "producer_lost"
PRODUCER_LOST_MESSAGE = ("the process producing this stream stopped before finishing it;"
                         " the frames before this one are all it produced")
#: The error code of a stream the gateway could not keep in its stream log (its store
#: failing); clients get :data:`STREAM_LOG_MESSAGE`, never the store's address or error.
STREAM_LOG_UNAVAILABLE = "stream_log_unavailable"
STREAM_LOG_MESSAGE = ("the gateway's stream log is unavailable, so this answer was ended;"
                      " send the request again in a moment (the gateway's log has the"
                      " details)")
#: Errors whose message tokenrelay wrote itself and which name no upstream detail: a
#: client may read them as they are.
_OWN_MESSAGES = frozenset({"invalid_request", "timeout_first_token", "timeout_idle",
                           "timeout_total", "truncated", "structured_output_invalid",
                           SERVER_SHUTDOWN, STREAM_CANCELLED, PRODUCER_LOST,
                           "stream_too_large"})
_GENERIC = {
    "rate_limited": "is rate limited; retry after the delay in the Retry-After header",
    "bad_request": "refused the request; check its parameters (e.g. the prompt's length"
                   " against the model's context)",
    "connection_error": "is unavailable; try again later",
    "timeout_connect": "is unavailable; try again later",
}


def client_message(code: str, message: str, route: str | None = None) -> str:
    """What a gateway client may read of a core error of model ``route``.

    The errors of an upstream route (``route`` is its name) carry the upstream's URL (an
    internal host) and its own error text: clients get the route name and a generic
    message instead; the request log and the operator's log keep the full one (issue 9).
    The embedded model's and the mock's errors (``route`` None) are tokenrelay's own.
    The stream log's failures name its store (a Redis address) and its error: clients get
    a general message whatever the route; the operator's log keeps the details.
    """
    if code == STREAM_LOG_UNAVAILABLE:
        return STREAM_LOG_MESSAGE
    if route is None or code in _OWN_MESSAGES:
        return message
    return (f"the upstream of model {route!r} "
            + _GENERIC.get(code, "failed; the gateway's log has the details"))


def error_from_exc(exc: TokenrelayError | ErrorEvent, route: str | None = None,
                   ) -> dict[str, Any]:
    code = exc.code
    kind = "invalid_request_error" if code == "invalid_request" else "upstream_error"
    if code == "rate_limited":
        kind = "rate_limit_error"
    elif code in (SERVER_SHUTDOWN, PRODUCER_LOST, "stream_too_large",
                  STREAM_LOG_UNAVAILABLE):
        kind = "server_error"
    elif code == STREAM_CANCELLED:
        kind = "cancelled"
    return error_body(client_message(code, exc.message, route), type=kind, code=code)


_TEXT_TAIL = b'"logprobs":null,"finish_reason":null}]}'


class ChunkEncoder:
    """Builds ``chat.completion.chunk`` SSE frames for one response."""

    def __init__(self, model: str, *, include_usage: bool, route: str | None = None,
                 id: str | None = None, created: int | None = None,
                 role_sent: bool = False) -> None:
        #: The chunks' ``id``: the stream's id in the stream log (resume and cancel by it).
        self.id = id or "chatcmpl-" + uuid.uuid4().hex
        self.model = model
        #: The upstream route's name, if the model is one (its errors are generic).
        self.route = route
        self.created = int(time.time()) if created is None else created
        self.include_usage = include_usage
        #: The sequence number (SSE ``id:``) of the next frame.
        self.next_seq = 0
        #: The first chunk (with the role) went out (a taken-over stream's did).
        self._sent_role = role_sent
        # Per tool-call index: its id (sent once), and whether its name was sent. The SDK
        # concatenates every string it receives for an index, so id and name go out once.
        self._tool_ids: dict[int, str] = {}
        self._tool_named: set[int] = set()
        # Every chunk shares this prefix; only the choices differ (saves a dict per chunk).
        self._head = (
            b'{"id":"' + self.id.encode() + b'","object":"chat.completion.chunk","created":'
            + str(self.created).encode() + b',"model":' + dumps(model)
            + b',"system_fingerprint":null,"choices":'
        )

    def frame(self, payload: bytes) -> bytes:
        seq = self.next_seq
        self.next_seq = seq + 1
        return b"id: %d\ndata: %s\n\n" % (seq, payload)

    def _text(self, text: str) -> bytes:
        # The hot path (a text delta after the first): the choice around the text is
        # constant, so only the text is serialised.
        seq = self.next_seq
        self.next_seq = seq + 1
        return b"id: %d\ndata: %s[{\"index\":0,\"delta\":{\"content\":%s},%s\n\n" % (
            seq, self._head, dumps(text), _TEXT_TAIL)

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.frame(self._head + dumps([choice]) + b"}")

    def encode(self, event: StreamEvent) -> bytes:
        """The frames ``event`` completes, joined (``b""`` for none)."""
        if isinstance(event, TextDelta):  # the hot path: one frame
            if not self._sent_role:
                self._sent_role = True
                return self._chunk({"role": "assistant", "content": event.delta})
            return self._text(event.delta)
        frames: list[bytes] = []
        if isinstance(event, ToolCallDelta):
            call: dict[str, Any] = {"index": event.index,
                                    "function": {"arguments": event.arguments_delta}}
            if event.index not in self._tool_ids:  # the first piece of this call
                self._tool_ids[event.index] = event.id or tool_call_id()
                call.update(id=self._tool_ids[event.index], type="function")
            if event.name and event.index not in self._tool_named:
                self._tool_named.add(event.index)
                call["function"]["name"] = event.name
            delta: dict[str, Any] = {"tool_calls": [call]}
            if not self._sent_role:
                self._sent_role = True
                delta = {"role": "assistant", "content": None, **delta}
            frames.append(self._chunk(delta))
        elif isinstance(event, Done):
            if event.finish_reason in ("error", "cancelled"):
                return b""  # an error frame was sent, or nobody is listening
            if not self._sent_role:
                self._sent_role = True
                frames.append(self._chunk({"role": "assistant", "content": ""}))
            frames.append(self._chunk({}, event.finish_reason))
            if self.include_usage:
                frames.append(self.frame(
                    self._head + b'[],"usage":' + dumps(usage_dict(event.usage)) + b"}"
                ))
            frames.append(self.frame(b"[DONE]"))  # numbered too: a resume may stop at it
        elif isinstance(event, ErrorEvent):
            # Exactly one error event, then the end: never a silent end, never a fake stop.
            frames.append(self.frame(dumps(error_from_exc(event, self.route))))
        return b"".join(frames)


def completion_body(model: str, result: Any) -> dict[str, Any]:
    """A ``chat.completion`` object for ``stream: false``."""
    message: dict[str, Any] = {"role": "assistant", "content": result.text or None,
                               "refusal": None}
    if result.tool_calls:
        message["tool_calls"] = [
            {"id": c.id or tool_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    elif message["content"] is None:
        message["content"] = ""
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": result.finish_reason}],
        "usage": usage_dict(result.usage),
    }


class SimpleEncoder:
    """The ``/chat`` format: ``event: text`` frames, then ``usage`` / ``done`` or ``error``."""

    __slots__ = ("next_seq", "route")

    def __init__(self, route: str | None = None) -> None:
        #: The sequence number (SSE ``id:``) of the next frame.
        self.next_seq = 0
        self.route = route

    def encode(self, event: StreamEvent) -> bytes:
        """The frame of ``event`` (``b""`` for none)."""
        if isinstance(event, TextDelta):
            name, data = b"text", dumps({"text": event.delta})
        elif isinstance(event, ErrorEvent):
            name, data = b"error", dumps(error_from_exc(event, self.route)["error"])
        elif isinstance(event, Done):
            if event.finish_reason in ("error", "cancelled"):
                return b""
            name, data = b"done", dumps({
                "finish_reason": event.finish_reason,
                "usage": event.usage.to_dict(),
                "metrics": event.metrics.to_dict(),
            })
        else:
            return b""
        seq = self.next_seq
        self.next_seq = seq + 1
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name, data)


def chunk_error_frame(seq: int, code: str, message: str) -> bytes:
    """A chat completions error frame numbered ``seq`` (a reader writes it: no encoder)."""
    body = error_from_exc(ErrorEvent(code, message), None)
    return b"id: %d\ndata: %s\n\n" % (seq, dumps(body))


def simple_error_frame(seq: int, code: str, message: str) -> bytes:
    """A ``/chat`` error frame numbered ``seq``."""
    body = error_from_exc(ErrorEvent(code, message), None)["error"]
    return b"id: %d\nevent: error\ndata: %s\n\n" % (seq, dumps(body))
