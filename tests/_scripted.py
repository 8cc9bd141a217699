"""A provider that streams exactly the chunks it is given, and keeps the requests it got.

The gateway tests serve it next to the ``mock`` (``gateway.models[name] = (provider, name)``)
to script what the core hands the encoders: tool-call pieces, JSON text, a finish reason,
independently of what the scripted ``MockProvider`` happens to produce.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from tokenrelay.events import Usage
from tokenrelay.providers.base import Chunk, Provider, ToolCallChunk
from tokenrelay.request import Request

USAGE = Usage(7, 5)


def text_chunks(*pieces: str, finish: str = "stop") -> list[Chunk]:
    return [Chunk(text=p) for p in pieces] + [Chunk(finish_reason=finish, usage=USAGE)]


def tool_call_chunks(*calls: tuple[str, str, dict[str, Any]]) -> list[Chunk]:
    """``(call id, name, arguments)`` per call, each streamed as the OpenAI API does: id and
    name with empty arguments first, then the arguments in three pieces."""
    chunks = []
    for index, (call_id, name, arguments) in enumerate(calls):
        text = json.dumps(arguments)
        chunks.append(Chunk(tool_calls=[ToolCallChunk(index, call_id, name, "")]))
        third = max(1, len(text) // 3)
        for piece in (text[:third], text[third:2 * third], text[2 * third:]):
            chunks.append(Chunk(tool_calls=[ToolCallChunk(index, arguments=piece)]))
    return chunks + [Chunk(finish_reason="tool_calls", usage=USAGE)]


class ScriptedProvider(Provider):
    """Streams ``script`` (a list of chunks, or a function of the request returning one)."""

    name = "scripted"

    def __init__(self, script: list[Chunk] | Callable[[Request], list[Chunk]]) -> None:
        self.script = script
        self.requests: list[Request] = []

    async def stream(self, request: Request, *, raw: bool = False) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        chunks = self.script(request) if callable(self.script) else self.script
        for chunk in chunks:
            # Chunks are mutable: hand out copies so that a script can be replayed.
            yield replace(chunk, tool_calls=[replace(c) for c in chunk.tool_calls or []]
                          or None)
