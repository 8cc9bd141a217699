"""Any OpenAI-compatible Chat Completions endpoint: OpenAI, vLLM, llama.cpp server, Ollama.

Only the endpoint and the key differ between them (``base_url``, ``api_key``); the wire
format is parsed by the pure :class:`~tokenrelay.providers._openai_wire.ChatChunkParser`
and this module is the thin I/O shell around it, on the HTTP shell every HTTP provider
shares (:class:`~tokenrelay.providers.http.HTTPProvider`: the session per event loop, the
POST closed when the consumer stops, errors translated once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from ..errors import ProviderError, StreamError, UsageError
from ..request import Message, Request, ToolSpec
from ._openai_wire import ChatChunkParser, completion_to_chunks, error_message
from ._resume import GRACE_HEADER, STREAM_ID_HEADER, HTTPResume, ResumableParser, stream_id
from .base import Chunk, ModelInfo
from .http import TRANSPORT_ERRORS, HTTPProvider, read_some

__all__ = ["DEFAULT_RESUME_GRACE", "OpenAIProvider"]

_log = logging.getLogger("tokenrelay")

#: Seconds a tokenrelay gateway is asked to keep an answer after its connection breaks.
DEFAULT_RESUME_GRACE = 30.0
#: The longest a cancel request for an abandoned answer may take (it is best effort).
_CANCEL_TIMEOUT = 2.0

_STATUS_HINTS = {
    401: "check OPENAI_API_KEY (or pass api_key=...)",
    403: "the key is not allowed to use this model or endpoint; check OPENAI_API_KEY",
    404: "check the model name and the base URL (it usually ends in /v1)",
}


#: The ways an upstream continues a partial answer (``OpenAIProvider(continue_prefix=)``).
CONTINUE_STYLES = (None, "vllm", "llama.cpp")


class OpenAIProvider(HTTPProvider):
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
        continue_prefix: how the server continues a partial assistant answer
            (``Request.continue_from``), if it can: ``"vllm"`` sends the partial answer
            as the last, assistant, message with ``continue_final_message: true,
            add_generation_prompt: false`` (vLLM, and llama.cpp's server since 2026-05);
            ``"llama.cpp"`` sends it as the last message only (llama.cpp's server
            prefills a trailing assistant message unless started with
            ``--no-prefill-assistant``). ``None``: such requests are refused.
        resume_grace: seconds a tokenrelay gateway should keep producing an answer after
            its connection breaks, waiting for this client to resume it
            (``x-tokenrelay-resume-grace``; other servers ignore the header). ``None`` or
            0: ask for none (a break is then an error, as with any server).

    Example::

        provider = OpenAIProvider(base_url="http://127.0.0.1:8000/v1")
        async with tokenrelay.astream("hi", provider=provider, model="qwen2.5") as s: ...
    """

    name = "openai"
    status_hints = _STATUS_HINTS

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        connect_timeout: float | None = 10.0,
        max_connections: int = 256,
        headers: Mapping[str, str] | None = None,
        continue_prefix: str | None = None,
        resume_grace: float | None = DEFAULT_RESUME_GRACE,
    ) -> None:
        if continue_prefix not in CONTINUE_STYLES:
            raise UsageError(f"continue_prefix must be one of"
                             f" {', '.join(repr(c) for c in CONTINUE_STYLES)}")
        self.continue_prefix = continue_prefix
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__(base_url=base_url, connect_timeout=connect_timeout,
                         max_connections=max_connections, headers={**(headers or {}), **auth})
        if resume_grace is not None and not 0 <= resume_grace <= 86400:
            raise UsageError("resume_grace must be between 0 and 86400 seconds (or None)")
        self.resume_grace = resume_grace or None
        # Sent with the answer's request (and each resume): the grace we ask for.
        self._grace_headers = ({GRACE_HEADER: f"{resume_grace:g}"} if resume_grace
                               else None)
        self.api_key = api_key
        # False once the server rejected stream_options (older vLLM / llama.cpp / proxies).
        self.stream_options_supported = True
        self._default_model: str | None = None

    def _error_text(self, payload: Any) -> str:
        return error_message(payload)[0]

    # -- streaming ------------------------------------------------------------------

    def _body(self, request: Request, *, stream_options: bool) -> bytes:
        if not request.model:
            raise UsageError("no model given: pass model=... (the name the server knows)")
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [_message(m) for m in request.messages],
        }
        if request.continue_from is not None:
            self._continue(body, request.continue_from)
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

    def can_continue(self) -> bool:
        return self.continue_prefix is not None

    def _continue(self, body: dict[str, Any], prefix: str) -> None:
        """The partial answer as the last (assistant) message, in the server's style."""
        if self.continue_prefix is None:
            raise UsageError("this endpoint cannot continue a partial answer: set the"
                             " route's continue_prefix (\"vllm\" or \"llama.cpp\") if"
                             " the server can")
        body["messages"].append({"role": "assistant", "content": prefix})
        if self.continue_prefix == "vllm":
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False

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
            async with self._post(url, body, headers=self._grace_headers) as response:
                if not 200 <= response.status < 300:
                    if not 400 <= response.status <= 599:
                        raise self._unexpected_status(response)
                    data = await read_some(response)
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
                pending = True  # the first chunk carries the resume handle (or None)
                handle = None
                try:
                    while True:
                        try:
                            data = await content.readany()
                        except TRANSPORT_ERRORS as exc:
                            if handle is not None and parser.done:
                                break  # the answer is whole: nothing to resume
                            raise self._broken(exc, started=parser.started) from exc
                        if not data:
                            break
                        chunks = parser.feed(data)
                        if pending and chunks:
                            pending = False
                            handle = self._resumption(response, parser, request)
                            chunks[0].resume = handle
                        for chunk in chunks:
                            yield chunk
                    parser.end()
                finally:
                    if pending:
                        # Left before the first chunk: nobody will resume this answer, so
                        # a gateway keeping it for us (the grace we asked) can stop now.
                        await self._abandon_early(response, request)
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
        except TRANSPORT_ERRORS as exc:
            raise self._broken(exc, started=False) from exc
        return self._from_json(obj, raw=raw)

    # -- resuming a broken answer (providers/_resume.py) ---------------------------------

    #: How a resumed answer is asked for: ``chat`` (a tokenrelay gateway's
    #: ``…/chat/completions/{id}/stream``) or ``responses`` (``/responses/{id}?stream=``).
    replay = "chat"

    def _resumption(self, response: aiohttp.ClientResponse, parser: Any,
                    request: Request) -> HTTPResume | None:
        """The answer's resume handle, or None when the server cannot resume it (any
        server but a tokenrelay gateway: no ``x-tokenrelay-stream-id``)."""
        sid = stream_id(response.headers.get(STREAM_ID_HEADER))
        if sid is None:
            return None
        return HTTPResume(self, sid, parser, replay=self.replay,
                          stop_on_abandon=self._stops_on_abandon(request))

    def _stops_on_abandon(self, request: Request) -> bool:
        """Whether an answer abandoned early is cancelled on the server: when it keeps the
        answer only because we asked for a grace period."""
        return self.resume_grace is not None

    async def _abandon_early(self, response: aiohttp.ClientResponse, request: Request) -> None:
        sid = stream_id(response.headers.get(STREAM_ID_HEADER))
        if sid is not None and self._stops_on_abandon(request):
            await self._cancel(self._stream_url(sid, "cancel"))

    def _stream_url(self, sid: str, action: str) -> str:
        if self.replay == "responses":
            return f"{self.base_url}/responses/{sid}" + ("/cancel" if action == "cancel" else "")
        return f"{self.base_url}{self.path}/{sid}/{action}"

    def _replay_request(self, handle: HTTPResume, after: int) -> tuple[str, dict[str, str]]:
        """The URL and headers that ask for the answer's events after ``after``."""
        headers = dict(self._grace_headers or {})
        if handle.replay == "responses":
            url = self._stream_url(handle.stream_id, "retrieve")
            return f"{url}?stream=true&starting_after={after}", headers
        headers["Last-Event-ID"] = str(after)
        return self._stream_url(handle.stream_id, "stream"), headers

    async def resumed(self, handle: HTTPResume, *, raw: bool = False) -> AsyncIterator[Chunk]:
        """The rest of an answer, from after the last event its parser received (see
        :class:`~tokenrelay.providers.base.ResumeHandle`)."""
        parser: ResumableParser = handle.parser
        after = parser.position()
        if after is None:
            raise StreamError("cannot resume: no event id was received yet",
                              code="resume_failed")
        url, headers = self._replay_request(handle, after)
        async with self._post(url, b"", headers=headers, method="GET") as response:
            if not 200 <= response.status < 300:
                if not 400 <= response.status <= 599:
                    raise self._unexpected_status(response)
                raise self._status_error(response, await read_some(response))
            if "event-stream" not in response.headers.get("content-type", ""):
                raise StreamError(f"{url} answered the resume with"
                                  f" {response.headers.get('content-type', 'no content type')!r},"
                                  " not an event stream", code="resume_failed")
            handle.resumes += 1
            parser.reconnect(after)
            content = response.content
            while True:
                try:
                    data = await content.readany()
                except TRANSPORT_ERRORS as exc:
                    if parser.done:
                        break  # the answer is whole: nothing more to resume
                    raise self._broken(exc, started=True) from exc
                if not data:
                    break
                for chunk in parser.feed(data):
                    yield chunk
            parser.end()

    async def cancel_stream(self, handle: HTTPResume) -> None:
        """Ask the server to stop ``handle``'s answer (best effort)."""
        await self._cancel(self._stream_url(handle.stream_id, "cancel"))

    async def _cancel(self, url: str) -> None:
        try:
            async with self._client().post(
                url, data=b"{}", headers={"Content-Type": "application/json"},
                allow_redirects=False, timeout=aiohttp.ClientTimeout(total=_CANCEL_TIMEOUT),
            ) as response:
                await read_some(response)
        except (*TRANSPORT_ERRORS, RuntimeError) as exc:
            # Best effort: the grace period ends the answer on the server anyway.
            _log.debug("cancelling %s failed: %s", url, exc)

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
                data = await read_some(response)
        except TRANSPORT_ERRORS as exc:
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


