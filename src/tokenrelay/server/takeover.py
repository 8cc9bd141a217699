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
from .encode import ChunkEncoder, SimpleEncoder
from .response_snapshot import ResponseSnapshot, parse_frame
from .responses import ResponsesEncoder
from .routing import label
from .security import ANONYMOUS, GatewayHTTPError, Lease
from .sse import BreakConnection
from .streamlog import (
    Producer,
    ProducerLost,
    StreamInfo,
    StreamLog,
    StreamLogError,
    StreamNotFound,
)
from .streamlog.base import MAX_META_BYTES

if TYPE_CHECKING:
    from ..providers.base import Provider
    from .gateway import Gateway

__all__ = ["REQUEST_KEY", "ChatPartial", "Resumption", "StreamTakeOver", "TakeOver",
           "chat_partial", "record_lost", "response_text", "restart_meta", "stored_frames",
           "unlimited_lease"]

log = logging.getLogger("tokenrelay.server")

#: The stream record's meta keys: the core request (JSON) and the served model name.
REQUEST_KEY = "request"
MODEL_KEY = "model"
#: A taken-over chat stream goes on at least this long without a reader (the store counts
#: readers at each lease refresh, every 0.5 s: the one that took it over is not counted yet).
TAKE_OVER_GRACE_S = 3.0


def restart_meta(meta: Mapping[str, str], core: Request, log_: StreamLog) -> dict[str, str]:
    """``meta`` + the core request, when the store is shared by processes (one process's
    streams die with it: nothing to keep) and the whole still fits the record's cap (else
    ``meta`` alone: that stream cannot be taken over)."""
    out = dict(meta)
    if not log_.shared:
        return out
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


async def stored_frames(log_: StreamLog, stream_id: str, upto: int) -> list[bytes]:
    """Frames 0 … ``upto`` of a stream, as stored (fewer if the store lost some)."""
    frames: list[bytes] = []
    if upto < 0:
        return frames
    reader = await log_.reader(stream_id, after=-1, owner=None)
    try:
        while reader.cursor < upto and not reader.ended:
            try:
                batch = await reader.read(timeout=1.0)
            except ProducerLost:
                break
            if not batch.frames:
                break
            frames.extend(batch.frames)
    finally:
        await reader.aclose()
    return frames[:upto + 1]


@dataclass
class ChatPartial:
    """A chat stream's answer so far, rebuilt from its frames (chat completions chunks or
    ``/chat`` frames)."""

    text: str = ""
    #: From the first chunk (chat completions): its ``model`` and ``created``.
    model: str | None = None
    created: int | None = None
    #: A frame went out (a chunk with the role, for chat completions).
    started: bool = False
    #: Something else came (tool calls, a finish, an error, a frame not understood): the
    #: answer cannot be continued as text.
    other: bool = False


def chat_partial(endpoint: str, frames: list[bytes]) -> ChatPartial:
    """The answer so far of a chat completions / ``/chat`` stream (pure)."""
    out = ChatPartial()
    pieces: list[str] = []
    for data in frames:
        event = parse_frame(data)
        out.started = True
        if event is None:
            out.other = True
            continue
        if endpoint == "chat":
            text = event.get("text")
            if isinstance(text, str) and len(event) == 1:
                pieces.append(text)
            else:
                out.other = True
            continue
        choices = event.get("choices")
        if out.model is None and isinstance(event.get("model"), str):
            out.model = event["model"]
        if out.created is None and isinstance(event.get("created"), int):
            out.created = event["created"]
        choice = choices[0] if isinstance(choices, list) and len(choices) == 1 else None
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if (not isinstance(delta, dict) or choice.get("finish_reason") is not None  # type: ignore[union-attr]
                or delta.get("tool_calls")):
            out.other = True
            continue
        content = delta.get("content")
        if isinstance(content, str):
            pieces.append(content)
    out.text = "".join(pieces)
    return out


def record_lost(gateway: Gateway, info: StreamInfo, *, endpoint: str, answer: str,
                message: str) -> None:
    """Count and log a stream ended ``producer_lost`` here (its producer's process died,
    with the row it would have written): one ``interrupted`` row with the partial answer."""
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
        prompt=prompt, answer=answer, error=f"producer_lost: {message}",
        stream_id=info.id)


