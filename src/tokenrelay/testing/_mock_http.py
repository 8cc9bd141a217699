"""The HTTP/1.1 of ``tokenrelay.testing.mock_upstream``: one connection and one request, byte-exact.

Deliberately minimal (keep-alive, ``Content-Length`` request bodies, chunked responses)
so that the mock controls every byte it sends, including the broken ones, and notices a
client leaving at once: while a request is answered, the socket is read too, and EOF
there means the client went away (a write would only fail later, or never).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .mock_upstream import Behaviour

__all__ = ["ClientGone", "Connection", "Exchange", "HTTPError", "RequestRecord"]

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable"}


class ClientGone(Exception):
    """The client left while it was being answered."""


class HTTPError(Exception):
    """A request that cannot be read: answered with ``status``, then the connection ends."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class RequestRecord:
    """One request as the server saw it. Times are ``time.monotonic()`` seconds."""

    id: int
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    started_at: float
    model: str | None = None
    stream: bool = False
    behaviour: Behaviour | None = None
    #: The fault really injected (``None`` once ``times`` is used up).
    fault: str | None = None
    status: int | None = None
    tokens_sent: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    #: When the client was seen leaving before the answer was over.
    aborted_at: float | None = None

    @property
    def outcome(self) -> str:
        """open | complete | aborted."""
        if self.aborted_at is not None:
            return "aborted"
        return "open" if self.finished_at is None else "complete"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["behaviour"] = None if self.behaviour is None else self.behaviour.to_dict()
        data["outcome"] = self.outcome
        return data


