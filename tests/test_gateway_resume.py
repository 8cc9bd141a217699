"""Streams that outlive their connection: resume, grace, cancel (chat completions, /chat).

What must hold (README "Resuming streams", server/producing.py, server/delivery.py):

* every streamed answer has an id (its chunks' ``id``, the ``x-tokenrelay-stream-id``
  header) and SSE ids 0, 1, 2, …; a resume from any frame gets exactly the frames after it
  (none lost, none twice), then the live rest;
* without ``x-tokenrelay-resume-grace`` a disconnect aborts the upstream at once (as
  before) and the stream ends ``cancelled`` in the log; with it the answer goes on for a
  resume, and is aborted when the grace passes with nobody reading;
* ``POST …/cancel`` stops a running stream from another connection within 500 ms;
* only the creating key may resume or cancel (404 for anyone else), and every bad input is
  an OpenAI-style error naming it.

Live gateway over real sockets (a disconnect only shows there), mock upstream in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import LiveGateway, poll, sse_events
from _harness import gateway_config as config
from _harness import mock_routes as routes
from _redis import RedisServer, redis_prefix

from tokenrelay.server import hash_key
from tokenrelay.server.reqlog import RequestLog
from tokenrelay.testing.mock_upstream import MockUpstream, RequestRecord, token_text

SPECS = {
    "quick": "tokens=12",
    "paced": "tokens=30,tps=150",  # 0.2 s per answer: disconnects land mid-stream
    "slow": "tokens=400,tps=20",  # 20 s: stopped long before its end
    "failing": "tokens=4,fault=error,after=2",
}
#: How soon the upstream must see a stop (disconnect without grace, cancel, grace over).
ABORT_WITHIN = 0.5
GRACE = "x-tokenrelay-resume-grace"

MakeGateway = Callable[..., LiveGateway]


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


@pytest.fixture
def make_gateway(upstream: MockUpstream, tmp_path: Path) -> Iterator[MakeGateway]:
    upstream.reset()
    with ExitStack() as stack:
        def make(**options: Any) -> LiveGateway:
            return stack.enter_context(LiveGateway(config(tmp_path, routes(upstream.url,
                                                                           **SPECS), **options)))

        yield make


@pytest.fixture
def live(make_gateway: MakeGateway) -> LiveGateway:
    return make_gateway()


# -- helpers --------------------------------------------------------------------------------


def post_raw(port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
             ) -> socket.socket:
    """A raw socket that has sent a POST (a client that can vanish at any byte)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"%sContent-Length: %d\r\n\r\n%s" % (path.encode(), extra, len(data), data))
    return sock


def recv_bytes(sock: socket.socket, n: int, timeout: float = 5) -> bytes:
    """At least ``n`` bytes (fewer only at EOF)."""
    received = b""
    deadline = time.monotonic() + timeout
    while len(received) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            break
        received += data
    return received


def head_and_body(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Headers and de-chunked body received so far (a cut chunk is left out)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode().lower()] = value.decode().strip()
    body = b""
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0 or len(rest) < size:
            body += rest[:size] if size else b""
            break
        body += rest[:size]
        rest = rest[size + 2:]
    return headers, body


def complete_frames(body: bytes) -> list[dict[str, str]]:
    """The whole events in ``body`` (a frame cut by the disconnect is left out)."""
    whole = body[:body.rfind(b"\n\n") + 2] if b"\n\n" in body else b""
    return [e for e in sse_events(whole) if "id" in e]


def chunk_text(events: list[dict[str, str]]) -> str:
    text = ""
    for e in events:
        if e["data"] == "[DONE]":
            continue
        data = json.loads(e["data"])
        for choice in data.get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
    return text


