#!/usr/bin/env python
"""The floor for bench_gateway.py: the least a re-serialising SSE relay can do.

    .venv/bin/python bench/minimal_relay.py --port 8001 --upstream http://127.0.0.1:9000/v1
    .venv/bin/python bench/minimal_relay.py ... --raw --server granian --workers 2

``--server granian`` runs the same ASGI callable under Granian (a Rust HTTP server, its
own process manager) instead of uvicorn; ``--workers N`` runs N processes of either on
the port (bench/bench_workers.py compares them).

The stack DEVELOPERS.md measured at ≈ 50 µs per relayed chunk (uvicorn + httptools +
uvloop, Starlette, an aiohttp upstream client, orjson) and nothing else: no auth, no
validation, no limits, no metrics, no event model, no timeouts, no disconnect handling
beyond what Starlette does. Each upstream SSE frame is parsed and re-serialised (as the
gateway must: never raw upstream bytes) and written as soon as it is read. It is not a
product; it is the reference that says how much of tokenrelay's cost per chunk is the
stack's and how much is tokenrelay's own.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def create_app(upstream: str) -> Starlette:
    session: aiohttp.ClientSession | None = None

    async def chat(request: Request) -> Response:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4096))
        body = await request.body()
        response = await session.post(f"{upstream}/chat/completions", data=body,
                                      headers={"content-type": "application/json"})

        async def frames() -> AsyncIterator[bytes]:
            buffer = b""
            try:
                async for data in response.content.iter_any():
                    buffer += data
                    while b"\n\n" in buffer:
                        frame, buffer = buffer.split(b"\n\n", 1)
                        if not frame.startswith(b"data: "):
                            continue
                        payload = frame[6:]
                        if payload == b"[DONE]":
                            yield b"data: [DONE]\n\n"
                            continue
                        yield b"data: " + orjson.dumps(orjson.loads(payload)) + b"\n\n"
            finally:
                response.release()

        return StreamingResponse(frames(), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return Response(b'{"status": "ok"}', media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/healthz", health)])


def create_raw_app(upstream: str) -> object:
    """The same relay as a bare ASGI callable: no Starlette (no routing, no middleware,
    no send wrappers), uvicorn calling it directly. The floor below the floor."""
    session: aiohttp.ClientSession | None = None
    headers = [(b"content-type", b"text/event-stream")]

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        nonlocal session
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"status": "ok"}'})  # type: ignore[operator]
            return
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4096))
        body = b""
        while True:
            message = await receive()  # type: ignore[operator]
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        response = await session.post(f"{upstream}/chat/completions", data=body,
                                      headers={"content-type": "application/json"})
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        buffer = b""
        content = response.content
        while True:
            data = await content.readany()
            if not data:
                break
            buffer += data
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                if not frame.startswith(b"data: "):
                    continue
                payload = frame[6:]
                out = (b"data: [DONE]\n\n" if payload == b"[DONE]" else
                       b"data: " + orjson.dumps(orjson.loads(payload)) + b"\n\n")
                await send({"type": "http.response.body", "body": out, "more_body": True})  # type: ignore[operator]
        response.release()
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    return app


def raw_from_env() -> object:
    """``create_raw_app`` for servers that import their app by name in each worker."""
    import os

    return create_raw_app(os.environ["MINIMAL_RELAY_UPSTREAM"])


def starlette_from_env() -> object:
    import os

    return create_app(os.environ["MINIMAL_RELAY_UPSTREAM"])


def serve(upstream: str, port: int, *, raw: bool, server: str, workers: int) -> None:
    import os
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    if server == "uvicorn" and workers == 1:
        app = create_raw_app(upstream) if raw else create_app(upstream)
        uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop",  # type: ignore[arg-type]
                    http="httptools", log_level="warning", access_log=False, backlog=4096)
        return
    # Several processes import the app by name: this directory on their path.
    os.environ["MINIMAL_RELAY_UPSTREAM"] = upstream
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, here)
    target = "minimal_relay:" + ("raw_from_env" if raw else "starlette_from_env")
    if server == "uvicorn":
        uvicorn.run(target, factory=True, workers=workers, app_dir=here, host="127.0.0.1",
                    port=port, loop="uvloop", http="httptools", log_level="warning",
                    access_log=False, backlog=4096)
        return
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops

    Granian(target, factory=True, address="127.0.0.1", port=port, workers=workers,
            interface=Interfaces.ASGINL, loop=Loops.uvloop, http=HTTPModes.http1,
            websockets=False, backlog=4096, log_level="warning",  # type: ignore[arg-type]
            working_dir=Path(here)).serve()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream API root (…/v1)")
    parser.add_argument("--raw", action="store_true", help="a bare ASGI app, no Starlette")
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn",
                        help="the HTTP server and process manager [uvicorn]")
    parser.add_argument("--workers", type=int, default=1, help="processes [1]")
    args = parser.parse_args()
    serve(args.upstream, args.port, raw=args.raw, server=args.server, workers=args.workers)
