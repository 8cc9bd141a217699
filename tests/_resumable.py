"""A scripted loopback server that keeps streamed answers after their connection breaks,
speaking the two resume protocols the library knows (``providers/_resume.py``):

* OpenAI background responses: ``POST /v1/responses`` with ``background: true`` streams
  events carrying ``sequence_number`` (no SSE ids, as OpenAI sends them) and the
  response's id in ``response.created``; ``GET /v1/responses/{id}?stream=true&
  starting_after=N`` replays what came after N and follows live; ``POST …/cancel``;
* the tokenrelay gateway's chat protocol (``x-tokenrelay-stream-id``, SSE ids,
  ``GET /v1/chat/completions/{id}/stream`` + ``Last-Event-ID``, ``POST …/{id}/cancel``),
  for unit checks; the live gateway is what the end-to-end tests use.

Answers are produced by a task of their own, whatever happens to connections. Each
answer's text is ``"w0 w1 … w{N-1} "``. ``tokens`` and ``tps`` come from the model name
(``"m:tokens=40,tps=200"``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

__all__ = ["ResumableServer", "expected_text"]


def expected_text(tokens: int) -> str:
    return "".join(f"w{i} " for i in range(tokens))


def _options(model: str) -> tuple[int, float]:
    opts = dict(p.split("=", 1) for p in model.partition(":")[2].split(",") if "=" in p)
    return int(opts.get("tokens", 20)), float(opts.get("tps", 200))


@dataclass
class _Answer:
    frames: list[bytes] = field(default_factory=list)
    ended: bool = False
    cancelled: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def add(self, frame: bytes, *, end: bool = False) -> None:
        self.frames.append(frame)
        self.ended = self.ended or end
        self.changed.set()
        self.changed = asyncio.Event()


class ResumableServer:
    def __init__(self) -> None:
        self.answers: dict[str, _Answer] = {}
        #: Requests seen: (method, path, Last-Event-ID or starting_after, grace header).
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        self.port = 0
        #: How the chat replay answers instead, when set: (status, content type, body).
        self.replay_answer: tuple[int, str, bytes] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/chat/completions/{id}/stream", self._chat_replay)
        app.router.add_post("/v1/chat/completions/{id}/cancel", self._cancel)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/responses/{id}", self._responses_replay)
        app.router.add_post("/v1/responses/{id}/cancel", self._cancel)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        for answer in self.answers.values():
            if answer.task is not None:
                answer.task.cancel()
        assert self._runner is not None
        await self._runner.cleanup()

    def _log(self, request: web.Request, cursor: str | None) -> None:
        self.requests.append((request.method, request.path, cursor,
                              request.headers.get("x-tokenrelay-resume-grace")))

    # -- producing --------------------------------------------------------------------

    async def _produce_chat(self, sid: str, answer: _Answer, tokens: int, tps: float) -> None:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return json.dumps({"id": sid, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish}]}).encode()

        def frame(data: bytes) -> bytes:
            return b"id: %d\ndata: %s\n\n" % (len(answer.frames), data)

        for i in range(tokens):
            await asyncio.sleep(1 / tps)
            delta = {"content": f"w{i} "}
            if i == 0:
                delta["role"] = "assistant"
            answer.add(frame(chunk(delta)))
        answer.add(frame(chunk({}, "stop")))
        answer.add(frame(b"[DONE]"), end=True)

    async def _produce_response(self, rid: str, answer: _Answer, tokens: int,
                                tps: float) -> None:
        def event(obj: dict[str, Any]) -> None:
            obj["sequence_number"] = len(answer.frames)
            last = obj["type"] in ("response.completed", "response.cancelled")
            answer.add(b"event: %s\ndata: %s\n\n" % (obj["type"].encode(),
                                                     json.dumps(obj).encode()), end=last)

        response = {"id": rid, "object": "response", "status": "in_progress", "output": []}
        event({"type": "response.created", "response": response})
        event({"type": "response.in_progress", "response": response})
        for i in range(tokens):
            await asyncio.sleep(1 / tps)
            event({"type": "response.output_text.delta", "output_index": 0,
                   "content_index": 0, "delta": f"w{i} "})
        event({"type": "response.completed", "response": {
            **response, "status": "completed",
            "usage": {"input_tokens": 3, "output_tokens": tokens}}})

    # -- endpoints --------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._log(request, None)
        body = await request.json()
        sid = "chatcmpl-" + uuid.uuid4().hex
        answer = self.answers[sid] = _Answer()
        answer.task = asyncio.ensure_future(self._produce_chat(sid, answer,
                                                               *_options(body["model"])))
        return await self._follow(request, answer, 0, {"x-tokenrelay-stream-id": sid})

    async def _chat_replay(self, request: web.Request) -> web.StreamResponse:
        cursor = request.headers.get("Last-Event-ID")
        self._log(request, cursor)
        answer = self.answers.get(request.match_info["id"])
        if self.replay_answer is not None:
            status, content_type, body = self.replay_answer
            return web.Response(status=status, body=body, content_type=content_type)
        if answer is None:
            return web.json_response({"error": {"message": "no such stream"}}, status=404)
        return await self._follow(request, answer, int(cursor or -1) + 1, {})

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        self._log(request, None)
        body = await request.json()
        assert body.get("background") is True and body.get("store") is True, body
        rid = "resp_" + uuid.uuid4().hex
        answer = self.answers[rid] = _Answer()
        answer.task = asyncio.ensure_future(self._produce_response(
            rid, answer, *_options(body["model"])))
        return await self._follow(request, answer, 0, {})

    async def _responses_replay(self, request: web.Request) -> web.StreamResponse:
        cursor = request.query.get("starting_after")
        self._log(request, cursor)
        answer = self.answers.get(request.match_info["id"])
        if answer is None or request.query.get("stream") != "true":
            return web.json_response({"error": {"message": "no such response"}}, status=404)
        return await self._follow(request, answer, int(cursor or -1) + 1, {})

    async def _cancel(self, request: web.Request) -> web.Response:
        self._log(request, None)
        answer = self.answers.get(request.match_info["id"])
        if answer is None:
            return web.json_response({"error": {"message": "no such stream"}}, status=404)
        if not answer.ended and answer.task is not None:
            answer.task.cancel()
            answer.cancelled = True
            answer.add(b"id: %d\ndata: %s\n\n" % (len(answer.frames), json.dumps(
                {"error": {"message": "cancelled", "code": "cancelled"}}).encode()), end=True)
        return web.json_response({"id": request.match_info["id"], "cancelled": True})

    async def _follow(self, request: web.Request, answer: _Answer, start: int,
                      headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await response.prepare(request)
        at = start
        try:
            while True:
                while at < len(answer.frames):
                    await response.write(answer.frames[at])
                    at += 1
                if answer.ended:
                    break
                await answer.changed.wait()
        except ConnectionError:
            pass  # the client went away; the answer goes on
        return response
