"""The gateway's endpoints: each turns its body into a core ``Request`` and its encoder,
then takes the one shared path (``gateway.py``: admit → produce → deliver).

``POST /v1/chat/completions``, ``/chat`` and ``/v1/responses`` answer from a model (the
streamed answers of the first two through the stream log, resumable and cancellable by
their id: ``GET …/{id}/stream``, ``POST …/{id}/cancel``, ``delivery.py``); the others
describe the gateway (models, health, metrics, the OpenAPI document, the page).
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response

from ..request import Message, Request
from .background import BackgroundEndpoints, BackgroundResponses
from .delivery import Delivery
from .encode import ChunkEncoder, SimpleEncoder, chunk_error_frame, dumps, simple_error_frame
from .gateway import Gateway, error_response
from .metrics import CONTENT_TYPE_LATEST
from .openapi import openapi_document
from .responses import ResponsesEncoder
from .responses_schema import ResponsesRequest
from .routing import label
from .schema import ChatCompletionRequest, SimpleChatRequest
from .security import GatewayHTTPError, reservation

__all__ = ["Endpoints"]


class Endpoints:
    """The endpoints of one gateway (bound methods, for Starlette's routes)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.router = gateway.router
        self.delivery = Delivery(gateway)
        self._openapi = dumps(openapi_document(auth=bool(gateway.config.keys)))
        #: Background responses: their producers, retrieve and cancel (background.py).
        self.background = BackgroundResponses(gateway)
        self.responses = BackgroundEndpoints(self.background)

    # -- answered by a model ---------------------------------------------------------

    async def chat_completions(self, request: HTTPRequest) -> Any:
        """``POST /v1/chat/completions``."""
        gw, router = self.gateway, self.router
        try:
            key, chat = await gw.admit(request, ChatCompletionRequest)
            provider, upstream_model = router.lookup(chat.model)
            max_tokens = gw.limiter.clamp_max_tokens(
                key, chat.effective_max_tokens(), gw.config.max_tokens_default)
            try:
                core = Request(
                    messages=chat.core_messages(),
                    model=upstream_model, temperature=chat.temperature, max_tokens=max_tokens,
                    top_p=chat.top_p, stop=chat.stop, seed=chat.seed,  # type: ignore[arg-type]
                    response_format=chat.core_response_format(), tools=chat.core_tools(),
                    tool_choice=chat.core_tool_choice(),
                    extra=router.unused_parameters(chat.model, chat.unused_parameters()))
            except (ValidationError, ValueError) as exc:
                raise GatewayHTTPError(400, f"invalid messages: {exc}", param="messages") from exc
            grace = gw.resume_grace(request) if chat.stream else 0.0
            lease = await gw.acquire(key, reservation(core, key))
            if chat.stream:
                producer = await gw.create_stream(
                    key, endpoint="chat.completions", model=chat.model,
                    id_prefix="chatcmpl-", lease=lease, core=core, grace=grace,
                    usage=bool(chat.stream_options and chat.stream_options.include_usage))
        except GatewayHTTPError as exc:
            return gw.rejected(exc, request)

        stream = gw.open(core, provider)
        route = router.route(chat.model)
        if not chat.stream:
            return await gw.complete(stream, request=request, lease=lease, key_id=key.id,
                                     model=chat.model, route=route)
        encoder = ChunkEncoder(chat.model, include_usage=bool(
            chat.stream_options and chat.stream_options.include_usage), route=route,
            id=producer.stream_id)
        return gw.produce(stream, encoder, producer, lease=lease, key_id=key.id,
                          endpoint="chat.completions", model=label(chat.model), route=route,
                          grace=grace, scope=request.scope)

    async def simple_chat(self, request: HTTPRequest) -> Any:
        """``POST /chat``: a prompt (and optional history) in, plain text deltas out."""
        gw, router = self.gateway, self.router
        try:
            key, chat = await gw.admit(request, SimpleChatRequest)
            model = chat.model or router.default_model()
            if model is None:
                raise GatewayHTTPError(404, "no models are configured", param="model",
                                       code="model_not_found")
            provider, upstream_model = router.lookup(model)
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
            max_tokens = gw.limiter.clamp_max_tokens(
                key, chat.max_tokens, gw.config.max_tokens_default)
            core = Request(messages=tuple(messages), model=upstream_model,
                           max_tokens=max_tokens, temperature=chat.temperature)
            grace = gw.resume_grace(request)
            lease = await gw.acquire(key, reservation(core, key))
            producer = await gw.create_stream(key, endpoint="chat", model=model,
                                              id_prefix="chat-", lease=lease, core=core,
                                              grace=grace)
        except GatewayHTTPError as exc:
            return gw.rejected(exc, request)
        stream = gw.open(core, provider)
        route = router.route(model)
        return gw.produce(stream, SimpleEncoder(route), producer, lease=lease, key_id=key.id,
                          endpoint="chat", model=label(model), route=route, grace=grace,
                          scope=request.scope)

    # -- streams by id (resume, cancel: delivery.py) ----------------------------------

    async def resume_chat_completion(self, request: HTTPRequest) -> Any:
        """``GET /v1/chat/completions/{id}/stream``."""
        return await self.delivery.resume(request, endpoint="chat.completions",
                                          error_frame=chunk_error_frame)

    async def cancel_chat_completion(self, request: HTTPRequest) -> Response:
        """``POST /v1/chat/completions/{id}/cancel``."""
        return await self.delivery.cancel(request, endpoint="chat.completions")

    async def resume_chat(self, request: HTTPRequest) -> Any:
        """``GET /chat/{id}/stream``."""
        return await self.delivery.resume(request, endpoint="chat",
                                          error_frame=simple_error_frame)

    async def cancel_chat(self, request: HTTPRequest) -> Response:
        """``POST /chat/{id}/cancel``."""
        return await self.delivery.cancel(request, endpoint="chat")

    async def create_response(self, request: HTTPRequest) -> Any:
        """``POST /v1/responses``: the same path as chat completions, another wire format."""
        gw, router = self.gateway, self.router
        try:
            key, req = await gw.admit(request, ResponsesRequest)
            if req.background and req.store is False:
                # OpenAI's rule: a background response is stored to be retrieved.
                raise GatewayHTTPError(400, "Background mode requires store=true.",
                                       param="store", code="invalid_value")
            provider, upstream_model = router.lookup(req.model)
            max_tokens = gw.limiter.clamp_max_tokens(
                key, req.max_output_tokens, gw.config.max_tokens_default)
            try:
                core = req.to_core(upstream_model, max_tokens, extra=router.unused_parameters(
                    req.model, req.unused_parameters(), api="responses"))
            except (ValidationError, ValueError) as exc:
                raise GatewayHTTPError(400, f"invalid input: {exc}", param="input") from exc
            foreground = req.stream and not req.background
            grace = gw.resume_grace(request) if foreground else 0.0
            lease = await gw.acquire(key, reservation(core, key))
            if foreground:
                # Its id is the response's: resumable and cancellable as a background
                # one (GET /v1/responses/{id}?stream=true, POST …/cancel).
                producer = await gw.create_stream(key, endpoint="responses", model=req.model,
                                                  id_prefix="resp_", lease=lease)
        except GatewayHTTPError as exc:
            return gw.rejected(exc, request)

        stream = gw.open(core, provider)
        route = router.route(req.model)
        if req.background:
            return await self.background.start(
                request, {"request": req, "model": req.model, "route": route},
                stream=stream, lease=lease, key_id=key.id, model=req.model, route=route,
                deliver=req.stream)
        if not req.stream:
            encoder = ResponsesEncoder(req, model=req.model, route=route)
            return await gw.complete(stream, request=request, lease=lease, key_id=key.id,
                                     model=req.model, endpoint="responses",
                                     render=encoder.body, route=route)
        encoder = ResponsesEncoder(req, model=req.model, route=route,
                                   response_id=producer.stream_id)
        return gw.produce(stream, encoder, producer, lease=lease, key_id=key.id,
                          endpoint="responses", model=label(req.model), route=route,
                          grace=grace, scope=request.scope)

    # -- about the gateway -----------------------------------------------------------

    async def list_models(self, request: HTTPRequest) -> Response:
        """``GET /v1/models``."""
        try:
            self.gateway.auth.check(request.headers)  # type: ignore[arg-type]
        except GatewayHTTPError as exc:
            return error_response(exc)
        return JSONResponse(self.router.model_list(int(time.time())))

    async def retrieve_model(self, request: HTTPRequest) -> Response:
        """``GET /v1/models/{id}`` (``client.models.retrieve``)."""
        name = request.path_params["model"]
        try:
            self.gateway.auth.check(request.headers)  # type: ignore[arg-type]
            self.router.lookup(name)  # 404 for a name not served; a scripted mock:... is
        except GatewayHTTPError as exc:
            return error_response(exc)
        return JSONResponse(self.router.model_object(name, int(time.time())))

    async def healthz(self, request: HTTPRequest) -> Response:
        # Unauthenticated (for load balancers): no model names here, /v1/models has them.
        # Always 200: a process whose Redis is out of reach still serves (its running
        # streams, and by on_redis_error); "degraded" and the reason say what is wrong.
        return JSONResponse(self.gateway.health())

    async def metrics(self, request: HTTPRequest) -> Response:
        """``GET /metrics`` (Prometheus), behind the API keys unless ``metrics_public``."""
        if not self.gateway.config.metrics_public:
            try:
                self.gateway.auth.check(request.headers)  # type: ignore[arg-type]
            except GatewayHTTPError as exc:
                return error_response(exc)
        return Response(self.gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(self, request: HTTPRequest) -> Response:
        return Response(self._openapi, media_type="application/json")

    async def index(self, request: HTTPRequest) -> Response:
        """``GET /``: the chat page."""
        page = resources.files("tokenrelay.server") / "static" / "index.html"
        return HTMLResponse(page.read_text(encoding="utf-8"),
                            headers={"cache-control": "no-store"})
