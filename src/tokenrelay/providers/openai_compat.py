"""Any OpenAI-compatible Chat Completions endpoint: OpenAI, vLLM, llama.cpp server, Ollama.

Only the endpoint and the key differ between them (``base_url``, ``api_key``); the wire
format is parsed by the pure :class:`~tokenrelay._openai_wire.ChatChunkParser` and this
module is the thin I/O shell around it: one POST, errors translated once, the response
closed when the consumer stops.

The HTTP client is aiohttp: on this project's gateway benchmark it reads 64 relayed
streams for 6.4 µs of CPU per frame, against 13 µs (httpx, one client per connection) to
92 µs (httpx with one shared pool, whose bookkeeping grows with its connections), and its
connector queues requests beyond ``max_connections`` in O(1) (bench/README.md, 2026-12-02).

One provider object is cached and shared by every caller, and callers come from
different event loops (the sync API's background loop, each ``asyncio.run``, the
gateway's). A client session and its pooled connections belong to the loop that opened
them, so the provider keeps one session per running loop (:class:`LoopSessions`).
"""

from __future__ import annotations

import builtins
import contextlib
import email.utils
import json
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import yarl

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
from ._sessions import LoopSessions
from .base import Chunk, ModelInfo, Provider

__all__ = ["OpenAIProvider"]

#: Error bodies are read up to this size: they are for a message, not for data.
_MAX_ERROR_BODY = 64 * 1024
_STATUS_HINTS = {
    401: "check OPENAI_API_KEY (or pass api_key=...)",
    403: "the key is not allowed to use this model or endpoint; check OPENAI_API_KEY",
    404: "check the model name and the base URL (it usually ends in /v1)",
}
STREAM_HEADERS = {
    "Accept": "text/event-stream",
    "Content-Type": "application/json",
    # A compressed event stream is buffered by the compressor: ask for none.
    "Accept-Encoding": "identity",
}
#: What the client library raises for a failed request (aiohttp's connect timeout is a
#: ``TimeoutError``).
_TRANSPORT_ERRORS = (aiohttp.ClientError, builtins.TimeoutError, OSError)


