"""Background responses (issue 12 §3): ``POST /v1/responses`` with ``background: true``,
retrieve, replay from ``starting_after``, cancel — through a live gateway, with the
official ``openai`` SDK unchanged.

What must hold (server/background.py): the POST answers at once (``queued``); the
generation runs to its end with no client attached, a disconnect never stops it; a
replay after N is exactly the tail of the uninterrupted stream, every event's
``sequence_number`` equal to its SSE ``id:``; a cancel stops the upstream within 500 ms
and the response ends ``cancelled``; only the creating key can see it (others get 404).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _harness import LiveGateway, poll, sse_events
from _harness import gateway_config as config
from _harness import mock_routes as routes
from _redis import RedisServer, redis_prefix
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay.events import TextDelta
from tokenrelay.server.background import BackgroundResponses
from tokenrelay.server.config import ServerConfig, hash_key
from tokenrelay.server.gateway import Gateway
from tokenrelay.server.response_snapshot import ResponseSnapshot
from tokenrelay.server.responses import ResponsesEncoder
from tokenrelay.server.security import GatewayHTTPError
from tokenrelay.testing.mock_upstream import MockUpstream

SPECS = {
    "quick": "tokens=12,tps=200",
    "steady": "tokens=30,tps=40",
    "slow": "tokens=1000,tps=20",
}
KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}
#: How soon a cancel must reach the upstream (the gateway's promise for a disconnect too).
ABORT_WITHIN = 0.5


def _keys() -> list[dict[str, str]]:
    return [{"id": name, "sha256": hash_key(key)} for name, key in KEYS.items()]


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def live(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[LiveGateway]:
    tmp = tmp_path_factory.mktemp("background")
    with LiveGateway(config(tmp, routes(upstream.url, **SPECS), keys=_keys())) as gateway:
        yield gateway


_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:  # their pooled connections, before the gateway goes
        _CLIENTS.pop().close()


def client(live: LiveGateway, key: str = "alice") -> openai.OpenAI:
    api = openai.OpenAI(base_url=live.url + "/v1", api_key=KEYS[key], max_retries=0,
                        timeout=20)
    _CLIENTS.append(api)
    return api


def dumps(events: list[Any]) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json") for e in events]


def final_text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


# -- create, stream, retrieve ---------------------------------------------------------------


def test_a_background_stream_starts_queued_and_numbers_every_event(live: LiveGateway) -> None:
    events = list(client(live).responses.create(model="quick", input="hi", background=True,
                                                stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_text.delta") == 12
    created = events[0].response
    assert created.status == "queued" and created.background is True
    assert events[1].response.status == "in_progress"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # The id is the stream's: resp_ + 128 random bits, the same on every event.
    assert created.id.startswith("resp_") and len(created.id) == 5 + 32
    int(created.id[5:], 16)
    assert {e.response.id for e in events if hasattr(e, "response")} == {created.id}
    final = events[-1].response
    assert final.status == "completed" and final.output_text == final_text(events)

    retrieved = client(live).responses.retrieve(created.id)
    assert retrieved.model_dump(mode="json") == final.model_dump(mode="json")


def test_a_background_post_answers_at_once_and_the_generation_goes_on(
        live: LiveGateway, upstream: MockUpstream) -> None:
    api = client(live)
    upstream.reset()
    queued = api.responses.create(model="steady", input="hi", background=True)
    # The answer did not wait for the model (30 tokens at 40/s: 0.75 s).
    assert not [r for r in upstream.chat_requests() if r.tokens_sent >= 30]
    assert queued.status == "queued" and queued.background and queued.output == []
    assert queued.store is True

    # While it runs: the text so far, status in_progress.
    def partial() -> Any:
        r = api.responses.retrieve(queued.id)
        return r if r.status == "in_progress" and r.output_text else None

    running = poll(partial, 5)
    assert running, "never saw the response in progress with text"
    assert 0 < len(running.output_text) and running.output[0].status == "in_progress"

    done = poll(lambda: (r := api.responses.retrieve(queued.id)).status == "completed" and r,
                5)
    assert done, "the background response did not complete"
    assert done.output_text.startswith(running.output_text)
    assert done.usage is not None and done.usage.output_tokens == 30
    (row,) = live.wait_log(lambda r: r["endpoint"] == "responses" and r["model"] == "steady"
                           and r["status"] == "ok")
    assert row["answer"] == done.output_text


def test_a_replay_after_n_is_the_tail_of_the_uninterrupted_stream(live: LiveGateway) -> None:
    api = client(live)
    events = list(api.responses.create(model="quick", input="hi", background=True,
                                       stream=True))
    rid = events[0].response.id
    whole = dumps(events)
    for after in (0, 1, 5, len(events) - 2):
        tail = list(api.responses.retrieve(rid, stream=True, starting_after=after))
        assert dumps(tail) == whole[after + 1:], after
    # The SDK's own helper: it reads from the start and drops what is not after N.
    with api.responses.stream(response_id=rid, starting_after=7) as stream:
        helper = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in helper] == list(range(8, len(events)))
    assert final.output_text == events[-1].response.output_text
    # One request-log row for the response, its replays counted on it; and in /metrics.
    (row,) = live.wait_log(lambda r: r["stream_id"] == rid and r["resumes"] == 5)
    assert row["endpoint"] == "responses" and row["status"] == "ok"
    metrics = httpx.get(f"{live.url}/metrics", timeout=5,
                        headers={"authorization": f"Bearer {KEYS['alice']}"}).text
    assert 'tokenrelay_stream_resumes_total{endpoint="responses"}' in metrics


def test_sse_ids_equal_sequence_numbers_on_the_wire(live: LiveGateway) -> None:
    api = client(live)
    rid = api.responses.create(model="quick", input="hi", background=True).id
    poll(lambda: api.responses.retrieve(rid).status == "completed", 5)
    headers = {"authorization": f"Bearer {KEYS['alice']}"}
    body = httpx.get(f"{live.url}/v1/responses/{rid}",
                     params={"stream": "true", "starting_after": "3"}, headers=headers,
                     timeout=10).content
    frames = sse_events(body)
    assert frames and [int(f["id"]) for f in frames] == list(range(4, 4 + len(frames)))
    for f in frames:
        event = json.loads(f["data"])
        assert event["sequence_number"] == int(f["id"]) and event["type"] == f["event"]


def test_a_replay_of_a_running_response_follows_it_live(live: LiveGateway) -> None:
    api = client(live)
    rid = api.responses.create(model="steady", input="hi", background=True).id
    time.sleep(0.2)  # a few tokens in: part replayed, the rest live
    tail = list(api.responses.retrieve(rid, stream=True, starting_after=1))
    assert tail[0].sequence_number == 2 and tail[-1].type == "response.completed"
    assert [e.sequence_number for e in tail] == list(range(2, 2 + len(tail)))
    assert final_text(tail) == tail[-1].response.output_text
    # A cursor beyond what exists yet waits for it.
    rid = api.responses.create(model="steady", input="hi", background=True).id
    ahead = list(api.responses.retrieve(rid, stream=True, starting_after=20))
    assert ahead[0].sequence_number == 21 and ahead[-1].type == "response.completed"


def test_a_client_that_leaves_does_not_stop_a_background_response(
        live: LiveGateway, upstream: MockUpstream) -> None:
    api = client(live)
    stream = api.responses.create(model="steady", input="leave", background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    stream.close()  # the connection goes away mid-answer
    rid = seen[0].response.id

    done = poll(lambda: (r := api.responses.retrieve(rid)).status == "completed" and r, 5)
    assert done, "the response stopped with its client"
    assert done.usage is not None and done.usage.output_tokens == 30
    record = upstream.wait_for(lambda r: r.model == SPECS["steady"]
                               and r.finished_at is not None, 3)
    assert record is not None and record.aborted_at is None and record.tokens_sent == 30


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_stops_the_generation_within_500_ms(live: LiveGateway,
                                                   upstream: MockUpstream) -> None:
    api = client(live)
    upstream.reset()
    rid = api.responses.create(model="slow", input="cancel me", background=True).id
    record = upstream.wait_for(lambda r: r.model == SPECS["slow"] and r.tokens_sent >= 3, 5)
    assert record is not None
    sent_at = time.monotonic()
    cancelled = api.responses.cancel(rid)
    answered = time.monotonic() - sent_at

    assert cancelled.status == "cancelled" and cancelled.id == rid
    assert cancelled.output_text and cancelled.output[0].status == "incomplete"
    aborted = upstream.wait_for(lambda r: r.model == SPECS["slow"]
                                and r.aborted_at is not None, 3)
    assert aborted is not None, "the upstream never saw the cancel"
    took = aborted.aborted_at - sent_at  # type: ignore[operator]
    assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the cancel"
    assert answered < 2, answered
    tokens = aborted.tokens_sent
    time.sleep(0.3)
    assert aborted.tokens_sent == tokens, "tokens kept coming after the cancel"

    # Idempotent, and what retrieve and a replay say agree.
    assert api.responses.cancel(rid).model_dump() == cancelled.model_dump()
    assert api.responses.retrieve(rid).model_dump() == cancelled.model_dump()
    replay = list(api.responses.retrieve(rid, stream=True))
    assert replay[-1].type == "response.cancelled"  # type: ignore[comparison-overlap]
    assert final_text(replay) == cancelled.output_text
    (row,) = live.wait_log(lambda r: r["model"] == "slow" and r["status"] == "cancelled")
    assert row["answer"] == cancelled.output_text


def test_a_finished_response_cannot_be_cancelled(live: LiveGateway) -> None:
    api = client(live)
    events = list(api.responses.create(model="quick", input="hi", background=True,
                                       stream=True))
    # OpenAI answers 400 "Cannot cancel a completed response." (measured, LiteLLM #39617).
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a completed response"):
        api.responses.cancel(events[0].response.id)
    assert api.responses.retrieve(events[0].response.id).status == "completed"


def test_the_async_client_streams_resumes_and_cancels(live: LiveGateway,
                                                      upstream: MockUpstream) -> None:
    async def run() -> None:
        api = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEYS["alice"],
                                 max_retries=0, timeout=20)
        stream = await api.responses.create(model="slow", input="async", background=True,
                                            stream=True)
        first: list[Any] = []
        async for event in stream:
            first.append(event)
            if len(first) == 6:
                break
        await stream.close()
        rid = first[0].response.id
        async with api.responses.stream(response_id=rid, starting_after=5) as resumed:
            async for event in resumed:
                assert event.sequence_number == 6
                break
        cancelled = await api.responses.cancel(rid)
        assert cancelled.status == "cancelled"
        assert (await api.responses.retrieve(rid)).status == "cancelled"
        await api.close()

    asyncio.run(run())


# -- owner binding and bad input ------------------------------------------------------------


def test_only_the_creating_key_sees_a_response(live: LiveGateway) -> None:
    alice, bob = client(live, "alice"), client(live, "bob")
    rid = alice.responses.create(model="steady", input="mine", background=True).id
    with pytest.raises(openai.NotFoundError) as found:
        bob.responses.retrieve(rid)
    assert found.value.status_code == 404 and rid in str(found.value)
    with pytest.raises(openai.NotFoundError):
        list(bob.responses.retrieve(rid, stream=True, starting_after=0))
    with pytest.raises(openai.NotFoundError):
        bob.responses.cancel(rid)
    # The same answer as for an id that never existed: existence is not revealed.
    with pytest.raises(openai.NotFoundError) as unknown:
        bob.responses.retrieve("resp_" + "0" * 32)
    assert type(unknown.value.body) is type(found.value.body)
    # Bob's cancel changed nothing.
    done = poll(lambda: (r := alice.responses.retrieve(rid)).status != "in_progress"
                and r.status != "queued" and r, 5)
    assert done and done.status == "completed"
    no_key = httpx.get(f"{live.url}/v1/responses/{rid}", timeout=5)
    assert no_key.status_code == 401


@pytest.mark.parametrize(("query", "fragment"), [
    ({"stream": "true", "starting_after": "abc"}, "invalid starting_after"),
    ({"stream": "true", "starting_after": "-2"}, "invalid starting_after"),
    ({"stream": "true", "starting_after": "1e3"}, "invalid starting_after"),
    ({"stream": "true", "starting_after": "100000"}, "nothing follows"),
    ({"stream": "maybe"}, "invalid stream"),
    ({"starting_after": "3"}, "needs stream=true"),
])
def test_bad_queries_are_400_naming_the_parameter(live: LiveGateway,
                                                  query: dict[str, str], fragment: str) -> None:
    api = client(live)
    rid = api.responses.create(model="quick", input="hi", background=True).id
    poll(lambda: api.responses.retrieve(rid).status == "completed", 5)
    answer = httpx.get(f"{live.url}/v1/responses/{rid}", params=query, timeout=5,
                       headers={"authorization": f"Bearer {KEYS['alice']}"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] in ("starting_after", "stream")


def test_unknown_and_malformed_ids_are_404(live: LiveGateway) -> None:
    api = client(live)
    for rid in ("resp_" + "f" * 32, "nope", "resp_../../x", "a" * 300):
        with pytest.raises(openai.NotFoundError):
            api.responses.retrieve(rid)
        with pytest.raises(openai.NotFoundError):
            api.responses.cancel(rid)


def test_background_without_store_is_refused_as_openai_does(live: LiveGateway) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(live).responses.create(model="quick", input="hi", background=True, store=False)
    assert refused.value.param == "store"  # type: ignore[attr-defined]
    assert "Background mode requires store=true" in str(refused.value)


# -- the Redis store ------------------------------------------------------------------------


def test_background_responses_on_the_redis_store(redis_server: RedisServer,
                                                 upstream: MockUpstream,
                                                 tmp_path: Path) -> None:
    streams = {"store": "redis", "redis_url": redis_server.url,
               "redis_prefix": redis_prefix()}
    cfg = config(tmp_path, routes(upstream.url, **SPECS), keys=_keys(), streams=streams)
    with LiveGateway(cfg) as gateway:
        api = client(gateway)
        events = list(api.responses.create(model="quick", input="hi", background=True,
                                           stream=True))
        rid = events[0].response.id
        assert events[0].response.status == "queued" and events[-1].type == "response.completed"
        assert dumps(list(api.responses.retrieve(rid, stream=True, starting_after=4))) \
            == dumps(events)[5:]
        assert api.responses.retrieve(rid).output_text == events[-1].response.output_text
        with pytest.raises(openai.NotFoundError):
            client(gateway, "bob").responses.retrieve(rid)

        upstream.reset()
        slow = api.responses.create(model="slow", input="cancel me", background=True).id
        assert upstream.wait_for(lambda r: r.model == SPECS["slow"] and r.tokens_sent >= 2, 5)
        sent_at = time.monotonic()
        assert api.responses.cancel(slow).status == "cancelled"
        aborted = upstream.wait_for(lambda r: r.model == SPECS["slow"]
                                    and r.aborted_at is not None, 3)
        assert aborted is not None
        took = aborted.aborted_at - sent_at  # type: ignore[operator]
        assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the cancel"


# -- a producer that is gone ----------------------------------------------------------------


def _gateway() -> Gateway:
    """A gateway's state alone (the memory store, no log), for BackgroundResponses."""
    return Gateway(ServerConfig.model_validate({"serve_local": False,
                                                "log": {"enabled": False}}))


