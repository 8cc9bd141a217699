"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Request bodies come from the pydantic models that validate them (``schema.py``), so the
document cannot drift from what the gateway accepts; responses are written out here
against the OpenAI wire format the encoders produce (``encode.py``). OpenAPI 3.1 schemas
are JSON Schema 2020-12, which is what pydantic emits, so no translation is needed.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from .. import __version__
from .responses_schema import ResponsesRequest
from .schema import ChatCompletionRequest, SimpleChatRequest

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {name: {"type": "integer", "minimum": 0}
                   for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
}

_ERROR_OBJECT = {
    "type": "object",
    "required": ["message", "type"],
    "properties": {
        "message": {"type": "string"},
        "type": {"type": "string"},
        "param": _nullable({"type": "string"}),
        "code": _nullable({"type": "string"}),
    },
}

_ERROR = {
    "type": "object",
    "description": "An OpenAI error object.",
    "required": ["error"],
    "properties": {"error": _ref("ErrorObject")},
}

_FINISH = _nullable({"type": "string", "examples": ["stop", "length", "tool_calls"]})

_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": {"type": "string"},
                                    "arguments": {"type": "string"}}},
    },
}

_COMPLETION = {
    "type": "object",
    "description": "The answer of a request with `stream: false`.",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "system_fingerprint": _nullable({"type": "string"}),
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "message": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"const": "assistant"},
                        "content": _nullable({"type": "string"}),
                        "refusal": _nullable({"type": "string"}),
                        "tool_calls": {"type": "array", "items": _TOOL_CALL},
                    },
                },
                "logprobs": {"type": "null"},
                "finish_reason": _FINISH,
            },
        }},
        "usage": _ref("Usage"),
    },
}

_CHUNK = {
    "type": "object",
    "description": "The `data:` of one event of a `stream: true` answer; the stream ends"
                   " with `data: [DONE]`, or with one event holding an error object.",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion.chunk"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "system_fingerprint": _nullable({"type": "string"}),
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "delta", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "delta": {"type": "object"},
                "logprobs": {"type": "null"},
                "finish_reason": _FINISH,
            },
        }},
        "usage": _ref("Usage"),
    },
}

_MODEL = {
    "type": "object",
    "required": ["id", "object", "owned_by"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "model"},
        "created": {"type": "integer"}, "owned_by": {"type": "string"},
        "route": {"type": "object", "description": "A routed model's upstream.",
                  "properties": {"upstream_model": {"type": "string"},
                                 "host": {"type": "string"}, "api": {"type": "string"}}},
    },
}

_MODELS = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": _ref("Model")},
    },
}


_OUTPUT_TEXT = {
    "type": "object",
    "required": ["type", "text", "annotations"],
    "properties": {"type": {"const": "output_text"}, "text": {"type": "string"},
                   "annotations": {"type": "array"}, "logprobs": {"type": "array"}},
}

_OUTPUT_ITEM = {"oneOf": [
    {"type": "object", "required": ["id", "type", "role", "status", "content"],
     "properties": {"id": {"type": "string"}, "type": {"const": "message"},
                    "role": {"const": "assistant"},
                    "status": {"enum": ["in_progress", "completed", "incomplete"]},
                    "content": {"type": "array", "items": _OUTPUT_TEXT}}},
    {"type": "object", "required": ["id", "type", "call_id", "name", "arguments", "status"],
     "properties": {"id": {"type": "string"}, "type": {"const": "function_call"},
                    "call_id": {"type": "string"}, "name": {"type": "string"},
                    "arguments": {"type": "string"},
                    "status": {"enum": ["in_progress", "completed", "incomplete"]}}},
]}