def stream_all(url: str, *, headers: dict[str, str] | None = None,
               body: dict[str, Any] | None = None, path: str = "/v1/chat/completions",
               ) -> tuple[httpx.Response, list[dict[str, str]]]:
    """A whole streamed answer (POST) or resume (GET when ``body`` is None)."""
    with httpx.Client(timeout=10) as client:
        if body is None:
            with client.stream("GET", url + path, headers=headers) as r:
                raw = r.read()
        else:
            with client.stream("POST", url + path, json=body, headers=headers) as r:
                raw = r.read()
    return r, [e for e in sse_events(raw) if "id" in e]


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            **extra}


def aborted(model: str) -> Callable[[RequestRecord], bool]:
    return lambda r: r.model == SPECS[model] and r.aborted_at is not None


def error_of(event: dict[str, str]) -> dict[str, Any]:
    data = json.loads(event["data"])
    return dict(data.get("error", data))


def check_sequence(events: list[dict[str, str]], start: int = 0) -> None:
    ids = [int(e["id"]) for e in events]
    assert ids == list(range(start, start + len(ids))), ids


# -- the id, the header, replay -------------------------------------------------------------


def test_every_streamed_answer_has_an_id_and_replays_byte_for_byte(live: LiveGateway) -> None:
    r, events = stream_all(live.url, body=chat("quick"))
    stream_id = r.headers["x-tokenrelay-stream-id"]
    assert stream_id.startswith("chatcmpl-") and len(stream_id) == len("chatcmpl-") + 32
    check_sequence(events)
    chunks = [json.loads(e["data"]) for e in events if e["data"] != "[DONE]"]
    assert {c["id"] for c in chunks} == {stream_id}
    assert chunk_text(events) == token_text(12) and events[-1]["data"] == "[DONE]"

    # The whole stream again, and from any frame: exactly what followed it.
    _, again = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream")
    assert again == events
    for after in (0, 5, len(events) - 2):
        _, rest = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream"
                             f"?starting_after={after}")
        assert rest == events[after + 1:]
        _, rest = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream",
                             headers={"Last-Event-ID": str(after)})
        assert rest == events[after + 1:]
    (row,) = live.wait_log(lambda row: row["stream_id"] == stream_id)
    assert row["status"] == "ok"
    assert poll(lambda: live.log_rows()[0]["resumes"] == 7, 3), live.log_rows()[0]
    assert len([row for row in live.log_rows() if row["stream_id"] == stream_id]) == 1


def test_a_resume_of_a_live_stream_replays_then_follows(live: LiveGateway) -> None:
    sock = post_raw(live.port, "/v1/chat/completions", chat("slow"))
    try:
        raw = recv_bytes(sock, 1)
        deadline = time.monotonic() + 5
        while len(complete_frames(head_and_body(raw)[1])) < 4 and time.monotonic() < deadline:
            raw += recv_bytes(sock, 1)
        headers, body = head_and_body(raw)
        stream_id = headers["x-tokenrelay-stream-id"]
        seen = complete_frames(body)
        with httpx.Client(timeout=10) as client, client.stream(
                "GET", f"{live.url}/v1/chat/completions/{stream_id}/stream",
                headers={"Last-Event-ID": "1"}) as r:
            assert r.headers["x-tokenrelay-stream-id"] == stream_id
            got = b""
            for data in r.iter_bytes():
                got += data
                if len(complete_frames(got)) >= len(seen) + 3:
                    break
        resumed = complete_frames(got)
        check_sequence(resumed, 2)
        assert resumed[:len(seen) - 2] == seen[2:]  # the replay, then live frames
    finally:
        sock.close()


# -- disconnects ----------------------------------------------------------------------------


