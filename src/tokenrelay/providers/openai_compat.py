"""Any OpenAI-compatible Chat Completions endpoint: OpenAI, vLLM, llama.cpp server, Ollama.

Only the endpoint and the key differ between them (``base_url``, ``api_key``); the wire
format is parsed by the pure :class:`~tokenrelay._openai_wire.ChatChunkParser` and this
module is the thin I/O shell around it: one POST, errors translated once, the response
closed when the consumer stops.

One provider object is cached and shared by every caller, and callers come from
different event loops (the sync API's background loop, each ``asyncio.run``). An
``httpx.AsyncClient`` and its pooled connections belong to the loop that opened them, so
the provider keeps one client per running loop and never hands a client to another loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import httpx

from .._openai_wire import ChatChunkParser, completion_to_chunks, error_message
from ..errors import (
    APIStatusError,
    ConfigurationError,
    ConnectionError,
    ProviderError,
    StreamError,
    TimeoutError,
    UsageError,
    status_error,
)
from ..request import Message, Request, ToolSpec
from .base import Chunk, ModelInfo, Provider

__all__ = ["OpenAIProvider"]

#: Error bodies are read up to this size: they are for a message, not for data.
_MAX_ERROR_BODY = 64 * 1024
_STATUS_HINTS = {
    401: "check OPENAI_API_KEY (or pass api_key=...)",
    403: "the key is not allowed to use this model or endpoint; check OPENAI_API_KEY",
    404: "check the model name and the base URL (it usually ends in /v1)",
}


def checked_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash, or a UsageError if it is not http(s)."""
    url = base_url.rstrip("/")
    try:
        scheme = httpx.URL(url).scheme
    except httpx.InvalidURL as exc:
        raise UsageError(f"invalid base URL {base_url!r}: {exc}") from exc
    if scheme not in ("http", "https"):
        raise UsageError(
            f"invalid base URL {base_url!r}: it must start with http:// or https://"
            " (e.g. http://127.0.0.1:8000/v1)"
        )
    return url


