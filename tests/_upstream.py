"""A real OpenAI-compatible HTTP server on loopback, scripted byte by byte.

The server is :class:`tokenrelay.testing.mock_upstream.MockUpstream` (raw asyncio sockets on its
own event loop thread: it serves sync tests, ``asyncio.run`` and pytest-asyncio alike,
resets connections, ends bodies without ``[DONE]``, notices the moment a client goes).
This subclass keeps the scripted scenarios of the provider and CLI tests, chosen by the
model name, ``scenario`` or ``scenario:arg``::

    ok                    role chunk, 4 text chunks, finish, usage chunk, [DONE]
    no_usage              the same without the usage chunk
    fault=error,after=N   N text chunks then an {"error": ...} frame, then [DONE]
    fault=reset,after=N   N text chunks then a TCP reset
    reset_first:N         reset the first N requests before any byte, then ``ok``
    no_done               finish and usage chunks, then a clean end without [DONE]
    fault=malformed,after=N  N text chunks then ``data: {not json``
    status:CODE           answer CODE with an OpenAI error body (e.g. status:401)
    status_then_ok:CODE   answer CODE to the first request, ``ok`` to the next ones
                          (Retry-After from the ``retry_after`` attribute)
    fault=stall,after=N   N text chunks then nothing until the client leaves
    slow                  a text chunk every 50 ms, up to 200
    no_stream_options     400 when the body has stream_options, else ``no_usage``
    json                  a non-streamed chat.completion body
    fixture:NAME          replay tests/fixtures/NAME.sse, one read per SSE frame

Every request is recorded in ``calls``; ``disconnects`` holds the monotonic times at
which a client went away while the server was still answering.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tokenrelay.testing._mock_spec import parse_spec
from tokenrelay.testing.mock_upstream import RESET_GRACE, Exchange, MockUpstream, RequestRecord

FIXTURES = Path(__file__).parent / "fixtures"
TOKENS = ["Hello", ",", " world", "!"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def chunk(content: str | None = None, *, finish: str | None = None, role: bool = False,
          usage: dict[str, int] | None = None, choices: bool = True) -> dict[str, Any]:
    """A chat.completion.chunk like the OpenAI API sends."""
    delta: dict[str, Any] = {}
    if role:
        delta = {"role": "assistant", "content": ""}
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1718000000,
        "model": "test-model",
        "system_fingerprint": "fp_test",
        "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ] if choices else [],
        "usage": usage,
    }


def frame(obj: Any) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Upstream(MockUpstream):
    """The server. ``with Upstream() as server: server.url`` → ``http://127.0.0.1:N/v1``."""

    owned_by = "tests"

    def __init__(self, retry_after: str | None = "0") -> None:
        super().__init__(models=["test-model"])
        self.retry_after = retry_after

    @property
    def calls(self) -> list[RequestRecord]:
        return list(self.requests)

    @property
    def disconnects(self) -> list[float]:
        return [r.aborted_at for r in self.calls if r.aborted_at is not None]

    def wait_disconnect(self, timeout: float = 2.0) -> float | None:
        """The time the server saw a client leave (waiting up to ``timeout``)."""
        record = self.wait_for(lambda r: r.aborted_at is not None, timeout)
        return None if record is None else record.aborted_at

    def count(self, path: str = "/v1/chat/completions") -> int:
        return sum(1 for c in self.calls if c.path == path)

    async def chat_completion(self, exchange: Exchange) -> None:
        model = str(exchange.body.get("model", "ok"))
        if "fault=" in model:  # the mock's one spelling of faults (tokenrelay.testing._mock_spec)
            options = parse_spec(model)
            scenario, arg = f"{options['fault']}_after", str(options.get("after", 1))
        else:
            scenario, _, arg = model.partition(":")
        await _Script(self, exchange).run(scenario, arg)


class _Script:
    def __init__(self, server: Upstream, exchange: Exchange) -> None:
        self.server, self.ex = server, exchange

    async def send(self, obj: Any) -> None:
        await self.ex.send(frame(obj))

    async def text(self, n: int = len(TOKENS)) -> None:
        await self.send(chunk(role=True))
        for i in range(n):
            await self.send(chunk(TOKENS[i % len(TOKENS)]))

    async def finish(self, *, usage: bool = True, done: bool = True) -> None:
        await self.send(chunk(finish="stop"))
        if usage:
            await self.send(chunk(choices=False, usage=USAGE))
        if done:
            await self.send("[DONE]")
        await self.ex.end()

    async def ok(self, *, usage: bool = True, done: bool = True) -> None:
        await self.ex.start_stream()
        await self.text()
        await self.finish(usage=usage, done=done)

    async def run(self, scenario: str, arg: str) -> None:
        n = int(arg) if arg.isdigit() else 0
        server, ex = self.server, self.ex
        if scenario == "ok":
            await self.ok()
        elif scenario == "no_usage":
            await self.ok(usage=False)
        elif scenario == "no_done":
            await self.ok(done=False)
        elif scenario == "error_after":
            await ex.start_stream()
            await self.text(n)
            await self.send({"error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error", "code": "overloaded"}})
            await self.send("[DONE]")
            await ex.end()
        elif scenario == "reset_after":
            await ex.start_stream()
            await self.text(n)
            await asyncio.sleep(RESET_GRACE)  # let the client read the tokens before the RST
            ex.reset()
        elif scenario == "reset_first":
            if server.count() <= n:
                ex.reset()
                return
            await self.ok()
        elif scenario == "malformed_after":
            await ex.start_stream()
            await self.text(n)
            await ex.send(b'data: {"choices": [{"delta": {"content": "x"\n\n')
            await self.finish()
        elif scenario == "status":
            await self.status(n)
        elif scenario == "status_then_ok":
            if server.count() == 1:
                await self.status(n)
                return
            await self.ok()
        elif scenario == "stall_after":
            await ex.start_stream()
            await self.text(n)
            await ex.wait_gone(30)
        elif scenario == "slow":
            await ex.start_stream()
            await self.send(chunk(role=True))
            for i in range(200):
                await self.send(chunk(f"t{i} "))
                if await ex.wait_gone(0.05):
                    return
            await self.finish()
        elif scenario == "no_stream_options":
            if "stream_options" in ex.body:
                await ex.error(400, "Unrecognized request argument supplied: stream_options")
                return
            await self.ok(usage=False)
        elif scenario == "json":
            await ex.json(200, {
                "id": "chatcmpl-test", "object": "chat.completion", "model": "test-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
        elif scenario == "fixture":
            await ex.start_stream()
            data = (FIXTURES / f"{arg}.sse").read_bytes()
            for piece in data.split(b"\n\n"):
                if piece.strip():
                    await ex.send(piece + b"\n\n")
            await ex.end()
        else:
            await ex.error(404, f"unknown scenario {scenario!r}", code="model_not_found")

    async def status(self, status: int) -> None:
        messages = {401: "Incorrect API key provided: k. You can find your API key at"
                         " https://platform.openai.com/account/api-keys.",
                    429: "Rate limit reached for requests",
                    500: "The server had an error while processing your request."}
        headers = {}
        if status in (429, 503) and self.server.retry_after is not None:
            headers["Retry-After"] = self.server.retry_after
        await self.ex.error(status, messages.get(status, f"error {status}"), type="error",
                            code=str(status), headers=headers)
