"""The library resumes a broken stream where the server keeps it (issue 12 §5).

A TCP proxy on loopback (``_cutproxy.py``) breaks the client's connection at random byte
counts (RST, FIN, or a silent stall); the library reconnects (``Last-Event-ID`` /
``starting_after``) and the caller sees one stream: the text of an uninterrupted run, no
event twice, ``result.resumes`` counted. Servers: the real gateway (``LiveGateway``, the
mock model) for chat completions and background responses; ``_resumable.py`` (a scripted
server) where a test must see the requests themselves; ``_upstream.Upstream`` (a server
that cannot resume) for the behaviour that must not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from _cutproxy import Cut, CutProxy
from _harness import LiveGateway, gateway_config, mock_routes, poll
from _pty import tokenrelay as tokenrelay_cli
from _resumable import ResumableServer, expected_text
from _upstream import Upstream

import tokenrelay
from tokenrelay.errors import StreamError, UsageError
from tokenrelay.providers._openai_wire import ChatChunkParser
from tokenrelay.providers._resume import stream_id
from tokenrelay.providers.base import Provider
from tokenrelay.providers.openai_compat import OpenAIProvider
from tokenrelay.providers.openai_responses import OpenAIResponsesProvider, ResponsesEventParser
from tokenrelay.request import RetryPolicy, Timeouts
from tokenrelay.testing.mock_upstream import MockUpstream

MODEL = "mock:tokens=40,tps=400"
FAST = RetryPolicy(backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    """The gateway: the scripted ``mock``, and ``relayed`` (the same answers, relayed from
    a mock upstream: a name the CLI sends to an endpoint)."""
    with MockUpstream() as upstream:
        routes = mock_routes(upstream.url, relayed="tokens=40,tps=400")
        config = gateway_config(tmp_path_factory.mktemp("reqlog"), routes)
        with LiveGateway(config) as live:
            yield live


@pytest.fixture(scope="module")
def scripted() -> Iterator[ResumableServer]:
    with ResumableServer() as server:
        yield server


@dataclass
class Target:
    """A server that keeps answers, and how the library talks to it."""

    port: int
    make: Callable[[str], Provider]
    model: str = MODEL
    extra: dict[str, Any] = field(default_factory=dict)
    #: Where the first text frame ends in the bytes of a connection (cuts go after it).
    marker: bytes = b'"content"'
    #: Whether giving up on the answer cancels it on the server (not a background one).
    cancels: bool = True

    def provider(self, proxy: CutProxy) -> Provider:
        return self.make(f"http://127.0.0.1:{proxy.port}/v1")


def responses_target(gw: LiveGateway) -> Target:
    return Target(gw.port, lambda url: OpenAIResponsesProvider(base_url=url),
                  extra={"background": True}, marker=b"output_text.delta", cancels=False)


def chat_target(port: int) -> Target:
    return Target(port, lambda url: OpenAIProvider(base_url=url))


@pytest.fixture(params=["gateway-chat", "gateway-responses", "gateway-background"])
def target(request: pytest.FixtureRequest, gateway: LiveGateway) -> Target:
    if request.param == "gateway-background":
        return responses_target(gateway)
    if request.param == "gateway-responses":  # streamed in the foreground, with a grace
        return Target(gateway.port, lambda url: OpenAIResponsesProvider(base_url=url),
                      marker=b"output_text.delta")
    return chat_target(gateway.port)


def reqlog_row(gateway: LiveGateway, stream_id: str) -> dict[str, Any] | None:
    """The gateway's request-log row of a stream, once written (rows go in batches)."""
    path = gateway.config.log.path
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM requests WHERE stream_id = ?", (stream_id,)).fetchone()
    return None if row is None else dict(row)


def run(target: Target, proxy: CutProxy, **options: Any) -> tokenrelay.Result:
    options.setdefault("retry", FAST)
    with tokenrelay.stream("hi", model=target.model, provider=target.provider(proxy),
                           extra=target.extra or None, **options) as s:
        text = "".join(s.text_stream())
    assert text == s.result.text
    return s.result


