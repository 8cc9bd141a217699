"""The Redis store against a real redis-server: key layout and TTLs, leases across
processes, hostile replies, and Redis itself failing mid-read."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _redis import RedisServer, redis_prefix

pytest.importorskip("redis")

import redis.asyncio as aioredis

from tokenrelay.server.streamlog import (
    ProducerLost,
    StreamLogUnavailable,
)
from tokenrelay.server.streamlog.redis_log import RedisStreamLog


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStreamLog]:
    log = RedisStreamLog.from_url(redis_server.url, prefix=redis_prefix(), retention_s=60,
                                  max_frame_bytes=4096)
    try:
        yield log
    finally:
        await log.aclose()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_one_stream_key_entry_ids_from_seq_and_a_ttl_on_every_key(
        store: RedisStreamLog, raw: aioredis.Redis) -> None:
    p = await store.create(owner="k", endpoint="chat", meta={"model": "m"})
    await p.append([b"a", b"b"], status="in_progress")
    await store.cancel(p.stream_id, owner="k")
    m, x, lease, c, _ = store._keys(p.stream_id)
    entries = await raw.xrange(x)
    assert [(eid, fields) for eid, fields in entries] == [
        (b"0-1", {b"d": b"a"}), (b"0-2", {b"d": b"b"})]
    for key in (m, x, c):
        assert 0 < await raw.pttl(key) <= 60_000
    assert 0 < await raw.pttl(lease) <= 1500
    await p.finish("cancelled", [b"c"])
    assert (await raw.xrange(x))[-1] == (b"0-3", {b"d": b"c", b"end": b"cancelled"})
    assert await raw.exists(lease) == 0
    for key in (m, x):
        assert 0 < await raw.pttl(key) <= 60_000


async def test_a_finished_stream_expires_after_retention_s_a_live_one_does_not(
        redis_server: RedisServer, raw: aioredis.Redis) -> None:
    store = RedisStreamLog.from_url(redis_server.url, prefix=redis_prefix(), retention_s=1.5)
    try:
        done = await store.create(owner="k", endpoint="chat")
        await done.finish("completed", [b"end"])
        live = await store.create(owner="k", endpoint="chat")
        await live.append([b"0"])
        await asyncio.sleep(2.2)  # past retention_s: the live one's keys were renewed
        assert await store.info(done.stream_id, owner="k") is None
        assert await raw.exists(*store._keys(done.stream_id)) == 0
        info = await store.info(live.stream_id, owner="k")
        assert info is not None and info.last_seq == 0 and info.producer_alive
    finally:
        await store.aclose()


async def test_the_lease_is_kept_alive_while_the_producer_lives(
        store: RedisStreamLog, raw: aioredis.Redis) -> None:
    p = await store.create(owner="k", endpoint="chat")
    reader = await store.reader(p.stream_id, owner="k")
    # 2.5 s without an append: the keeper refreshes the 1.5 s lease every 0.5 s.
    batch = await reader.read(timeout=2.5)
    assert list(batch.frames) == []
    assert 0 < await raw.pttl(store._keys(p.stream_id)[2]) <= 1500
    await p.append([b"x"])
    assert list((await reader.read(timeout=5)).frames) == [b"x"]


async def test_a_reader_in_another_process_counts_and_its_death_too(
        store: RedisStreamLog, redis_server: RedisServer) -> None:
    other = RedisStreamLog.from_url(redis_server.url, prefix=store.prefix)
    try:
        p = await store.create(owner="k", endpoint="chat")
        reader = await other.reader(p.stream_id, owner="k")
        await wait_for(lambda: p.readers == 1, 1.5)
        # Its process stops renewing (dropped without aclose, as in a crash): it lapses.
        other._readers.clear()
        del reader
        await wait_for(lambda: p.readers == 0, 3.0)
        assert p.readers_seen_at is not None
    finally:
        await other.aclose()


async def wait_for(check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.05)


async def test_cancel_from_another_process_reaches_the_producer_at_once(
        store: RedisStreamLog, redis_server: RedisServer) -> None:
    other = RedisStreamLog.from_url(redis_server.url, prefix=store.prefix)

    async def no_refresh() -> bool:  # the flag is not polled: only pub/sub can tell it
        await asyncio.sleep(0.5)
        return True

    store._refresh_all = no_refresh  # type: ignore[method-assign]
    try:
        p = await store.create(owner="k", endpoint="responses")
        await asyncio.sleep(0.2)  # the producer's process is subscribed
        info = await other.cancel(p.stream_id, owner="k")
        assert info is not None and info.cancel_requested
        await asyncio.wait_for(p.signal.wait(), 1.2)  # before the lease would expire
        assert p.cancel_requested and not p.lease_lost
    finally:
        await other.aclose()


async def test_a_missed_cancel_message_is_seen_at_the_next_lease_refresh(
        store: RedisStreamLog, raw: aioredis.Redis) -> None:
    p = await store.create(owner="k", endpoint="responses")
    await raw.set(store._keys(p.stream_id)[3], b"1", px=60_000)  # the flag, unpublished
    await asyncio.wait_for(p.signal.wait(), 1.5)
    assert p.cancel_requested


# -- hostile replies ----------------------------------------------------------------------


async def _reader_after_one_frame(store: RedisStreamLog):  # type: ignore[no-untyped-def]
    p = await store.create(owner="k", endpoint="chat")
    await p.append([b"ok"])
    reader = await store.reader(p.stream_id, owner="k")
    assert list((await reader.read(timeout=5)).frames) == [b"ok"]
    return p, reader


@pytest.mark.parametrize("entry_id, fields", [
    ("0-5", {"d": b"skipped ahead"}),            # a gap in the ids
    ("0-2", {"d": b"x" * 5000}),                 # over max_frame_bytes
    ("0-2", {"d": b"x", "evil": b"1"}),          # an unknown field
    ("0-2", {"nod": b"x"}),                      # no frame
    ("0-2", {"d": b"x", "end": b"weird"}),       # not a final status
])
async def test_a_bad_entry_is_an_error_not_a_frame(
        store: RedisStreamLog, raw: aioredis.Redis, entry_id: str,
        fields: dict[str, bytes]) -> None:
    p, reader = await _reader_after_one_frame(store)
    await raw.xadd(store._keys(p.stream_id)[1], fields, id=entry_id)  # type: ignore[arg-type]
    with pytest.raises(StreamLogUnavailable):
        await reader.read(timeout=5)


async def test_frames_after_the_final_one_are_an_error(
        store: RedisStreamLog, raw: aioredis.Redis) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await p.finish("completed", [b"end"])
    await raw.xadd(store._keys(p.stream_id)[1], {"d": b"more"}, id="0-2")
    reader = await store.reader(p.stream_id, owner="k")
    with pytest.raises(StreamLogUnavailable):
        await reader.read(timeout=5)


@pytest.mark.parametrize("field, value", [
    ("s", b"hacked"), ("n", b"-7"), ("n", b"many"), ("o", b"o" * 300), ("m", b"[1, 2]"),
    ("m", b'{"a": 1}'), ("t", b"yesterday"), ("t", b"nan"), ("f", b"inf"),
])
async def test_a_bad_record_is_an_error(store: RedisStreamLog, raw: aioredis.Redis,
                                        field: str, value: bytes) -> None:
    p = await store.create(owner="k", endpoint="chat")
    await raw.hset(store._keys(p.stream_id)[0], field, value)
    with pytest.raises(StreamLogUnavailable):
        await store.info(p.stream_id, owner=None)


async def test_reads_are_bounded_by_read_count(redis_server: RedisServer) -> None:
    store = RedisStreamLog.from_url(redis_server.url, prefix=redis_prefix(), read_count=10)
    try:
        p = await store.create(owner="k", endpoint="chat")
        await p.append([b"%d" % i for i in range(25)])
        reader = await store.reader(p.stream_id, owner="k")
        sizes = [len((await reader.read(timeout=5)).frames) for _ in range(3)]
        assert sizes == [10, 10, 5]
    finally:
        await store.aclose()


# -- failures: the producer's process, and Redis itself -----------------------------------

_CHILD = """
import asyncio, random, sys
from tokenrelay.server.streamlog.redis_log import RedisStreamLog