_RESPONSE = {
    "type": "object",
    "description": "A response object (OpenAI Responses API): the answer of `stream: false`,"
                   " and the `response` of the lifecycle events. Request options are echoed."
                   " A foreground response is not stored (`store` false); a background one"
                   " (`background: true`) is kept in the stream log and can be retrieved,"
                   " replayed and cancelled.",
    "required": ["id", "object", "created_at", "status", "model", "output", "tools",
                 "tool_choice", "parallel_tool_calls"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "response"},
        "created_at": {"type": "integer"},
        "status": {"enum": ["queued", "in_progress", "completed", "incomplete", "failed",
                            "cancelled"]},
        "background": {"type": "boolean"},
        "store": {"type": "boolean"},
        "error": _nullable({"type": "object", "required": ["code", "message"],
                            "properties": {"code": {"type": "string"},
                                           "message": {"type": "string"}}}),
        "incomplete_details": _nullable({"type": "object", "properties": {
            "reason": {"enum": ["max_output_tokens", "content_filter"]}}}),
        "model": {"type": "string"},
        "output": {"type": "array", "items": _OUTPUT_ITEM},
        "usage": _nullable({
            "type": "object",
            "required": ["input_tokens", "output_tokens", "total_tokens"],
            "properties": {name: {"type": "integer", "minimum": 0}
                           for name in ("input_tokens", "output_tokens", "total_tokens")},
        }),
        "tools": {"type": "array"},
        "tool_choice": {},
        "parallel_tool_calls": {"type": "boolean"},
    },
}