async def _orphan(background: BackgroundResponses, text: list[str]) -> str:
    """A background response whose producer let go mid-answer (its process died)."""
    from tokenrelay.server.responses_schema import ResponsesRequest

    request = ResponsesRequest.model_validate({"model": "m", "input": "hi"})
    producer = await background.log.create(owner="alice", endpoint="responses",
                                            id_prefix="resp_", meta={"background": "1"})
    encoder = ResponsesEncoder(request, model="m", response_id=producer.stream_id,
                               background=True)
    await producer.append(encoder.start("queued"))
    await producer.append(encoder.progress(), status="in_progress")
    for piece in text:
        await producer.append(encoder.frames(TextDelta(piece)))
    await producer.release()
    return producer.stream_id


async def test_a_lost_producer_ends_the_response_failed_for_every_reader() -> None:
    gateway = _gateway()
    background = BackgroundResponses(gateway)
    rid = await _orphan(background, ["Hel", "lo"])
    reader = await background.log.reader(rid, after=3, owner="alice")
    frames = [f async for f in background.deliver(reader)]
    events = [json.loads(e["data"]) for e in sse_events(b"".join(frames))]
    # Every frame written, then one typed error frame and the end (issue 12 §4).
    assert [e["type"] for e in events] == ["response.output_text.delta",
                                           "response.output_text.delta", "error"]
    assert [e["sequence_number"] for e in events] == [4, 5, 6]
    assert events[2]["code"] == "producer_lost"
    # Retrieve: failed, with the output so far and the error; a second reader sees the
    # same end, once.
    info = await background.find(rid, "alice")
    assert info.status == "failed" and info.last_seq == 6
    failed = await background.retrieve(info)
    assert failed["status"] == "failed" and failed["id"] == rid
    assert failed["error"]["message"] == events[2]["message"]
    assert failed["output"][0]["content"][0]["text"] == "Hello"
    assert failed["output"][0]["status"] == "incomplete"
    again = await background.log.reader(rid, after=5, owner="alice")
    assert len([f async for f in background.deliver(again)]) == 1
    assert gateway.metrics.producer_losses._value.get() == 1
    await gateway.aclose()