async def main():
    store = RedisStreamLog.from_url(sys.argv[1], prefix=sys.argv[2])
    rng = random.Random(int(sys.argv[3]))
    p = await store.create(owner="k", endpoint="chat")
    print(p.stream_id, flush=True)
    tick = 0
    while True:
        n = rng.randint(1, 4)
        last = await p.append([b"t%d %d/%d" % (tick, i, n) for i in range(n)])
        print(last, flush=True)
        tick += 1
        await asyncio.sleep(rng.uniform(0, 0.03))

asyncio.run(main())
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_producer_process_killed_mid_stream(store: RedisStreamLog,
                                                    redis_server: RedisServer,
                                                    seed: int) -> None:
    """SIGKILL the producing process at a random point: the reader gets every frame
    written, once, whole ticks only, then ProducerLost within 2 s of the death, and the
    stream ends with the typed error."""
    rng = random.Random(seed)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, redis_server.url, store.prefix, str(seed),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        assert child.stdout is not None
        async with asyncio.timeout(30):
            stream_id = (await child.stdout.readline()).decode().strip()
        reader = await store.reader(stream_id, owner="k")
        got: list[tuple[int, bytes]] = []
        kill_after = rng.randint(1, 40)
        async with asyncio.timeout(20):
            while len(got) < kill_after:
                batch = await reader.read()
                got += [(batch.first_seq + i, d) for i, d in enumerate(batch.frames)]
        await asyncio.sleep(rng.uniform(0, 0.03))  # anywhere in a tick
        child.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.wait_for(child.wait(), 10)
        acked = [int(line) for line in (await child.stdout.read()).split()]
        with pytest.raises(ProducerLost) as caught:
            async with asyncio.timeout(10):
                while True:
                    batch = await reader.read()
                    got += [(batch.first_seq + i, d) for i, d in enumerate(batch.frames)]
        lost_after = time.monotonic() - killed
        assert lost_after <= 2.0, f"producer_lost after {lost_after:.2f} s"
        seqs = [s for s, _ in got]
        assert seqs == list(range(len(seqs)))  # no gap, no duplicate
        assert seqs[-1] >= max(acked, default=0)  # every acknowledged frame arrived
        # Whole ticks only: a tick is stored entirely or not at all.
        ticks: dict[bytes, list[bytes]] = {}
        for _, data in got:
            tick, part = data.split(b" ")
            ticks.setdefault(tick, []).append(part)
        for parts in ticks.values():
            n = int(parts[0].split(b"/")[1])
            assert parts == [b"%d/%d" % (i, n) for i in range(n)]
        assert caught.value.last_seq == seqs[-1]
        assert await store.end_lost(stream_id, last_seq=seqs[-1], frames=[b"producer_lost"])
        assert list((await reader.read(timeout=5)).frames) == [b"producer_lost"]
        assert reader.ended and reader.status == "failed"
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def _waiting_reader(server: RedisServer) -> tuple[RedisStreamLog, asyncio.Task[object]]:
    store = RedisStreamLog.from_url(server.url, prefix=redis_prefix())
    p = await store.create(owner="k", endpoint="chat")
    await p.append([b"0"])
    reader = await store.reader(p.stream_id, owner="k")
    assert list((await reader.read(timeout=5)).frames) == [b"0"]
    task: asyncio.Task[object] = asyncio.create_task(reader.read())
    await asyncio.sleep(0.3)  # blocked in XREAD
    task.producer = p  # type: ignore[attr-defined]  (keep it alive)
    return store, task