def resume_after_cut(live: LiveGateway, rng: random.Random, path: str = "/v1/chat/completions",
                     model: str = "paced") -> tuple[str, list[dict[str, str]]]:
    """Stream with a grace, vanish after a random number of bytes, resume from the last
    whole frame received: every frame once, in order."""
    sock = post_raw(live.port, path, chat(model) if path != "/chat" else
                    {"prompt": "hi", "model": model}, {GRACE: "30"})
    raw = recv_bytes(sock, rng.randint(1, 2500))
    sock.close()  # at any byte: in the headers, in a chunk's size line, mid-frame
    headers, body = head_and_body(raw)
    if "x-tokenrelay-stream-id" not in headers:  # cut inside the status line or headers
        return "", []
    stream_id = headers["x-tokenrelay-stream-id"]
    before = complete_frames(body)
    cursor = {} if not before else {"Last-Event-ID": before[-1]["id"]}
    _, after = stream_all(live.url, path=f"{path}/{stream_id}/stream", headers=cursor)
    events = before + after
    check_sequence(events)
    return stream_id, events


def test_random_disconnects_with_a_grace_lose_and_repeat_nothing(live: LiveGateway) -> None:
    rng = random.Random(1203)
    _, whole = stream_all(live.url, body=chat("paced"))
    expected = chunk_text(whole)
    ids = []
    for _ in range(10):
        stream_id, events = resume_after_cut(live, rng)
        if not stream_id:
            continue
        ids.append(stream_id)
        assert chunk_text(events) == expected and events[-1]["data"] == "[DONE]"
        assert [json.loads(e["data"])["id"] for e in events if e["data"] != "[DONE]"] == \
            [stream_id] * (len(events) - 1)
    assert len(ids) >= 5
    rows = live.wait_log(lambda row: row["stream_id"] in ids, count=len(ids))
    # One row per stream, whatever happened to its connections, completed, one resume.
    assert sorted(row["stream_id"] for row in rows) == sorted(ids)
    assert all(row["status"] == "ok" and row["answer"] == expected for row in rows)
    assert poll(lambda: all(row["resumes"] == 1 for row in live.log_rows()
                            if row["stream_id"] in ids), 3)
    assert poll(lambda: live.active() == 0, 3)


def test_simple_chat_resumes_too(live: LiveGateway) -> None:
    rng = random.Random(7)
    _, whole = stream_all(live.url, body={"prompt": "hi", "model": "paced"}, path="/chat")
    expected = "".join(json.loads(e["data"])["text"] for e in whole if e.get("event") == "text")
    assert whole[-1]["event"] == "done"
    done = 0
    for _ in range(4):
        stream_id, events = resume_after_cut(live, rng, path="/chat")
        if stream_id:
            assert stream_id.startswith("chat-")
            text = "".join(json.loads(e["data"])["text"] for e in events
                           if e.get("event") == "text")
            assert text == expected and events[-1]["event"] == "done"
            done += 1
    assert done >= 2


def test_without_a_grace_a_disconnect_aborts_and_the_stream_ends_cancelled(
        live: LiveGateway, upstream: MockUpstream) -> None:
    sock = post_raw(live.port, "/v1/chat/completions", chat("slow"))
    raw = recv_bytes(sock, 1)
    while len(complete_frames(head_and_body(raw)[1])) < 3:
        raw += recv_bytes(sock, 1)
    stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
    closed_at = time.monotonic()
    sock.close()
    record = upstream.wait_for(aborted("slow"), 3)
    assert record is not None and record.aborted_at - closed_at < ABORT_WITHIN
    # The log has the stream's end: the frames sent, then a typed cancelled end.
    _, events = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream")
    check_sequence(events)
    assert error_of(events[-1])["code"] == "cancelled"
    assert chunk_text(events[:-1]).startswith(token_text(2))
    (row,) = live.wait_log(lambda row: row["stream_id"] == stream_id)
    assert row["status"] == "cancelled"


