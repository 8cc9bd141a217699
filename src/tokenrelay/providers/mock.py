"""A scripted provider for tests and demos.

Use it in your own tests the way simonw/llm's ``MockModel`` or pydantic-ai's
``TestModel`` are used::

    provider = MockProvider("Hello world", tps=50, fault="error", after=1)
    with tokenrelay.stream("hi", provider=provider) as s: ...

From the CLI it is model ``mock``; options go after a colon, spelled as for
``mock-upstream`` (:mod:`tokenrelay.testing._mock_spec`)::

    tokenrelay -m mock:tokens=50,tps=20,fault=error,after=5 "hello"

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
from ..testing._mock_spec import COMMON, PROVIDER_ONLY, RENAMED, parse_fault, parse_spec
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

    Its options are spelled as in ``mock:...`` model names and in ``mock-upstream``
    (see :mod:`tokenrelay.testing._mock_spec`).

    Args:
        text: the answer; a callable gets the request; ``None`` derives it from the prompt.
        tokens: with no ``text``, the number of tokens of filler to stream.
        delay: seconds before the first token.
        tps: tokens per second after the first (``None``: no pause).
        fault: ``error`` (a mid-stream ``StreamError``), ``stall`` (hang), ``close`` (end
            without a finish_reason), ``reset`` (the connection drops), ``malformed``
            (a chunk that is not JSON) after ``after`` tokens; or an HTTP-like status
            (429, 500, ...) to fail with before any token.
        after: tokens sent before a mid-stream fault.
        times: inject the fault in the first ``times`` calls only (``None``: every call).
        retry_after: the ``Retry-After`` seconds carried by a status fault.
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
        delay: float = 0.0,
        tps: float | None = None,
        fault: str | int | None = None,
        after: int = 1,
        times: int | None = None,
        retry_after: float | str | None = None,
        finish_reason: str = "stop",
        report_usage: bool = True,
        parallel_tools: bool = False,
        tool_rounds: int = 1,
        **renamed: Any,
    ) -> None:
        for name in renamed:
            if name in RENAMED:
                raise TypeError(f"MockProvider: {name}= is spelled"
                                f" {RENAMED[name].replace(',', ', ')} now")
            raise TypeError(f"MockProvider() got an unexpected keyword argument {name!r}")
        self.text = text
        self.tokens = tokens
        self.delay = delay
        self.tps = tps
        try:
            self.fault = None if fault is None else parse_fault(str(fault))
            self.retry_after = None if retry_after is None else float(retry_after)
        except ValueError as exc:
            raise UsageError(f"MockProvider: {exc}") from exc
        self.after = after
        self.times = times
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
            # Exactly ``tokens`` tokens: the filler wraps round with a space before its
            # first word (a trailing space token once made tokens=30 stream 29).
            words = tokenize(_LOREM.strip())
            return "".join(words[i % len(words)] if i < len(words) or i % len(words)
                           else " " + words[0] for i in range(self.tokens))
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
        if request.continue_from is not None:
            # max_tokens counts the tokens generated after the prefix, as on a real server.
            pieces = _after_prefix(pieces, request.continue_from, split)
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
        fault = self.fault if self.times is None or self.calls <= self.times else None
        if fault is not None and fault.isdigit():
            if self.delay:
                await asyncio.sleep(self.delay)
            raise status_error(int(fault), f"mock failure {fault} before the first token",
                               retry_after=self.retry_after)
        self.requests.append(request)
        chunks, finish = self._chunks(request)
        gap = None if not self.tps else 1.0 / self.tps
        fault_at = self.after if fault is not None else -1
        finished = False
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            for i, chunk in enumerate(chunks):
                if i == fault_at:
                    finished = await _inject(fault, i)  # type: ignore[arg-type]
                    return
                if i and gap:
                    await asyncio.sleep(gap)
                self.tokens_sent += 1
                if raw:
                    chunk.raw = {"token": chunk.text} if chunk.tool_calls is None else {
                        "tool_call": _raw_call(chunk.tool_calls[0])}
                yield chunk
            if fault_at >= len(chunks):  # a fault after the last token still happens
                finished = await _inject(fault, len(chunks))  # type: ignore[arg-type]
                return
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

    def can_continue(self) -> bool:
        return True

    def count_prompt_tokens(self, request: Request) -> int:
        return sum(len(tokenize(m.content)) for m in request.messages)

    def counting_ready(self) -> bool:
        return True

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo("mock", self.name, "scripted answers for tests and demos")]


def _after_prefix(pieces: list[str], prefix: str,
                  split: Callable[[str], list[str]]) -> list[str]:
    """The tokens an uninterrupted run sends after ``prefix`` (``Request.continue_from``:
    an answer continued from its partial text), so that prefix + continuation is exactly
    the uninterrupted answer. A prefix that is not the start of the answer gets what
    follows its length."""
    joined = "".join(pieces)
    if joined.startswith(prefix):
        done = 0
        for i, piece in enumerate(pieces):
            if done == len(prefix):
                return pieces[i:]
            done += len(piece)
        if done == len(prefix):
            return []
    return split(joined[len(prefix):])


async def _inject(fault: str, sent: int) -> bool:
    """A mid-stream fault after ``sent`` tokens, as the OpenAI provider would report the
    same fault of a real server. Returns True for ``close`` (the stream ends quietly,
    without its finish: the stream reports it truncated)."""
    if fault == "error":
        raise StreamError(f"mock error after {sent} tokens", code="mock_error")
    if fault == "reset":
        raise StreamError(f"the mock connection was reset after {sent} tokens",
                          code="connection_lost")
    if fault == "malformed":
        raise StreamError(f"the mock sent a malformed chunk after {sent} tokens",
                          code="malformed_chunk")
    if fault == "stall":
        await asyncio.Event().wait()  # hang until cancelled
    return True


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


def parse_mock_options(spec: str) -> dict[str, Any]:
    """``"tokens=50,tps=20,fault=error,after=5"`` → keyword arguments of MockProvider.

    Raises:
        UsageError: an unknown or renamed option, or a bad value.
    """
    return parse_spec(spec, known=(*COMMON, *PROVIDER_ONLY), what="mock")
