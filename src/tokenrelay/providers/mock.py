"""A scripted provider for tests and demos.

Use it in your own tests the way simonw/llm's ``MockModel`` or pydantic-ai's
``TestModel`` are used::

    provider = MockProvider("Hello world", tokens_per_second=50, error_after=1)
    with tokenrelay.stream("hi", provider=provider) as s: ...

From the CLI it is model ``mock``; options go after a colon::

    tokenrelay -m "mock:tokens_per_second=20,error_after=5" "hello"

Structured output and tools, so that both can be tried without a model: a request with a
``response_format`` gets a deterministic JSON instance of its schema, in token-sized
pieces; a request with ``tools`` (and ``tool_choice`` other than ``"none"``) gets, in its
first round, a call of the first tool (the one ``tool_choice`` names; every tool, as
interleaved parallel calls, with ``parallel_tools``) with arguments made from the tool's
parameter schema, and ``finish_reason="tool_calls"``; a request ending with tool results
gets an answer quoting them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from .._json_schema import example_value
from ..errors import StreamError, UsageError, status_error
from ..events import Usage
from ..request import Request
from .base import Chunk, ModelInfo, Provider, ToolCallChunk

__all__ = ["MockProvider", "parse_mock_options"]

_TOKEN = re.compile(r"\s*\S+|\s+")
# JSON in pieces the size of real tokens: words, and runs of punctuation ('{"', '":').
_JSON_TOKEN = re.compile(r"\s*(?:\w+|[^\w\s]+)|\s+")

_LOREM = (
    "Streaming shows each token as soon as the model makes it, so the reader starts "
    "reading at once instead of waiting for the whole answer. "
)


def tokenize(text: str) -> list[str]:
    """Split into word-sized tokens that join back to exactly ``text``."""
    return _TOKEN.findall(text)


class MockProvider(Provider):
    """A provider that streams scripted text.

    Args:
        text: the answer; a callable gets the request; ``None`` derives it from the prompt.
        tokens: with no ``text``, the number of tokens of filler to stream.
        first_token_delay: seconds before the first token.
        tokens_per_second: pace of the tokens after the first (``None``: no pause).
        error_after: raise a mid-stream ``StreamError`` after this many tokens.
        stall_after: stop sending (hang) after this many tokens.
        truncate_after: end the stream without a finish_reason after this many tokens.
        fail_before_first: an HTTP-like status (429, 500, ...) to fail with before any
            token, ``fail_times`` times, then succeed.
        retry_after: the ``Retry-After`` seconds carried by those failures.
        finish_reason: the reason sent at the end.
        report_usage: send usage at the end (otherwise the stream estimates it).
        parallel_tools: call every tool at once (interleaved), not just the first.
        tool_rounds: rounds in which it calls tools before it answers (counted by the
            assistant ``tool_calls`` messages already in the request).
    """

    name = "mock"

    def __init__(
        self,
        text: str | Callable[[Request], str] | None = None,
        *,
        tokens: int | None = None,
        first_token_delay: float = 0.0,
        tokens_per_second: float | None = None,
        error_after: int | None = None,
        stall_after: int | None = None,
        truncate_after: int | None = None,
        fail_before_first: int | None = None,
        fail_times: int = 1,
        retry_after: float | None = None,
        finish_reason: str = "stop",
        report_usage: bool = True,
        parallel_tools: bool = False,
        tool_rounds: int = 1,
    ) -> None:
        self.text = text
        self.tokens = tokens
        self.first_token_delay = first_token_delay
        self.tokens_per_second = tokens_per_second
        self.error_after = error_after
        self.stall_after = stall_after
        self.truncate_after = truncate_after
        self.fail_before_first = fail_before_first
        self.fail_times = fail_times
        self.retry_after = retry_after
        self.finish_reason = finish_reason
        self.report_usage = report_usage
        self.parallel_tools = parallel_tools
        self.tool_rounds = tool_rounds
        #: The latest requests stream() was called with (bounded: the provider of model
        #: "mock" is shared by a whole process, a gateway included).
        self.requests: deque[Request] = deque(maxlen=32)
        #: How many times stream() was called, and how many streams were closed early.
        self.calls = 0
        self.cancelled = 0
        self.tokens_sent = 0

    def answer_for(self, request: Request) -> str:
        if callable(self.text):
            return self.text(request)
        if self.text is not None:
            return self.text
        if self.tokens is not None:
            words = tokenize(_LOREM)
            return "".join(words[i % len(words)] for i in range(self.tokens)).strip()
        if request.response_format is not None:
            return json.dumps(example_value(request.response_format.schema_), ensure_ascii=False)
        if request.messages[-1].role == "tool":
            return _tool_answer(request)
        return f"Mock answer to: {request.last_user_text()}"

    def tool_calls_for(self, request: Request) -> list[tuple[str, str]]:
        """The calls to make, as ``(tool name, arguments JSON)``; none to answer with text."""
        if not request.tools or request.tool_choice == "none":
            return []
        rounds = sum(1 for m in request.messages if m.role == "assistant" and m.tool_calls)
        if rounds >= self.tool_rounds:
            return []
        tools = list(request.tools)
        choice = request.tool_choice
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if t.name == wanted] or tools[:1]
        elif not self.parallel_tools:
            tools = tools[:1]
        return [(t.name, json.dumps(example_value(t.parameters), ensure_ascii=False))
                for t in tools]

    def _chunks(self, request: Request) -> tuple[list[Chunk], str]:
        calls = self.tool_calls_for(request)
        if calls:
            return _tool_call_chunks(calls, len(request.messages)), "tool_calls"
        answer = self.answer_for(request)
        split = _JSON_TOKEN.findall if request.response_format is not None else tokenize
        pieces = split(answer)
        finish = self.finish_reason
        if request.max_tokens is not None and len(pieces) > request.max_tokens:
            pieces, finish = pieces[: request.max_tokens], "length"
        if request.stop:
            joined = "".join(pieces)
            cut = min((joined.find(s) for s in request.stop if s in joined), default=-1)
            if cut >= 0:
                pieces, finish = split(joined[:cut]), "stop"
        return [Chunk(text=piece) for piece in pieces], finish

    async def stream(self, request: Request, *, raw: bool = False) -> AsyncIterator[Chunk]:
        self.calls += 1
        if self.fail_before_first is not None and self.calls <= self.fail_times:
            if self.first_token_delay:
                await asyncio.sleep(self.first_token_delay)
            raise status_error(
                self.fail_before_first,
                f"mock failure {self.fail_before_first} before the first token",
                retry_after=self.retry_after,
            )
        self.requests.append(request)
        chunks, finish = self._chunks(request)
        gap = None if not self.tokens_per_second else 1.0 / self.tokens_per_second
        finished = False
        try:
            if self.first_token_delay:
                await asyncio.sleep(self.first_token_delay)
            for i, chunk in enumerate(chunks):
                if i == self.error_after:
                    raise StreamError(f"mock error after {i} tokens", code="mock_error")
                if i == self.stall_after:
                    await asyncio.Event().wait()  # hang until cancelled
                if i == self.truncate_after:
                    finished = True
                    return
                if i and gap:
                    await asyncio.sleep(gap)
                self.tokens_sent += 1
                if raw:
                    chunk.raw = {"token": chunk.text} if chunk.tool_calls is None else {
                        "tool_call": _raw_call(chunk.tool_calls[0])}
                yield chunk
            usage = None
            if self.report_usage:
                usage = Usage(
                    prompt_tokens=sum(len(tokenize(m.content)) for m in request.messages),
                    completion_tokens=len(chunks),
                )
            finished = True
            yield Chunk(finish_reason=finish, usage=usage,
                        raw={"finish_reason": finish} if raw else None)
        finally:
            if not finished:
                self.cancelled += 1

    def count_tokens(self, text: str, *, model: str | None = None) -> int:
        return len(tokenize(text))

    def count_prompt_tokens(self, request: Request) -> int:
        return sum(len(tokenize(m.content)) for m in request.messages)

    def counting_ready(self) -> bool:
        return True

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo("mock", self.name, "scripted answers for tests and demos")]


def _tool_call_chunks(calls: list[tuple[str, str]], salt: int) -> list[Chunk]:
    """Each call opens with its id and name, then the argument pieces of all calls follow
    interleaved, as OpenAI streams parallel calls."""
    chunks = [Chunk(tool_calls=[ToolCallChunk(i, f"call_mock_{salt}_{i}", name, "")])
              for i, (name, _) in enumerate(calls)]
    pieces = [_JSON_TOKEN.findall(arguments) for _, arguments in calls]
    for step in range(max(len(p) for p in pieces)):
        for i, parts in enumerate(pieces):
            if step < len(parts):
                chunks.append(Chunk(tool_calls=[ToolCallChunk(i, arguments=parts[step])]))
    return chunks


def _raw_call(piece: ToolCallChunk) -> dict[str, Any]:
    return {"index": piece.index, "id": piece.id, "name": piece.name,
            "arguments": piece.arguments}


def _tool_answer(request: Request) -> str:
    """The answer to a request ending with tool results: it quotes them."""
    names = {call.get("id"): (call.get("function") or {}).get("name")
             for m in request.messages for call in m.tool_calls or ()}
    replies = []
    for m in reversed(request.messages):
        if m.role != "tool":
            break
        replies.append(f"{names.get(m.tool_call_id) or m.name or 'the tool'} returned"
                       f" {m.content}")
    return "Mock answer using the tool results: " + "; ".join(reversed(replies)) + "."


_FLOATS = {"first_token_delay", "tokens_per_second", "retry_after"}
_INTS = {"tokens", "error_after", "stall_after", "truncate_after", "fail_before_first",
         "fail_times", "tool_rounds"}
_STRS = {"text", "finish_reason"}
_BOOLS = {"report_usage", "parallel_tools"}


def parse_mock_options(spec: str) -> dict[str, Any]:
    """``"tokens_per_second=20,error_after=5"`` → keyword arguments of MockProvider."""
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        known = _FLOATS | _INTS | _STRS | _BOOLS
        if key not in known:
            raise UsageError(f"unknown mock option {key!r}; known: " + ", ".join(sorted(known)))
        try:
            if not sep:
                raise ValueError
            if key in _FLOATS:
                options[key] = float(value)
            elif key in _INTS:
                options[key] = int(value)
            elif key in _STRS:
                options[key] = value
            else:
                options[key] = value.lower() in ("1", "true", "yes")
        except ValueError as exc:
            raise UsageError(f"bad mock option {part!r}: expected {key}=<value>") from exc
    return options