def test_the_grace_ends_with_nobody_resuming_and_aborts_the_upstream(
        make_gateway: MakeGateway, upstream: MockUpstream) -> None:
    live = make_gateway()
    sock = post_raw(live.port, "/v1/chat/completions", chat("slow"), {GRACE: "1"})
    raw = recv_bytes(sock, 1)
    while len(complete_frames(head_and_body(raw)[1])) < 2:
        raw += recv_bytes(sock, 1)
    stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
    closed_at = time.monotonic()
    sock.close()
    time.sleep(0.7)
    assert upstream.wait_for(aborted("slow"), 0.01) is None, "aborted before the grace ended"
    record = upstream.wait_for(aborted("slow"), 3)
    assert record is not None
    took = record.aborted_at - closed_at  # type: ignore[operator]
    assert 1.0 <= took < 1.0 + ABORT_WITHIN, took
    _, events = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream")
    check_sequence(events)
    end = error_of(events[-1])
    assert end["code"] == "cancelled" and "grace" in end["message"]
    (row,) = live.wait_log(lambda row: row["stream_id"] == stream_id)
    assert row["status"] == "cancelled" and row["http_status"] == 200
    assert poll(lambda: live.active() == 0, 3)


def test_a_reader_attached_keeps_a_detached_stream_going(
        make_gateway: MakeGateway, upstream: MockUpstream) -> None:
    live = make_gateway()
    sock = post_raw(live.port, "/v1/chat/completions", chat("slow"), {GRACE: "0.5"})
    raw = recv_bytes(sock, 1)
    while "x-tokenrelay-stream-id" not in head_and_body(raw)[0]:
        raw += recv_bytes(sock, 1)
    stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
    sock.close()
    with httpx.Client(timeout=10) as client, client.stream(
            "GET", f"{live.url}/v1/chat/completions/{stream_id}/stream") as r:
        started = time.monotonic()
        got = b""
        for data in r.iter_bytes():  # 1.5 s, three times the grace, attached
            got += data
            if time.monotonic() - started > 1.5:
                break
    assert upstream.wait_for(aborted("slow"), 0.01) is None, "aborted with a reader attached"
    check_sequence(complete_frames(got))
    # The reader left: the grace runs again from then.
    left_at = time.monotonic()
    record = upstream.wait_for(aborted("slow"), 3)
    assert record is not None and record.aborted_at - left_at < 0.5 + ABORT_WITHIN


# -- cancel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat"])
def test_cancel_from_another_connection_stops_the_stream(
        live: LiveGateway, upstream: MockUpstream, path: str) -> None:
    body = chat("slow") if path != "/chat" else {"prompt": "hi", "model": "slow"}
    sock = post_raw(live.port, path, body)
    raw = recv_bytes(sock, 1)
    while len(complete_frames(head_and_body(raw)[1])) < 2:
        raw += recv_bytes(sock, 1)
    stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
    asked_at = time.monotonic()
    r = httpx.post(f"{live.url}{path}/{stream_id}/cancel", json={}, timeout=5)
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["id"] == stream_id and state["status"] == "cancelled"
    record = upstream.wait_for(aborted("slow"), 3)
    assert record is not None and record.aborted_at - asked_at < ABORT_WITHIN
    # The attached client got the typed end, then the end of the response.
    raw += sock.recv(65536) if not raw.endswith(b"0\r\n\r\n") else b""
    deadline = time.monotonic() + 3
    while not raw.endswith(b"\r\n0\r\n\r\n") and time.monotonic() < deadline:
        raw += recv_bytes(sock, 1, timeout=max(0.01, deadline - time.monotonic()))
    sock.close()
    events = complete_frames(head_and_body(raw)[1])
    check_sequence(events)
    assert error_of(events[-1])["code"] == "cancelled"
    if path == "/chat":
        assert events[-1]["event"] == "error"
    # Idempotent: the final state again.
    again = httpx.post(f"{live.url}{path}/{stream_id}/cancel", json={}, timeout=5)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert again.json()["last_event_id"] == int(events[-1]["id"])
    (row,) = live.wait_log(lambda row: row["stream_id"] == stream_id)
    assert row["status"] == "cancelled"
    metrics = httpx.get(f"{live.url}/metrics").text
    endpoint = "chat" if path == "/chat" else "chat.completions"
    assert f'tokenrelay_stream_cancels_total{{endpoint="{endpoint}"}} 1.0' in metrics