_RESPONSE_EVENT_TYPES = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added", "response.output_text.delta", "response.output_text.done",
    "response.content_part.done", "response.function_call_arguments.delta",
    "response.function_call_arguments.done", "response.output_item.done",
    "response.completed", "response.incomplete", "response.failed", "response.cancelled",
    "error",
]


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """An SSE ``data`` field holding JSON that matches ``schema``."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["event", "data"],
            "properties": {"id": {"type": "string"}, "event": {"const": name},
                           "data": _json_data(data)}}


# For text/event-stream, OpenAPI 3.1 tools (schemathesis among them) read ``schema`` as
# the schema of one event: an object of the SSE fields ``id``, ``event`` and ``data``.
_CHUNK_EVENT = {
    "type": "object",
    "description": "One event: a ChatCompletionChunk, an error object (then the stream"
                   " ends), or the final `[DONE]`.",
    "required": ["data"],
    "properties": {
        "id": {"type": "string"},
        "data": {"anyOf": [
            {"const": "[DONE]"},
            _json_data({"anyOf": [_ref("ChatCompletionChunk"), _ref("Error")]}),
        ]},
    },
}

_CHAT_EVENT = {
    "description": "`text` events, then `done` (finish reason, usage, metrics) or `error`.",
    "oneOf": [
        _event("text", {"type": "object", "required": ["text"],
                        "properties": {"text": {"type": "string"}}}),
        _event("done", {"type": "object", "required": ["finish_reason", "usage", "metrics"],
                        "properties": {"finish_reason": _nullable({"type": "string"}),
                                       "usage": {"type": "object"},
                                       "metrics": {"type": "object"}}}),
        _event("error", _ref("ErrorObject")),
    ],
}

_RESPONSE_EVENT = {
    "type": "object",
    "description": "One event of a streamed response: `response.created`,"
                   " `response.in_progress`, the output items (messages: `output_item.added`,"
                   " `content_part.added`, `output_text.delta`..., `output_text.done`,"
                   " `content_part.done`, `output_item.done`; function calls:"
                   " `output_item.added`, `function_call_arguments.delta`..., `.done`,"
                   " `output_item.done`), then `response.completed`, `response.incomplete`"
                   " (max_output_tokens) or `error` + `response.failed`, or (a background"
                   " response cancelled) `response.cancelled`. No `[DONE]`. The SSE `id` is"
                   " the event's `sequence_number`.",
    "required": ["event", "data"],
    "properties": {
        "id": {"type": "string"},
        "event": {"enum": _RESPONSE_EVENT_TYPES},
        "data": _json_data({"type": "object", "required": ["type", "sequence_number"],
                            "properties": {"type": {"enum": _RESPONSE_EVENT_TYPES},
                                           "sequence_number": {"type": "integer"},
                                           "response": _ref("Response")}}),
    },
}

_ERRORS = {
    "400": "Invalid body or parameter; `error.param` names the field.",
    "401": "Missing or invalid API key.",
    "403": "A Host name this gateway does not serve (without keys: loopback names and"
           " `allowed_hosts` only, against DNS rebinding).",
    "404": "Unknown model.",
    "408": "The request body did not arrive within the configured body timeout.",
    "413": "Request body over the configured cap (or the upstream's, passed on).",
    "415": "The Content-Type header is not application/json.",
    "422": "The upstream refused the request's content (passed on).",
    "429": "A per-key limit (concurrency, requests or tokens per minute), or the upstream's"
           " rate limit; see Retry-After.",
    "431": "The request line and headers are over 64 KiB together.",
    "502": "The upstream failed before the first token (any upstream status not passed on,"
           " a redirect, a broken connection).",
    "503": "The upstream is overloaded (see Retry-After), the gateway is shutting down, or"
           " its stream log is full or unreachable (retry).",
    "504": "The upstream timed out before the first token.",
}
#: What a POST to a model endpoint may answer besides its success.
_POST_ERRORS = ("400", "401", "403", "404", "408", "413", "415", "422", "429", "431", "502",
                "503", "504")


def _error_responses(*codes: str) -> dict[str, Any]:
    return {code: {"description": _ERRORS[code],
                   "content": {"application/json": {"schema": _ref("Error")}}}
            for code in codes}


_STREAM_STATE = {
    "type": "object",
    "description": "A stream's state (the answer of `POST …/{id}/cancel`).",
    "required": ["id", "object", "status", "last_event_id"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "stream"},
        "status": {"enum": ["queued", "in_progress", "completed", "failed", "cancelled",
                            "incomplete"]},
        "last_event_id": {"type": "integer", "minimum": -1,
                          "description": "The SSE id of the stream's last frame so far."},
        "created_at": {"type": "integer"},
        "cancel_requested": {"type": "boolean"},
    },
}

#: The request header asking a stream to go on for a resume when its client leaves.
_GRACE_PARAMETER = {
    "name": "x-tokenrelay-resume-grace", "in": "header", "required": False,
    "schema": {"type": "number", "minimum": 0},
    "description": "Seconds the answer goes on producing, waiting for a resume, when the"
                   " client disconnects (capped by the config's `max_resume_grace_s`)."
                   " Without it a disconnect stops the answer at once.",
}
_STREAM_ID_HEADER = {"x-tokenrelay-stream-id": {
    "description": "The stream's id (the chunks' `id`): resume or cancel it with it.",
    "schema": {"type": "string"}}}


def _stream_paths(prefix: str, what: str, event: dict[str, Any],
                  operation: str) -> dict[str, Any]:
    """``GET {prefix}/{id}/stream`` and ``POST {prefix}/{id}/cancel``."""
    stream_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "The stream's id (`x-tokenrelay-stream-id`)."}
    return {
        f"{prefix}/{{id}}/stream": {"get": {
            "operationId": f"resume{operation}",
            "summary": f"Resume a streamed {what}: the frames after a cursor, then live",
            "description": "Replays the stored frames after `Last-Event-ID` (or"
                           " `starting_after`; neither: from the first frame) and follows"
                           " the stream live to its end. Only the API key that created the"
                           " stream may read it. A frame number beyond a live stream's"
                           " waits for it. If the process producing the stream died, one"
                           " error frame with `code: producer_lost` ends it.",
            "parameters": [
                stream_id,
                {"name": "starting_after", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0},
                 "description": "The SSE id of the last frame received."},
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "integer", "minimum": 0},
                 "description": "The same (what EventSource sends); wins over the query."},
            ],
            "responses": {
                "200": {"description": "The frames, as the original stream sent them.",
                        "headers": _STREAM_ID_HEADER,
                        "content": {"text/event-stream": {"schema": event}}},
                **_error_responses("400", "401", "403", "404", "503"),
            },
        }},
        f"{prefix}/{{id}}/cancel": {"post": {
            "operationId": f"cancel{operation}",
            "summary": f"Cancel a streamed {what}, from any connection",
            "description": "Stops the stream (its upstream is aborted; a client reading"
                           " it gets an error frame with `code: cancelled`) and answers its"
                           " state once it ended. Idempotent: a finished stream answers its"
                           " final state.",
            "parameters": [stream_id],
            "responses": {
                "200": {"description": "The stream's state.",
                        "content": {"application/json": {"schema": _ref("StreamState")}}},
                **_error_responses("401", "403", "404", "415", "503"),
            },
        }},
    }


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True,
                "schema": {"type": "string"}}
_NOT_FOUND = {"description": "No such response: unknown, expired, or created with another"
                             " API key (never said which).",
              "content": {"application/json": {"schema": _ref("Error")}}}


def _stored_response_paths() -> dict[str, Any]:
    """``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` (background.py)."""
    retrieve = {
        "summary": "Retrieve a response, or replay its events (`stream=true`)",
        "description": "A background response, or a streamed one (kept in the stream log"
                       " for `retention_s`): the Response object as it stands (the output so"
                       " far while it runs); with `stream=true`, its events after"
                       " `starting_after` (or a `Last-Event-ID` header; default: from the"
                       " first) and then live until it ends.",
        "parameters": [
            _RESPONSE_ID,
            {"name": "stream", "in": "query", "required": False,
             "schema": {"type": "boolean"}},
            {"name": "starting_after", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0}},
        ],
        "responses": {
            "200": {"description": "The response object, or its events (`stream=true`).",
                    "content": {"application/json": {"schema": _ref("Response")},
                                "text/event-stream": {"schema": _RESPONSE_EVENT}}},
            "404": _NOT_FOUND,
            **_error_responses("400", "401", "403", "503"),
        },
    }
    cancel = {
        "summary": "Cancel a response (from any gateway process; idempotent)",
        "description": "Stops the generation and answers the final response object (status"
                       " `cancelled`). A response that ended otherwise is a 400, as OpenAI"
                       " answers (`Cannot cancel a completed response.`).",
        "parameters": [_RESPONSE_ID],
        "responses": {
            "200": {"description": "The cancelled response.",
                    "content": {"application/json": {"schema": _ref("Response")}}},
            "404": _NOT_FOUND,
            **_error_responses("400", "401", "403", "415", "503"),
        },
    }
    return {
        "/v1/responses/{response_id}": {"get": {**retrieve, "operationId": "retrieveResponse"}},
        "/responses/{response_id}": {"get": {**retrieve,
                                             "operationId": "retrieveResponseNoPrefix"}},
        "/v1/responses/{response_id}/cancel": {"post": {**cancel,
                                                        "operationId": "cancelResponse"}},
        "/responses/{response_id}/cancel": {"post": {**cancel,
                                                     "operationId": "cancelResponseNoPrefix"}},
    }


def openapi_document(*, auth: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway.

    Args:
        auth: whether API keys are required (``[[keys]]`` configured): adds the
            security schemes the gateway accepts.
    """
    _, top = models_json_schema(
        [(ChatCompletionRequest, "validation"), (SimpleChatRequest, "validation"),
         (ResponsesRequest, "validation")],
        ref_template=_REF)
    schemas: dict[str, Any] = dict(top["$defs"])
    schemas.update(Usage=_USAGE, Error=_ERROR, ErrorObject=_ERROR_OBJECT,
                   ChatCompletion=_COMPLETION,
                   ChatCompletionChunk=_CHUNK, Model=_MODEL, ModelList=_MODELS,
                   Response=_RESPONSE, StreamState=_STREAM_STATE)
    responses = {
        "summary": "Create a response (OpenAI Responses API)",
        "description": "The same models as chat completions, in the Responses wire format."
                       " Input: a string, or message, function_call and function_call_output"
                       " items; function tools; `text.format` for structured output."
                       " `previous_response_id` is refused. `background: true` answers at"
                       " once (status `queued`; with `stream: true` the events follow) and"
                       " the generation goes on with no client attached; `store: false`"
                       " with it is a 400.",
        "requestBody": _body("ResponsesRequest"),
        "responses": {
            "200": {
                "description": "The response object (`stream: false`) or its events"
                               " (`stream: true`).",
                "content": {
                    "application/json": {"schema": _ref("Response")},
                    "text/event-stream": {"schema": _RESPONSE_EVENT},
                },
            },
            **_error_responses(*_POST_ERRORS),
        },
    }
    chat_completions = {
        "summary": "Create a chat completion (OpenAI-compatible)",
        "requestBody": _body("ChatCompletionRequest"),
        "parameters": [_GRACE_PARAMETER],
        "responses": {
            "200": {
                "description": "The completion (`stream: false`) or its events"
                               " (`stream: true`; `data:` holds ChatCompletionChunk JSON;"
                               " each frame's SSE `id:` is its number, 0, 1, 2, …).",
                "headers": _STREAM_ID_HEADER,
                "content": {
                    "application/json": {"schema": _ref("ChatCompletion")},
                    "text/event-stream": {"schema": _CHUNK_EVENT},
                },
            },
            **_error_responses(*_POST_ERRORS),
        },
    }
    paths: dict[str, Any] = {
        "/v1/chat/completions": {"post": {**chat_completions,
                                          "operationId": "createChatCompletion"}},
        "/chat/completions": {"post": {**chat_completions,
                                       "operationId": "createChatCompletionNoPrefix",
                                       "description": "The same as /v1/chat/completions."}},
        "/v1/responses": {"post": {**responses, "operationId": "createResponse"}},
        "/responses": {"post": {**responses, "operationId": "createResponseNoPrefix",
                                "description": "The same as /v1/responses."}},
        **_stored_response_paths(),
        "/chat": {"post": {
            "operationId": "chat",
            "summary": "Stream the answer to one prompt as simple text events",
            "requestBody": _body("SimpleChatRequest"),
            "parameters": [_GRACE_PARAMETER],
            "responses": {
                "200": {"description": "The answer as server-sent events.",
                        "headers": _STREAM_ID_HEADER,
                        "content": {"text/event-stream": {"schema": _CHAT_EVENT}}},
                **_error_responses(*_POST_ERRORS),
            },
        }},
        **_stream_paths("/v1/chat/completions", "chat completion", _CHUNK_EVENT,
                        "ChatCompletionStream"),
        **_stream_paths("/chat", "/chat answer", _CHAT_EVENT, "ChatStream"),
        "/v1/models": {"get": {
            "operationId": "listModels",
            "summary": "The models this gateway serves",
            "responses": {
                "200": {"description": "The models.",
                        "content": {"application/json": {"schema": _ref("ModelList")}}},
                **_error_responses("401"),
            },
        }},
        "/v1/models/{model}": {"get": {
            "operationId": "retrieveModel",
            "summary": "One model this gateway serves",
            "parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "The model.",
                        "content": {"application/json": {"schema": _ref("Model")}}},
                **_error_responses("401", "404"),
            },
        }},
        "/healthz": {"get": {
            "operationId": "health", "summary": "Liveness", "security": [],
            "responses": {"200": {"description": "Up.",
                                  "content": {"application/json": {"schema": {
                                      "type": "object"}}}}},
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics", "security": [],
            "responses": {"200": {"description": "Prometheus text format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1.",
                                  "content": {"application/json": {"schema": {
                                      "type": "object"}}}}},
        }},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenrelay gateway",
            "version": __version__,
            "description": "OpenAI-compatible chat completions and responses streamed as"
                           " server-sent events, and a simple `/chat` endpoint.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "api-key"},
            "xApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        document["security"] = [{"bearer": []}, {"apiKey": []}, {"xApiKey": []}]
    return document
