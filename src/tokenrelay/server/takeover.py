"""Take-over: another process finishes a stream whose producing process died (issue 12 §4).

With the Redis store, a reader whose stream's producer lease lapses (``ProducerLost``,
after every frame written before the death) first tries to *take the stream over*
instead of ending it with the typed ``producer_lost`` error:

1. the stream's record must carry what a restart needs (:func:`restart_meta`, stored at
   creation): the core request as JSON (only when it fits the record's meta cap, 16 KiB;
   else no take-over) and the served model name;
2. the model must be able to continue a partial answer (``Provider.can_continue()``: the
   embedded model, the mock, an OpenAI-compatible route with ``continue_prefix``), the
   request must ask for plain text (no tools, no ``response_format``: a grammar or a tool
   call cannot be resumed mid-way) and nobody asked to cancel it;
3. ``StreamLog.acquire`` must give this process the lease (one process wins; the others
   read on and get the winner's frames).

The winner rebuilds the partial answer from the stored frames (the endpoint's own
encoding: :class:`Resumption`), asks the model to continue it (``Request.continue_from``:
the chat template's assistant turn + the partial text; ``max_tokens`` less what was already
generated) and produces the rest with an encoder in the state the dead one left: frames
numbered from ``next_seq``, the same ids, no second ``response.created`` or role chunk.
The client reads one answer. Anything that fails on the way is the ``producer_lost`` end,
exactly as without take-over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import TokenrelayError
from ..request import Request
from .security import ANONYMOUS, GatewayHTTPError, Lease
from .streamlog import Producer, StreamInfo, StreamLogError, StreamNotFound
from .streamlog.base import MAX_META_BYTES

if TYPE_CHECKING:
    from ..providers.base import Provider
    from .gateway import Gateway

__all__ = ["REQUEST_KEY", "Resumption", "TakeOver", "record_lost", "restart_meta",
           "unlimited_lease"]

log = logging.getLogger("tokenrelay.server")

#: The stream record's meta keys: the core request (JSON) and the served model name.
REQUEST_KEY = "request"
MODEL_KEY = "model"


def restart_meta(meta: Mapping[str, str], core: Request) -> dict[str, str]:
    """``meta`` + the core request, when the whole still fits the record's cap (else
    ``meta`` alone: that stream cannot be taken over)."""
    out = dict(meta)
    data = core.model_dump_json(exclude_defaults=True, by_alias=True)
    used = sum(len(k) + len(v) for k, v in out.items()) + len(REQUEST_KEY)
    # (the cap is on characters; the stores count bytes of UTF-8: leave room for both)
    if used + len(data.encode()) <= MAX_META_BYTES:
        out[REQUEST_KEY] = data
    return out


class _NoLimits:
    def _release(self, lease: Lease, used_tokens: int | None) -> None:
        pass


def unlimited_lease() -> Lease:
    """A limits lease that holds nothing: a taken-over stream was admitted once, when it
    was created (in the process that died)."""
    return Lease(_NoLimits(), ANONYMOUS, 0)


@dataclass
class Resumption:
    """What a take-over starts from: the stream's record, the new lease, the request to
    continue (``continue_from`` set) and its provider."""

    info: StreamInfo
    producer: Producer
    request: Request
    provider: Provider
    #: The served model name (the stream's ``model`` meta).
    model: str
    route: str | None
    #: The partial answer's text (what the dead producer's frames carry).
    partial: str


class TakeOver:
    """The take-overs of one gateway (counted in ``tokenrelay_stream_take_overs``)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def restartable(self, info: StreamInfo) -> tuple[Request, Provider, str] | None:
        """The stored request, its provider and model name, if the stream can be
        continued here (else None: end it ``producer_lost``)."""
        raw = info.meta.get(REQUEST_KEY)
        model = info.meta.get(MODEL_KEY)
        if not raw or not model or info.cancel_requested or info.ended:
            return None
        try:
            request = Request.model_validate_json(raw)
            provider, _ = self.gateway.router.lookup(model)
        except (ValidationError, ValueError, GatewayHTTPError, TokenrelayError):
            return None  # a record this gateway cannot serve (its routes changed)
        if request.tools or request.response_format is not None:
            return None
        if not provider.can_continue():
            return None
        return request, provider, model

    async def begin(self, stream_id: str, partial_of: Any) -> Resumption | None | bool:
        """Try to take stream ``stream_id`` over.

        ``partial_of(info) -> str | None`` (async) rebuilds the partial answer's text from
        the stored frames (None: it cannot be continued, e.g. a tool call began).

        Returns the :class:`Resumption` (this process produces the rest now), True when
        another process holds the stream (read on), None when it cannot be taken over
        (end it ``producer_lost``).
        """
        log_ = self.gateway.streams
        try:
            info = await log_.info(stream_id, owner=None)
        except StreamLogError:
            return None
        if info is None:
            return None
        found = self.restartable(info)
        if found is None:
            return None
        request, provider, model = found
        try:
            producer = await log_.acquire(stream_id)
        except (StreamNotFound, StreamLogError):
            return None
        if producer is None:
            return True  # someone holds it (another reader's process won), or it ended
        try:
            partial = await partial_of(producer.info)
            if partial is None:
                raise _CannotContinue
            budget = request.max_tokens
            if budget is not None:
                done = await asyncio.to_thread(provider.count_tokens, partial,
                                               model=request.model)
                budget -= done
                if budget < 1:
                    raise _CannotContinue
            request = request.model_copy(update={"continue_from": partial,
                                                 "max_tokens": budget})
        except (_CannotContinue, StreamLogError, TokenrelayError) as exc:
            log.info("stream %s: not taken over (%s)", stream_id,
                     exc if str(exc) else "its partial answer cannot be continued")
            await _let_go(producer)
            return None
        except BaseException:
            await _let_go(producer)
            raise
        self.gateway.metrics.take_overs.inc()
        log.warning("stream %s: its producer stopped after frame %d; this process"
                    " continues it", stream_id, producer.next_seq - 1)
        return Resumption(info=producer.info, producer=producer, request=request,
                          provider=provider, model=model,
                          route=self.gateway.router.route(model), partial=partial)


def record_lost(gateway: Gateway, info: StreamInfo, *, endpoint: str, answer: str,
                message: str) -> None:
    """Count and log a stream ended ``producer_lost`` here (its producer's process died,
    with the row it would have written): one ``interrupted`` row with the partial answer."""
    from .routing import label

    model = label(info.meta.get(MODEL_KEY, "-"))
    gateway.metrics.producer_losses.inc()
    gateway.metrics.requests.labels(endpoint, model, "interrupted").inc()
    if gateway.reqlog is None:
        return
    prompt = None
    raw = info.meta.get(REQUEST_KEY)
    if raw:
        try:
            prompt = [m.model_dump(exclude_none=True)
                      for m in Request.model_validate_json(raw).messages]
        except (ValidationError, ValueError):
            pass
    gateway.reqlog.record(
        key_id=info.owner, endpoint=endpoint, model=model, status="interrupted",
        http_status=200, prompt_tokens=0, completion_tokens=0, usage_estimated=1,
        time_to_first_token=None, duration=max(0.0, time.time() - info.created_at),
        prompt=prompt, answer=answer, error=f"producer_lost: {message}")


class _CannotContinue(Exception):
    pass


async def _let_go(producer: Producer) -> None:
    """Give a lease taken for nothing back: the caller ends the stream ``producer_lost``
    (``end_lost`` needs no producer holding it)."""
    try:
        await producer.release()
    except StreamLogError:
        pass
