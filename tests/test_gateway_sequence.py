"""One sequence per stream, the same for every endpoint: frames are numbered 0, 1, 2, …
and every SSE frame carries its number as ``id:`` (for ``/v1/responses`` it is also the
event's ``sequence_number``). The stream log stores frames under these numbers and a
resume names the last one it saw, so a gap, a repeat or a frame without an id would lose
or duplicate an event on resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import LiveGateway, gateway_config, mock_routes, sse_events

from tokenrelay.testing.mock_upstream import MockUpstream

#: (path, body) of each streaming endpoint; models: the in-process mock, a route to the
#: mock upstream, and each failing part-way (an error frame ends the stream).
ENDPOINTS = {
    "chat.completions": ("/v1/chat/completions",
                         lambda model: {"model": model, "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}],
                                        "stream_options": {"include_usage": True}}),
    "chat": ("/chat", lambda model: {"model": model, "prompt": "hi"}),
    "responses": ("/v1/responses",
                  lambda model: {"model": model, "input": "hi", "stream": True}),
}
MODELS = ["mock", "up", "mock:fault=error,after=2", "up-error"]


def _failing(model: str) -> bool:
    return model in ("mock:fault=error,after=2", "up-error")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    tmp: Path = tmp_path_factory.mktemp("gateway")
    with MockUpstream() as upstream:
        models = mock_routes(upstream.url, up="tokens=6", up_error="fault=error,after=2,tokens=6")
        with LiveGateway(gateway_config(tmp, models)) as gateway:
            yield gateway


def _frames(live: LiveGateway, endpoint: str, model: str) -> list[dict[str, str]]:
    path, body = ENDPOINTS[endpoint]
    with httpx.stream("POST", live.url + path, json=body(model), timeout=10) as response:
        assert response.status_code == 200
        return sse_events(response.read())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_every_frame_carries_the_next_number_from_zero(live: LiveGateway, endpoint: str,
                                                      model: str) -> None:
    frames = _frames(live, endpoint, model)
    assert len(frames) >= 3
    assert [frame.get("id") for frame in frames] == [str(n) for n in range(len(frames))]
    payloads: list[Any] = [f["data"] if f["data"] == "[DONE]" else json.loads(f["data"])
                           for f in frames]
    if endpoint == "responses":
        assert [p["sequence_number"] for p in payloads] == list(range(len(frames)))
    if endpoint == "chat.completions" and not _failing(model):
        assert payloads[-1] == "[DONE]"  # the end is a numbered frame too
    if _failing(model):  # the error frame is numbered like any other
        error = frames[-2] if endpoint == "responses" else frames[-1]
        assert "error" in error["data"]