async def test_redis_killed_mid_read_is_a_typed_error(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path / "redis")
    try:
        store, task = await _waiting_reader(server)
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(StreamLogUnavailable) as caught:
            await asyncio.wait_for(task, 15)
        assert time.monotonic() - t0 < 5
        assert server.url not in str(caught.value)
        # A running stream goes on: its frame is held in memory until Redis is back
        # (tests/test_streamlog_outage.py); a new one is refused (no hold_new_streams).
        assert await task.producer.append([b"1"]) == 1  # type: ignore[attr-defined]
        with pytest.raises(StreamLogUnavailable):
            await store.create(owner="k", endpoint="chat")
        await store.aclose()
    finally:
        server.stop()


async def test_redis_stopped_mid_read_is_a_typed_error_not_a_hang(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path / "redis")
    try:
        store, task = await _waiting_reader(server)
        server.pause()  # SIGSTOP: connections stay open, nothing answers
        t0 = time.monotonic()
        with pytest.raises(StreamLogUnavailable):
            await asyncio.wait_for(task, 20)
        assert time.monotonic() - t0 < 10
        server.resume()
        await store.aclose()
    finally:
        server.stop()


async def test_no_redis_at_all_is_a_typed_error(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path / "redis")
    url = server.url
    server.stop()
    store = RedisStreamLog.from_url(url)
    try:
        with pytest.raises(StreamLogUnavailable):
            await asyncio.wait_for(store.create(owner="k", endpoint="chat"), 10)
        with pytest.raises(StreamLogUnavailable):
            await asyncio.wait_for(store.info("a" * 32, owner=None), 10)
    finally:
        await store.aclose()