def test_cancel_stops_a_detached_stream(live: LiveGateway, upstream: MockUpstream) -> None:
    sock = post_raw(live.port, "/v1/chat/completions", chat("slow"), {GRACE: "60"})
    raw = recv_bytes(sock, 1)
    while len(complete_frames(head_and_body(raw)[1])) < 2:
        raw += recv_bytes(sock, 1)
    stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
    sock.close()
    time.sleep(0.3)
    assert upstream.wait_for(aborted("slow"), 0.01) is None  # going on, detached
    asked_at = time.monotonic()
    r = httpx.post(f"{live.url}/v1/chat/completions/{stream_id}/cancel", json={}, timeout=5)
    assert r.json()["status"] == "cancelled"
    record = upstream.wait_for(aborted("slow"), 3)
    assert record is not None and record.aborted_at - asked_at < ABORT_WITHIN
    _, events = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream")
    check_sequence(events)
    assert error_of(events[-1])["code"] == "cancelled"
    assert poll(lambda: live.active() == 0, 3)


def test_a_finished_stream_answers_its_final_state(live: LiveGateway) -> None:
    r, events = stream_all(live.url, body=chat("quick"))
    stream_id = r.headers["x-tokenrelay-stream-id"]
    answer = httpx.post(f"{live.url}/v1/chat/completions/{stream_id}/cancel", json={})
    assert answer.status_code == 200
    assert answer.json() == {**answer.json(), "id": stream_id, "status": "completed",
                             "last_event_id": len(events) - 1, "cancel_requested": False}
    r, events = stream_all(live.url, body=chat("failing"))
    stream_id = r.headers["x-tokenrelay-stream-id"]
    assert error_of(events[-1])["code"]
    answer = httpx.post(f"{live.url}/v1/chat/completions/{stream_id}/cancel", json={})
    assert answer.json()["status"] == "failed"


# -- owner binding, bad input ---------------------------------------------------------------


def test_only_the_creating_key_may_resume_or_cancel(make_gateway: MakeGateway) -> None:
    keys = [{"id": "alice", "sha256": hash_key("sk-alice")},
            {"id": "bob", "sha256": hash_key("sk-bob")}]
    live = make_gateway(keys=keys)
    alice = {"Authorization": "Bearer sk-alice"}
    bob = {"Authorization": "Bearer sk-bob"}
    r, events = stream_all(live.url, body=chat("quick"), headers=alice)
    stream_id = r.headers["x-tokenrelay-stream-id"]
    for method, path in (("GET", "stream"), ("POST", "cancel")):
        url = f"{live.url}/v1/chat/completions/{stream_id}/{path}"
        other = httpx.request(method, url, headers=bob, json={} if method == "POST" else None)
        unknown = httpx.request(method, url.replace(stream_id[-6:], "abcdef"), headers=alice,
                                json={} if method == "POST" else None)
        # Another key's stream and an unknown one look exactly alike.
        assert other.status_code == unknown.status_code == 404
        assert other.json()["error"]["code"] == unknown.json()["error"]["code"] == \
            "stream_not_found"
        assert httpx.request(method, url, json={} if method == "POST" else None
                             ).status_code == 401
    _, again = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream",
                          headers=alice)
    assert again == events


