"""The memory store's limits: retention by age and by total bytes, and what happens at each."""

from __future__ import annotations

import asyncio

import pytest

from tokenrelay.server.streamlog import MemoryStreamLog, ProducerLost, StreamLogFull
from tokenrelay.server.streamlog.memory import FRAME_OVERHEAD, STREAM_OVERHEAD


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def finished(store: MemoryStreamLog, size: int) -> str:
    p = await store.create(owner="k", endpoint="chat")
    await p.append([b"x" * size])
    await p.finish("completed", [b"end"])
    return p.stream_id


async def test_a_finished_stream_is_kept_retention_s_then_dropped() -> None:
    clock = Clock()
    store = MemoryStreamLog(retention_s=600, clock=clock)
    live = await store.create(owner="k", endpoint="chat")
    await live.append([b"a"])
    done = await finished(store, 10)
    clock.now += 599
    assert await store.info(done, owner="k") is not None
    clock.now += 2
    assert await store.info(done, owner="k") is None
    # A live stream is never dropped for its age.
    clock.now += 100_000
    info = await store.info(live.stream_id, owner="k")
    assert info is not None and info.last_seq == 0
    assert store.total_bytes == STREAM_OVERHEAD + 1 + FRAME_OVERHEAD


async def test_an_idle_store_drops_expired_streams_by_itself() -> None:
    store = MemoryStreamLog(retention_s=0.2)
    await finished(store, 100)
    assert len(store) == 1
    await asyncio.sleep(0.5)  # no call into the store meanwhile
    assert len(store) == 0 and store.total_bytes == 0
    await store.aclose()


async def test_over_max_bytes_the_oldest_finished_streams_go_first() -> None:
    frame = 10_000
    per_stream = STREAM_OVERHEAD + frame + 3 + 2 * FRAME_OVERHEAD
    store = MemoryStreamLog(max_bytes=3 * per_stream + 100, clock=Clock())
    a = await finished(store, frame)
    b = await finished(store, frame)
    c = await finished(store, frame)
    assert store.total_bytes == 3 * per_stream
    d = await finished(store, frame)  # over: a goes
    assert [await store.info(s, owner=None) is not None for s in (a, b, c, d)] == [
        False, True, True, True]
    assert store.total_bytes <= store.max_bytes
    # A live stream growing past the limit pushes finished ones out, never itself.
    live = await store.create(owner="k", endpoint="chat")
    for _ in range(3):
        await live.append([b"y" * frame])
    assert await store.info(live.stream_id, owner=None) is not None
    assert [await store.info(s, owner=None) is not None for s in (b, c, d)] == [
        False, False, False]


async def test_live_streams_alone_at_max_bytes_refuse_new_streams_only() -> None:
    store = MemoryStreamLog(max_bytes=64 << 10, clock=Clock())
    live = [await store.create(owner="k", endpoint="chat") for _ in range(3)]
    for p in live:
        await p.append([b"z" * (21 << 10)])
    assert store.total_bytes > store.max_bytes
    with pytest.raises(StreamLogFull) as caught:
        await store.create(owner="k", endpoint="chat")
    assert caught.value.code == "stream_log_full" and caught.value.retryable
    # The live ones go on; when one finishes and is dropped, there is room again.
    await live[0].append([b"more"])
    await live[0].finish("completed", [b"end"])
    await live[1].finish("completed", [b"end"])
    p = await store.create(owner="k", endpoint="chat")
    assert await store.info(p.stream_id, owner=None) is not None
    assert await store.info(live[0].stream_id, owner=None) is None  # dropped to make room


async def test_a_reader_of_a_dropped_stream_reads_to_its_end() -> None:
    clock = Clock()
    store = MemoryStreamLog(retention_s=10, clock=clock)
    p = await store.create(owner="k", endpoint="chat")
    await p.append([b"0", b"1", b"2"])
    await p.finish("completed", [b"3"])
    reader = await store.reader(p.stream_id, after=0, owner="k")
    clock.now += 11
    assert await store.info(p.stream_id, owner="k") is None
    assert [f.data async for f in reader] == [b"1", b"2", b"3"]


async def test_a_stream_without_producer_is_dropped_like_a_finished_one() -> None:
    clock = Clock()
    store = MemoryStreamLog(retention_s=10, clock=clock)
    p = await store.create(owner="k", endpoint="chat")
    await p.append([b"0"])
    await p.release()
    reader = await store.reader(p.stream_id, after=0, owner="k")
    with pytest.raises(ProducerLost):
        await reader.read()
    clock.now += 11
    assert await store.info(p.stream_id, owner="k") is None
    assert store.total_bytes == 0


async def test_taken_over_it_is_live_again() -> None:
    clock = Clock()
    store = MemoryStreamLog(retention_s=10, clock=clock)
    p = await store.create(owner="k", endpoint="chat")
    await p.release()
    q = await store.acquire(p.stream_id)
    assert q is not None
    clock.now += 100
    assert await store.info(p.stream_id, owner="k") is not None


async def test_the_hot_path_calls_need_no_await() -> None:
    store = MemoryStreamLog()
    p = await store.create(owner="k", endpoint="chat")
    reader = await store.reader(p.stream_id, owner="k")
    frame = b"id: 0\ndata: {}\n\n"
    assert p.append_nowait([frame]) == 0
    batch = reader.read_nowait()
    assert batch.first_seq == 0 and batch.frames[0] is frame  # stored, not copied
    assert reader.read_nowait().frames == ()
