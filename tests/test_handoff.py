"""The stream log's hand-off at shutdown (issue 10): a producer gives its stream up
unfinished and lists it for the other processes; what the list returns is checked.

The whole path (SIGTERM, the broken connection, the resume through nginx, the take-over,
the sweeper) runs on real replicas in ``test_replicas.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from _redis import RedisServer, redis_prefix

pytest.importorskip("redis")

import redis.asyncio as aioredis

from tokenrelay.server.streamlog import MemoryStreamLog
from tokenrelay.server.streamlog.redis_log import RedisStreamLog


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStreamLog, RedisStreamLog]]:
    """Two processes' stores on one Redis (the same prefix)."""
    prefix = redis_prefix()
    one = RedisStreamLog.from_url(redis_server.url, prefix=prefix, retention_s=60)
    two = RedisStreamLog.from_url(redis_server.url, prefix=prefix, retention_s=60)
    try:
        yield one, two
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_handed_off_stream_is_listed_and_another_process_takes_it_on(
        stores: tuple[RedisStreamLog, RedisStreamLog]) -> None:
    one, two = stores
    producer = await one.create(owner="k", endpoint="chat.completions")
    await producer.append([b"id: 0\ndata: a\n\n", b"id: 1\ndata: b\n\n"])
    assert one.shared and await two.handed_off() == []
    assert await one.hand_off(producer)
    assert producer.closed
    assert await two.handed_off() == [producer.stream_id]
    # Its lease is free at once (no wait for it to lapse): the other process takes it on
    # after the last frame appended.
    taken = await two.acquire(producer.stream_id)
    assert taken is not None and taken.next_seq == 2
    await taken.finish("completed", [b"id: 2\ndata: [DONE]\n\n"])
    await two.forget_handed_off(producer.stream_id)
    assert await one.handed_off() == []
    # A producer given up already cannot be handed off again (nothing to give).
    assert not await one.hand_off(producer)


async def test_the_list_returns_only_stream_ids(
        stores: tuple[RedisStreamLog, RedisStreamLog], redis_server: RedisServer) -> None:
    """Whatever else is in the list (written by anything with access to Redis) is never
    returned, so it never becomes part of a key name; it is removed."""
    one, _ = stores
    producer = await one.create(owner="k", endpoint="chat")
    assert await one.hand_off(producer)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        key = f"{one.prefix}handoff"
        await raw.zadd(key, {"../../etc": 0, "x" * 300: 0, "a b": 0})
        assert await one.handed_off() == [producer.stream_id]
        assert await raw.zcard(key) == 1
    finally:
        await raw.aclose()


async def test_the_memory_store_hands_nothing_off() -> None:
    """One process, nothing to hand over to: the stream ends where it runs (the drain's
    server_shutdown end, test_gateway_shutdown.py)."""
    log = MemoryStreamLog()
    producer = await log.create(owner="k", endpoint="chat")
    assert not log.shared
    assert not await log.hand_off(producer)
    assert not producer.closed and await log.handed_off() == []
    await producer.finish("completed", [b"data: x\n\n"])
    await log.aclose()