def test_bad_input_is_an_error_naming_it(live: LiveGateway) -> None:
    r, events = stream_all(live.url, body=chat("quick"))
    stream_id = r.headers["x-tokenrelay-stream-id"]
    base = f"{live.url}/v1/chat/completions"

    def error(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        return dict(response.json()["error"])

    for bad in ("x", "-5", "1.5", "99999999999999999999", "٣"):
        e = error(httpx.get(f"{base}/{stream_id}/stream",
                            headers={"Last-Event-ID": bad.encode()}), 400)
        assert e["param"] == "Last-Event-ID" and "Last-Event-ID" in e["message"]
        e = error(httpx.get(f"{base}/{stream_id}/stream", params={"starting_after": bad}), 400)
        assert e["param"] == "starting_after"
    # Beyond the end of a stream that has ended: nothing will ever come.
    e = error(httpx.get(f"{base}/{stream_id}/stream",
                        params={"starting_after": len(events) + 3}), 400)
    assert e["param"] == "starting_after"
    # Unknown ids, malformed ids, another endpoint's id: 404.
    for other in ("chatcmpl-" + "0" * 32, "short", "a" * 200, "chatcmpl-%2e%2e"):
        assert error(httpx.get(f"{base}/{other}/stream"), 404)["code"] == "stream_not_found"
        assert error(httpx.post(f"{base}/{other}/cancel", json={}), 404)["param"] == "id"
    assert error(httpx.get(f"{live.url}/chat/{stream_id}/stream"), 404)
    # The grace header.
    for bad in ("soon", "-1", "nan", "inf", "1" * 40):
        e = error(httpx.post(base, json=chat("quick"), headers={GRACE: bad}), 400)
        assert e["param"] == GRACE and GRACE in e["message"]
    rows = live.wait_log(lambda row: row["status"] == "refused", count=5)
    assert rows


def test_starting_after_beyond_a_live_stream_waits_for_it(live: LiveGateway) -> None:
    sock = post_raw(live.port, "/v1/chat/completions", chat("paced"), {GRACE: "5"})
    raw = recv_bytes(sock, 1)
    while "x-tokenrelay-stream-id" not in head_and_body(raw)[0]:
        raw += recv_bytes(sock, 1)
    stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
    try:
        _, events = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream"
                               "?starting_after=20")
        check_sequence(events, 21)
        assert events[-1]["data"] == "[DONE]"
    finally:
        sock.close()


def test_the_grace_is_capped_by_the_config(make_gateway: MakeGateway,
                                           upstream: MockUpstream) -> None:
    live = make_gateway(streams={"max_resume_grace_s": 0.3})
    sock = post_raw(live.port, "/v1/chat/completions", chat("slow"), {GRACE: "3600"})
    raw = recv_bytes(sock, 1)
    while len(complete_frames(head_and_body(raw)[1])) < 1:
        raw += recv_bytes(sock, 1)
    closed_at = time.monotonic()
    sock.close()
    record = upstream.wait_for(aborted("slow"), 3)
    assert record is not None and record.aborted_at - closed_at < 0.3 + ABORT_WITHIN


def test_metrics_count_resumes_and_replayed_frames(live: LiveGateway) -> None:
    r, events = stream_all(live.url, body=chat("quick"))
    stream_id = r.headers["x-tokenrelay-stream-id"]
    stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream?starting_after=3")
    text = httpx.get(f"{live.url}/metrics").text
    assert 'tokenrelay_stream_resumes_total{endpoint="chat.completions"} 1.0' in text
    replayed = len(events) - 4
    assert f'tokenrelay_stream_replayed_frames_total{{endpoint="chat.completions"}}' \
           f' {replayed:.1f}' in text


def test_the_request_log_gains_its_stream_columns_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("""CREATE TABLE requests (id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at REAL NOT NULL, key_id TEXT NOT NULL, endpoint TEXT NOT NULL,
        model TEXT NOT NULL, status TEXT NOT NULL, http_status INTEGER,
        prompt_tokens INTEGER, completion_tokens INTEGER, usage_estimated INTEGER,
        time_to_first_token REAL, duration REAL, prompt TEXT, answer TEXT, error TEXT)""")
    db.execute("INSERT INTO requests (created_at, key_id, endpoint, model, status)"
               " VALUES (1, 'k', 'chat', 'm', 'ok')")
    db.commit()
    db.close()
    reqlog = RequestLog(path)
    try:
        reqlog.record(key_id="k", endpoint="chat", model="m", status="ok", stream_id="s1")
        reqlog.add_resume("s1")
        reqlog.add_resume("s1")
        reqlog.flush()
        rows = reqlog.rows()
        assert [(r["stream_id"], r["resumes"]) for r in rows] == [("s1", 2), (None, 0)]
    finally:
        reqlog.close()
    RequestLog(path).close()  # opened again: nothing to add


