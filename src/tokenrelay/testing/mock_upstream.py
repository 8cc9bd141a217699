"""A fault-injecting OpenAI-compatible server: ``tokenrelay mock-upstream``.

Stands in for vLLM / llama.cpp / OpenAI behind the gateway and the library, in tests,
benchmarks and demos. It is raw asyncio streams and a minimal HTTP/1.1 (``_mock_http``)
rather than a framework, so that every byte is under control: it can reset a connection
(``SO_LINGER 0``), end a body cleanly without ``[DONE]``, send a chunk that is not JSON,
stall with the socket open, and notice the moment a client goes away (it watches the
socket for EOF while it answers, so an abort is seen at once, not at the next write).

Endpoints: ``POST /v1/chat/completions`` (``stream`` true or false,
``stream_options.include_usage``), ``GET /v1/models``, and the control plane
``GET /_mock/requests`` (the request records below as JSON) and ``DELETE /_mock/requests``
(forget them and the fault counters).

What a request gets is chosen per request, by ``x-mock-*`` headers or, because a
gateway forwards only its own headers, by the model name: the options of model
``mock:`` (one spelling, :mod:`tokenrelay.testing._mock_spec`), ``key=value`` items separated by
``,`` (or ``;``); items without ``=`` are plain names and ignored. Headers win::

    tokens=N             text tokens to stream ("tok0 tok1 ..."; max_tokens cuts them)
    delay=S              seconds before the first token
    tps=R                tokens per second after the first
    fault=F              reset | close | malformed | error | stall | an HTTP status
    after=N              tokens sent before a mid-stream fault (default 1)
    times=K              inject the fault on the first K matching requests only
    retry_after=V        Retry-After header value of a status fault

    x-mock-fault: reset, x-mock-after: 3     ≡  model "fault=reset,after=3"

Faults: ``reset`` a TCP reset after ``after`` tokens (``RESET_GRACE`` after them: an RST
makes the peer drop what it has not read yet); ``close`` a clean end of the body
(and of the connection) without finish_reason or ``[DONE]``; ``malformed`` a chunk that
is not JSON; ``error`` a ``data: {"error": {...}}`` frame then ``[DONE]`` (as vLLM does);
``stall`` nothing more, the socket kept open until the client leaves; a status (``429``,
``500``, ...) an OpenAI error body with that status before any token. ``times`` counts
per model name + ``x-mock-*`` headers, so "429 then success" is ``fault=429,times=1``.

Structured output and tools, so clients' parsing can be tested end to end: a request
with ``response_format`` ``json_schema`` gets JSON matching the schema (``sample_json``;
``json_object`` gets ``{}``) streamed in small pieces instead of ``tok`` tokens; a request
with ``tools`` gets one call of the first tool (or the one ``tool_choice`` names) with
arguments matching its parameters and ``finish_reason: "tool_calls"`` — unless
``tool_choice`` is ``"none"`` or the last message is a tool result, which get text.
A trailing assistant message ``"tok0 … tok{k-1}"`` is a prefill (vLLM's
``continue_final_message``, llama.cpp server's default): the answer goes on from ``tok{k}``,
exactly as the uninterrupted one (``max_tokens`` counts the tokens after it).

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
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Self

from ..errors import ConfigurationError, UsageError
from ._mock_http import ClientGone, Connection, Exchange, HTTPError, RequestRecord
from ._mock_spec import parse_items, parse_spec

__all__ = ["Behaviour", "Exchange", "MockUpstream", "RequestRecord", "sample_json",
           "token_text"]

#: The options (spelled as for model ``mock:``, see ``_mock_spec``) → Behaviour fields.
_FIELDS: dict[str, str] = {
    "tokens": "tokens", "delay": "first_token_delay", "tps": "tokens_per_second",
    "fault": "fault", "after": "fault_after", "times": "fault_times",
    "retry_after": "retry_after",
}
#: An RST makes the peer drop what it received but did not read yet: let it read first.
RESET_GRACE = 0.1


def token_text(n: int) -> str:
    """The text of ``n`` streamed tokens: ``"tok0 tok1 ... tok{n-1}"``."""
    return " ".join(f"tok{i}" for i in range(n))


_SAMPLE_STRINGS = {"date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01",
                   "time": "00:00:00", "email": "mock@example.com",
                   "uri": "https://example.com", "uuid": "00000000-0000-4000-8000-000000000000"}


def sample_json(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """A value matching the JSON ``schema``: the subset structured outputs and tool
    parameters use (objects, arrays, scalars, enums, ``$ref``/``$defs``, ``anyOf``).

    Kept apart from the scripted ``MockProvider``'s generator on purpose: this server is
    a stand-in for a remote one and its answers must not move with the core's.
    """
    if not isinstance(schema, dict):
        return None
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    if isinstance(schema.get("$ref"), str):
        return sample_json(defs.get(schema["$ref"].rsplit("/", 1)[-1]), defs)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return sample_json(schema[key][0], defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        return {name: sample_json(sub, defs)
                for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        count = max(1, int(schema.get("minItems", 1)))
        return [sample_json(schema.get("items"), defs) for _ in range(count)]
    if kind == "string":
        text = _SAMPLE_STRINGS.get(schema.get("format", ""), "text")
        return text.ljust(int(schema.get("minLength", 0)), "x")
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum")) or 0
        return int(low) + 1 if kind == "integer" else float(low) + 1.0
    if kind == "boolean":
        return True
    return None


def _pieces(text: str, size: int = 8) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _structured_answer(body: dict[str, Any]) -> str | None:
    """The JSON answer to a request with ``response_format``; ``None`` for free text."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_schema", "json_object"):
        return None
    schema = (fmt.get("json_schema") or {}).get("schema") if fmt["type"] == "json_schema" \
        else None
    return json.dumps(sample_json(schema) if schema else {})


