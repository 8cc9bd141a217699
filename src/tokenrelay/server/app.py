"""The gateway app: OpenAI-compatible endpoints over the tokenrelay core.

Every request walks the same path as the library: body → validated request → provider
(from config, never from the request) → ``AsyncStream`` → encoder → ``SSEResponse``.
No ``BaseHTTPMiddleware`` anywhere: it roughly doubles the per-chunk cost (DEVELOPERS.md);
the body cap is a pure ASGI middleware and auth is a function call in each endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .._stream import AsyncStream, Result
from ..config import resolve
from ..errors import TokenrelayError, UsageError
from ..events import ErrorEvent, StreamEvent
from ..providers.base import Provider
from ..request import Message, Request, RetryPolicy, Timeouts
from .access import AccessLog, log_access
from .config import KeyConfig, ModelRoute, ServerConfig
from .encode import (
    SERVER_SHUTDOWN,
    SHUTDOWN_MESSAGE,
    ChunkEncoder,
    SimpleEncoder,
    completion_body,
    dumps,
    error_body,
    error_from_exc,
    error_status,
)
from .guard import Refusal, RequestGuard, logging_refusals
from .metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from .openapi import openapi_document
from .reqlog import RequestLog
from .schema import ChatCompletionRequest, SimpleChatRequest
from .security import ANONYMOUS, Authenticator, GatewayHTTPError, Lease, Limiter, reservation
from .shutdown import Drain, is_shutdown
from .sse import EarlyResponse, SSEResponse

__all__ = ["Gateway", "create_app"]

log = logging.getLogger("tokenrelay.server")

_Body = TypeVar("_Body", bound=BaseModel)

#: The largest scripted answer (``mock:tokens=N``) a client may ask for.
MAX_MOCK_TOKENS = 10_000


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the cap, before anything parses them."""

    def __init__(self, app: Any, max_bytes: int,
                 on_refused: Callable[[Any, int, str, str], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused

    async def _refuse(self, scope: Any, send: Any) -> None:
        message = f"request body over {self.max_bytes} bytes"
        if self.on_refused is not None:
            self.on_refused(scope, 413, "body_too_large", message)
        await _send_error(send, 413, message, "invalid_request_error", "body_too_large")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await self._refuse(scope, send)
                    return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, send)


class _BodyTooLarge(Exception):
    pass


async def _send_error(send: Any, status: int, message: str, type: str, code: str,
                      param: str | None = None) -> None:
    body = dumps(error_body(message, type=type, code=code, param=param))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error_response(exc: GatewayHTTPError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, type=exc.type, code=exc.code, param=exc.param),
        status_code=exc.status, headers=exc.headers)


def _validation_error(exc: ValidationError) -> GatewayHTTPError:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "body"
    if err["type"] == "extra_forbidden":
        # OpenAI's own wording for a parameter it does not know.
        return GatewayHTTPError(400, f"Unrecognized request argument supplied: {field}",
                                param=field, code="unknown_parameter")
    return GatewayHTTPError(400, f"invalid {field}: {err['msg']}", param=field,
                            code="invalid_value")