async def test_retrieve_and_cancel_end_a_response_whose_producer_is_gone() -> None:
    gateway = _gateway()
    background = BackgroundResponses(gateway)
    rid = await _orphan(background, ["par", "tial"])
    cancelled = await background.cancel(rid, "alice")
    assert cancelled["status"] == "cancelled"
    assert cancelled["output"][0]["content"][0]["text"] == "partial"
    assert (await background.find(rid, "alice")).status == "cancelled"
    assert await background.cancel(rid, "alice") == cancelled  # idempotent

    rid = await _orphan(background, ["x"])
    info = await background.find(rid, "alice")
    assert (await background.retrieve(info))["status"] == "failed"
    with pytest.raises(GatewayHTTPError) as refused:
        await background.cancel(rid, "alice")
    assert refused.value.status == 400 and "Cannot cancel a failed response" in str(
        refused.value)
    with pytest.raises(GatewayHTTPError) as hidden:
        await background.find(rid, "bob")
    assert hidden.value.status == 404
    await gateway.aclose()


def test_two_gateways_on_one_redis_share_retrieve_replay_and_cancel(
        redis_server: RedisServer, upstream: MockUpstream, tmp_path: Path) -> None:
    streams = {"store": "redis", "redis_url": redis_server.url,
               "redis_prefix": redis_prefix()}

    def gateway(name: str) -> LiveGateway:
        return LiveGateway(config(tmp_path / name, routes(upstream.url, **SPECS),
                                  keys=_keys(), streams=streams, drain_timeout_s=0.5))

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with gateway("a") as a, gateway("b") as b:
        on_a, on_b = client(a), client(b)
        # Made on A, read on B: live replay, then the same final object.
        rid = on_a.responses.create(model="steady", input="hi", background=True).id
        events = list(on_b.responses.retrieve(rid, stream=True, starting_after=0))
        assert events[0].sequence_number == 1 and events[-1].type == "response.completed"
        assert on_b.responses.retrieve(rid).model_dump() == on_a.responses.retrieve(
            rid).model_dump()
        with pytest.raises(openai.NotFoundError):
            client(b, "bob").responses.retrieve(rid)

        # Cancelled on B, produced on A: A's upstream request is aborted.
        upstream.reset()
        slow = on_a.responses.create(model="slow", input="cancel me", background=True).id
        assert upstream.wait_for(lambda r: r.model == SPECS["slow"] and r.tokens_sent >= 2, 5)
        sent_at = time.monotonic()
        assert on_b.responses.cancel(slow).status == "cancelled"
        aborted = upstream.wait_for(lambda r: r.model == SPECS["slow"]
                                    and r.aborted_at is not None, 3)
        assert aborted is not None
        took = aborted.aborted_at - sent_at  # type: ignore[operator]
        assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the cancel"
        assert on_a.responses.retrieve(slow).status == "cancelled"

        # A stops while it produces one whose route cannot continue a partial answer
        # (takeover.py): nobody could finish it elsewhere, so A does not hand it off but
        # ends it at its drain deadline as server_shutdown, with what was made; B reads
        # that end from the shared store.
        running = on_a.responses.create(model="slow", input="shutdown", background=True).id
        assert poll(lambda: on_b.responses.retrieve(running).status == "in_progress", 5)
        a.__exit__(None, None, None)
        ended = on_b.responses.retrieve(running)
        assert ended.status == "failed" and ended.error is not None
        assert "shutting down" in ended.error.message
        assert ended.output_text  # what was generated before stays
        assert on_b.responses.retrieve(running).model_dump() == ended.model_dump()