class StreamTakeOver(TakeOver):
    """Take-over and loss of the streams of every endpoint (chat completions, ``/chat``,
    ``/v1/responses``), for their readers (``delivery.py``, ``background.py``)."""

    def stopping(self) -> bool:
        """This process is shutting down, and others share the stream log: it takes no
        stream over (a stream it took would be handed off again at once)."""
        return self.gateway.streams.shared and self.gateway.drain.draining

    async def attempt(self, stream_id: str, endpoint: str) -> bool:
        """Continue the stream here if it can be: True (this process, or another, produces
        it now: read on), False (end it ``producer_lost``).

        Raises :class:`~.sse.BreakConnection` while this process shuts down (a stream
        handed off by it, or whose producer died meanwhile): the reader's client resumes
        on another process, which takes it over.
        """
        if self.stopping():
            raise BreakConnection(f"stream {stream_id}: this process is shutting down;"
                                  " resume on another")
        if endpoint == "responses":
            return await self._responses(stream_id)
        state: dict[str, ChatPartial] = {}
        log_ = self.gateway.streams

        async def partial_of(info: StreamInfo) -> str | None:
            frames = await stored_frames(log_, stream_id, info.last_seq)
            partial = chat_partial(endpoint, frames)
            if len(frames) != info.last_seq + 1 or partial.other:
                return None
            state["partial"] = partial
            return partial.text

        found = await self.begin(stream_id, partial_of)
        if not isinstance(found, Resumption):
            return found is True
        partial, meta = state["partial"], found.info.meta
        encoder: ChunkEncoder | SimpleEncoder
        if endpoint == "chat.completions":
            encoder = ChunkEncoder(partial.model or found.model,
                                   include_usage=meta.get("usage") == "1", route=found.route,
                                   id=stream_id, created=partial.created,
                                   role_sent=partial.started)
        else:
            encoder = SimpleEncoder(found.route)
        encoder.next_seq = found.producer.next_seq
        try:
            grace = float(meta.get("grace") or 0.0)
        except ValueError:
            grace = 0.0
        gw = self.gateway
        production = gw.produce_detached(
            gw.open(found.request, found.provider), encoder, found.producer,
            lease=unlimited_lease(), key_id=found.info.owner, endpoint=endpoint,
            model=label(found.model), route=found.route,
            grace=max(grace, TAKE_OVER_GRACE_S))
        production.answer_prefix = found.partial
        return True

    async def _responses(self, stream_id: str) -> bool:
        state: dict[str, Any] = {}
        log_ = self.gateway.streams

        async def partial_of(info: StreamInfo) -> str | None:
            snap = response_snapshot(await stored_frames(log_, stream_id, info.last_seq))
            obj = snap.object()
            if obj is None or snap.final is not None or snap.error is not None:
                return None
            items = obj.get("output") or []
            if len(items) > 1 or (items and not _open_message(items[0])):
                return None  # a tool call, or more than one item: not a text to go on
            state["response"] = obj
            return response_text(snap)

        found = await self.begin(stream_id, partial_of)
        if not isinstance(found, Resumption):
            return found is True
        response = state["response"]
        encoder = ResponsesEncoder.resumed(response, next_seq=found.producer.next_seq,
                                           route=found.route)
        if response.get("status") == "queued":
            # (it died between its two first frames)
            await found.producer.append(encoder.progress(), status="in_progress")
        gw = self.gateway
        production = gw.produce_detached(
            gw.open(found.request, found.provider), encoder, found.producer,
            lease=unlimited_lease(), key_id=found.info.owner, endpoint="responses",
            model=label(found.model), route=found.route)
        production.answer_prefix = found.partial
        return True

    async def lost(self, stream_id: str, endpoint: str, *, message: str) -> None:
        """A stream this process ended ``producer_lost``: its ``interrupted`` row."""
        log_ = self.gateway.streams
        try:
            info = await log_.info(stream_id, owner=None)
            if info is None:
                return
            frames = await stored_frames(log_, stream_id, info.last_seq - 1)
        except StreamLogError:
            return
        answer = (response_text(response_snapshot(frames)) if endpoint == "responses"
                  else chat_partial(endpoint, frames).text)
        record_lost(self.gateway, info, endpoint=endpoint, answer=answer, message=message)


def response_snapshot(frames: list[bytes]) -> ResponseSnapshot:
    snap = ResponseSnapshot()
    for data in frames:
        snap.feed(data)
    return snap


def _open_message(item: Any) -> bool:
    return (isinstance(item, dict) and item.get("type") == "message"
            and item.get("status") == "in_progress")


def response_text(snap: ResponseSnapshot) -> str:
    """The text of a response's (first) message so far."""
    for item in snap.items:
        if item.get("type") == "message":
            return "".join(str(p.get("text", "")) for p in item.get("content") or []
                           if isinstance(p, dict))
    return ""


class _CannotContinue(Exception):
    pass


async def _let_go(producer: Producer) -> None:
    """Give a lease taken for nothing back: the caller ends the stream ``producer_lost``
    (``end_lost`` needs no producer holding it)."""
    try:
        await producer.release()
    except StreamLogError:
        pass