class OpenAIProvider(Provider):
    """Streams from an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or
            ``http://127.0.0.1:8000/v1``.
        api_key: sent as ``Authorization: Bearer``; ``None`` sends no header (local
            servers).
        connect_timeout: seconds to open the connection. Reading has no httpx timeout:
            the stream enforces the first-token, idle and total deadlines itself.
        max_connections: connections per event loop. Set explicitly because httpx's
            default pool (100) would silently queue a gateway's extra streams.
        transport: an httpx transport to use instead of the network (tests,
            benchmarks); it is shared by the clients of every loop.
        headers: extra headers sent with every request.

    Example::

        provider = OpenAIProvider(base_url="http://127.0.0.1:8000/v1")
        async with tokenrelay.astream("hi", provider=provider, model="qwen2.5") as s: ...
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        connect_timeout: float | None = 10.0,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        url = checked_base_url(base_url)
        if max_connections < 1:
            raise UsageError("max_connections must be at least 1")
        self.base_url = url
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._transport = transport
        self._headers = {"User-Agent": "tokenrelay", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # False once the server rejected stream_options (older vLLM / llama.cpp / proxies).
        self.stream_options_supported = True
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._clients = weakref.WeakKeyDictionary()
        # Admission in front of httpx: requests beyond the pool wait here, not inside
        # httpcore, whose pool scan costs queued x connections per event (httpcore 1.0.9):
        # 1,000 queued streams wedged the gateway's loop at 100% CPU (bench/README.md).
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._slots = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={self.base_url!r})"

    # -- HTTP client, one per event loop ------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                client = self._clients[loop] = httpx.AsyncClient(
                    headers=self._headers,
                    timeout=httpx.Timeout(
                        connect=self.connect_timeout, read=None, write=self.connect_timeout,
                        pool=None,
                    ),
                    limits=httpx.Limits(
                        max_connections=self.max_connections,
                        max_keepalive_connections=self.max_connections,
                    ),
                    transport=self._transport,
                    follow_redirects=True,
                )
                self._slots[loop] = asyncio.Semaphore(self.max_connections)
        return client

    def _slot(self) -> asyncio.Semaphore:
        return self._slots[asyncio.get_running_loop()]

    async def aclose(self) -> None:
        """Close this loop's client; clients of other loops are dropped with their loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - aclose is always awaited
            return
        with self._lock:
            client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    # -- streaming ------------------------------------------------------------------

    def _body(self, request: Request, *, stream_options: bool) -> bytes:
        if not request.model:
            raise UsageError("no model given: pass model=... (the name the server knows)")
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [_message(m) for m in request.messages],
        }
        if stream_options:
            body["stream_options"] = {"include_usage": True}
        for name in ("temperature", "max_tokens", "top_p", "seed"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.stop:
            body["stop"] = list(request.stop)
        if request.response_format is not None:
            fmt = request.response_format
            if fmt.schema_ == {"type": "object"} and not fmt.strict:
                # Any object at all: JSON mode, which more servers support than schemas.
                body["response_format"] = {"type": "json_object"}
            else:
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
        if request.tools:
            body["tools"] = [_tool(t) for t in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        body.update(request.extra)
        body["stream"] = True  # this provider only streams; complete() is built on it
        if not stream_options or body.get("stream_options") is None:
            body.pop("stream_options", None)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    async def stream(self, request: Request, *, raw: bool = False) -> AsyncIterator[Chunk]:
        client = self._client()
        url = f"{self.base_url}/chat/completions"
        headers = {
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
            # A compressed event stream is buffered by the compressor: ask for none.
            "Accept-Encoding": "identity",
        }
        with_options = self.stream_options_supported
        slot = self._slot()
        while True:
            body = self._body(request, stream_options=with_options)
            try:
                async with slot, client.stream(
                    "POST", url, content=body, headers=headers
                ) as response:
                    if response.status_code >= 400:
                        data = await _read_some(response)
                        if (
                            with_options
                            and response.status_code in (400, 422)
                            and b"stream_options" in data
                        ):
                            # The server predates stream_options: ask again without it and
                            # remember; usage is then counted (estimated) by the stream.
                            self.stream_options_supported = with_options = False
                            continue
                        raise self._status_error(response, data)
                    content_type = response.headers.get("content-type", "")
                    if "json" in content_type and "event-stream" not in content_type:
                        for chunk in await self._unstreamed(response, raw=raw):
                            yield chunk
                        return
                    if content_type.startswith("text/html"):
                        # A web page, not an API: a login portal or a base URL without /v1.
                        raise ProviderError(
                            f"{url} answered with an HTML page, not an event stream; check"
                            " the base URL (the API root, usually ending in /v1)"
                        )
                    chunks = self._chunks(response, ChatChunkParser(raw=raw))
                    async with contextlib.aclosing(chunks):  # closed with the response
                        async for chunk in chunks:
                            yield chunk
                    return
            except httpx.TransportError as exc:
                raise self._transport_error(exc, url) from exc

    async def _chunks(
        self, response: httpx.Response, parser: Any
    ) -> AsyncGenerator[Chunk, None]:
        """Feed the body to ``parser`` (``feed`` / ``started`` / ``end``) and yield its chunks."""
        encoding = response.headers.get("content-encoding", "identity")
        reads = response.aiter_raw() if encoding == "identity" else response.aiter_bytes()
        try:
            # aclosing: a consumer that stops mid-stream finalizes httpx's reader here,
            # not later from the garbage collector.
            async with contextlib.aclosing(reads):  # type: ignore[type-var]
                async for data in reads:
                    for chunk in parser.feed(data):
                        yield chunk
        except httpx.TransportError as exc:
            raise self._broken(exc, started=parser.started) from exc
        parser.end()

    async def _unstreamed(self, response: httpx.Response, *, raw: bool) -> list[Chunk]:
        # Some servers ignore stream=true and answer with one chat.completion object.
        try:
            obj = json.loads(await response.aread())
        except ValueError as exc:
            raise StreamError(
                f"{self.base_url} answered with malformed JSON instead of an event stream",
                code="malformed_chunk",
            ) from exc
        return completion_to_chunks(obj, raw=raw)

    # -- models -----------------------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        """The models the endpoint serves (``GET /models``)."""
        url = f"{self.base_url}/models"
        try:
            response = await self._client().get(url, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise self._transport_error(exc, url) from exc
        if response.status_code >= 400:
            raise self._status_error(response, response.content[:_MAX_ERROR_BODY])
        try:
            data = response.json()["data"]
            return [
                ModelInfo(str(m["id"]), self.name, str(m.get("owned_by") or "")) for m in data
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                f"{url} did not answer with an OpenAI model list: {response.text[:200]!r}"
            ) from exc

    # -- error translation (once, here) -----------------------------------------------

    def _status_error(self, response: httpx.Response, data: bytes) -> APIStatusError:
        status = response.status_code
        try:
            payload: Any = json.loads(data)
        except ValueError:
            payload = data.decode("utf-8", "replace").strip() or response.reason_phrase
        message, _ = error_message(payload)
        text = f"{self.base_url} answered {status} {response.reason_phrase}: {message}"
        hint = _STATUS_HINTS.get(status)
        if hint:
            text += f" ({hint})"
        return status_error(status, text, body=payload, retry_after=retry_after(response.headers))

    def _transport_error(
        self, exc: httpx.TransportError, url: str
    ) -> ProviderError | ConfigurationError:
        detail = _detail(exc)
        if isinstance(exc, httpx.ConnectTimeout):
            return TimeoutError(
                f"could not connect to {url} within {self.connect_timeout:g}s (connect"
                " timeout); is the server up and reachable?",
                kind="connect",
            )
        if isinstance(exc, httpx.ConnectError):
            return ConnectionError(
                f"could not connect to {url}: {detail}; is the server running and the base"
                " URL right?"
            )
        if isinstance(exc, httpx.UnsupportedProtocol):
            return ConfigurationError(f"cannot request {url}: {detail}")
        return ConnectionError(f"the connection to {url} failed before the answer: {detail}")

    def _broken(self, exc: httpx.TransportError, *, started: bool) -> ProviderError:
        detail = _detail(exc)
        if started:
            return StreamError(
                f"the connection to {self.base_url} broke mid-stream: {detail}",
                code="connection_lost",
            )
        # Nothing was shown yet, so asking again cannot duplicate text: retryable.
        return ConnectionError(
            f"the connection to {self.base_url} broke before the first token: {detail}"
        )


def _message(message: Message) -> dict[str, Any]:
    """A message in the Chat Completions shape."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = list(message.tool_calls)
        if not message.content:
            out["content"] = None  # what the API itself returns for a tool-calls-only turn
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role != "tool":
        out["name"] = message.name  # tool messages take no name in the Chat Completions API
    return out


def _tool(spec: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": spec.name}
    if spec.description:
        function["description"] = spec.description
    function["parameters"] = spec.parameters
    return {"type": "function", "function": function}


def _detail(exc: BaseException) -> str:
    # httpx often wraps the useful OSError ("Connection reset by peer") in an empty error.
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


async def _read_some(response: httpx.Response) -> bytes:
    data = bytearray()
    async for piece in response.aiter_bytes():
        data += piece
        if len(data) >= _MAX_ERROR_BODY:
            break
    return bytes(data[:_MAX_ERROR_BODY])


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an
    HTTP-date, RFC 9110 §10.2.3); ``None`` when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())