# -- the snapshot, on frames it did not expect ------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.one_of(
    st.binary(max_size=80),
    st.builds(lambda kind, body: b"event: x\nid: 1\ndata: " + json.dumps(
        {"type": kind, **body}).encode() + b"\n\n",
        st.sampled_from(["response.created", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta",
                         "response.function_call_arguments.delta",
                         "response.output_item.done", "response.completed", "error"]),
        st.dictionaries(st.sampled_from(["output_index", "content_index", "item", "part",
                                         "delta", "response", "message"]),
                        st.one_of(st.integers(-3, 3), st.text(max_size=5), st.none(),
                                  st.booleans(), st.lists(st.integers(), max_size=2),
                                  st.dictionaries(st.sampled_from(["type", "content",
                                                                   "text", "status"]),
                                                  st.one_of(st.text(max_size=3),
                                                            st.lists(st.dictionaries(
                                                                st.just("text"),
                                                                st.text(max_size=3)),
                                                                max_size=2)),
                                                  max_size=3)),
                        max_size=4))),
    max_size=12))
def test_the_snapshot_never_fails_on_unexpected_frames(frames: list[bytes]) -> None:
    snap = ResponseSnapshot()
    for data in frames:
        snap.feed(data)
    snap.object()
    snap.ended("failed", error={"code": "server_error", "message": "x"})


