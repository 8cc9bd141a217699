"""A real OpenAI-compatible HTTP server on loopback, scripted byte by byte.

It is a raw asyncio socket server (HTTP/1.1, chunked bodies) running on its own event
loop thread, so it serves sync tests, ``asyncio.run`` and pytest-asyncio alike, and it
can do what frameworks hide: reset the connection (``SO_LINGER 0``), end a body cleanly
without ``[DONE]``, send bytes that are not JSON, and notice the moment a client goes.

The behaviour of a request is chosen by its model name, ``scenario`` or
``scenario:arg``::

    ok                    role chunk, 4 text chunks, finish, usage chunk, [DONE]
    no_usage              the same without the usage chunk
    error_after:N         N text chunks then an {"error": ...} frame, then [DONE]
    reset_after:N         N text chunks then a TCP reset
    reset_first:N         reset the first N requests before any byte, then ``ok``
    no_done               finish and usage chunks, then a clean end without [DONE]
    malformed_after:N     N text chunks then ``data: {not json``
    status:CODE           answer CODE with an OpenAI error body (e.g. status:401)
    status_then_ok:CODE   answer CODE to the first request, ``ok`` to the next ones
                          (Retry-After from the ``retry_after`` attribute)
    stall_after:N         N text chunks then nothing until the client leaves
    slow                  a text chunk every 50 ms, up to 200
    no_stream_options     400 when the body has stream_options, else ``no_usage``
    json                  a non-streamed chat.completion body
    fixture:NAME          replay tests/fixtures/NAME.sse, one read per SSE frame

Every request is recorded in ``calls``; ``disconnects`` holds the monotonic times at
which a client went away while the server was still sending.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
TOKENS = ["Hello", ",", " world", "!"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


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


@dataclass
class Upstream:
    """The server. ``with Upstream() as server: server.url`` → ``http://127.0.0.1:N/v1``."""

    retry_after: str | None = "0"
    calls: list[Call] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __enter__(self) -> Upstream:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            port = self._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}/v1"
            started.set()

        def run() -> None:
            assert self._loop is not None
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="upstream", daemon=True)
        self._thread.start()
        if not started.wait(5):
            raise RuntimeError("the loopback upstream did not start")

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(5)
        loop.close()
        self._loop = None

    def wait_disconnect(self, timeout: float = 2.0) -> float | None:
        """The time the server saw a client leave (waiting up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.disconnects and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.disconnects[0] if self.disconnects else None

    def count(self, path: str = "/v1/chat/completions") -> int:
        return sum(1 for c in self.calls if c.path == path)

    # -- HTTP ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnects.append(time.monotonic())
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            if not writer.is_closing():
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {}
        for line in filter(None, header_lines):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        raw_body = await reader.readexactly(int(headers.get("content-length", "0")))
        body = json.loads(raw_body) if raw_body else None
        self.calls.append(Call(method, path, headers, body))
        if path.endswith("/models"):
            await self._json(writer, 200, {"object": "list", "data": [
                {"id": "test-model", "object": "model", "owned_by": "tests"}]})
            return
        scenario, _, arg = str((body or {}).get("model", "ok")).partition(":")
        await _Response(self, reader, writer, body or {}).run(scenario, arg)

    async def _json(self, writer: asyncio.StreamWriter, status: int, obj: Any,
                    extra: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                "Content-Type: application/json", f"Content-Length: {len(data)}",
                "Connection: close"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class _Response:
    def __init__(self, server: Upstream, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        self.server, self.reader, self.writer, self.body = server, reader, writer, body

    async def start(self) -> None:
        self.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def end(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    async def wait_gone(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True (and recorded) if the client left meanwhile."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return False
        except ConnectionError:
            data = b""
        if not data:
            self.server.disconnects.append(time.monotonic())
            return True
        return False

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def text(self, n: int = len(TOKENS)) -> None:
        await self.send(frame(chunk(role=True)))
        for i in range(n):
            await self.send(frame(chunk(TOKENS[i % len(TOKENS)])))

    async def finish(self, *, usage: bool = True, done: bool = True) -> None:
        await self.send(frame(chunk(finish="stop")))
        if usage:
            await self.send(frame(chunk(choices=False, usage=USAGE)))
        if done:
            await self.send(frame("[DONE]"))
        await self.end()

    async def run(self, scenario: str, arg: str) -> None:
        n = int(arg) if arg.isdigit() else 0
        server = self.server
        if scenario == "ok":
            await self.start()
            await self.text()
            await self.finish()
        elif scenario == "no_usage":
            await self.start()
            await self.text()
            await self.finish(usage=False)
        elif scenario == "error_after":
            await self.start()
            await self.text(n)
            await self.send(frame({"error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error", "code": "overloaded"}}))
            await self.send(frame("[DONE]"))
            await self.end()
        elif scenario == "reset_after":
            await self.start()
            await self.text(n)
            await asyncio.sleep(0.1)  # let the client read the tokens before the RST
            self.reset()
        elif scenario == "reset_first":
            if server.count() <= n:
                self.reset()
                return
            await self.start()
            await self.text()
            await self.finish()
        elif scenario == "no_done":
            await self.start()
            await self.text()
            await self.finish(done=False)
        elif scenario == "malformed_after":
            await self.start()
            await self.text(n)
            await self.send(b'data: {"choices": [{"delta": {"content": "x"\n\n')
            await self.finish()
        elif scenario == "status":
            await self._status(n)
        elif scenario == "status_then_ok":
            if server.count() == 1:
                await self._status(n)
                return
            await self.start()
            await self.text()
            await self.finish()
        elif scenario == "stall_after":
            await self.start()
            await self.text(n)
            await self.wait_gone(30)
        elif scenario == "slow":
            await self.start()
            await self.send(frame(chunk(role=True)))
            for i in range(200):
                await self.send(frame(chunk(f"t{i} ")))
                if await self.wait_gone(0.05):
                    return
            await self.finish()
        elif scenario == "no_stream_options":
            if "stream_options" in self.body:
                await server._json(self.writer, 400, {"error": {
                    "message": "Unrecognized request argument supplied: stream_options",
                    "type": "invalid_request_error", "param": None, "code": None}})
                return
            await self.start()
            await self.text()
            await self.finish(usage=False)
        elif scenario == "json":
            await server._json(self.writer, 200, {
                "id": "chatcmpl-test", "object": "chat.completion", "model": "test-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
        elif scenario == "fixture":
            await self.start()
            data = (FIXTURES / f"{arg}.sse").read_bytes()
            for piece in data.split(b"\n\n"):
                if piece.strip():
                    await self.send(piece + b"\n\n")
            await self.end()
        else:
            await server._json(self.writer, 404, {"error": {
                "message": f"unknown scenario {scenario!r}", "type": "invalid_request_error",
                "code": "model_not_found"}})

    async def _status(self, status: int) -> None:
        messages = {401: "Incorrect API key provided: k. You can find your API key at"
                         " https://platform.openai.com/account/api-keys.",
                    429: "Rate limit reached for requests",
                    500: "The server had an error while processing your request."}
        extra = {}
        if status in (429, 503) and self.server.retry_after is not None:
            extra["Retry-After"] = self.server.retry_after
        await self.server._json(self.writer, status, {"error": {
            "message": messages.get(status, f"error {status}"), "type": "error",
            "param": None, "code": str(status)}}, extra)