# -- the Redis store ------------------------------------------------------------------------


def test_resume_and_cancel_with_the_redis_store(make_gateway: MakeGateway,
                                                upstream: MockUpstream,
                                                redis_server: RedisServer) -> None:
    live = make_gateway(streams={"store": "redis", "redis_url": redis_server.url,
                                 "redis_prefix": redis_prefix()})
    rng = random.Random(99)
    _, whole = stream_all(live.url, body=chat("paced"))
    check_sequence(whole)
    expected = chunk_text(whole)
    resumed = 0
    for _ in range(5):
        stream_id, events = resume_after_cut(live, rng)
        if stream_id:
            assert chunk_text(events) == expected and events[-1]["data"] == "[DONE]"
            resumed += 1
    assert resumed >= 3
    sock = post_raw(live.port, "/v1/chat/completions", chat("slow"))
    raw = recv_bytes(sock, 1)
    while len(complete_frames(head_and_body(raw)[1])) < 2:
        raw += recv_bytes(sock, 1)
    stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
    asked_at = time.monotonic()
    r = httpx.post(f"{live.url}/v1/chat/completions/{stream_id}/cancel", json={}, timeout=5)
    assert r.json()["status"] == "cancelled"
    record = upstream.wait_for(aborted("slow"), 3)
    assert record is not None and record.aborted_at - asked_at < ABORT_WITHIN
    sock.close()
    _, events = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream")
    check_sequence(events)
    assert error_of(events[-1])["code"] == "cancelled"