def checked_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash, or a UsageError if it is not http(s)."""
    url = base_url.rstrip("/")
    try:
        parsed = yarl.URL(url)
        host = parsed.host
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid base URL {base_url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise UsageError(
            f"invalid base URL {base_url!r}: it must start with http:// or https://"
            " (e.g. http://127.0.0.1:8000/v1)"
        )
    if not host:
        raise UsageError(f"invalid base URL {base_url!r}: it names no host")
    return url


class OpenAIProvider(Provider):
    """Streams from an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or
            ``http://127.0.0.1:8000/v1``.
        api_key: sent as ``Authorization: Bearer``; ``None`` sends no header (local
            servers).
        connect_timeout: seconds to open the connection. Reading has no client timeout:
            the stream enforces the first-token, idle and total deadlines itself.
        max_connections: connections per event loop; further requests wait for one.
            Set explicitly because a default pool (100 in aiohttp and httpx) would
            silently queue a gateway's extra streams.
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
        headers: Mapping[str, str] | None = None,
    ) -> None:
        url = checked_base_url(base_url)
        if max_connections < 1:
            raise UsageError("max_connections must be at least 1")
        self.base_url = url
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._headers = {"User-Agent": "tokenrelay", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # False once the server rejected stream_options (older vLLM / llama.cpp / proxies).
        self.stream_options_supported = True
        self._default_model: str | None = None
        self._sessions = LoopSessions(self._new_session)

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={self.base_url!r})"

    # -- HTTP client, one per event loop ------------------------------------------------

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=self.connect_timeout, sock_read=None
            ),
        )

    def _client(self) -> aiohttp.ClientSession:
        return self._sessions.get()

    async def aclose(self) -> None:
        """Close this loop's session; sessions of other loops are dropped with their loop."""
        await self._sessions.aclose()

    @contextlib.asynccontextmanager
    async def _post(self, url: str, body: bytes) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST ``body``; the response is released to the pool if it was read to the end,
        else closed (which is what aborts the upstream generation)."""
        session = self._client()
        try:
            try:
                response = await session.post(url, data=body, headers=STREAM_HEADERS,
                                              allow_redirects=False)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # could not connect at all: not a stale connection
                # A pooled connection the server closed just as it was reused (aiohttp,
                # unlike httpcore, does not check a pooled socket for EOF before reuse):
                # the request never reached the server, so ask once more at once, on a
                # fresh connection, instead of failing into the stream's retry backoff.
                response = await session.post(url, data=body, headers=STREAM_HEADERS,
                                              allow_redirects=False)
        except _TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, url) from exc
        try:
            yield response
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()

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

    # What the Responses provider changes (providers/openai_responses.py): the path, the
    # body, the parser, the non-streamed answer; the I/O below is shared.
    path = "/chat/completions"
    #: Whether bodies carry stream_options (retried without it on a 400 naming it).
    uses_stream_options = True

    def _parser(self, *, raw: bool) -> Any:
        """The incremental parser: ``feed(bytes) -> list[Chunk]``, ``started``, ``end()``."""
        return ChatChunkParser(raw=raw)

    def _from_json(self, obj: Any, *, raw: bool) -> list[Chunk]:
        """The chunks of a non-streamed answer (a server that ignored stream=true)."""
        return completion_to_chunks(obj, raw=raw)

    async def stream(self, request: Request, *, raw: bool = False) -> AsyncIterator[Chunk]:
        url = self.base_url + self.path
        with_options = self.uses_stream_options and self.stream_options_supported
        while True:
            body = self._body(request, stream_options=with_options)
            async with self._post(url, body) as response:
                if not 200 <= response.status < 300:
                    if not 400 <= response.status <= 599:
                        raise self._unexpected_status(response)
                    data = await _read_some(response)
                    if (
                        with_options
                        and response.status in (400, 422)
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
                # The hot loop: one read, its chunks. Inline rather than a generator of
                # its own: every async-generator layer costs each relayed chunk a resume.
                parser = self._parser(raw=raw)
                content = response.content
                while True:
                    try:
                        data = await content.readany()
                    except _TRANSPORT_ERRORS as exc:
                        raise self._broken(exc, started=parser.started) from exc
                    if not data:
                        break
                    for chunk in parser.feed(data):
                        yield chunk
                parser.end()
                return

    async def _unstreamed(self, response: aiohttp.ClientResponse, *, raw: bool) -> list[Chunk]:
        # Some servers ignore stream=true and answer with one complete object.
        try:
            obj = json.loads(await response.read())
        except ValueError as exc:
            raise StreamError(
                f"{self.base_url} answered with malformed JSON instead of an event stream",
                code="malformed_chunk",
            ) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._broken(exc, started=False) from exc
        return self._from_json(obj, raw=raw)

    # -- models -----------------------------------------------------------------------

    async def default_model(self) -> str:
        """The endpoint's first listed model (``GET /models``), asked once per provider:
        the default when neither the caller, ``TOKENRELAY_MODEL`` nor ``tokenrelay models
        default`` names one (issue 11: asking any endpoint for ``gpt-4o-mini`` was a 404).
        """
        if self._default_model is None:
            try:
                models = await self.list_models()
            except ProviderError as exc:
                exc.message = (f"no model named, and listing the models of {self.base_url}"
                               f" to pick its first failed: {exc.message}")
                exc.args = (exc.message,)
                raise
            if not models:
                raise UsageError(f"no model named, and {self.base_url}/models lists none:"
                                 " pass model= or set TOKENRELAY_MODEL")
            self._default_model = models[0].name
        return self._default_model

    async def list_models(self) -> list[ModelInfo]:
        """The models the endpoint serves (``GET /models``)."""
        url = f"{self.base_url}/models"
        try:
            async with self._client().get(
                url, headers={"Accept": "application/json"}, allow_redirects=False
            ) as response:
                if not 200 <= response.status < 300 and not 400 <= response.status <= 599:
                    raise self._unexpected_status(response)
                data = await _read_some(response)
        except _TRANSPORT_ERRORS as exc:
            raise self._transport_error(exc, url) from exc
        if response.status >= 400:
            raise self._status_error(response, data)
        try:
            models = json.loads(data)["data"]
            return [
                ModelInfo(str(m["id"]), self.name, str(m.get("owned_by") or ""))
                for m in models
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                f"{url} did not answer with an OpenAI model list: {data[:200]!r}"
            ) from exc

    # -- error translation (once, here) -----------------------------------------------

    def _status_error(self, response: aiohttp.ClientResponse, data: bytes) -> APIStatusError:
        status = response.status
        reason = response.reason or ""
        try:
            payload: Any = json.loads(data)
        except ValueError:
            payload = data.decode("utf-8", "replace").strip() or reason
        message, _ = error_message(payload)
        text = f"{self.base_url} answered {status} {reason}: {message}"
        hint = _STATUS_HINTS.get(status)
        if hint:
            text += f" ({hint})"
        return status_error(status, text, body=payload, retry_after=retry_after(response.headers))

    def _unexpected_status(self, response: aiohttp.ClientResponse) -> APIStatusError:
        """A status that is neither success nor an HTTP error: a redirect (never
        followed: it could send the prompt and the key to any host), a 1xx, or no valid
        HTTP status at all (outside 100-599)."""
        status = response.status
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            error = APIStatusError(
                f"{self.base_url} answered {status} {response.reason or ''}, a redirect to"
                f" {location[:200]!r}; redirects are not followed (they could send the"
                " prompt and the key to another host): set the base URL to the API root"
                " itself", status_code=status)
            error.code = "upstream_redirect"
        else:
            error = APIStatusError(
                f"{self.base_url} answered with HTTP status {status}, which is not a"
                " success or an error status (200-299, 400-599)", status_code=status)
            error.code = "upstream_invalid_status"
        return error

    def _transport_error(self, exc: BaseException, url: str) -> ProviderError | ConfigurationError:
        detail = _detail(exc)
        if isinstance(exc, builtins.TimeoutError):  # aiohttp.ConnectionTimeoutError
            return TimeoutError(
                f"could not connect to {url} within {self.connect_timeout:g}s (connect"
                " timeout); is the server up and reachable?",
                kind="connect",
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            detail = _connect_detail(exc)
            return ConnectionError(
                f"could not connect to {url}: {detail}; is the server running and the base"
                " URL right?"
            )
        if isinstance(exc, aiohttp.InvalidURL):
            return ConfigurationError(f"cannot request {url}: {detail}")
        return ConnectionError(f"the connection to {url} failed before the answer: {detail}")

    def _broken(self, exc: BaseException, *, started: bool) -> ProviderError:
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


def _connect_detail(exc: aiohttp.ClientConnectorError) -> str:
    """Why a connection could not be opened, in plain words: aiohttp's own message
    ("Cannot connect to host h:p ssl:default [Connect call failed ...]") names its
    internals (issue 11)."""
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    reason = getattr(os_error, "strerror", None) or ""
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", ())  # aiohttp >= 3.11
    if isinstance(exc, dns_error) or isinstance(os_error, socket.gaierror):
        return f"cannot resolve host {exc.host!r}" + (f" ({reason})" if reason else "")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS handshake failed ({reason or type(os_error).__name__})"
    return (reason or type(os_error).__name__).lower()


def _detail(exc: BaseException) -> str:
    # Client errors often wrap the useful OSError ("Connection reset by peer") emptily.
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


async def _read_some(response: aiohttp.ClientResponse) -> bytes:
    data = bytearray()
    while len(data) < _MAX_ERROR_BODY:
        piece = await response.content.readany()
        if not piece:
            break
        data += piece
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
