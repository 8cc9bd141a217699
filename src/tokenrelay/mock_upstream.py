"""A fault-injecting OpenAI-compatible server: ``tokenrelay mock-upstream``.

Stands in for vLLM / llama.cpp / OpenAI behind the gateway and the library, in tests,
benchmarks and demos. It is raw asyncio streams and a minimal HTTP/1.1 (keep-alive,
``Content-Length`` request bodies, chunked responses) rather than a framework, so that
every byte is under control: it can reset a connection (``SO_LINGER 0``), end a body
cleanly without ``[DONE]``, send a chunk that is not JSON, stall with the socket open,
and notice the moment a client goes away (it watches the socket for EOF while it
answers, so an abort is seen at once, not at the next write).

Endpoints: ``POST /v1/chat/completions`` (``stream`` true or false,
``stream_options.include_usage``), ``GET /v1/models``, and the control plane
``GET /_mock/requests`` (the request records below as JSON) and ``DELETE /_mock/requests``
(forget them and the fault counters).

What a request gets is chosen per request, by ``x-mock-*`` headers or, because a
gateway forwards only its own headers, by the model name (``key=value`` items separated
by ``;`` or ``,``; items without ``=`` are plain names and ignored). Headers win::

    tokens=N             text tokens to stream ("tok0 tok1 ..."; max_tokens cuts them)
    delay=S              seconds before the first token     (first_token_delay)
    tps=R                tokens per second after the first  (tokens_per_second)
    fault=F              reset | close | malformed | error | stall | an HTTP status
    after=N              tokens sent before a mid-stream fault (fault_after, default 1)
    times=K              inject the fault on the first K matching requests only
    retry_after=V        Retry-After header value of a status fault

    x-mock-fault: reset, x-mock-fault-after: 3     ≡  model "fault=reset;after=3"

Faults: ``reset`` a TCP reset after ``after`` tokens; ``close`` a clean end of the body
(and of the connection) without finish_reason or ``[DONE]``; ``malformed`` a chunk that
is not JSON; ``error`` a ``data: {"error": {...}}`` frame then ``[DONE]`` (as vLLM does);
``stall`` nothing more, the socket kept open until the client leaves; a status (``429``,
``500``, ...) an OpenAI error body with that status before any token. ``times`` counts
per model name + ``x-mock-*`` headers, so "429 then success" is ``fault=429;times=1``.

Every request is recorded (:class:`RequestRecord`): when it started, tokens sent, and
``aborted_at``, the moment the client was seen leaving. Times are ``time.monotonic()``
seconds, comparable between processes on one machine. Example::

    with MockUpstream() as upstream:                 # its own thread and event loop
        url = upstream.url                           # http://127.0.0.1:PORT/v1
        ...
        record = upstream.wait_for(lambda r: r.aborted_at is not None)
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Self

from .errors import ConfigurationError, UsageError

__all__ = ["Behaviour", "Exchange", "MockUpstream", "RequestRecord", "token_text"]

#: Mid-stream faults; any HTTP status 400-599 is a fault too.
STREAM_FAULTS = ("reset", "close", "malformed", "error", "stall")
#: Option name → (field, type); short forms first in the docs.
_OPTIONS: dict[str, str] = {
    "tokens": "tokens", "n": "tokens",
    "delay": "first_token_delay", "first_token_delay": "first_token_delay",
    "tps": "tokens_per_second", "tokens_per_second": "tokens_per_second",
    "fault": "fault",
    "after": "fault_after", "fault_after": "fault_after",
    "times": "fault_times", "fault_times": "fault_times",
    "retry_after": "retry_after",
}
#: An RST makes the peer drop what it received but did not read yet: let it read first.
RESET_GRACE = 0.1
_MAX_HEAD = 64 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def token_text(n: int) -> str:
    """The text of ``n`` streamed tokens: ``"tok0 tok1 ... tok{n-1}"``."""
    return " ".join(f"tok{i}" for i in range(n))


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What one request gets (see the module docstring for the option names)."""

    tokens: int = 16
    first_token_delay: float = 0.0
    tokens_per_second: float | None = None
    fault: str | None = None
    fault_after: int = 1
    fault_times: int | None = None
    retry_after: str | None = None

    @classmethod
    def parse(cls, spec: str, base: Behaviour | None = None) -> Behaviour:
        """``"fault=reset;after=3;tps=50"`` applied over ``base``.

        Raises:
            UsageError: an unknown option or a bad value.
        """
        items = {}
        for part in spec.replace(",", ";").split(";"):
            key, sep, value = part.partition("=")
            if sep:
                items[key.strip()] = value.strip()
        return (base or cls()).with_options(items)

    def with_options(self, options: dict[str, str]) -> Behaviour:
        changes: dict[str, Any] = {}
        for key, value in options.items():
            name = _OPTIONS.get(key.lower().replace("-", "_"))
            if name is None:
                raise UsageError(f"unknown mock-upstream option {key!r}; known: "
                                 + ", ".join(sorted(set(_OPTIONS))))
            try:
                changes[name] = _convert(name, value)
            except ValueError as exc:
                raise UsageError(f"bad mock-upstream option {key}={value!r}: {exc}") from exc
        return replace(self, **changes)

    @property
    def status(self) -> int | None:
        """The HTTP status of a status fault."""
        return int(self.fault) if self.fault and self.fault.isdigit() else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _convert(name: str, value: str) -> Any:
    if name == "fault":
        fault = value.lower()
        if fault in STREAM_FAULTS or (fault.isdigit() and 400 <= int(fault) <= 599):
            return fault
        raise ValueError("expected " + " | ".join(STREAM_FAULTS) + " | an HTTP status 400-599")
    if name == "retry_after":
        return value
    if name in ("tokens", "fault_after", "fault_times"):
        number: float = int(value)
    else:
        number = float(value)
        if name == "tokens_per_second" and number <= 0:
            raise ValueError("must be above 0")
    if number < 0:
        raise ValueError("must not be negative")
    return number


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


