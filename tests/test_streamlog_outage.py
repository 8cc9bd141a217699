"""The Redis stream log when Redis goes away mid-run (issue 10): running streams go on,
their frames held in memory and written back, in order, once Redis answers again; the
record made again when Redis came back empty; the hold capped; a stream another process
took over meanwhile is left to it. Each test has a private redis-server it stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _redis import RedisServer, redis_prefix

pytest.importorskip("redis")

from tokenrelay.server.streamlog import (
    StreamLogUnavailable,
    StreamNotFound,
    StreamTooLarge,
)
from tokenrelay.server.streamlog.redis_log import RedisStreamLog


def frames(tag: str, n: int, size: int = 20) -> list[bytes]:
    return [f"{tag}{i}:".encode().ljust(size, b".") for i in range(n)]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def read_all(store: RedisStreamLog, stream_id: str, after: int = -1,
                   ) -> tuple[list[bytes], str | None]:
    async with await store.reader(stream_id, after=after, owner="k") as reader:
        got = [frame.data async for frame in reader]
        return got, reader.status


def make_store(url: str, **kwargs: object) -> RedisStreamLog:
    # block_ms 200: a stopped server is noticed within ~2.4 s (two tries of 1.2 s).
    return RedisStreamLog.from_url(url, prefix=redis_prefix(), retention_s=60,
                                   block_ms=200, **kwargs)  # type: ignore[arg-type]


async def test_frames_held_while_redis_is_stopped_are_written_in_order(
        tmp_path: Path) -> None:
    """SIGSTOP (nothing answers, nothing lost): one stream ends during the outage, one
    goes on after it; both read back from Redis byte for byte, and the one that went on
    appends straight to Redis again, under its lease."""
    server = RedisServer.start(tmp_path / "redis")
    store = make_store(server.url)
    try:
        a = await store.create(owner="k", endpoint="chat", meta={"model": "m"})
        b = await store.create(owner="k", endpoint="chat")
        sent_a, sent_b = frames("a", 8), frames("b", 8)
        assert await a.append(sent_a[:2]) == 1
        assert await b.append(sent_b[:2]) == 1
        server.pause()
        started = time.monotonic()
        assert await a.append(sent_a[2:3]) == 2  # noticed (a few seconds), then held
        assert time.monotonic() - started < 8
        for i in range(3, 7):
            assert await a.append(sent_a[i:i + 1]) == i  # held at once
        assert await b.append(sent_b[2:5]) == 4
        assert await a.finish("completed", sent_a[7:]) == 7
        await asyncio.sleep(1.6)  # both leases lapse in Redis meanwhile
        server.resume()
        await until(lambda: not store._holding)
        assert not b.lease_lost and "_enqueue" not in b.__dict__
        assert await b.append(sent_b[5:7]) == 6  # Redis again, its lease taken back
        assert await b.refresh()
        assert await b.finish("completed", sent_b[7:]) == 7

        assert await read_all(store, a.stream_id) == (sent_a, "completed")
        assert await read_all(store, b.stream_id) == (sent_b, "completed")
        info = await store.info(a.stream_id, owner="k")
        assert info is not None and info.last_seq == 7 and info.status == "completed"
        assert dict(info.meta) == {"model": "m"}  # nothing was lost: no kept_from
        assert store._held_total == 0
    finally:
        server.resume()
        try:
            await store.aclose()
        finally:
            server.stop()


async def test_redis_restarted_empty_the_record_is_made_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL and a restart without persistence: the running stream's record is made
    again under the same id from its first held frame (a resume from there works; one
    from before is not found); with hold_new_streams a stream created while Redis was
    away is made whole."""
    caplog.set_level(logging.WARNING, "tokenrelay.streamlog")
    server = RedisServer.start(tmp_path / "redis")
    store = make_store(server.url, hold_new_streams=True)
    try:
        p = await store.create(owner="k", endpoint="chat", meta={"model": "m"})
        sent = frames("p", 6)
        await p.append(sent[:2])
        server.kill()
        assert await p.append(sent[2:4]) == 3
        born = await store.create(owner="k", endpoint="chat")  # while Redis is away
        born_frames = frames("n", 3)
        assert await born.append(born_frames[:2]) == 1
        assert await born.finish("cancelled", born_frames[2:]) == 2
        assert await p.append(sent[4:5]) == 4
        server.restart()
        await until(lambda: not store._holding)
        assert await p.finish("completed", sent[5:]) == 5

        info = await store.info(p.stream_id, owner="k")
        assert info is not None and (info.owner, info.endpoint, info.status) == (
            "k", "chat", "completed")
        assert dict(info.meta) == {"model": "m", "kept_from": "2"}
        assert await read_all(store, p.stream_id, after=1) == (sent[2:], "completed")
        with pytest.raises(StreamNotFound):
            await store.reader(p.stream_id, after=0, owner="k")
        assert await read_all(store, born.stream_id) == (born_frames, "cancelled")
        assert await store.info(born.stream_id, owner="other") is None  # owner kept
        text = caplog.text
        assert text.count("their frames held in memory until it is back") == 1
        assert "reachable again" in text
    finally:
        try:
            await store.aclose()
        finally:
            server.stop()