def _continued_from(body: dict[str, Any]) -> int:
    """How many ``tok`` tokens an assistant prefill already holds: a trailing assistant
    message continued as vLLM does (``continue_final_message: true``) or llama.cpp's server
    (a trailing assistant message is a prefill unless ``--no-prefill-assistant``). The
    answer goes on from there, exactly as the uninterrupted one would have."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return 0
    last = messages[-1]
    if last.get("role") != "assistant" or body.get("add_generation_prompt") is True:
        return 0
    words = str(last.get("content") or "").split()
    if words != [f"tok{i}" for i in range(len(words))]:
        return 0
    return len(words)


def _tool_to_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool a request with ``tools`` gets a call of (``None``: answer with text)."""
    tools: list[dict[str, Any]] = [
        t["function"] for t in body.get("tools") or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")]
    choice = body.get("tool_choice")
    messages = body.get("messages") or [{}]
    if not tools or choice == "none" or (
            isinstance(messages[-1], dict) and messages[-1].get("role") == "tool"):
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        return next((t for t in tools if t["name"] == wanted), tools[0])
    return tools[0]


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
        """``"fault=reset,after=3,tps=50"`` applied over ``base``; items without ``=``
        (a model's plain name) are ignored.

        Raises:
            UsageError: an unknown or renamed option, or a bad value.
        """
        options = parse_spec(spec, what="mock-upstream", names_allowed=True)
        return (base or cls())._with(options)

    def with_options(self, options: dict[str, str]) -> Behaviour:
        """Options as strings, e.g. from ``x-mock-*`` headers (``x-mock-fault: reset``)."""
        return self._with(parse_items(options, what="mock-upstream"))

    def _with(self, options: dict[str, Any]) -> Behaviour:
        return replace(self, **{_FIELDS[k]: v for k, v in options.items()})

    @property
    def status(self) -> int | None:
        """The HTTP status of a status fault."""
        return int(self.fault) if self.fault and self.fault.isdigit() else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MockUpstream:
    """The server. ``with MockUpstream() as up`` runs it on its own thread;
    ``async with`` (or ``astart``/``aclose``) on the running event loop.

    Args:
        host: address to listen on.
        port: port; 0 picks a free one (see ``url``).
        behaviour: what requests get when they ask for nothing else.
        models: the ids ``GET /v1/models`` lists.
        max_records: the request records kept (the oldest go first).
    """

    owned_by = "tokenrelay"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 behaviour: Behaviour | None = None,
                 models: Iterable[str] = ("mock-upstream",), max_records: int = 10_000,
                 ) -> None:
        self.host = host
        self.port = port
        self.behaviour = behaviour or Behaviour()
        self.models = list(models)
        #: The requests, in arrival order (appended from the server's loop).
        self.requests: deque[RequestRecord] = deque(maxlen=max_records)
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
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigurationError(
                f"cannot listen on {self.host} port {self.port}: {reason}"
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
        return [r for r in list(self.requests) if r.path.endswith("/chat/completions")]

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
        self._tasks.add(task)
        conn = Connection(reader, writer)
        try:
            while True:
                try:
                    request = await conn.read_request()
                except HTTPError as exc:
                    exchange = Exchange(conn, self._record("?", "?", {}, None))
                    exchange.keep_alive = False
                    await exchange.error(exc.status, exc.message)
                    break
                if request is None:
                    break
                if not await self._dispatch(conn, *request):
                    break
        except (OSError, ClientGone):
            conn.lost()
        except asyncio.CancelledError:
            # aclose(): ended, not re-raised. (On Python 3.11 the done-callback of
            # start_server's handler task calls task.exception(), which raises for a
            # cancelled task and logs "Exception in callback".)
            pass
        finally:
            self._tasks.discard(task)
            await conn.unwatch()
            conn.close()

    def _record(self, method: str, path: str, headers: dict[str, str], body: Any,
                ) -> RequestRecord:
        self._last_id += 1
        record = RequestRecord(self._last_id, method, path, headers, body,
                               started_at=time.monotonic())
        self.requests.append(record)
        return record

    async def _dispatch(self, conn: Connection, method: str, target: str, version: str,
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
        exchange = Exchange(conn, record)
        wanted = headers.get("connection", "").lower()
        exchange.keep_alive = wanted != "close" and (version != "HTTP/1.0" or
                                                     wanted == "keep-alive")

        def aborted(when: float) -> None:
            if record.finished_at is None and record.aborted_at is None:
                record.aborted_at = when

        conn.watch(aborted)
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
        except ClientGone:
            conn.lost()
            return False
        finally:
            await conn.unwatch()
        if record.aborted_at is None:
            record.finished_at = time.monotonic()
        return exchange.keep_alive and not conn.closing and not conn.gone.is_set()

    async def _control(self, conn: Connection, method: str, path: str,
                       headers: dict[str, str]) -> bool:
        record = RequestRecord(0, method, path, headers, None, started_at=time.monotonic())
        exchange = Exchange(conn, record)
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
        first = _continued_from(body)
        n, finish = max(0, behaviour.tokens - first), "stop"
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
        tool = _tool_to_call(body)
        if tool is not None:
            await self._tool_call(exchange, tool, usage)
            return
        answer = _structured_answer(body)
        pieces = None
        if answer is not None:
            pieces = _pieces(answer)
            n, finish = len(pieces), "stop"
            if isinstance(limit, int) and 0 < limit < n:
                n, finish = limit, "length"
            usage.update(completion_tokens=n, total_tokens=prompt_tokens + n)
        if pieces is None and first:
            pieces = [f" tok{i}" for i in range(first, first + n)]
        if exchange.record.stream:
            await self._stream(exchange, behaviour, fault, n, finish, usage, pieces)
        else:
            await self._complete(exchange, behaviour, fault, n, finish, usage, pieces)

    async def _tool_call(self, ex: Exchange, tool: dict[str, Any],
                         usage: dict[str, int]) -> None:
        arguments = json.dumps(sample_json(tool.get("parameters") or {"type": "object"}))
        call_id = f"call_mock{ex.record.id}"
        if not ex.record.stream:
            answer = ex.completion("", finish="tool_calls", usage=usage)
            answer["choices"][0]["message"].update(content=None, tool_calls=[{
                "id": call_id, "type": "function",
                "function": {"name": tool["name"], "arguments": arguments}}])
            await ex.json(200, answer)
            return
        await ex.start_stream()
        await ex.send_event(ex.chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": call_id, "type": "function",
             "function": {"name": tool["name"], "arguments": ""}}]}))
        for piece in _pieces(arguments):
            await ex.send_event(ex.chunk({"tool_calls": [
                {"index": 0, "function": {"arguments": piece}}]}))
        ex.sent_token()
        await ex.send_event(ex.chunk({}, finish="tool_calls"))
        if ex.include_usage:
            await ex.send_event(ex.chunk(None, usage=usage))
        await ex.send_event("[DONE]")
        await ex.end()

    async def _stream(self, ex: Exchange, behaviour: Behaviour, fault: str | None, n: int,
                      finish: str, usage: dict[str, int], pieces: list[str] | None = None,
                      ) -> None:
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
            delay = 0.0
            if i and gap:
                next_at += gap
                delay = next_at - loop.time()
            if delay > 0:
                await ex.pause(delay)
            elif i % 8 == 0:
                await asyncio.sleep(0)  # unpaced or late: still let the others (and EOF) in
            await ex.send_text(pieces[i] if pieces else f"tok{i}" if i == 0 else f" tok{i}")
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
        raise ClientGone

    async def _complete(self, ex: Exchange, behaviour: Behaviour, fault: str | None, n: int,
                        finish: str, usage: dict[str, int], pieces: list[str] | None = None,
                        ) -> None:
        gap = 1.0 / behaviour.tokens_per_second if behaviour.tokens_per_second else 0.0
        await ex.pause(behaviour.first_token_delay + gap * max(0, n - 1))
        if fault == "reset":
            ex.reset()
        elif fault == "close":
            ex.close()
        elif fault == "stall":
            await ex.wait_gone()
            raise ClientGone
        elif fault == "malformed":
            await ex.respond(200, b'{"id": "chatcmpl-mock", "choices": [{"message": ',
                             content_type="application/json")
        elif fault == "error":
            await ex.json(200, {"error": {"message": "mock-upstream: injected error",
                                          "type": "server_error", "param": None,
                                          "code": "server_error"}})
        else:
            ex.record.tokens_sent = n
            ex.record.first_token_at = time.monotonic()
            text = "".join(pieces[:n]) if pieces else token_text(n)
            await ex.json(200, ex.completion(text, finish=finish, usage=usage))