# -- foreground streams: in the log too -----------------------------------------------------


def test_a_streamed_foreground_response_is_resumable_within_its_grace(
        live: LiveGateway, upstream: MockUpstream) -> None:
    api = client(live)
    raw = api.responses.with_raw_response.create(
        model="steady", input="hi", stream=True,
        extra_headers={"x-tokenrelay-resume-grace": "5"})
    stream = raw.parse()
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    stream.close()  # the connection drops mid-answer; the grace keeps it producing
    rid = seen[0].response.id
    assert raw.headers["x-tokenrelay-stream-id"] == rid and rid.startswith("resp_")
    assert seen[0].response.status == "in_progress" and seen[0].response.background is False

    tail = list(api.responses.retrieve(rid, stream=True,
                                       starting_after=seen[-1].sequence_number))
    assert tail[0].sequence_number == seen[-1].sequence_number + 1
    assert tail[-1].type == "response.completed"
    assert final_text(seen + tail) == tail[-1].response.output_text
    assert tail[-1].response.usage is not None and tail[-1].response.usage.output_tokens == 30


def test_a_streamed_foreground_response_without_grace_stops_with_its_client(
        live: LiveGateway, upstream: MockUpstream) -> None:
    api = client(live)
    upstream.reset()
    raw = api.responses.with_raw_response.create(model="slow", input="hi", stream=True)
    stream = raw.parse()
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    closed_at = time.monotonic()
    stream.close()
    aborted = upstream.wait_for(lambda r: r.model == SPECS["slow"]
                                and r.aborted_at is not None, 3)
    assert aborted is not None
    took = aborted.aborted_at - closed_at  # type: ignore[operator]
    assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the close"
    rid = raw.headers["x-tokenrelay-stream-id"]
    ended = poll(lambda: (r := api.responses.retrieve(rid)).status == "cancelled" and r, 3)
    assert ended and ended.output_text


def test_cancelling_a_streamed_foreground_response_ends_its_client_s_stream(
        live: LiveGateway, upstream: MockUpstream) -> None:
    api, other = client(live), client(live)
    upstream.reset()
    stream = api.responses.create(model="slow", input="hi", stream=True)
    events = []
    for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta":
            sent_at = time.monotonic()
            assert other.responses.cancel(events[0].response.id).status == "cancelled"
            break
    events += list(stream)  # the rest, to the end the cancel gave it
    assert events[-1].type == "response.cancelled"  # type: ignore[comparison-overlap]
    aborted = upstream.wait_for(lambda r: r.model == SPECS["slow"]
                                and r.aborted_at is not None, 3)
    assert aborted is not None
    took = aborted.aborted_at - sent_at  # type: ignore[operator]
    assert 0 <= took < ABORT_WITHIN, f"the upstream was aborted {took:.3f} s after the cancel"