async def test_the_hold_is_capped(tmp_path: Path) -> None:
    """Over max_stream_bytes held, an append is refused (StreamTooLarge: the stream ends
    with a typed error); its end is still held and written. Over max_held_bytes in all,
    a stream's append is refused as unavailable."""
    server = RedisServer.start(tmp_path / "redis")
    store = make_store(server.url, max_stream_bytes=1000, max_held_bytes=1500)
    try:
        p = await store.create(owner="k", endpoint="chat")
        q = await store.create(owner="k", endpoint="chat")
        await p.append([b"x" * 100])
        server.kill()
        assert await p.append([b"y" * 600]) == 1  # held: 600 of 1000
        with pytest.raises(StreamTooLarge) as too_large:
            await p.append([b"z" * 600])
        assert "max_stream_bytes (1000)" in str(too_large.value)
        assert p.next_seq == 2  # the refused frame took no number
        assert await p.finish("failed", [b"error"]) == 2  # the end is exempt
        assert await q.append([b"q" * 800]) == 0
        with pytest.raises(StreamLogUnavailable) as unavailable:
            await q.append([b"r" * 200])  # 605 + 800 + 200 > 1500 held in all
        assert "max_held_bytes (1500)" in str(unavailable.value)
        await q.finish("failed", [b"end"])
        server.restart()
        await until(lambda: not store._holding)
        assert store._held_total == 0
        assert await read_all(store, p.stream_id, after=0) == ([b"y" * 600, b"error"],
                                                                "failed")
        assert await read_all(store, q.stream_id) == ([b"q" * 800, b"end"], "failed")
    finally:
        try:
            await store.aclose()
        finally:
            server.stop()


class Switch:
    """A TCP forwarder to Redis that can be cut (connections closed, port refusing) and
    restored: Redis unreachable from one store only."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      ) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_a_stream_taken_over_meanwhile_is_left_to_the_other_process(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "tokenrelay.streamlog")
    server = RedisServer.start(tmp_path / "redis")
    switch = Switch(server.port)
    await switch.start()
    prefix = redis_prefix()
    here = RedisStreamLog.from_url(f"redis://127.0.0.1:{switch.port}/0", prefix=prefix,
                                   block_ms=200)
    there = RedisStreamLog.from_url(server.url, prefix=prefix, block_ms=200)
    try:
        p = await here.create(owner="k", endpoint="chat")
        await p.append([b"0"])
        await switch.cut()  # Redis is away for this process only
        assert await p.append([b"1-held"]) == 1
        await asyncio.sleep(1.6)  # its lease lapses
        other = await there.acquire(p.stream_id)
        assert other is not None
        await other.append([b"1-other"])
        await switch.start()  # back (same port)
        await until(lambda: not here._holding)
        assert p.lease_lost and p.signal.is_set()
        assert "another process took it over meanwhile" in caplog.text
        await other.finish("completed", [b"2"])
        assert await read_all(there, p.stream_id) == ([b"0", b"1-other", b"2"], "completed")
    finally:
        try:
            with contextlib.suppress(Exception):
                await switch.cut()
            await here.aclose()
            await there.aclose()
        finally:
            server.stop()


async def test_a_reader_here_waits_for_its_holding_producer(tmp_path: Path) -> None:
    """Between Redis coming back and the held frames being written, a reader in the same
    process sees no lease; it waits for its producer here instead of declaring it lost
    (a take-over elsewhere would race it)."""
    server = RedisServer.start(tmp_path / "redis")
    store = make_store(server.url)
    try:
        p = await store.create(owner="k", endpoint="chat")
        await p.append([b"0"])
        reader = await store.reader(p.stream_id, after=0, owner="k")
        p._start_holding()  # as after an outage, before the recovery's first write
        lease = store._keys(p.stream_id)[2]
        await store._redis.delete(lease)  # (it lapsed while Redis was away)
        assert await p.append([b"1"]) == 1  # held
        batch = await reader.read(timeout=0.8)  # no ProducerLost
        assert list(batch.frames) == []
        store._lost(StreamLogUnavailable("test: Redis was away"))  # the recovery starts
        assert list((await reader.read(timeout=5)).frames) == [b"1"]
        await p.finish("completed", [b"2"])
        assert list((await reader.read(timeout=5)).frames) == [b"2"] and reader.ended
        await reader.aclose()
    finally:
        try:
            await store.aclose()
        finally:
            server.stop()


async def test_a_record_gone_without_an_outage_is_made_again(tmp_path: Path) -> None:
    """Redis restarted empty between two calls (no call failed: a FLUSHALL here), or it
    evicted a live stream: the producer is not "lost", it makes the record again."""
    server = RedisServer.start(tmp_path / "redis")
    store = make_store(server.url)
    try:
        p = await store.create(owner="k", endpoint="chat")
        await p.append([b"0", b"1"])
        await store._redis.flushall()
        assert await p.append([b"2"]) == 2
        await until(lambda: not store._holding)
        assert not p.lease_lost
        assert await p.append([b"3"]) == 3
        await p.finish("completed", [b"4"])
        assert await read_all(store, p.stream_id, after=1) == ([b"2", b"3", b"4"],
                                                                "completed")
    finally:
        try:
            await store.aclose()
        finally:
            server.stop()


async def test_a_quiet_stream_keeps_its_lease_through_an_outage(tmp_path: Path) -> None:
    """No frame at all while Redis is stopped (a model thinking): the lease lapses in
    Redis meanwhile, yet the stream is not lost: the keeper's failed refresh makes it
    hold, and its lease is taken again when Redis is back."""
    server = RedisServer.start(tmp_path / "redis")
    store = make_store(server.url)
    try:
        p = await store.create(owner="k", endpoint="chat")
        await p.append([b"0"])
        server.pause()
        await until(lambda: p._held is not None, timeout=8)  # the keeper noticed
        await asyncio.sleep(1.6)
        server.resume()
        await until(lambda: not store._holding)
        assert not p.lease_lost and not p.signal.is_set()
        assert await p.append([b"1"]) == 1
        await p.finish("completed", [b"2"])
        assert await read_all(store, p.stream_id) == ([b"0", b"1", b"2"], "completed")
    finally:
        server.resume()
        try:
            await store.aclose()
        finally:
            server.stop()