def test_a_shutdown_ends_a_detached_stream_with_the_shutdown_error(
        upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.reset()
    cfg = config(tmp_path, routes(upstream.url, **SPECS), drain_timeout_s=0.5)
    with LiveGateway(cfg) as live:
        sock = post_raw(live.port, "/v1/chat/completions", chat("slow"), {GRACE: "60"})
        raw = recv_bytes(sock, 1)
        while len(complete_frames(head_and_body(raw)[1])) < 2:
            raw += recv_bytes(sock, 1)
        stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
        sock.close()
        time.sleep(0.2)
        assert live.active() == 1  # producing, with nobody attached
        stopped_at = time.monotonic()
    assert time.monotonic() - stopped_at < 5
    record = upstream.wait_for(aborted("slow"), 3)
    assert record is not None
    db = sqlite3.connect(tmp_path / "requests.db")
    try:
        (status, error) = db.execute("SELECT status, error FROM requests WHERE stream_id = ?",
                                     (stream_id,)).fetchone()
    finally:
        db.close()
    assert status == "error" and error.startswith("server_shutdown")

    async def stored() -> list[bytes]:  # the stream log (memory) outlives the server
        reader = await live.gateway.streams.reader(stream_id, owner=None)
        assert reader.ended is False
        return [frame.data async for frame in reader]

    events = [e for e in sse_events(b"".join(asyncio.run(stored()))) if "id" in e]
    check_sequence(events)
    assert error_of(events[-1])["code"] == "server_shutdown"


def test_a_reader_of_a_stream_whose_producer_is_gone_gets_producer_lost(
        live: LiveGateway) -> None:
    frames = [b'id: 0\ndata: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
              b'id: 1\ndata: {"choices":[{"index":0,"delta":{"content":"b"}}]}\n\n']

    async def orphan() -> str:
        # A producer that dies without finishing (as a crashed process's would).
        producer = await live.gateway.streams.create(
            owner="anonymous", endpoint="chat.completions", id_prefix="chatcmpl-",
            status="in_progress")
        await producer.append(frames)
        await producer.release()
        return producer.stream_id

    stream_id = live.call(orphan())
    for _ in range(2):  # the first reader writes the end, the second reads it
        _, events = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream")
        check_sequence(events)
        assert [e["data"] for e in events[:2]] == [f[f.index(b"data: ") + 6:-2].decode()
                                                   for f in frames]
        assert len(events) == 3 and error_of(events[2])["code"] == "producer_lost"
    _, events = stream_all(live.url, path=f"/chat/{stream_id}/stream")
    assert not events  # another endpoint's stream: 404 (no events)
    text = httpx.get(f"{live.url}/metrics").text
    assert "tokenrelay_stream_producer_losses_total 1.0" in text


def test_a_producer_whose_redis_lease_lapsed_takes_it_back_and_goes_on(
        make_gateway: MakeGateway, redis_server: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    import redis

    caplog.set_level(logging.WARNING, logger="tokenrelay.server")

    prefix = redis_prefix()
    live = make_gateway(streams={"store": "redis", "redis_url": redis_server.url,
                                 "redis_prefix": prefix})
    _, whole = stream_all(live.url, body=chat("paced"))
    sock = post_raw(live.port, "/v1/chat/completions", chat("paced"))
    raw = recv_bytes(sock, 1)
    while len(complete_frames(head_and_body(raw)[1])) < 3:
        raw += recv_bytes(sock, 1)
    stream_id = head_and_body(raw)[0]["x-tokenrelay-stream-id"]
    # As if this process had stalled past its lease: the lease key is gone.
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.delete(f"{prefix}{{{stream_id}}}:l") == 1
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while not raw.endswith(b"\r\n0\r\n\r\n") and time.monotonic() < deadline:
        raw += recv_bytes(sock, 1, timeout=max(0.01, deadline - time.monotonic()))
    sock.close()
    events = complete_frames(head_and_body(raw)[1])
    check_sequence(events)
    assert chunk_text(events) == chunk_text(whole) and events[-1]["data"] == "[DONE]"
    _, again = stream_all(live.url, path=f"/v1/chat/completions/{stream_id}/stream")
    assert again == events
    assert any("taken back" in r.getMessage() for r in caplog.records), caplog.text


def test_a_page_on_another_origin_may_ask_for_a_grace_and_read_the_stream_id(
        make_gateway: MakeGateway) -> None:
    live = make_gateway(cors_origins=["https://app.example"])
    origin = {"Origin": "https://app.example"}
    preflight = httpx.options(f"{live.url}/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-tokenrelay-resume-grace"})
    assert preflight.status_code == 200
    assert "x-tokenrelay-resume-grace" in preflight.headers["access-control-allow-headers"]
    r, _ = stream_all(live.url, body=chat("quick"), headers={**origin, GRACE: "5"})
    assert "x-tokenrelay-stream-id" in r.headers["access-control-expose-headers"]
    stream_id = r.headers["x-tokenrelay-stream-id"]
    preflight = httpx.options(f"{live.url}/v1/chat/completions/{stream_id}/stream", headers={
        **origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id"})
    assert preflight.status_code == 200


def test_the_openapi_document_describes_resume_and_cancel() -> None:
    from tokenrelay.server.openapi import openapi_document

    paths = openapi_document(auth=True)["paths"]
    for prefix in ("/v1/chat/completions", "/chat"):
        resume = paths[f"{prefix}/{{id}}/stream"]["get"]
        assert {p["name"] for p in resume["parameters"]} == {"id", "starting_after",
                                                             "Last-Event-ID"}
        assert {"200", "400", "404"} <= set(resume["responses"])
        cancel = paths[f"{prefix}/{{id}}/cancel"]["post"]
        assert cancel["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/StreamState"}
        create = paths[prefix]["post"]
        assert "x-tokenrelay-resume-grace" in {p["name"] for p in create["parameters"]}
        assert "x-tokenrelay-stream-id" in create["responses"]["200"]["headers"]