class _ClientGone(Exception):
    pass


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Connection:
    """One client socket: buffered request reading, writes, and disconnect watching."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.gone = asyncio.Event()
        self.record: RequestRecord | None = None
        self.closing = False  # we end it ourselves: EOF from now on is no abort
        self._watcher: asyncio.Task[None] | None = None

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        self.buffer += data
        return bool(data)

    async def read_request(self) -> tuple[str, str, str, dict[str, str], bytes] | None:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > _MAX_HEAD:
                raise _HTTPError(431, "request head too large")
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
            raise _HTTPError(400, f"bad request line {request_line!r}") from None
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _HTTPError(411, "send the body with Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _HTTPError(400, "bad Content-Length") from None
        if length > 16 * 1024 * 1024:
            raise _HTTPError(413, "request body too large")
        while len(self.buffer) < length:
            if not await self._fill():
                raise ConnectionResetError("the client left mid-request")
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return method.upper(), target, version.upper(), headers, body

    # -- noticing the client leaving --------------------------------------------------

    def watch(self, record: RequestRecord) -> None:
        """While answering, read the socket: EOF means the client left."""
        self.record = record
        self._watcher = asyncio.ensure_future(self._watch())

    async def unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        self.record = None

    async def _watch(self) -> None:
        try:
            while await self._fill():
                if len(self.buffer) >= _MAX_HEAD:
                    return  # a pipelined next request, not a goodbye: stop watching
        except OSError:
            pass
        self.lost()

    def lost(self) -> None:
        if self.closing or self.gone.is_set():
            return
        self.gone.set()
        record = self.record
        if record is not None and record.finished_at is None and record.aborted_at is None:
            record.aborted_at = time.monotonic()

    # -- writing --------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if self.gone.is_set():
            raise _ClientGone
        self.writer.write(data)
        try:
            await self.writer.drain()
        except OSError:
            self.lost()
            raise _ClientGone from None

    async def pause(self, seconds: float) -> None:
        """Sleep, but stop at once (``_ClientGone``) if the client leaves meanwhile."""
        if not self.gone.is_set() and seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self.gone.wait()
            except TimeoutError:
                return
        if self.gone.is_set():
            raise _ClientGone

    def reset(self) -> None:
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
    """One request being answered; the building blocks of every behaviour.

    Subclasses of :class:`MockUpstream` script their own answers with these (the test
    suite's ``tests/_upstream.py`` does).
    """

    def __init__(self, server: MockUpstream, conn: _Connection, record: RequestRecord) -> None:
        self.server = server
        self.conn = conn
        self.record = record
        self.body: dict[str, Any] = record.body if isinstance(record.body, dict) else {}
        self.keep_alive = True
        self._id = f"chatcmpl-mock{record.id}"
        self._created = int(time.time())

    # -- plain responses ------------------------------------------------------------

    async def json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.record.status = status
        await self.conn.write(self._head(status, {
            "Content-Type": "application/json", "Content-Length": str(len(data)),
            **(headers or {})}) + data)

    async def error(self, status: int, message: str, *, type: str = "invalid_request_error",
                    code: str | None = None, headers: dict[str, str] | None = None) -> None:
        await self.json(status, {"error": {"message": message, "type": type, "param": None,
                                           "code": code}}, headers)

    def _head(self, status: int, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
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
        """One piece of the chunked body."""
        await self.conn.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def send_event(self, obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        await self.send(f"data: {data}\n\n".encode())

    async def end(self) -> None:
        """The end of the chunked body (the connection stays usable)."""
        await self.conn.write(b"0\r\n\r\n")

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
            obj["usage"] = usage
        return obj

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

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
        """A TCP reset (RST) now."""
        self.keep_alive = False
        self.conn.reset()

    def close(self) -> None:
        """A clean close (FIN) once what was written is sent."""
        self.keep_alive = False
        self.conn.close()

    def sent_token(self) -> None:
        record = self.record
        record.tokens_sent += 1
        if record.first_token_at is None:
            record.first_token_at = time.monotonic()


class MockUpstream:
    """The server. ``with MockUpstream() as up`` runs it on its own thread;
    ``async with`` (or ``astart``/``aclose``) on the running event loop.

    Args:
        host: address to listen on.
        port: port; 0 picks a free one (see ``url``).
        behaviour: what requests get when they ask for nothing else.
        models: the ids ``GET /v1/models`` lists.
    """

    owned_by = "tokenrelay"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 behaviour: Behaviour | None = None,
                 models: Iterable[str] = ("mock-upstream",)) -> None:
        self.host = host
        self.port = port
        self.behaviour = behaviour or Behaviour()
        self.models = list(models)
        #: Every request, in arrival order (appended from the server's loop).
        self.requests: list[RequestRecord] = []
        self._fault_counts: dict[tuple[str, ...], int] = {}
        self._last_id = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL: ``http://host:port/v1``."""
        return self.base_url + "/v1"

    # -- lifecycle on the running loop ------------------------------------------------

    async def astart(self) -> None:
        """Listen on the running event loop.

        Raises:
            ConfigurationError: the address cannot be used.
        """
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                      backlog=1024)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {self.host} port {self.port}: {exc.strerror or exc}"
                " (pick another --port)") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.astart()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- lifecycle on a thread of its own ---------------------------------------------

    def start(self) -> Self:
        """Serve from a background thread with its own event loop."""
        loop = self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                loop.run_until_complete(self.astart())
            except ConfigurationError as exc:  # handed to the starting thread
                failure.append(exc)
                return
            finally:
                started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="mock-upstream", daemon=True)
        self._thread.start()
        started.wait(10)
        if self._server is None:
            self._thread.join(5)
            loop.close()
            self._loop = None
            raise failure[0] if failure else RuntimeError("the mock upstream did not start")
        return self

    def close(self) -> None:
        """Stop the background thread started by ``start()``."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- records ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the records and the ``times`` counters."""
        self.requests.clear()
        self._fault_counts.clear()

    def chat_requests(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def wait_for(self, predicate: Callable[[RequestRecord], bool], timeout: float = 5.0,
                 ) -> RequestRecord | None:
        """The first record matching ``predicate``, polling up to ``timeout`` seconds
        (from another thread than the server's)."""
        deadline = time.monotonic() + timeout
        while True:
            for record in list(self.requests):
                if predicate(record):
                    return record
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    # -- HTTP -------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        conn = _Connection(reader, writer)
        try:
            while True:
                try:
                    request = await conn.read_request()
                except _HTTPError as exc:
                    record = self._record("?", "?", {}, None)
                    exchange = Exchange(self, conn, record)
                    exchange.keep_alive = False
                    await exchange.error(exc.status, exc.message)
                    break
                if request is None:
                    break
                if not await self._dispatch(conn, *request):
                    break
        except (OSError, _ClientGone):
            conn.lost()
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            await conn.unwatch()
            conn.close()

    def _record(self, method: str, path: str, headers: dict[str, str], body: Any,
                ) -> RequestRecord:
        self._last_id += 1
        record = RequestRecord(self._last_id, method, path, headers, body,
                               started_at=time.monotonic())
        self.requests.append(record)
        return record

    async def _dispatch(self, conn: _Connection, method: str, target: str, version: str,
                        headers: dict[str, str], raw: bytes) -> bool:
        """Answer one request; False when the connection must end."""
        path = target.split("?", 1)[0]
        if path.startswith("/_mock/"):
            return await self._control(conn, method, path, headers)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = self._record(method, path, headers, body)
        exchange = Exchange(self, conn, record)
        wanted = headers.get("connection", "").lower()
        exchange.keep_alive = wanted != "close" and (version != "HTTP/1.0" or
                                                     wanted == "keep-alive")
        conn.watch(record)
        try:
            if path.endswith("/chat/completions") and method == "POST":
                if not isinstance(body, dict):
                    await exchange.error(400, "the body must be a JSON object")
                else:
                    record.model = str(body.get("model", "")) or None
                    record.stream = bool(body.get("stream"))
                    await self.chat_completion(exchange)
            elif path.endswith("/models") and method == "GET":
                await exchange.json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": self.owned_by}
                    for m in self.models]})
            else:
                await exchange.error(404 if method in ("GET", "POST") else 405,
                                     f"no route for {method} {path}", code="not_found")
        except _ClientGone:
            conn.lost()
            return False
        finally:
            await conn.unwatch()
        if record.aborted_at is None:
            record.finished_at = time.monotonic()
        return exchange.keep_alive and not conn.closing and not conn.gone.is_set()

    async def _control(self, conn: _Connection, method: str, path: str,
                       headers: dict[str, str]) -> bool:
        record = RequestRecord(0, method, path, headers, None, started_at=time.monotonic())
        exchange = Exchange(self, conn, record)
        if path == "/_mock/requests" and method == "GET":
            await exchange.json(200, [r.to_dict() for r in list(self.requests)])
        elif path == "/_mock/requests" and method == "DELETE":
            count = len(self.requests)
            self.reset()
            await exchange.json(200, {"cleared": count})
        else:
            await exchange.error(404, f"no route for {method} {path}", code="not_found")
        return True

    # -- chat completions -------------------------------------------------------------

    def behaviour_for(self, exchange: Exchange) -> Behaviour:
        """The request's behaviour: the default, then the model's options, then headers.

        Raises:
            UsageError: an unknown option or a bad value.
        """
        record = exchange.record
        behaviour = Behaviour.parse(record.model or "", self.behaviour)
        options = {k[7:]: v for k, v in record.headers.items() if k.startswith("x-mock-")}
        return behaviour.with_options(options)

    def _inject(self, exchange: Exchange, behaviour: Behaviour) -> str | None:
        """The fault to inject now, counting ``times``."""
        if behaviour.fault is None:
            return None
        if behaviour.fault_times is not None:
            record = exchange.record
            key = (record.model or "", *sorted(f"{k}={v}" for k, v in record.headers.items()
                                               if k.startswith("x-mock-")))
            seen = self._fault_counts.get(key, 0)
            if seen >= behaviour.fault_times:
                return None
            self._fault_counts[key] = seen + 1
        exchange.record.fault = behaviour.fault
        return behaviour.fault

    async def chat_completion(self, exchange: Exchange) -> None:
        """Answer ``POST /chat/completions`` (override to script other answers)."""
        try:
            behaviour = self.behaviour_for(exchange)
        except UsageError as exc:
            await exchange.error(400, exc.message, code="invalid_mock_option")
            return
        exchange.record.behaviour = behaviour
        fault = self._inject(exchange, behaviour)
        body = exchange.body
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        n, finish = behaviour.tokens, "stop"
        if isinstance(limit, int) and 0 < limit < n:
            n, finish = limit, "length"
        prompt_tokens = sum(len(str(m.get("content") or "").split())
                            for m in body.get("messages") or [] if isinstance(m, dict))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                 "total_tokens": prompt_tokens + n}
        status = behaviour.status if fault else None
        if status is not None:
            await exchange.pause(behaviour.first_token_delay)
            headers = {} if behaviour.retry_after is None else {
                "Retry-After": behaviour.retry_after}
            kind = "rate_limit_error" if status == 429 else "server_error"
            await exchange.error(status, f"mock-upstream: injected {status}", type=kind,
                                 code=str(status), headers=headers)
            return
        if exchange.record.stream:
            await self._stream(exchange, behaviour, fault, n, finish, usage)
        else:
            await self._complete(exchange, behaviour, fault, n, finish, usage)

    async def _stream(self, ex: Exchange, behaviour: Behaviour, fault: str | None, n: int,
                      finish: str, usage: dict[str, int]) -> None:
        await ex.start_stream()
        await ex.send_event(ex.chunk({"role": "assistant", "content": ""}))
        await ex.pause(behaviour.first_token_delay)
        loop = asyncio.get_running_loop()
        gap = 1.0 / behaviour.tokens_per_second if behaviour.tokens_per_second else 0.0
        next_at = loop.time()
        fault_at = min(behaviour.fault_after, n) if fault else -1
        for i in range(n + 1):
            if i == fault_at:
                assert fault is not None
                if not await self._stream_fault(ex, fault, i):
                    return
            if i == n:
                break
            if i and gap:
                next_at += gap
                await ex.pause(next_at - loop.time())
            elif not gap:
                await asyncio.sleep(0)  # unpaced: still let the other streams (and EOF) in
            await ex.send_event(ex.chunk({"content": f"tok{i}" if i == 0 else f" tok{i}"}))
            ex.sent_token()
        await ex.send_event(ex.chunk({}, finish=finish))
        if ex.include_usage:
            await ex.send_event(ex.chunk(None, usage=usage))
        await ex.send_event("[DONE]")
        await ex.end()

    async def _stream_fault(self, ex: Exchange, fault: str, i: int) -> bool:
        """Inject a mid-stream fault; False when the answer ends with it."""
        if fault == "reset":
            await ex.pause(RESET_GRACE)
            ex.reset()
            return False
        if fault == "close":
            await ex.end()
            ex.close()
            return False
        if fault == "malformed":
            await ex.send(b'data: {"choices": [{"delta": {"content": "x"\n\n')
            return True  # a broken upstream may go on; the client must not
        if fault == "error":
            await ex.send_event({"error": {
                "message": f"mock-upstream: injected error after {i} tokens",
                "type": "server_error", "param": None, "code": "server_error"}})
            await ex.send_event("[DONE]")
            await ex.end()
            return False
        # stall: nothing more, the socket open, until the client leaves
        await ex.wait_gone()
        raise _ClientGone

    async def _complete(self, ex: Exchange, behaviour: Behaviour, fault: str | None, n: int,
                        finish: str, usage: dict[str, int]) -> None:
        gap = 1.0 / behaviour.tokens_per_second if behaviour.tokens_per_second else 0.0
        await ex.pause(behaviour.first_token_delay + gap * max(0, n - 1))
        if fault == "reset":
            ex.reset()
        elif fault == "close":
            ex.close()
        elif fault == "stall":
            await ex.wait_gone()
            raise _ClientGone
        elif fault == "malformed":
            ex.record.status = 200
            data = b'{"id": "chatcmpl-mock", "choices": [{"message": '
            await ex.conn.write(ex._head(200, {"Content-Type": "application/json",
                                               "Content-Length": str(len(data))}) + data)
        elif fault == "error":
            await ex.json(200, {"error": {"message": "mock-upstream: injected error",
                                          "type": "server_error", "param": None,
                                          "code": "server_error"}})
        else:
            ex.record.tokens_sent = n
            ex.record.first_token_at = time.monotonic()
            await ex.json(200, ex.completion(token_text(n), finish=finish, usage=usage))
