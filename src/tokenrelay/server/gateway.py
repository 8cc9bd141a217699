"""The gateway's one path for every endpoint that answers from a model: admit → produce →
deliver.

An endpoint (``endpoints.py``) turns its body into a core ``Request`` and its encoder;
from there chat completions, ``/chat`` and ``/v1/responses`` share everything here:
:meth:`Gateway.admit` (key, body, validation), :meth:`Gateway.open` (the ``AsyncStream``),
:meth:`Gateway.create_stream` + :meth:`Gateway.produce` (a streamed answer, produced into
the stream log and delivered to its client: ``producing.py``), :meth:`Gateway.relay` (a
streamed answer without the log: no endpoint uses it now; ``bench_gateway.py --parts
producing`` measures the log's cost against it) or :meth:`Gateway.complete` (a ``stream: false`` one),
and :meth:`Gateway.finish` (limits, metrics, access line, request log), once per request
whatever ends it. Resume and cancel of a stream by its id are in ``delivery.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from .._stream import AsyncStream, Result
from ..errors import ConfigurationError, TokenrelayError
from ..events import ErrorEvent, StreamEvent
from ..providers.base import Provider
from ..request import Request, RetryPolicy, Timeouts
from .access import log_access
from .config import KeyConfig, ModelRoute, ServerConfig
from .encode import (
    SERVER_SHUTDOWN,
    SHUTDOWN_MESSAGE,
    completion_body,
    dumps,
    error_body,
    error_from_exc,
    error_status,
)
from .handoff import Sweeper
from .metrics import GatewayMetrics
from .producing import Encoder, Production
from .reqlog import RequestLog
from .routing import Router, label
from .security import ANONYMOUS, Authenticator, GatewayHTTPError, Lease, Limiter
from .shutdown import Drain, is_shutdown
from .sse import EarlyResponse, SSEResponse
from .streamlog import Producer, StreamInfo, StreamLog, StreamLogError, create_store
from .takeover import TakeOver, restart_meta

if TYPE_CHECKING:
    from .redis_link import RedisLink
    from .shared_limits import SharedLimiter

__all__ = ["GRACE_HEADER", "STREAM_ID_HEADER", "Gateway", "error_response"]

#: The response header carrying a streamed answer's id (before its first frame).
STREAM_ID_HEADER = b"x-tokenrelay-stream-id"
#: The request header asking for a resume grace period, in seconds.
GRACE_HEADER = "x-tokenrelay-resume-grace"

log = logging.getLogger("tokenrelay.server")

_Body = TypeVar("_Body", bound=BaseModel)


def error_response(exc: GatewayHTTPError) -> JSONResponse:
    """A refusal as OpenAI's error object, with its status and headers."""
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
    """The state behind the app (routes, limits, drain, metrics, request log) and the path
    every model-answering endpoint shares."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.auth = Authenticator(config.keys)
        self.metrics = GatewayMetrics()
        #: The shared state's Redis (``[redis] url``), else None: limits in this process.
        self.redis: RedisLink | None = None
        self.limiter: Limiter | SharedLimiter = Limiter()
        if config.redis.url:
            self.redis, self.limiter = _shared_limits(config, self.metrics)
        self.timeouts = Timeouts()
        self.retry = RetryPolicy()
        #: Model name → provider (``routing.py``).
        self.router = Router(config)
        #: The requests answering a model, ended at the drain deadline on shutdown.
        self.drain = Drain()
        #: The stream log between producing and delivering (``[streams]``).
        # One Redis client: the stream log's writes share the limits' pool (same URL).
        shared = (self.redis.client if self.redis is not None
                  and config.streams.redis_url == config.redis.url else None)
        self.streams: StreamLog = create_store(
            config.streams, client=shared,
            hold_new_streams=config.redis.on_redis_error == "open")
        self.reqlog: RequestLog | None = None
        if config.log.enabled:
            from ..log import default_log_path

            path = config.log.path or default_log_path().with_name("requests.db")
            self.reqlog = RequestLog(path, redact=config.log.redact)
        #: Streams produced by this process now, by id (resumes are counted on them).
        self.productions: dict[str, Production] = {}
        #: Tasks of the gateway's own: streams producing with no client attached.
        self._background: set[asyncio.Task[None]] = set()
        #: Takes over the streams other processes handed off at shutdown (shared log).
        self.sweeper = Sweeper(self)

    @property
    def models(self) -> dict[str, tuple[Provider, str]]:
        """The served names (the router's table: tests and the banner read and extend it)."""
        return self.router.models

    @property
    def route_of(self) -> dict[str, ModelRoute]:
        return self.router.route_of

    async def start(self) -> None:
        """At startup: check Redis (down: start all the same, ``degraded``)."""
        if self.redis is not None:
            await self.redis.start()
        self.sweeper.start()

    def health(self) -> dict[str, Any]:
        """``/healthz``: ``ok``, or ``degraded`` with the reason (Redis unreachable)."""
        body: dict[str, Any] = {"status": "ok"}
        if self.redis is not None and not self.redis.up:
            body = {"status": "degraded", "reason": self.redis.reason,
                    "on_redis_error": self.config.redis.on_redis_error}
        body["active_streams"] = self.limiter.total_active()
        return body

    # -- admit -----------------------------------------------------------------------

    async def acquire(self, key: KeyConfig, reserve_tokens: int) -> Lease:
        """Admit a request against its key's limits (429, or 503 without Redis)."""
        limiter = self.limiter
        if isinstance(limiter, Limiter):
            return limiter.acquire(key, reserve_tokens)
        return await limiter.aacquire(key, reserve_tokens)

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
        return error_response(exc)

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


    def sse(self, frames: AsyncIterator[bytes], *,
            headers: list[tuple[bytes, bytes]] | None = None, detach: Any = None,
            wait_first: float | None = None) -> SSEResponse:
        """An event stream of ``frames`` with this gateway's heartbeat and send timeout."""
        return SSEResponse(frames, heartbeat=self.config.heartbeat,
                           send_timeout=self.config.send_timeout,
                           wait_first=min(self.config.heartbeat, 10.0)
                           if wait_first is None else wait_first,
                           headers=headers, detach=detach)

    # -- produce (into the stream log) ---------------------------------------------------

    def resume_grace(self, request: HTTPRequest) -> float:
        """The resume grace the request asks for (``x-tokenrelay-resume-grace``), capped by
        ``[streams] max_resume_grace_s``; 0 without the header."""
        raw = request.headers.get(GRACE_HEADER)
        if raw is None:
            return 0.0
        try:
            value = float(raw.strip()) if len(raw) <= 32 else float("nan")
        except ValueError:
            value = float("nan")
        if not value >= 0 or value == float("inf"):
            raise GatewayHTTPError(
                400, f"the {GRACE_HEADER} header must be a number of seconds >= 0, got"
                f" {raw[:40]!r}", param=GRACE_HEADER, code="invalid_value")
        return min(value, self.config.streams.max_resume_grace_s)

    async def create_stream(self, key: KeyConfig, *, endpoint: str, model: str,
                            id_prefix: str, lease: Lease, core: Request | None = None,
                            grace: float = 0.0, usage: bool = False) -> Producer:
        """A new stream in the log for one answer (its id is the answer's); on failure the
        limits ``lease`` is released and a 503 raised. The record keeps what a take-over
        needs (``core``, the grace, whether usage is streamed: ``takeover.py``)."""
        meta = {"model": model[:200], "grace": repr(grace), "usage": "1" if usage else ""}
        try:
            return await self.streams.create(
                owner=key.id, endpoint=endpoint, id_prefix=id_prefix, status="in_progress",
                meta=meta if core is None else restart_meta(meta, core, self.streams))
        except StreamLogError as exc:
            lease.release(0)
            log.warning("the stream log refused a new stream: %s", exc)
            raise GatewayHTTPError(503, f"the gateway cannot keep a new stream now ({exc.code});"
                                   " try again in a moment", type="server_error",
                                   code=exc.code, headers={"retry-after": "1"}) from exc

    def produce(self, stream: AsyncStream, encoder: Encoder, producer: Producer, *,
                lease: Lease, key_id: str, endpoint: str, model: str,
                route: str | None = None, grace: float = 0.0,
                scope: MutableMapping[str, Any] | None = None) -> SSEResponse:
        """Produce a streamed answer into the log and deliver it to its client (the
        stream's id in the ``x-tokenrelay-stream-id`` header); with a ``grace`` it goes on
        that long for a resume when the client leaves."""
        production = self._production(stream, encoder, producer, lease=lease, key_id=key_id,
                                      endpoint=endpoint, model=model, route=route,
                                      grace=grace, scope=scope)
        return self.sse(production.frames(), headers=[(STREAM_ID_HEADER, production.id.encode())],
                        detach=production if grace > 0 else None)

    def produce_detached(self, stream: AsyncStream, encoder: Encoder, producer: Producer, *,
                         lease: Lease, key_id: str, endpoint: str, model: str,
                         route: str | None = None, grace: float | None = None,
                         scope: MutableMapping[str, Any] | None = None) -> Production:
        """Produce a streamed answer with no client attached, to its end or a cancel (a
        background response): a task of the gateway's, in its drain. Read it through the
        log by ``production.id``. With a ``grace`` (a taken-over stream), it stops once
        nobody has read it for that long."""
        production = self._production(stream, encoder, producer, lease=lease, key_id=key_id,
                                      endpoint=endpoint, model=model, route=route,
                                      grace=grace or 0.0, scope=scope, keep=grace is None)
        production.run_detached()
        return production

    def _production(self, stream: AsyncStream, encoder: Encoder, producer: Producer,
                    **kwargs: Any) -> Production:
        production = Production(self, stream=stream, encoder=encoder, producer=producer,
                                **kwargs)
        self.productions[production.id] = production
        return production

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task of the gateway's (kept until it ends; cancelled at ``aclose``)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def produced(self, production: Production, *, started: float, shutdown: bool) -> None:
        """A production ended (``producing.py``): its request's bookkeeping, once."""
        self.productions.pop(production.id, None)
        reason = {"cancel": "cancel", "grace": "grace_expired", "lost": "producer_lost"}.get(
            production.stop_reason or "", "client_disconnect")
        self.finish(stream=production.stream, lease=production.lease,
                    key_id=production.key_id, endpoint=production.endpoint,
                    model=production.model, started=started,
                    http_status=production.http_status, shutdown=shutdown,
                    scope=production.scope, stream_id=production.id,
                    resumes=production.resumes, cancel_reason=reason,
                    answer_prefix=production.answer_prefix,
                    handed_off=production.handed_off)

    def continuable(self, info: StreamInfo) -> bool:
        """Whether a process of this deployment could continue stream ``info`` from its
        partial answer (``takeover.py``): what a hand-off at shutdown needs."""
        return TakeOver(self).restartable(info) is not None

    def open(self, request: Request, provider: Provider) -> AsyncStream:
        return AsyncStream(request, provider, timeouts=self.timeouts, retry=self.retry,
                           raise_errors=False)

    def finish(self, *, stream: AsyncStream, lease: Lease, key_id: str, endpoint: str,
               model: str, started: float, http_status: int, shutdown: bool = False,
               scope: MutableMapping[str, Any] | None = None, stream_id: str | None = None,
               resumes: int = 0, cancel_reason: str = "client_disconnect",
               answer_prefix: str = "", handed_off: bool = False) -> None:
        """Release limits, count metrics and log one finished (or cancelled) request
        (``scope``: the HTTP request's, for its console access line; ``answer_prefix``:
        the partial answer a take-over continued, for the request log's row;
        ``handed_off``: given up at shutdown for another process to finish, which writes
        the row of the whole answer: this one's status is ``handed_over``)."""
        result = stream.result
        lease.release(result.usage.total_tokens)
        status = {"cancelled": "cancelled", "error": "error"}.get(result.finish_reason, "ok")
        if shutdown:
            status = "error"
        elif handed_off:
            status = "handed_over"
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
            m.cancellations.labels(model, cancel_reason).inc()
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
                answer=answer_prefix + result.text, error=error, stream_id=stream_id,
                resumes=resumes)

    async def drain_logs(self) -> None:
        """Wait until the request log has written every row queued so far."""
        if self.reqlog is not None:
            self.reqlog.hand_over()
            await asyncio.to_thread(self.reqlog.flush)


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
                    error = stream.error
                    if error is not None and not stream.text:
                        # Failed before anything was sent: a real HTTP error status.
                        http_status = error_status(error)
                        body = dumps(_core_error_body(error, route))
                        raise EarlyResponse(http_status, body, [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ] + _retry_after(error), frame=frame)
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

    async def complete(self, stream: AsyncStream, *, request: HTTPRequest, lease: Lease,
                       key_id: str, model: str, endpoint: str = "chat.completions",
                       render: Callable[[str, Result], dict[str, Any]] = completion_body,
                       route: str | None = None) -> Response:
        """The answer of a ``stream: false`` request, rendered whole by ``render``
        (bookkeeping in ``finally``, as for a stream)."""
        name = label(model)
        started = time.monotonic()
        http_status = 200
        shutdown = False
        self.metrics.active_streams.labels(name).inc()
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
            self.metrics.active_streams.labels(name).dec()
            await stream.aclose()
            self.finish(stream=stream, lease=lease, key_id=key_id, endpoint=endpoint,
                        model=name, started=started, http_status=http_status,
                        shutdown=shutdown, scope=request.scope)

    async def aclose(self) -> None:
        await self.sweeper.aclose()
        if self._background:
            # Streams producing with no client attached hold no connection, so uvicorn
            # does not wait for them: they get the drain here (the rest of
            # drain_timeout_s, then the drain's server_shutdown end), as attached ones do.
            self.drain.begin(self.config.drain_timeout_s)
            await asyncio.wait(set(self._background),
                               timeout=self.config.drain_timeout_s + 2.0)
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
        self.drain.close()
        await self.drain_logs()
        await self.router.aclose()
        await self.streams.aclose()
        if self.reqlog is not None:
            self.reqlog.close()
        if self.redis is not None:
            if not isinstance(self.limiter, Limiter):
                await self.limiter.aclose()
            await self.redis.aclose()


def _shared_limits(config: ServerConfig, metrics: GatewayMetrics,
                   ) -> tuple[RedisLink, SharedLimiter]:
    """The Redis of ``[redis] url`` and the limiter sharing its state there."""
    assert config.redis.url
    try:
        from .redis_link import RedisLink
        from .shared_limits import SharedLimiter
    except ImportError as exc:
        raise ConfigurationError(
            '[redis] url (--redis) needs the Redis client: pip install "tokenrelay[redis]"'
        ) from exc
    link = RedisLink(config.redis.url, timeout_s=config.redis.timeout_s)
    return link, SharedLimiter(link, prefix=config.redis.prefix,
                               on_redis_error=config.redis.on_redis_error,
                               registry=metrics.registry)


async def _consume(stream: AsyncStream) -> None:
    async for _ in stream:
        pass


async def _disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


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

