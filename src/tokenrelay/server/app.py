"""The gateway as an ASGI app: its routes, middleware, and a direct path for the POSTs that
stream.

Every request walks the same path as the library: body → validated request → provider
(from config, never from the request) → ``AsyncStream`` → encoder → ``SSEResponse``:
``routing.py`` (model → provider), ``gateway.py`` (the shared admit → produce → deliver
path and the gateway's state), ``endpoints.py`` (one method per endpoint), and this module.
No ``BaseHTTPMiddleware`` anywhere: it roughly doubles the per-chunk cost (DEVELOPERS.md);
the body cap is a pure ASGI middleware and auth is a function call in each endpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .access import AccessLog, log_access
from .config import ServerConfig
from .encode import dumps, error_body
from .endpoints import Endpoints
from .gateway import Gateway
from .guard import Refusal, RequestGuard, logging_refusals
from .sse import BreakConnection

__all__ = ["Gateway", "GatewayApp", "create_app"]


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


class GatewayApp(Starlette):
    """Starlette, plus a direct path for the POST endpoints that stream.

    On its way to an endpoint Starlette wraps ``send`` three times (ServerErrorMiddleware,
    ExceptionMiddleware, the route's exception wrapper), and every relayed chunk passes
    through all three: ~8 µs per chunk at one stream here (bench_gateway.py: the same
    minimal relay as a bare ASGI app, 41 µs, and under Starlette, 49). These endpoints
    answer their own errors, so their POSTs skip the stack: the body cap still applies,
    and an unexpected exception reaches uvicorn, which answers 500 as the stack's
    ServerErrorMiddleware would. With CORS configured every request takes the stack.
    The resumes that follow a stream live (``GET {prefix}/{id}/stream``, ``resume``) take
    the same direct path.
    """

    def __init__(self, *, direct: dict[str, Callable[[HTTPRequest], Any]],
                 max_body_bytes: int, gateway: Gateway, guard: RequestGuard,
                 logged_paths: frozenset[str],
                 resume: dict[str, Callable[[HTTPRequest], Any]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gateway = gateway
        self._guard = guard
        #: Paths whose endpoints log their own refusals (the streaming POSTs).
        self._logged_paths = logged_paths
        self._direct = {path: BodyLimit(_endpoint_app(endpoint), max_body_bytes,
                                        gateway.log_refused)
                        for path, endpoint in direct.items()}
        #: ``GET {prefix}/{id}/stream`` by prefix.
        self._resume = {prefix: _endpoint_app(endpoint)
                        for prefix, endpoint in (resume or {}).items()}

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
            elif scope["method"] == "GET" and scope["path"].endswith("/stream"):
                prefix, _, stream_id = scope["path"][:-7].rpartition("/")
                resume = self._resume.get(prefix)
                if resume is not None and stream_id:
                    scope["app"] = self
                    scope["path_params"] = {"id": stream_id}
                    await resume(scope, receive, send)
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
        except BreakConnection:
            raise  # (a stream handed off at shutdown: its access line is written)
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
    config = config or ServerConfig()
    gateway = Gateway(config)
    ep = Endpoints(gateway)
    routes = [
        Route("/v1/chat/completions", ep.chat_completions, methods=["POST"]),
        Route("/chat/completions", ep.chat_completions, methods=["POST"]),
        Route("/v1/responses", ep.create_response, methods=["POST"]),
        Route("/responses", ep.create_response, methods=["POST"]),
        Route("/v1/responses/{id}", ep.responses.retrieve, methods=["GET"]),
        Route("/responses/{id}", ep.responses.retrieve, methods=["GET"]),
        Route("/v1/responses/{id}/cancel", ep.responses.cancel, methods=["POST"]),
        Route("/responses/{id}/cancel", ep.responses.cancel, methods=["POST"]),
        Route("/v1/models", ep.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", ep.retrieve_model, methods=["GET"]),
        Route("/chat", ep.simple_chat, methods=["POST"]),
        Route("/v1/chat/completions/{id}/stream", ep.resume_chat_completion, methods=["GET"]),
        Route("/v1/chat/completions/{id}/cancel", ep.cancel_chat_completion, methods=["POST"]),
        Route("/chat/{id}/stream", ep.resume_chat, methods=["GET"]),
        Route("/chat/{id}/cancel", ep.cancel_chat, methods=["POST"]),
        Route("/healthz", ep.healthz, methods=["GET"]),
        Route("/metrics", ep.metrics, methods=["GET"]),
        Route("/openapi.json", ep.openapi_json, methods=["GET"]),
        Route("/", ep.index, methods=["GET"]),
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
            allow_headers=["authorization", "content-type", "api-key", "x-api-key",
                           "x-tokenrelay-resume-grace", "last-event-id"],
            # A page on another origin reads the stream's id (to resume or cancel it).
            expose_headers=["x-tokenrelay-stream-id"]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.aclose()

    direct: dict[str, Callable[[HTTPRequest], Any]] = {}
    resume: dict[str, Callable[[HTTPRequest], Any]] = {}
    if not config.cors_origins:
        resume = {"/v1/chat/completions": ep.resume_chat_completion,
                  "/chat": ep.resume_chat}
        direct = {"/v1/chat/completions": ep.chat_completions,
                  "/chat/completions": ep.chat_completions,
                  "/v1/responses": ep.create_response, "/responses": ep.create_response,
                  "/chat": ep.simple_chat}
    guard = RequestGuard(check_host=not config.keys or bool(config.allowed_hosts),
                         allowed_hosts=config.allowed_hosts)
    app = GatewayApp(direct=direct, max_body_bytes=config.max_body_bytes, gateway=gateway,
                     guard=guard, logged_paths=streaming, resume=resume, routes=routes,
                     middleware=middleware, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error})
    app.state.gateway = gateway
    return app
