"""The stream log's contract, run against both stores (memory, and a real redis-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from _redis import RedisServer, redis_prefix

from tokenrelay.server.streamlog import (
    FrameBatch,
    LeaseLost,
    MemoryStreamLog,
    Producer,
    ProducerLost,
    StreamLog,
    StreamNotFound,
    StreamReader,
    StreamTooLarge,
    valid_stream_id,
)

STORES = ["memory", "redis"]


def frame(seq: int, text: str = "x") -> bytes:
    return b"id: %d\ndata: %s\n\n" % (seq, text.encode())


async def make_store(kind: str, server: RedisServer | None, **kwargs: object) -> StreamLog:
    if kind == "memory":
        return MemoryStreamLog(**kwargs)  # type: ignore[arg-type]
    from tokenrelay.server.streamlog.redis_log import RedisStreamLog
    assert server is not None
    return RedisStreamLog.from_url(server.url, prefix=redis_prefix(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StreamLog]:
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    log = await make_store(request.param, server, max_stream_bytes=64 << 10,
                           max_frame_bytes=8 << 10)
    try:
        yield log
    finally:
        await log.aclose()


async def read_all(reader: StreamReader, timeout: float = 10.0) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    async with asyncio.timeout(timeout):
        async for f in reader:
            out.append((f.seq, f.data))
    return out


async def produce(producer: Producer, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        assert await producer.append([frame(i)]) == i


# -- records ------------------------------------------------------------------------------


async def test_create_makes_an_unguessable_id_and_a_record(store: StreamLog) -> None:
    before = time.time()
    p = await store.create(owner="alice", endpoint="responses", meta={"model": "mock"},
                           id_prefix="resp_")
    q = await store.create(owner="alice", endpoint="responses", id_prefix="resp_")
    assert p.stream_id != q.stream_id
    assert p.stream_id.startswith("resp_") and len(p.stream_id) == 5 + 32
    int(p.stream_id[5:], 16)  # 128 bits of hex
    assert valid_stream_id(p.stream_id)
    info = await store.info(p.stream_id, owner="alice")
    assert info is not None
    assert (info.owner, info.endpoint, info.status, info.last_seq) == (
        "alice", "responses", "queued", -1)
    assert info.meta == {"model": "mock"}
    assert before - 1 <= info.created_at <= time.time() + 1
    assert info.producer_alive and not info.ended and not info.cancel_requested
    assert p.next_seq == 0


async def test_append_numbers_frames_per_stream_and_sets_status(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat.completions")
    q = await store.create(owner="k", endpoint="chat.completions")
    assert await p.append([], status="in_progress") == -1
    assert await p.append([frame(0), frame(1), frame(2)]) == 2
    assert await q.append([frame(0)]) == 0
    assert p.next_seq == 3 and q.next_seq == 1
    info = await store.info(p.stream_id, owner="k")
    assert info is not None and info.status == "in_progress" and info.last_seq == 2
    assert await p.finish("completed", [frame(3, "[DONE]")]) == 3
    info = await store.info(p.stream_id, owner="k")
    assert info is not None and info.status == "completed" and info.ended
    assert info.finished_at is not None and not info.producer_alive
    with pytest.raises(LeaseLost):
        await p.append([frame(4)])


async def test_finish_needs_a_final_frame_and_a_final_status(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    with pytest.raises(ValueError):
        await p.finish("completed", [])
    with pytest.raises(ValueError):
        await p.finish("in_progress", [frame(0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await p.append([frame(0)], status="completed")  # type: ignore[arg-type]
    await p.finish("incomplete", [frame(0)])


# -- reading ------------------------------------------------------------------------------


async def test_reader_replays_then_follows_live_then_ends(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await produce(p, 3)
    reader = await store.reader(p.stream_id, after=-1, owner="k")

    async def rest() -> None:
        await asyncio.sleep(0.05)
        await produce(p, 3, start=3)
        await p.finish("completed", [frame(6, "end")])

    task = asyncio.create_task(rest())
    got = await read_all(reader)
    await task
    assert [s for s, _ in got] == list(range(7))
    assert got[6][1] == frame(6, "end") and got[2][1] == frame(2)
    assert reader.ended and reader.status == "completed" and reader.cursor == 6
    assert (await reader.read()).frames == ()  # at once after the end


async def test_reader_from_a_cursor_gets_what_follows(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await produce(p, 5)
    await p.finish("completed", [frame(5)])
    for after in (-1, 0, 3, 4):
        got = await read_all(await store.reader(p.stream_id, after=after, owner="k"))
        assert [s for s, _ in got] == list(range(after + 1, 6))
    last = await store.reader(p.stream_id, after=5, owner="k")
    batch = await last.read(timeout=5)
    assert batch.frames == () or list(batch.frames) == []
    assert last.ended and last.status == "completed"


async def test_a_cursor_beyond_the_end(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await produce(p, 2)
    # Live: waits for the frame to exist.
    reader = await store.reader(p.stream_id, after=4, owner="k")
    assert (await reader.read(timeout=0.2)).frames in ((), [])
    await produce(p, 4, start=2)
    batch = await reader.read(timeout=5)
    assert (batch.first_seq, list(batch.frames)) == (5, [frame(5)])
    await p.finish("completed", [frame(6)])
    # Ended: an error, as the protocol answers 400.
    with pytest.raises(ValueError):
        await store.reader(p.stream_id, after=7, owner="k")
    with pytest.raises(ValueError):
        await store.reader(p.stream_id, after=-2, owner="k")


async def test_read_with_a_timeout_returns_empty_when_nothing_comes(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    reader = await store.reader(p.stream_id, owner="k")
    t0 = time.monotonic()
    batch = await reader.read(timeout=0.3)
    elapsed = time.monotonic() - t0
    assert isinstance(batch, FrameBatch) and len(batch.frames) == 0 and batch.first_seq == 0
    assert 0.25 <= elapsed < 3.0
    assert (await reader.read(timeout=0)).frames in ((), [])
    await p.append([frame(0)])
    assert list((await reader.read(timeout=0)).frames) == [frame(0)]


async def test_many_readers_and_one_cancelled_reader(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    readers = [await store.reader(p.stream_id, owner="k") for _ in range(5)]
    tasks = [asyncio.create_task(read_all(r)) for r in readers]
    victim = asyncio.create_task(read_all(await store.reader(p.stream_id, owner="k")))
    await asyncio.sleep(0.05)
    victim.cancel()  # while all wait together: the others go on
    await produce(p, 10)
    await p.finish("completed", [frame(10)])
    for task in tasks:
        assert [s for s, _ in await task] == list(range(11))
    with pytest.raises(asyncio.CancelledError):
        await victim


# -- owner binding and hostile ids --------------------------------------------------------


async def test_another_owner_sees_nothing(store: StreamLog) -> None:
    p = await store.create(owner="alice", endpoint="responses")
    await p.append([frame(0)])
    assert await store.info(p.stream_id, owner="mallory") is None
    with pytest.raises(StreamNotFound):
        await store.reader(p.stream_id, owner="mallory")
    assert await store.cancel(p.stream_id, owner="mallory") is None
    assert not p.cancel_requested
    info = await store.info(p.stream_id, owner=None)  # the gateway's own lookups
    assert info is not None and info.owner == "alice"


@pytest.mark.parametrize("bad", ["", "short", "a" * 129, "x" * 20 + "}:m", "*" * 20,
                                 "../../" + "a" * 20, "a b" * 10, "ü" * 20])
async def test_malformed_ids_are_not_found(store: StreamLog, bad: str) -> None:
    assert not valid_stream_id(bad)
    assert await store.info(bad, owner=None) is None
    assert await store.cancel(bad, owner=None) is None
    with pytest.raises(StreamNotFound):
        await store.reader(bad, owner=None)
    with pytest.raises(StreamNotFound):
        await store.acquire(bad)
    assert not await store.end_lost(bad, last_seq=-1, frames=[b"x"])


async def test_unknown_ids_are_not_found(store: StreamLog) -> None:
    missing = "resp_" + "0" * 32
    assert await store.info(missing, owner=None) is None
    with pytest.raises(StreamNotFound):
        await store.reader(missing, owner=None)


# -- cancel -------------------------------------------------------------------------------


async def test_cancel_reaches_the_producer_and_is_idempotent(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="responses")
    await p.append([frame(0)], status="in_progress")
    t0 = time.monotonic()
    info = await store.cancel(p.stream_id, owner="k")
    assert info is not None and info.cancel_requested and info.status == "in_progress"
    async with asyncio.timeout(1.5):
        await p.signal.wait()
    assert time.monotonic() - t0 < 1.5
    assert p.cancel_requested and not p.lease_lost
    again = await store.cancel(p.stream_id, owner="k")
    assert again is not None and again.cancel_requested
    await p.finish("cancelled", [frame(1, "cancelled")])
    final = await store.cancel(p.stream_id, owner="k")
    assert final is not None and final.status == "cancelled" and final.last_seq == 1


async def test_cancel_of_a_finished_stream_answers_its_final_state(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="responses")
    await p.finish("completed", [frame(0)])
    info = await store.cancel(p.stream_id, owner="k")
    assert info is not None and info.status == "completed" and not info.cancel_requested


async def test_a_producer_made_after_a_cancel_sees_it(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="responses")
    await store.cancel(p.stream_id, owner="k")
    await p.release()
    q = await store.acquire(p.stream_id)
    assert q is not None and q.cancel_requested and q.signal.is_set()


# -- the producer's lease -----------------------------------------------------------------


async def test_release_without_finish_is_producer_lost_after_every_frame(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await produce(p, 4)
    reader = await store.reader(p.stream_id, after=1, owner="k")
    got: list[int] = []

    async def consume() -> float:
        try:
            async for f in reader:
                got.append(f.seq)
        except ProducerLost as exc:
            assert exc.last_seq == 3 and exc.code == "producer_lost"
            return time.monotonic()
        raise AssertionError("ended without ProducerLost")

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await p.release()
    lost_at = await asyncio.wait_for(task, 5)
    assert got == [2, 3]
    assert lost_at - t0 <= 2.0
    # Delivery ends it with a typed error frame, once; every reader then gets that end.
    assert await store.end_lost(p.stream_id, last_seq=3, frames=[frame(4, "producer_lost")])
    assert not await store.end_lost(p.stream_id, last_seq=3, frames=[frame(4, "again")])
    batch = await reader.read(timeout=5)
    assert list(batch.frames) == [frame(4, "producer_lost")] and reader.ended
    assert reader.status == "failed"
    late = await read_all(await store.reader(p.stream_id, after=-1, owner="k"))
    assert [s for s, _ in late] == [0, 1, 2, 3, 4]


async def test_a_dropped_producer_is_lost_within_two_seconds(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await produce(p, 2)
    stream_id = p.stream_id
    reader = await store.reader(stream_id, after=-1, owner="k")
    assert [f for f in (await reader.read(timeout=5)).frames] == [frame(0), frame(1)]
    await asyncio.sleep(0.6)  # a lease refresh or two went by: the lease is held
    info = await store.info(stream_id, owner="k")
    assert info is not None and info.producer_alive
    # The task running it died without finishing or releasing (as a killed process would).
    del p  # freed by reference counting, as a dead task's objects are (no gc.collect():
    #        it would report other tests' leaked sockets here)
    t0 = time.monotonic()
    with pytest.raises(ProducerLost) as caught:
        await asyncio.wait_for(reader.read(), 5)
    assert time.monotonic() - t0 <= 2.0
    assert caught.value.last_seq == 1


async def test_end_lost_only_without_a_producer_and_at_the_right_seq(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await produce(p, 2)
    assert not await store.end_lost(p.stream_id, last_seq=1, frames=[frame(2)])  # alive
    await p.release()
    assert not await store.end_lost(p.stream_id, last_seq=0, frames=[frame(1)])  # behind
    assert await store.end_lost(p.stream_id, last_seq=1, frames=[frame(2)],
                                status="incomplete")
    info = await store.info(p.stream_id, owner=None)
    assert info is not None and info.status == "incomplete" and info.last_seq == 2


async def test_take_over_continues_the_sequence(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await produce(p, 3)
    assert await store.acquire(p.stream_id) is None  # held
    reader = await store.reader(p.stream_id, owner="k")
    await p.release()
    q = await store.acquire(p.stream_id)
    assert q is not None and q.next_seq == 3 and q.stream_id == p.stream_id
    assert await store.acquire(p.stream_id) is None  # held by q now
    with pytest.raises(LeaseLost):
        await p.append([frame(3, "zombie")])
    await produce(q, 2, start=3)
    await q.finish("completed", [frame(5)])
    got = await read_all(reader)
    assert [s for s, _ in got] == list(range(6))
    assert b"zombie" not in b"".join(d for _, d in got)
    assert await store.acquire(p.stream_id) is None  # ended


async def test_leaving_the_context_without_finishing_releases(store: StreamLog) -> None:
    with pytest.raises(RuntimeError):
        async with await store.create(owner="k", endpoint="chat") as p:
            await p.append([frame(0)])
            raise RuntimeError("provider blew up")
    reader = await store.reader(p.stream_id, owner="k")
    assert list((await reader.read(timeout=5)).frames) == [frame(0)]
    with pytest.raises(ProducerLost):
        await asyncio.wait_for(reader.read(), 5)


async def test_an_append_cancelled_midway_leaves_the_sequence_consistent(
        store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await p.append([frame(0)])
    for _ in range(5):
        task = asyncio.create_task(p.append([frame(p.next_seq, "maybe")]))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Whatever was stored, the producer knows where it stands and goes on.
    last = await p.append([frame(p.next_seq, "after")])
    await p.finish("completed", [frame(last + 1)])
    got = await read_all(await store.reader(p.stream_id, owner="k"))
    assert [s for s, _ in got] == list(range(last + 2))
    assert got[last][1] == frame(last, "after")


async def test_refresh_reports_the_lease(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    assert await p.refresh()
    await p.release()
    assert not await p.refresh()


# -- readers, as the producer sees them --------------------------------------------------


async def wait_until(check, timeout: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, "not within the time"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_the_producer_knows_whether_anyone_reads(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    assert p.readers == 0 and p.readers_seen_at is None
    first = await store.reader(p.stream_id, owner="k")
    async with await store.reader(p.stream_id, owner="k"):
        await wait_until(lambda: p.readers == 2, 1.5)  # a lease refresh at most
        await first.aclose()
        await first.aclose()  # idempotent
        await wait_until(lambda: p.readers == 1, 1.5)
    await wait_until(lambda: p.readers == 0, 1.5)
    seen = p.readers_seen_at
    assert seen is not None and time.monotonic() - seen < 2.0
    # A reader dropped without aclose() (its task died) stops counting too.
    reader = await store.reader(p.stream_id, owner="k")
    await wait_until(lambda: p.readers == 1, 1.5)
    del reader
    await wait_until(lambda: p.readers == 0, 3.0)
    # Refused readers never count.
    with pytest.raises(StreamNotFound):
        await store.reader(p.stream_id, owner="mallory")
    await p.finish("completed", [frame(0)])
    with pytest.raises(ValueError):
        await store.reader(p.stream_id, after=5, owner="k")


# -- sizes --------------------------------------------------------------------------------


async def test_frame_and_stream_caps(store: StreamLog) -> None:
    p = await store.create(owner="k", endpoint="chat")
    with pytest.raises(StreamTooLarge):
        await p.append([b"x" * (8 << 10 + 1)])
    big = b"y" * (7 << 10)
    n = 0
    with pytest.raises(StreamTooLarge):
        while n < 100:
            await p.append([big])
            n += 1
    assert 7 <= n <= 9  # 64 KiB cap
    # The stream can still end with its error frame, and nothing was half-written.
    last = await p.finish("failed", [frame(n, "stream_too_large")])
    assert last == n
    got = await read_all(await store.reader(p.stream_id, owner="k"))
    assert [s for s, _ in got] == list(range(n + 1))


async def test_bad_create_arguments(store: StreamLog) -> None:
    for kwargs in ({"owner": "", "endpoint": "chat"}, {"owner": "k", "endpoint": ""},
                   {"owner": "k", "endpoint": "chat", "id_prefix": "a/b"},
                   {"owner": "k", "endpoint": "chat", "meta": {"m": "x" * 20000}}):
        with pytest.raises(ValueError):
            await store.create(**kwargs)  # type: ignore[arg-type]