def clean_run(target: Target) -> tuple[str, bytes]:
    """The text of an uninterrupted run, and the bytes of its connection."""
    with CutProxy(("127.0.0.1", target.port)) as proxy:
        result = run(target, proxy)
    assert result.finish_reason == "stop" and result.resumes == 0
    return result.text, bytes(proxy.received[0])


def cut_range(body: bytes, marker: bytes) -> tuple[int, int]:
    """Byte counts between the end of the first text frame and the end of the answer."""
    first = body.index(marker)
    return body.index(b"\n\n", first) + 2, len(body) - 1


# -- random breaks: one stream, the same text -----------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_random_breaks_give_the_uninterrupted_text(target: Target, seed: int) -> None:
    clean, body = clean_run(target)
    lo, hi = cut_range(body, target.marker)
    rng = random.Random(seed)
    breaks = rng.randint(1, 3)
    plan = [Cut(rng.randint(lo, hi), rng.choice(["reset", "close"])) for _ in range(breaks)]
    with CutProxy(("127.0.0.1", target.port),
                  plan=lambda n: plan[n] if n < len(plan) else None) as proxy:
        result = run(target, proxy)
    assert result.error is None and result.finish_reason == "stop"
    assert result.text == clean  # nothing lost, nothing twice
    assert proxy.cuts, "the proxy cut nothing"
    assert result.resumes == len(proxy.cuts), (result.resumes, proxy.cuts, plan)


def test_random_breaks_async(target: Target) -> None:
    clean, body = clean_run(target)
    lo, hi = cut_range(body, target.marker)
    rng = random.Random(7)
    plan = [Cut(rng.randint(lo, hi), "reset"), Cut(rng.randint(lo, hi), "close")]

    async def main(proxy: CutProxy) -> tuple[list[str], tokenrelay.Result]:
        deltas: list[str] = []
        async with tokenrelay.astream("hi", model=target.model, provider=target.provider(proxy),
                                      extra=target.extra or None, retry=FAST) as s:
            async for text in s.text_stream():
                deltas.append(text)
        return deltas, s.result

    with CutProxy(("127.0.0.1", target.port),
                  plan=lambda n: plan[n] if n < len(plan) else None) as proxy:
        deltas, result = asyncio.run(main(proxy))
    assert "".join(deltas) == clean and result.text == clean
    assert result.resumes == len(proxy.cuts) >= 1


def test_a_stalled_connection_resumes_after_the_idle_timeout(target: Target) -> None:
    clean, body = clean_run(target)
    lo, _ = cut_range(body, target.marker)
    with CutProxy(("127.0.0.1", target.port),
                  plan=lambda n: Cut(lo + 10, "stall") if n == 0 else None) as proxy:
        result = run(target, proxy, timeouts=Timeouts(idle=0.5))
    assert result.text == clean and result.resumes == 1