class Gateway:
    """The state behind the app: routes, limits, log, metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.auth = Authenticator(config.keys)
        self.limiter = Limiter()
        self.metrics = GatewayMetrics()
        self.timeouts = Timeouts()
        self.retry = RetryPolicy()
        self.models: dict[str, tuple[Provider, str]] = {}
        #: The configured upstream route of each routed model name.
        self.route_of: dict[str, ModelRoute] = {}
        #: OpenAI parameters already warned about as ignored (one line each, not one
        #: per request).
        self._warned: set[str] = set()
        # The scripted mock lets callers choose stalls and delays: by default only on a
        # loopback-only gateway.
        self.serve_mock = (config.loopback_only if config.serve_mock is None
                           else config.serve_mock)
        #: The providers made for this gateway's routes (the shared local and mock
        #: providers are not ours to close).
        self._routes: list[Provider] = []
        for route in config.models:
            from ..providers.openai_compat import OpenAIProvider
            from ..providers.openai_responses import OpenAIResponsesProvider

            key = route.api_key or (os.environ.get(route.api_key_env)
                                    if route.api_key_env else None)
            kind = OpenAIResponsesProvider if route.api == "responses" else OpenAIProvider
            provider = kind(base_url=route.base_url, api_key=key,
                            max_connections=route.max_connections)
            self._routes.append(provider)
            self.models[route.name] = (provider, route.upstream_model or route.name)
            self.route_of[route.name] = route
        self._route_names = frozenset(route.name for route in config.models)
        if self._routes:
            # Load the token estimator's encoding now (cl100k_base: 0.26 s, ~40 MiB): an
            # upstream route's usage is estimated for every stream that ends without
            # upstream usage (a client that left early, an upstream without
            # stream_options), and loading it lazily stalled the event loop, every stream
            # on it, at the first such stream. (The local and mock models count their own.)
            from ..usage import estimate_tokens

            estimate_tokens("warm-up")
        if config.serve_local and "smollm2" not in self.models:
            self.models["smollm2"] = resolve("smollm2")
        if self.serve_mock and "mock" not in self.models:
            self.models["mock"] = resolve("mock")
        #: The requests answering a model, ended at the drain deadline on shutdown.
        self.drain = Drain()
        self.reqlog: RequestLog | None = None
        if config.log.enabled:
            from ..log import default_log_path

            path = config.log.path or default_log_path().with_name("requests.db")
            self.reqlog = RequestLog(path, redact=config.log.redact)

    # -- helpers -------------------------------------------------------------------

    def route(self, model: str) -> str | None:
        """``model`` if it is one of the config's upstream routes (whose errors clients
        see only in general terms), else None (the embedded model, the mock)."""
        return model if model in self._route_names else None

    def lookup(self, model: str) -> tuple[Provider, str]:
        found = self.models.get(model)
        if found is not None:
            return found
        if model.startswith("mock:") and self.serve_mock:
            # Scripted behaviour chosen by the client: only ever the in-process mock.
            from ..providers.mock import parse_mock_options

            try:
                tokens = parse_mock_options(model[5:]).get("tokens") or 0
                if tokens > MAX_MOCK_TOKENS:
                    # The mock builds its whole answer at once, on the event loop:
                    # tokens=10**7 would freeze the gateway for everyone for seconds.
                    raise UsageError(f"mock tokens above {MAX_MOCK_TOKENS} are refused here")
                return resolve(model)
            except UsageError as exc:
                raise GatewayHTTPError(400, exc.message, param="model") from exc
        raise GatewayHTTPError(404, f"model {model!r} not found; GET /v1/models lists them",
                               param="model", code="model_not_found")

    async def read_body(self, request: HTTPRequest) -> Any:
        try:
            async with asyncio.timeout(self.config.body_timeout):
                raw = await request.body()
        except TimeoutError as exc:
            raise GatewayHTTPError(
                408, f"the request body did not arrive within {self.config.body_timeout:g}s",
                code="body_timeout") from exc
        try:
            import orjson

            return orjson.loads(raw)
        except ValueError as exc:
            raise GatewayHTTPError(400, f"request body is not valid JSON: {exc}",
                                   code="invalid_json") from exc

    async def admit(self, request: HTTPRequest, schema: type[_Body]) -> tuple[KeyConfig, _Body]:
        """The caller's key and its validated body (401 / 413 / 400 as GatewayHTTPError)."""
        key = self.auth.check(request.headers)  # type: ignore[arg-type]
        request.scope["tokenrelay.key"] = key.id  # for the log of a later refusal
        body = await self.read_body(request)
        try:
            return key, schema.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from exc

    def rejected(self, exc: GatewayHTTPError, request: HTTPRequest | None = None,
                 ) -> JSONResponse:
        """Count and log a refused request and answer it as an OpenAI error object."""
        if request is not None:
            self.log_refused(request.scope, exc.status, exc.code or "", exc.message)
        else:
            self.metrics.errors.labels(exc.code or "http_" + str(exc.status)).inc()
        return _error_response(exc)

    def log_refused(self, scope: Any, status: int, code: str, message: str) -> None:
        """Count and log a request refused before it reached a model (once per request:
        the guard, the body cap, the header cap, an endpoint, Starlette's 404/405)."""
        log_access(scope, status, duration=0.0)  # the console's line (once, too)
        if scope.get("tokenrelay.logged"):
            return
        self.metrics.errors.labels(code or "http_" + str(status)).inc()
        if self.reqlog is not None:
            self.reqlog.record_refused(scope, status, code, message)
        scope["tokenrelay.logged"] = True

    def unused_parameters(self, model: str, params: dict[str, Any], *,
                          api: str = "chat_completions") -> dict[str, Any]:
        """What to do with OpenAI parameters the gateway itself does not act on
        (``reasoning_effort``, ``store``, ``user``, ...): the ``extra`` to pass to an
        OpenAI-compatible upstream speaking the same ``api``, or ``{}`` and one warning
        line per parameter (per gateway, not per request) for a model that cannot use
        them."""
        if not params:
            return {}
        route = self.route_of.get(model)
        if route is not None and route.api == api:
            return params
        new = sorted(set(params) - self._warned)
        if new:
            self._warned.update(new)
            log.warning("ignoring OpenAI parameter%s %s: model %r does not use %s"
                        " (warned once)", "s" if len(new) > 1 else "", ", ".join(new),
                        _label(model), "them" if len(new) > 1 else "it")
        return {}

    def sse(self, frames: AsyncIterator[bytes]) -> SSEResponse:
        """An event stream of ``frames`` with this gateway's heartbeat and send timeout."""
        return SSEResponse(frames, heartbeat=self.config.heartbeat,
                           send_timeout=self.config.send_timeout,
                           wait_first=min(self.config.heartbeat, 10.0))

    def open(self, request: Request, provider: Provider) -> AsyncStream:
        return AsyncStream(request, provider, timeouts=self.timeouts, retry=self.retry,
                           raise_errors=False)

    def finish(self, *, stream: AsyncStream, lease: Lease, key_id: str, endpoint: str,
               model: str, started: float, http_status: int, shutdown: bool = False,
               scope: MutableMapping[str, Any] | None = None) -> None:
        """Release limits, count metrics and log one finished (or cancelled) request
        (``scope``: the HTTP request's, for its console access line)."""
        result = stream.result
        lease.release(result.usage.total_tokens)
        status = {"cancelled": "cancelled", "error": "error"}.get(result.finish_reason, "ok")
        if shutdown:
            status = "error"
        if scope is not None:
            log_access(scope, http_status, duration=time.monotonic() - started, model=model,
                       key=None if key_id == ANONYMOUS.id else key_id,
                       outcome=status, ttft=result.metrics.time_to_first_token,
                       prompt_tokens=result.usage.prompt_tokens,
                       completion_tokens=result.usage.completion_tokens)
        m = self.metrics
        m.requests.labels(endpoint, model, status).inc()
        if result.metrics.time_to_first_token is not None:
            m.ttft.labels(model).observe(result.metrics.time_to_first_token)
        if result.metrics.tokens_per_second is not None:
            m.tokens_per_second.labels(model).observe(result.metrics.tokens_per_second)
        m.completion_tokens.labels(model).inc(result.usage.completion_tokens)
        if status == "cancelled":
            m.cancellations.labels(model, "client_disconnect").inc()
        if result.error is not None:
            if result.error.code != SERVER_SHUTDOWN:
                # The operator's copy of what clients see only in general terms.
                log.warning("%s %s failed (%s): %s", endpoint, model, result.error.code,
                            result.error.message)
            m.errors.labels(result.error.code).inc()
            m.upstream_status.labels(
                model, str(getattr(result.error, "status_code", result.error.code))).inc()
        else:
            m.upstream_status.labels(model, "ok").inc()
        if self.reqlog is not None:
            error = None if result.error is None else f"{result.error.code}: {result.error.message}"
            if shutdown:
                error = f"{SERVER_SHUTDOWN}: {SHUTDOWN_MESSAGE}"
            self.reqlog.record(
                key_id=key_id, endpoint=endpoint, model=model, status=status,
                http_status=http_status, prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens,
                usage_estimated=int(result.usage.estimated),
                time_to_first_token=result.metrics.time_to_first_token,
                duration=time.monotonic() - started,
                prompt=[m.model_dump(exclude_none=True) for m in stream.request.messages],
                answer=result.text, error=error)

    async def drain_logs(self) -> None:
        """Wait until the request log has written every row queued so far."""
        if self.reqlog is not None:
            self.reqlog.hand_over()
            await asyncio.to_thread(self.reqlog.flush)

    # -- the streaming path ----------------------------------------------------------

    async def relay(self, stream: AsyncStream, encode: Callable[[StreamEvent], bytes], *,
                    lease: Lease, key_id: str, endpoint: str, model: str,
                    route: str | None = None,
                    scope: MutableMapping[str, Any] | None = None) -> AsyncIterator[bytes]:
        """The frames of one stream (``encode`` turns an event into its frames, or ``b""``);
        bookkeeping in ``finally`` (end, error or disconnect).

        One generator from events to frames, with nothing per frame but ``encode``: every
        async-generator layer between the provider and the socket costs each relayed
        chunk a resume.
        """
        started = time.monotonic()
        gauge = self.metrics.active_streams.labels(model)
        gauge.inc()
        http_status = 499  # client closed request, until the first frame goes out
        shutdown = False
        task = asyncio.current_task()
        self.drain.add(task)
        try:
            stream.pin_task()  # SSEResponse iterates this generator from one task
            events = stream.__aiter__()
            try:
                async for event in events:  # up to the first frame
                    frame = encode(event)
                    if not frame:
                        continue
                    result = stream._result
                    if result is not None and result.error is not None and not stream.text:
                        # Failed before anything was sent: a real HTTP error status.
                        http_status = error_status(result.error)
                        body = dumps(_core_error_body(result.error, route))
                        raise EarlyResponse(http_status, body, [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ] + _retry_after(result.error), frame=frame)
                    http_status = 200
                    yield frame
                    break
                async for event in events:
                    frame = encode(event)
                    if frame:
                        yield frame
            except asyncio.CancelledError as exc:
                if not is_shutdown(exc) or task is None:
                    raise
                task.uncancel()  # the drain's cancellation: answer it, as an error
                shutdown = True
                await stream.aclose()
                frame = encode(_SHUTDOWN_EVENT)
                if http_status == 499:
                    http_status = 503
                    body = dumps(_shutdown_body())
                    raise EarlyResponse(503, body, [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", b"1")], frame=frame) from None
                yield frame
        finally:
            self.drain.discard(task)
            gauge.dec()
            await stream.aclose()
            self.finish(stream=stream, lease=lease, key_id=key_id, endpoint=endpoint,
                        model=model, started=started, http_status=http_status,
                        shutdown=shutdown, scope=scope)

    # -- endpoints -------------------------------------------------------------------

    async def chat_completions(self, request: HTTPRequest) -> Any:
        try:
            key, chat = await self.admit(request, ChatCompletionRequest)
            provider, upstream_model = self.lookup(chat.model)
            max_tokens = self.limiter.clamp_max_tokens(
                key, chat.effective_max_tokens(), self.config.max_tokens_default)
            try:
                core = Request(
                    messages=chat.core_messages(),
                    model=upstream_model, temperature=chat.temperature, max_tokens=max_tokens,
                    top_p=chat.top_p, stop=chat.stop, seed=chat.seed,  # type: ignore[arg-type]
                    response_format=chat.core_response_format(), tools=chat.core_tools(),
                    tool_choice=chat.core_tool_choice(),
                    extra=self.unused_parameters(chat.model, chat.unused_parameters()))
            except (ValidationError, ValueError) as exc:
                raise GatewayHTTPError(400, f"invalid messages: {exc}", param="messages") from exc
            lease = self.limiter.acquire(key, reservation(core, key))
        except GatewayHTTPError as exc:
            return self.rejected(exc, request)

        stream = self.open(core, provider)
        if not chat.stream:
            return await self._complete(stream, request=request, lease=lease, key_id=key.id,
                                        model=chat.model, route=self.route(chat.model))
        encoder = ChunkEncoder(chat.model, include_usage=bool(
            chat.stream_options and chat.stream_options.include_usage),
            route=self.route(chat.model))
        return self.sse(self.relay(stream, encoder.encode, lease=lease, key_id=key.id,
                                   endpoint="chat.completions", model=_label(chat.model),
                                   route=self.route(chat.model), scope=request.scope))

    async def _complete(self, stream: AsyncStream, *, request: HTTPRequest, lease: Lease,
                        key_id: str, model: str, endpoint: str = "chat.completions",
                        render: Callable[[str, Result], dict[str, Any]] = completion_body,
                        route: str | None = None) -> Response:
        label = _label(model)
        started = time.monotonic()
        http_status = 200
        shutdown = False
        self.metrics.active_streams.labels(label).inc()
        task = asyncio.current_task()
        self.drain.add(task)
        try:
            # Starlette does not cancel an endpoint whose client left: watch for it, so
            # that a disconnect aborts the upstream request here too, not only in streams.
            consume = asyncio.ensure_future(_consume(stream))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({consume, gone}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError as exc:
                if not is_shutdown(exc) or task is None:
                    raise
                task.uncancel()  # the drain's cancellation: a 503, not a cut connection
                http_status, shutdown = 503, True
                return JSONResponse(_shutdown_body(), status_code=503,
                                    headers={"retry-after": "1"})
            finally:
                for waiter in (consume, gone):
                    waiter.cancel()
                await asyncio.gather(consume, gone, return_exceptions=True)
            if consume.cancelled():
                http_status = 499  # client closed request: nobody gets this response
                return Response(status_code=http_status)
            result = stream.result
            if result.error is not None:
                http_status = error_status(result.error)
                return JSONResponse(_core_error_body(result.error, route),
                                    status_code=http_status,
                                    headers={k.decode(): v.decode()
                                                 for k, v in _retry_after(result.error)})
            return Response(dumps(render(model, result)), media_type="application/json")
        finally:
            self.drain.discard(task)
            self.metrics.active_streams.labels(label).dec()
            await stream.aclose()
            self.finish(stream=stream, lease=lease, key_id=key_id, endpoint=endpoint,
                        model=label, started=started, http_status=http_status,
                        shutdown=shutdown, scope=request.scope)

    async def simple_chat(self, request: HTTPRequest) -> Any:
        try:
            key, chat = await self.admit(request, SimpleChatRequest)
            model = chat.model or ("smollm2" if "smollm2" in self.models else
                                   next(iter(self.models), None))
            if model is None:
                raise GatewayHTTPError(404, "no models are configured", param="model",
                                       code="model_not_found")
            provider, upstream_model = self.lookup(model)
            messages: list[Message] = []
            if chat.system:
                messages.append(Message(role="system", content=chat.system))
            for item in chat.history or []:
                try:
                    messages.append(Message.model_validate(item))
                except ValidationError as exc:
                    raise GatewayHTTPError(400, f"invalid history item: {item!r}",
                                           param="history") from exc
            messages.append(Message(role="user", content=chat.prompt))
            max_tokens = self.limiter.clamp_max_tokens(
                key, chat.max_tokens, self.config.max_tokens_default)
            core = Request(messages=tuple(messages), model=upstream_model,
                           max_tokens=max_tokens, temperature=chat.temperature)
            lease = self.limiter.acquire(key, reservation(core, key))
        except GatewayHTTPError as exc:
            return self.rejected(exc, request)
        stream = self.open(core, provider)
        route = self.route(model)
        return self.sse(self.relay(stream, SimpleEncoder(route).encode, lease=lease,
                                   key_id=key.id, endpoint="chat", model=_label(model),
                                   route=route, scope=request.scope))

    def model_object(self, name: str, created: int) -> dict[str, Any]:
        """The OpenAI model object of a served name; a routed model's ``owned_by`` is its
        route (the upstream host and model; never the key or the URL's path)."""
        route = self.route_of.get(name)
        if route is None:
            provider = self.models[name][0] if name in self.models else resolve(name)[0]
            owner = {"local": "tokenrelay (embedded)", "mock": "tokenrelay (mock)"}.get(
                provider.name, provider.name)
            return {"id": name, "object": "model", "created": created, "owned_by": owner}
        upstream = route.upstream_model or route.name
        return {"id": name, "object": "model", "created": created,
                "owned_by": f"{urlsplit(route.base_url).netloc} ({upstream})",
                "route": {"upstream_model": upstream,
                          "host": urlsplit(route.base_url).netloc, "api": route.api}}

    async def list_models(self, request: HTTPRequest) -> Response:
        try:
            self.auth.check(request.headers)  # type: ignore[arg-type]
        except GatewayHTTPError as exc:
            return _error_response(exc)
        created = int(time.time())
        data = [self.model_object(name, created) for name in self.models]
        return JSONResponse({"object": "list", "data": data})

    async def retrieve_model(self, request: HTTPRequest) -> Response:
        """``GET /v1/models/{id}`` (``client.models.retrieve``)."""
        name = request.path_params["model"]
        try:
            self.auth.check(request.headers)  # type: ignore[arg-type]
            self.lookup(name)  # 404 for a name not served; a scripted mock:... is served
        except GatewayHTTPError as exc:
            return _error_response(exc)
        return JSONResponse(self.model_object(name, int(time.time())))

    async def healthz(self, request: HTTPRequest) -> Response:
        # Unauthenticated (for load balancers): no model names here, /v1/models has them.
        return JSONResponse({"status": "ok", "active_streams": self.limiter.total_active()})

    async def metrics_endpoint(self, request: HTTPRequest) -> Response:
        if not self.config.metrics_public:
            try:
                self.auth.check(request.headers)  # type: ignore[arg-type]
            except GatewayHTTPError as exc:
                return _error_response(exc)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def index(self, request: HTTPRequest) -> Response:
        page = resources.files("tokenrelay.server") / "static" / "index.html"
        return HTMLResponse(page.read_text(encoding="utf-8"),
                            headers={"cache-control": "no-store"})

    async def aclose(self) -> None:
        self.drain.close()
        await self.drain_logs()
        for provider in self._routes:
            await provider.aclose()  # this loop's upstream connections
        if self.reqlog is not None:
            self.reqlog.close()


async def _consume(stream: AsyncStream) -> None:
    async for _ in stream:
        pass


async def _disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _label(model: str) -> str:
    """The model as a metrics/log label: scripted mock options would explode cardinality."""
    return "mock" if model.startswith("mock:") else model


def _core_error_body(exc: TokenrelayError, route: str | None = None) -> dict[str, Any]:
    return error_from_exc(exc, route)


_SHUTDOWN_EVENT = ErrorEvent(SERVER_SHUTDOWN, SHUTDOWN_MESSAGE, True)


def _shutdown_body() -> dict[str, Any]:
    return error_body(SHUTDOWN_MESSAGE, type="server_error", code=SERVER_SHUTDOWN)


def _retry_after(exc: TokenrelayError) -> list[tuple[bytes, bytes]]:
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is None:
        return []
    return [(b"retry-after", str(max(1, int(retry_after + 0.999))).encode())]


class GatewayApp(Starlette):
    """Starlette, plus a direct path for the POST endpoints that stream.

    On its way to an endpoint Starlette wraps ``send`` three times (ServerErrorMiddleware,
    ExceptionMiddleware, the route's exception wrapper), and every relayed chunk passes
    through all three: ~8 µs per chunk at one stream here (bench_gateway.py: the same
    minimal relay as a bare ASGI app, 41 µs, and under Starlette, 49). These endpoints
    answer their own errors, so their POSTs skip the stack: the body cap still applies,
    and an unexpected exception reaches uvicorn, which answers 500 as the stack's
    ServerErrorMiddleware would. With CORS configured every request takes the stack.
    """

    def __init__(self, *, direct: dict[str, Callable[[HTTPRequest], Any]],
                 max_body_bytes: int, gateway: Gateway, guard: RequestGuard,
                 logged_paths: frozenset[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gateway = gateway
        self._guard = guard
        #: Paths whose endpoints log their own refusals (the streaming POSTs).
        self._logged_paths = logged_paths
        self._direct = {path: BodyLimit(_endpoint_app(endpoint), max_body_bytes,
                                        gateway.log_refused)
                        for path, endpoint in direct.items()}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            try:
                self._guard.check(scope)  # Host (DNS rebinding), POST Content-Type
            except Refusal as refusal:
                self._gateway.log_refused(scope, refusal.status, refusal.code, refusal.message)
                await _send_error(send, refusal.status, refusal.message,
                                  "invalid_request_error", refusal.code, refusal.param)
                return
            if scope["method"] == "POST":
                app = self._direct.get(scope["path"])
                if app is not None:
                    scope["app"] = self
                    await app(scope, receive, send)
                    return
            if not (scope["method"] == "POST" and scope["path"] in self._logged_paths):
                # Starlette's answers (404, 405) and the GET endpoints' 401s: log any
                # refusal from the status line (never a streaming path: no cost per chunk).
                send = logging_refusals(scope, send, self._gateway.log_refused)
        await super().__call__(scope, receive, send)


def _endpoint_app(endpoint: Callable[[HTTPRequest], Any]) -> Callable[..., Any]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            response = await endpoint(HTTPRequest(scope, receive, send))
            await response(scope, receive, send)
        except Exception:
            log_access(scope, 500, duration=0.0)  # uvicorn answers 500 and logs why
            raise

    return app


#: The OpenAI error ``type`` and ``code`` of Starlette's own HTTP errors.
_HTTP_ERRORS = {404: ("invalid_request_error", "not_found"),
                405: ("invalid_request_error", "method_not_allowed")}


async def _http_error(request: HTTPRequest, exc: Exception) -> Response:
    """Starlette's 404 / 405 (and any other ``HTTPException``) as OpenAI error JSON, as
    OpenAI answers them: SDKs parse ``error.message`` out of every error body."""
    assert isinstance(exc, HTTPException)
    kind, code = _HTTP_ERRORS.get(exc.status_code, ("invalid_request_error",
                                                    f"http_{exc.status_code}"))
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        message = (f"Invalid URL ({method} {path}): no such endpoint here;"
                   " see GET /openapi.json")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
    else:
        message = str(exc.detail)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse(error_body(message, type=kind, code=code),
                        status_code=exc.status_code, headers=exc.headers)


def create_app(config: ServerConfig | None = None) -> Starlette:
    """The gateway as an ASGI app (``app.state.gateway`` holds its state)."""
    from .responses import create_response  # it imports this module's helpers

    config = config or ServerConfig()
    gateway = Gateway(config)
    openapi = dumps(openapi_document(auth=bool(config.keys)))

    async def openapi_json(request: HTTPRequest) -> Response:
        return Response(openapi, media_type="application/json")

    async def responses(request: HTTPRequest) -> Any:
        return await create_response(gateway, request)

    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/responses", responses, methods=["POST"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.retrieve_model, methods=["GET"]),
        Route("/chat", gateway.simple_chat, methods=["POST"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/", gateway.index, methods=["GET"]),
    ]
    streaming = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/responses",
                           "/responses", "/chat"})
    middleware = [Middleware(AccessLog, streams=streaming),
                  Middleware(BodyLimit, max_bytes=config.max_body_bytes,
                             on_refused=gateway.log_refused)]
    if config.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=config.cors_origins,
            allow_credentials=config.cors_credentials, allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "api-key", "x-api-key"]))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await gateway.aclose()

    direct: dict[str, Callable[[HTTPRequest], Any]] = {}
    if not config.cors_origins:
        direct = {"/v1/chat/completions": gateway.chat_completions,
                  "/chat/completions": gateway.chat_completions,
                  "/v1/responses": responses, "/responses": responses,
                  "/chat": gateway.simple_chat}
    guard = RequestGuard(check_host=not config.keys or bool(config.allowed_hosts),
                         allowed_hosts=config.allowed_hosts)
    app = GatewayApp(direct=direct, max_body_bytes=config.max_body_bytes, gateway=gateway,
                     guard=guard, logged_paths=streaming, routes=routes,
                     middleware=middleware, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error})
    app.state.gateway = gateway
    return app