class Connection:
    """One client socket: buffered request reading, writes, and disconnect watching."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.gone = asyncio.Event()
        self.closing = False  # we end it ourselves: EOF from now on is no goodbye
        self._on_lost: Callable[[float], None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        self.buffer += data
        return bool(data)

    async def read_request(self) -> tuple[str, str, str, dict[str, str], bytes] | None:
        """``(method, target, version, headers, body)``; ``None`` at EOF between requests."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise HTTPError(431, "request head too large")
            if not await self._fill():
                if self.buffer.strip():
                    raise ConnectionResetError("the client left mid-request")
                return None
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[:end + 4]
        request_line, *lines = head.lstrip("\r\n").split("\r\n")
        try:
            method, target, version = request_line.split(" ", 2)
        except ValueError:
            raise HTTPError(400, f"bad request line {request_line!r}") from None
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise HTTPError(411, "send the body with Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise HTTPError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise HTTPError(413, "request body too large")
        while len(self.buffer) < length:
            if not await self._fill():
                raise ConnectionResetError("the client left mid-request")
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return method.upper(), target, version.upper(), headers, body

    # -- noticing the client leaving --------------------------------------------------

    def watch(self, on_lost: Callable[[float], None]) -> None:
        """Read the socket while answering: EOF means the client left (``on_lost(when)``)."""
        self._on_lost = on_lost
        self._watcher = asyncio.ensure_future(self._watch())

    async def unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        self._on_lost = None

    async def _watch(self) -> None:
        try:
            while await self._fill():
                if len(self.buffer) >= MAX_HEAD:
                    return  # a pipelined next request, not a goodbye: stop watching
        except OSError:
            pass
        self.lost()

    def lost(self) -> None:
        if self.closing or self.gone.is_set():
            return
        self.gone.set()
        if self._on_lost is not None:
            self._on_lost(time.monotonic())

    # -- writing --------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if self.gone.is_set():
            raise ClientGone
        self.writer.write(data)
        try:
            await self.writer.drain()
        except OSError:
            self.lost()
            raise ClientGone from None

    async def pause(self, seconds: float) -> None:
        """Sleep, but stop at once (``ClientGone``) if the client leaves meanwhile."""
        if not self.gone.is_set() and seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self.gone.wait()
            except TimeoutError:
                return
        if self.gone.is_set():
            raise ClientGone

    def reset(self) -> None:
        """A TCP reset: ``SO_LINGER`` 0, then close."""
        self.closing = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        self.closing = True
        if not self.writer.is_closing():
            self.writer.close()


class Exchange:
    """One request being answered: the building blocks of every answer, broken or not.

    Subclasses of :class:`~tokenrelay.testing.mock_upstream.MockUpstream` script their own
    answers with these (the test suite's ``tests/_upstream.py`` does).
    """

    def __init__(self, conn: Connection, record: RequestRecord) -> None:
        self.conn = conn
        self.record = record
        self.body: dict[str, Any] = record.body if isinstance(record.body, dict) else {}
        self.keep_alive = True
        self._id = f"chatcmpl-mock{record.id}"
        self._created = int(time.time())
        self._text_frame: tuple[bytes, bytes] | None = None

    # -- plain responses ------------------------------------------------------------

    async def respond(self, status: int, data: bytes, *, content_type: str,
                      headers: dict[str, str] | None = None) -> None:
        """A whole response with a ``Content-Length`` body."""
        self.record.status = status
        await self.conn.write(self._head(status, {
            "Content-Type": content_type, "Content-Length": str(len(data)),
            **(headers or {})}) + data)

    async def json(self, status: int, obj: Any, *,
                   headers: dict[str, str] | None = None) -> None:
        await self.respond(status, json.dumps(obj, separators=(",", ":")).encode(),
                           content_type="application/json", headers=headers)

    async def error(self, status: int, message: str, *, type: str = "invalid_request_error",
                    code: str | None = None, headers: dict[str, str] | None = None) -> None:
        """An OpenAI error body."""
        await self.json(status, {"error": {"message": message, "type": type, "param": None,
                                           "code": code}}, headers=headers)

    def _head(self, status: int, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("Connection: " + ("keep-alive" if self.keep_alive else "close"))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    # -- event streams ----------------------------------------------------------------

    async def start_stream(self) -> None:
        """The 200 head of a chunked ``text/event-stream`` body."""
        self.record.status = 200
        await self.conn.write(self._head(200, {
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-store",
            "Transfer-Encoding": "chunked"}))

    async def send(self, data: bytes) -> None:
        """One piece of the chunked body, as is."""
        await self.conn.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def send_event(self, obj: Any) -> None:
        """A ``data:`` frame of ``obj`` as compact JSON (a string as it is: ``[DONE]``)."""
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        await self.send(f"data: {data}\n\n".encode())

    async def send_text(self, content: str) -> None:
        """The frame of a ``chat.completion.chunk`` with ``content`` (the hot path: the
        same bytes as ``send_event(chunk(...))``, with one small ``dumps``)."""
        if self._text_frame is None:
            empty = json.dumps(self.chunk({"content": ""}), separators=(",", ":"))
            head, _, tail = empty.partition('"content":""')
            self._text_frame = (f'data: {head}"content":'.encode(), f"{tail}\n\n".encode())
        head_bytes, tail_bytes = self._text_frame
        await self.send(head_bytes + json.dumps(content).encode() + tail_bytes)

    async def end(self) -> None:
        """The end of the chunked body (the connection stays usable)."""
        await self.conn.write(b"0\r\n\r\n")

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    def chunk(self, delta: dict[str, Any] | None, *, finish: str | None = None,
              usage: dict[str, int] | None = None) -> dict[str, Any]:
        """A ``chat.completion.chunk``; ``delta=None`` is the choice-less usage chunk."""
        obj: dict[str, Any] = {
            "id": self._id, "object": "chat.completion.chunk", "created": self._created,
            "model": self.record.model or "mock-upstream", "system_fingerprint": None,
            "choices": [] if delta is None else [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if usage is not None or self.include_usage:
            obj["usage"] = usage  # OpenAI sends "usage": null on the others
        return obj

    def completion(self, text: str, *, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        """A non-streamed ``chat.completion``."""
        return {
            "id": self._id, "object": "chat.completion", "created": self._created,
            "model": self.record.model or "mock-upstream", "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }

    # -- control ----------------------------------------------------------------------

    async def pause(self, seconds: float) -> None:
        """Sleep; ``ClientGone`` at once if the client leaves meanwhile."""
        await self.conn.pause(seconds)

    async def wait_gone(self, seconds: float | None = None) -> bool:
        """Wait (up to ``seconds``) for the client to leave; True if it did."""
        try:
            async with asyncio.timeout(seconds):
                await self.conn.gone.wait()
        except TimeoutError:
            return False
        return True

    def reset(self) -> None:
        """A TCP reset (RST) now: what the client has not read yet is lost to it."""
        self.keep_alive = False
        self.conn.reset()

    def close(self) -> None:
        """A clean close (FIN) once what was written is sent."""
        self.keep_alive = False
        self.conn.close()

    def sent_token(self, count: int = 1) -> None:
        record = self.record
        record.tokens_sent += count
        if record.first_token_at is None:
            record.first_token_at = time.monotonic()
