"""Property tests: whatever the ticks, cursors and reconnects, a reader gets exactly the
frames appended after its cursor — consecutive ids, no gap, no duplicate — and a typed end.
Both stores; Redis is a real redis-server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from _redis import RedisServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_streamlog import make_store

from tokenrelay.server.streamlog import ProducerLost, StreamLog, StreamReader


@dataclass
class Plan:
    ticks: list[list[bytes]]
    ending: str                           # completed | failed | lost
    #: (tick index to start at, cursor offset from the frames stored then, reconnect points)
    readers: list[tuple[int, int, list[int]]]


plans = st.builds(
    Plan,
    ticks=st.lists(st.lists(st.binary(max_size=48), max_size=5), max_size=10),
    ending=st.sampled_from(["completed", "failed", "lost"]),
    readers=st.lists(st.tuples(st.integers(0, 10), st.integers(-3, 2),
                               st.lists(st.integers(1, 6), max_size=3)),
                     min_size=1, max_size=4),
)


async def _consume(store: StreamLog, reader: StreamReader, after: int,
                   reconnects: list[int]) -> tuple[list[tuple[int, bytes]], str]:
    """Read to the end, dropping the connection after each count in ``reconnects`` and
    resuming from the last frame received (as a client with Last-Event-ID would)."""
    got: list[tuple[int, bytes]] = []
    pending = list(reconnects)
    stream_id = reader.stream_id
    budget = pending.pop(0) if pending else None
    while True:
        try:
            batch = await reader.read(timeout=5)
        except ProducerLost as exc:
            # Delivery's answer: one typed error frame as the end (once, whoever wins).
            await store.end_lost(stream_id, last_seq=exc.last_seq,
                                 frames=[b"%d:producer_lost" % (exc.last_seq + 1)])
            continue
        for i, data in enumerate(batch.frames):
            got.append((batch.first_seq + i, data))
        if reader.ended:
            assert reader.status is not None
            return got, reader.status
        if not batch.frames and not reader.ended:
            raise AssertionError("no frame in 5 s from a live producer")
        if budget is not None:
            budget -= len(batch.frames)
            if budget <= 0:
                await reader.aclose()
                last = got[-1][0] if got else after
                reader = await store.reader(stream_id, after=last, owner="k")
                budget = pending.pop(0) if pending else None


async def _run(store: StreamLog, plan: Plan) -> None:
    producer = await store.create(owner="k", endpoint="chat")
    stream_id = producer.stream_id
    produced: list[bytes] = []
    tasks: list[tuple[int, asyncio.Task[tuple[list[tuple[int, bytes]], str]]]] = []
    for index in range(len(plan.ticks) + 1):
        for start, offset, reconnects in plan.readers:
            if min(start, len(plan.ticks)) == index:
                after = max(-1, len(produced) - 1 + offset)
                reader = await store.reader(stream_id, after=after, owner="k")
                tasks.append((after, asyncio.create_task(
                    _consume(store, reader, after, reconnects))))
        if index < len(plan.ticks):
            frames = [b"%d:" % (len(produced) + i) + payload
                      for i, payload in enumerate(plan.ticks[index])]
            last = await producer.append(frames)
            produced += frames
            assert last == len(produced) - 1
            await asyncio.sleep(0)
    if plan.ending == "lost":
        await producer.release()
        produced.append(b"%d:producer_lost" % len(produced))
        final = "failed"
    else:
        final_frame = b"%d:end" % len(produced)
        await producer.finish(plan.ending, [final_frame])  # type: ignore[arg-type]
        produced.append(final_frame)
        final = plan.ending
    for after, task in tasks:
        got, status = await asyncio.wait_for(task, 30)
        assert status == final
        start = min(after + 1, len(produced))
        # Exactly the frames after the cursor: consecutive ids, no gap, no duplicate.
        assert [seq for seq, _ in got] == list(range(start, len(produced)))
        assert [data for _, data in got] == produced[start:]


def _check(kind: str, server: RedisServer | None, plan: Plan) -> None:
    async def main() -> None:
        store = await make_store(kind, server)
        try:
            await asyncio.wait_for(_run(store, plan), 60)
        finally:
            await store.aclose()

    asyncio.run(main())


@settings(max_examples=150, deadline=None)
@given(plan=plans)
def test_memory_readers_get_exactly_the_frames_after_their_cursor(plan: Plan) -> None:
    _check("memory", None, plan)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans)
def test_redis_readers_get_exactly_the_frames_after_their_cursor(
        plan: Plan, redis_server: RedisServer) -> None:
    _check("redis", redis_server, plan)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_cursor_beyond_what_a_stream_ends_with(kind: str,
                                                 request: pytest.FixtureRequest) -> None:
    """Waiting beyond the last frame, then the stream ends short of it: a clean end."""
    server = request.getfixturevalue("redis_server") if kind == "redis" else None

    async def main() -> None:
        store = await make_store(kind, server)
        try:
            p = await store.create(owner="k", endpoint="chat")
            await p.append([b"0"])
            reader = await store.reader(p.stream_id, after=5, owner="k")
            waiting = asyncio.create_task(reader.read(timeout=10))
            await asyncio.sleep(0.05)
            await p.finish("completed", [b"1"])
            batch = await asyncio.wait_for(waiting, 10)
            assert list(batch.frames) == [] and reader.ended and reader.status == "completed"
        finally:
            await store.aclose()

    asyncio.run(main())