def test_the_cli_shows_the_whole_answer_after_breaks(gateway: LiveGateway) -> None:
    target = chat_target(gateway.port)
    target.model = "relayed"
    clean, body = clean_run(target)
    lo, hi = cut_range(body, target.marker)
    plan = {0: Cut((lo + hi) // 2), 1: Cut(lo + 5, "close")}
    with CutProxy(("127.0.0.1", target.port), plan=plan.get) as proxy:
        done = tokenrelay_cli("--base-url", f"http://127.0.0.1:{proxy.port}/v1", "-m",
                              "relayed", "--stats", "hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == clean.strip() and len(proxy.cuts) == 2
    assert "resumed 2×" in done.stderr  # the footer says so


# -- bounds ------------------------------------------------------------------------------


def test_a_server_that_keeps_cutting_ends_in_a_typed_error(target: Target) -> None:
    clean, body = clean_run(target)
    lo, _ = cut_range(body, target.marker)
    # The first connection breaks after the first token; every reconnect breaks at once.
    with (CutProxy(("127.0.0.1", target.port),
                   plan=lambda n: Cut(lo + 5 if n == 0 else 1)) as proxy,
          pytest.raises(StreamError) as caught):
        run(target, proxy, retry=RetryPolicy(max_retries=2, backoff=0.01))
    error = caught.value
    assert error.code == "connection_lost" and "gave up resuming" in error.message
    assert error.partial_text and clean.startswith(error.partial_text)
    # The first connection, then max_retries reconnects (aiohttp sends an idempotent GET
    # once more by itself when the connection closes before the answer, RFC 9112 §9.3.1),
    # then the cancel of an answer the server keeps for us.
    assert proxy.connections == 1 + 2 * 2 + target.cancels


def test_max_resumes_bounds_the_reconnects_of_one_answer(target: Target) -> None:
    clean, body = clean_run(target)
    lo, _ = cut_range(body, target.marker)
    # Every connection brings something new, then breaks: only max_resumes stops it.
    with CutProxy(("127.0.0.1", target.port), plan=lambda n: Cut(lo + 5)) as proxy:
        result = run(target, proxy, retry=RetryPolicy(max_resumes=2, backoff=0.01),
                     raise_errors=False)
    assert isinstance(result.error, StreamError) and result.error.code == "connection_lost"
    assert result.finish_reason == "error" and result.resumes == 2
    assert clean.startswith(result.text) and len(result.text) < len(clean)
    assert proxy.connections == 3 + target.cancels


def test_max_resumes_zero_turns_resuming_off(target: Target) -> None:
    _, body = clean_run(target)
    lo, _ = cut_range(body, target.marker)
    with (CutProxy(("127.0.0.1", target.port),
                   plan=lambda n: Cut(lo + 5) if n == 0 else None) as proxy,
          pytest.raises(StreamError) as caught):
        run(target, proxy, retry=RetryPolicy(max_resumes=0))
    assert caught.value.code == "connection_lost" and proxy.connections == 1 + target.cancels


def test_a_server_that_cannot_resume_fails_as_before() -> None:
    """No ``x-tokenrelay-stream-id``, no background: a reset mid-stream is the error it
    always was, and nothing else is asked of the server."""
    with Upstream() as server:
        provider = OpenAIProvider(base_url=server.url)
        with pytest.raises(StreamError) as caught, tokenrelay.stream(
                "hi", model="fault=reset,after=2", provider=provider) as s:
            for _ in s:
                pass
        calls = [(c.method, c.path) for c in server.calls]
    assert caught.value.code == "connection_lost"
    assert caught.value.message.startswith(f"the connection to {server.url} broke mid-stream")
    assert caught.value.partial_text and s.result.resumes == 0
    assert calls == [("POST", "/v1/chat/completions")]


# -- what is asked of the server --------------------------------------------------------


def test_the_request_asks_for_a_grace_and_a_resume_names_the_last_event(
        scripted: ResumableServer) -> None:
    target = chat_target(scripted.port)
    before = len(scripted.requests)
    with CutProxy(("127.0.0.1", target.port),
                  plan=lambda n: Cut(700) if n == 0 else None) as proxy:
        result = run(target, proxy)
    requests = scripted.requests[before:]
    assert result.text == expected_text(40) and result.resumes == 1
    (post, get) = requests
    assert post[0] == "POST" and post[3] == "30"  # x-tokenrelay-resume-grace: 30
    assert get[0] == "GET" and get[1].endswith("/stream") and get[3] == "30"
    sid = get[1].split("/")[-2]
    frames = scripted.answers[sid].frames
    last = int(get[2])  # Last-Event-ID: the last frame received whole before the cut
    assert sum(len(f) for f in frames[: last + 1]) <= 700 - 100  # (headers come first)
    # resume_grace=None asks for none.
    provider = OpenAIProvider(base_url=scripted.base_url, resume_grace=None)
    assert tokenrelay.complete("hi", model=MODEL, provider=provider).text == expected_text(40)
    assert scripted.requests[-1][3] is None


@pytest.mark.parametrize(("answer", "code", "says"), [
    ((404, "application/json", b'{"error":{"message":"no such stream"}}'), "connection_lost",
     "refused to resume it; last error: " + "http://127.0.0.1"),
    ((200, "text/html", b"<html>login</html>"), "resume_failed", "'text/html'"),
])
def test_a_refused_resume_is_a_typed_error_at_once(
        scripted: ResumableServer, answer: tuple[int, str, bytes], code: str, says: str) -> None:
    target = chat_target(scripted.port)
    scripted.replay_answer = answer
    before = len(scripted.requests)
    try:
        with (CutProxy(("127.0.0.1", target.port),
                       plan=lambda n: Cut(700) if n == 0 else None) as proxy,
              pytest.raises(StreamError) as caught):
            run(target, proxy)
    finally:
        scripted.replay_answer = None
    assert caught.value.code == code and says in caught.value.message
    assert caught.value.partial_text and expected_text(40).startswith(caught.value.partial_text)
    # The answer, one resume (a refusal is not asked again), the cancel.
    kinds = [(method, path.rsplit("/", 1)[-1]) for method, path, _, _ in scripted.requests[before:]]
    assert kinds == [("POST", "completions"), ("GET", "stream"), ("POST", "cancel")]
    assert proxy.cuts


def test_the_grace_asked_for_comes_from_tokenrelay_resume_grace(
        scripted: ResumableServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for value, sent in [("12.5", "12.5"), ("0", None)]:
        monkeypatch.setenv("TOKENRELAY_RESUME_GRACE", value)
        result = tokenrelay.complete("hi", model="m:tokens=3,tps=500",
                                     base_url=scripted.base_url)
        assert result.text == expected_text(3) and scripted.requests[-1][3] == sent
    monkeypatch.setenv("TOKENRELAY_RESUME_GRACE", "soon")
    with pytest.raises(UsageError, match="TOKENRELAY_RESUME_GRACE"):
        tokenrelay.complete("hi", model="m:tokens=3", base_url=scripted.base_url)


def test_leaving_early_cancels_the_answer_on_the_server(scripted: ResumableServer) -> None:
    """The library asked the server to keep the answer: leaving early says stop."""
    provider = OpenAIProvider(base_url=scripted.base_url)
    before = len(scripted.requests)
    with tokenrelay.stream("hi", model="m:tokens=400,tps=100", provider=provider) as s:
        for _ in zip(range(3), s.text_stream(), strict=False):
            pass
    assert s.result.finish_reason == "cancelled"
    cancels = [r for r in scripted.requests[before:] if r[1].endswith("/cancel")]
    assert len(cancels) == 1
    sid = cancels[0][1].split("/")[-2]
    assert poll(lambda: scripted.answers[sid].ended, 2.0)
    assert scripted.answers[sid].cancelled


def test_leaving_early_stops_the_gateway_at_once(gateway: LiveGateway) -> None:
    """Without the cancel, the gateway would go on for the 30 s grace the library asked."""
    provider = OpenAIProvider(base_url=gateway.url + "/v1")
    with tokenrelay.stream("hi", model="mock:tokens=400,tps=50", provider=provider,
                           raw=True) as s:
        for event in s:
            if event.type == "text_delta":
                break
    assert s.result.raw_chunks
    sid = s.result.raw_chunks[0]["id"]
    row = poll(lambda: reqlog_row(gateway, sid), 3.0)
    assert row is not None and row["status"] == "cancelled", row
    assert row["duration"] < 2.0 and row["completion_tokens"] < 100


def test_a_break_before_the_first_token_asks_again_and_cancels_the_first_answer(
        gateway: LiveGateway) -> None:
    """Before the first token a break is retried as always (a new request); the answer the
    gateway keeps for the first one is cancelled, not left running for its grace."""
    target = chat_target(gateway.port)
    target.model = "mock:tokens=200,tps=100"  # 2 s: long enough to see it stopped
    _, body = clean_run(chat_target(gateway.port))
    inside_first_frame = body.index(b"\r\n\r\n") + 4 + 10
    with CutProxy(("127.0.0.1", target.port),
                  plan=lambda n: Cut(inside_first_frame) if n == 0 else None) as proxy:
        result = run(target, proxy)
    assert result.finish_reason == "stop" and result.resumes == 0
    head = bytes(proxy.received[0]).split(b"\r\n\r\n")[0].decode()
    first = head.split("x-tokenrelay-stream-id: ")[1].split("\r\n")[0]
    row = poll(lambda: reqlog_row(gateway, first), 3.0)
    assert row is not None and row["status"] == "cancelled", row
    assert row["completion_tokens"] < 100


def test_the_gateway_counts_the_resumes_the_library_made(gateway: LiveGateway) -> None:
    target = chat_target(gateway.port)
    _, body = clean_run(target)
    lo, hi = cut_range(body, target.marker)
    plan = {0: Cut((lo + hi) // 2), 1: Cut(lo + 5)}  # (a resumed connection is shorter)
    with CutProxy(("127.0.0.1", target.port), plan=plan.get) as proxy:
        result = run(target, proxy, raw=True)
    assert result.resumes == 2
    sid = result.raw_chunks[0]["id"] if result.raw_chunks else None
    assert sid is not None
    row = poll(lambda: reqlog_row(gateway, sid), 3.0)
    assert row is not None and row["status"] == "ok" and row["resumes"] == 2


def test_a_background_response_is_not_cancelled_when_the_caller_leaves(
        gateway: LiveGateway) -> None:
    provider = OpenAIResponsesProvider(base_url=gateway.url + "/v1")
    with tokenrelay.stream("hi", model="mock:tokens=60,tps=200", provider=provider,
                           extra={"background": True}, raw=True) as s:
        response_id = None
        for event in s:
            if event.type == "raw_chunk" and event.data.get("type") == "response.created":
                response_id = event.data["response"]["id"]
            if event.type == "text_delta":
                break
    assert response_id is not None and s.result.finish_reason == "cancelled"

    def status() -> str | None:
        body = httpx.get(f"{gateway.url}/v1/responses/{response_id}").json()
        return body["status"] if body["status"] in ("completed", "cancelled") else None

    assert poll(status, 5.0) == "completed"


# -- the pure parts -----------------------------------------------------------------------


def frames(*ids: int) -> bytes:
    return b"".join(b'id: %d\ndata: {"choices":[{"delta":{"content":"t%d "}}]}\n\n' % (i, i)
                    for i in ids)


def test_the_parser_skips_what_it_has_and_refuses_a_gap() -> None:
    parser = ChatChunkParser()
    assert [c.text for c in parser.feed(frames(0, 1, 2) + b"id: 3\ndata: {")] == [
        "t0 ", "t1 ", "t2 "]
    assert parser.position() == 2  # the half frame does not count
    parser.reconnect(2)
    assert [c.text for c in parser.feed(frames(1, 2, 3, 4))] == ["t3 ", "t4 "]
    parser.reconnect(4)
    with pytest.raises(StreamError) as caught:
        parser.feed(frames(6))
    assert caught.value.code == "resume_gap"
    # An id that is not a frame number cannot be placed: refused, not guessed.
    for bad in (b"x", b"-1", b"1e3", b"99999999999999999999"):
        parser = ChatChunkParser()
        parser.feed(frames(0))
        parser.reconnect(0)
        with pytest.raises(StreamError, match="valid sequence number"):
            parser.feed(b"id: %s\ndata: {}\n\n" % bad)


@pytest.mark.parametrize("wire", ["chat", "responses"])
def test_any_break_point_and_any_replay_start_give_the_whole_text_once(wire: str) -> None:
    """Property, 300 random trials per wire format: a connection cut at any byte (in any
    read sizes), then one or two reconnects whose replay starts anywhere at or before
    the cursor (a server may resend), give exactly the uninterrupted text."""
    n = 30
    if wire == "chat":
        events = [b'id: %d\ndata: {"choices":[{"delta":{"content":"t%d "}}]}\n\n' % (i, i)
                  for i in range(n)]
        events.append(b'id: %d\ndata: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
                      % n)
        events.append(b"id: %d\ndata: [DONE]\n\n" % (n + 1))
        make: Callable[[], Any] = ChatChunkParser
    else:
        events = [b'event: response.output_text.delta\ndata: {"type":"response.output_text.'
                  b'delta","output_index":0,"content_index":0,"delta":"t%d ",'
                  b'"sequence_number":%d}\n\n' % (i, i) for i in range(n)]
        events.append(b'data: {"type":"response.completed","sequence_number":%d,"response":'
                      b'{"status":"completed","output":[]}}\n\n' % n)
        make = ResponsesEventParser
    whole = "".join(f"t{i} " for i in range(n))
    rng = random.Random(12)
    for _ in range(300):
        parser, text, start = make(), [], 0
        for _cut in range(rng.randint(1, 2)):
            body = b"".join(events[start:])
            cut = rng.randint(0, len(body))
            at = 0
            while at < cut:  # reads of random sizes up to the cut
                step = min(rng.randint(1, 200), cut - at)
                text += [c.text for c in parser.feed(body[at:at + step])]
                at += step
            position = parser.position()
            if position is None:  # nothing whole yet: the client would ask again
                parser, text, start = make(), [], 0
                continue
            parser.reconnect(position)
            start = rng.randint(0, position + 1)  # the replay may resend what it has
        for chunk in parser.feed(b"".join(events[start:])):
            text.append(chunk.text)
        parser.end()
        assert "".join(text) == whole


def test_numbered_frames_take_the_fast_path_with_the_same_outcome() -> None:
    """A frame with an ``id:`` line (every gateway frame) skips line splitting, and gives
    the chunks and the position the general way gives."""
    body = frames(*range(12))
    whole, pieces = ChatChunkParser(), ChatChunkParser()
    for frame in body.split(b"\n\n")[:-1]:
        data = frame + b"\n\n"
        assert whole._sse.plain_data_with_id(data) is not None or not whole._sse._started
        chunks = whole.feed(data)
        assert [c.text for c in chunks] == [f"t{whole.position()} "]
    texts = [c.text for i in range(0, len(body), 7) for c in pieces.feed(body[i:i + 7])]
    assert texts == [f"t{i} " for i in range(12)] and pieces.position() == whole.position() == 11
    for odd in (b"id: 1x\ndata: {}\n\n", b"id: 1\ndata: {}\n\ndata: {}\n\n",
                b"id: 1\nevent: x\ndata: {}\n\n", b"id:1\ndata: {}\n\n"):
        assert whole._sse.plain_data_with_id(odd) is None


def test_the_responses_parser_resumes_on_sequence_numbers() -> None:
    def events(*seqs: int) -> bytes:
        return b"".join(
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"output_index":0,"content_index":0,"delta":"t%d ","sequence_number":%d}\n\n'
            % (n, n) for n in seqs)

    parser = ResponsesEventParser()
    created = (b'data: {"type":"response.created","sequence_number":0,'
               b'"response":{"id":"resp_0123456789abcdef"}}\n\n')
    assert [c.text for c in parser.feed(created + events(1, 2))] == ["t1 ", "t2 "]
    assert parser.position() == 2 and parser.response_id == "resp_0123456789abcdef"
    parser.reconnect(2)
    assert [c.text for c in parser.feed(events(2, 3))] == ["t3 "]
    parser.reconnect(3)
    with pytest.raises(StreamError) as caught:
        parser.feed(events(5))
    assert caught.value.code == "resume_gap"


def test_stream_ids_are_checked_before_they_go_into_a_url() -> None:
    assert stream_id("chatcmpl-" + "a" * 32) == "chatcmpl-" + "a" * 32
    for bad in ["../../admin", "a" * 200, "short", "x y" * 5, None, 42, "ab%2f" * 4]:
        assert stream_id(bad) is None
