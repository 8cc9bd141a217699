"""Per-key limits shared in Redis (``server/shared_limits.py``) against a real redis-server:
several limiters on one Redis, each with its own connection pool, stand for several
processes; their admissions together are exactly what one process would admit."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _redis import RedisServer, redis_prefix

pytest.importorskip("redis")

import redis.asyncio as aioredis

from tokenrelay.server.config import KeyConfig
from tokenrelay.server.redis_link import RedisLink
from tokenrelay.server.security import GatewayHTTPError, Lease
from tokenrelay.server.shared_limits import LEASE_MS, SharedLimiter

ZERO = "0" * 64


def key(**limits: int) -> KeyConfig:
    return KeyConfig(id="alice", sha256=ZERO, **limits)  # type: ignore[arg-type]


class Group:
    """``n`` limiters ("processes") sharing one Redis and one key prefix."""

    def __init__(self, url: str, n: int, **options: object) -> None:
        prefix = redis_prefix()
        self.links = [RedisLink(url) for _ in range(n)]
        self.limiters = [SharedLimiter(link, prefix=prefix, **options)  # type: ignore[arg-type]
                         for link in self.links]

    async def attempt(self, i: int, k: KeyConfig, reserve: int = 1) -> Lease | str:
        try:
            return await self.limiters[i % len(self.limiters)].aacquire(k, reserve)
        except GatewayHTTPError as exc:
            return exc.code or str(exc.status)

    async def aclose(self) -> None:
        for limiter, link in zip(self.limiters, self.links, strict=True):
            await limiter.aclose()
            await link.aclose()


@pytest.fixture
async def three(redis_server: RedisServer) -> AsyncIterator[Group]:
    group = Group(redis_server.url, 3)
    try:
        yield group
    finally:
        await group.aclose()


async def test_200_simultaneous_attempts_over_three_processes_admit_exactly_the_concurrency(
        three: Group) -> None:
    k = key(max_concurrent=5, requests_per_minute=60)
    results = await asyncio.gather(*[three.attempt(i, k) for i in range(200)])
    leases = [r for r in results if isinstance(r, Lease)]
    assert len(leases) == 5
    assert Counter(r for r in results if isinstance(r, str)) == {"concurrency_limit": 195}
    for lease in leases:
        lease.release(0)
    # Released: the next five get in, from any process (the release went out at once).
    await asyncio.sleep(0.05)
    again = await asyncio.gather(*[three.attempt(i, k) for i in range(30)])
    assert sum(isinstance(r, Lease) for r in again) == 5
    for r in again:
        if isinstance(r, Lease):
            r.release(0)


async def test_requests_per_minute_is_exact_over_three_processes_and_never_more_than_five_run(
        three: Group) -> None:
    """200 attempts spread over ~1 s, each admitted one holding its slot 10 ms: room for
    far more than 60 by concurrency, so requests/min decides: exactly 60, never 6 at once."""
    k = key(max_concurrent=5, requests_per_minute=60)
    running = 0
    most = 0

    async def one(i: int) -> Lease | str:
        nonlocal running, most
        await asyncio.sleep(i * 0.005)
        result = await three.attempt(i, k)
        if isinstance(result, Lease):
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.01)
            running -= 1
            result.release(0)
        return result

    results = await asyncio.gather(*[one(i) for i in range(200)])
    admitted = sum(isinstance(r, Lease) for r in results)
    refused = Counter(r for r in results if isinstance(r, str))
    assert admitted == 60, refused
    assert most <= 5
    assert refused["rate_limit"] >= 200 - 60 - refused["concurrency_limit"]
    # The 61st is told when the oldest of the minute's requests leaves the window.
    with pytest.raises(GatewayHTTPError) as caught:
        await three.limiters[0].aacquire(k, 1)
    assert caught.value.status == 429 and caught.value.code == "rate_limit"
    assert 55 <= int(caught.value.headers["retry-after"]) <= 61


async def test_tokens_are_reserved_at_admission_and_settled_with_the_real_usage(
        three: Group) -> None:
    k = key(tokens_per_minute=1000)
    a, b = three.limiters[0], three.limiters[1]
    first = await a.aacquire(k, 600)
    with pytest.raises(GatewayHTTPError) as caught:
        await b.aacquire(k, 600)  # 600 reserved elsewhere + 600 > 1000
    assert caught.value.code == "token_limit" and caught.value.status == 429
    first.release(100)  # it used 100 of its 600: 500 back for everyone
    await asyncio.sleep(0.05)
    second = await b.aacquire(k, 600)  # 100 + 600 <= 1000
    second.release(850)  # used more than it reserved: 100 + 850 = 950 counted
    await asyncio.sleep(0.05)
    with pytest.raises(GatewayHTTPError):
        await three.limiters[2].aacquire(k, 60)  # 950 + 60 > 1000
    last = await three.limiters[2].aacquire(k, 50)  # 950 + 50 = 1000
    last.release(None)  # usage unknown: the reservation stands


async def test_a_lost_token_sum_is_recounted_from_the_window(
        three: Group, redis_server: RedisServer) -> None:
    k = key(tokens_per_minute=1000)
    lease = await three.limiters[0].aacquire(k, 700)
    lease.release(400)
    await asyncio.sleep(0.05)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.delete(three.limiters[0].keys(k.id)[3])  # the running sum, evicted
    finally:
        await raw.aclose()
    with pytest.raises(GatewayHTTPError):
        await three.limiters[1].aacquire(k, 601)  # 700 - 300 = 400 counted: 1001 > 1000
    (await three.limiters[1].aacquire(k, 600)).release(None)


async def test_an_admission_sent_twice_counts_once(three: Group) -> None:
    """``RedisLink.run`` resends a batch after a connection error: the script must not
    count a request twice when its first reply was lost."""
    k = key(max_concurrent=2, requests_per_minute=2, tokens_per_minute=100)
    limiter = three.limiters[0]
    args = ["same-id", 2, 2, 100, 10, LEASE_MS]
    for _ in range(2):
        reply = (await limiter.link.run([(limiter._admit, limiter.keys(k.id), args)]))[0]
        assert reply == [0, 0]
    # One slot, one request, 10 tokens taken: room for exactly one more.
    other = await three.limiters[1].aacquire(k, 90)
    with pytest.raises(GatewayHTTPError):
        await three.limiters[2].aacquire(k, 1)
    other.release(None)


async def test_a_dead_process_frees_its_slots_within_5_s_a_live_one_keeps_them(
        redis_server: RedisServer) -> None:
    group = Group(redis_server.url, 2)
    try:
        k = key(max_concurrent=5)
        held = [await group.limiters[0].aacquire(k, 1) for _ in range(5)]
        # Alive: its slots are renewed past their lease (3 s): still full elsewhere.
        await asyncio.sleep(LEASE_MS / 1000 + 0.5)
        assert await group.attempt(1, k) == "concurrency_limit"
        # "Killed": it stops renewing, and never releases.
        dead = group.limiters[0]
        assert dead._keeper is not None
        dead._keeper.cancel()
        dead._slots.clear()
        died = time.monotonic()
        while True:
            result = await group.attempt(1, k)
            if isinstance(result, Lease):
                break
            assert time.monotonic() - died < 5.0, "a dead process's slots still held"
            await asyncio.sleep(0.05)
        freed_after = time.monotonic() - died
        print(f"slots of a dead process free again after {freed_after:.2f}s")
        result.release(0)
        del held
    finally:
        await group.aclose()


async def test_keys_without_limits_never_touch_redis(redis_server: RedisServer) -> None:
    link = RedisLink("redis://127.0.0.1:1/0", timeout_s=0.2)  # nothing listens there
    limiter = SharedLimiter(link)
    try:
        lease = await limiter.aacquire(key(max_tokens=10), 100)
        assert limiter.total_active() == 1 and link.up
        lease.release(5)
        assert limiter.total_active() == 0
    finally:
        await limiter.aclose()
        await link.aclose()


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_unreachable_follows_on_redis_error(mode: str) -> None:
    link = RedisLink("redis://127.0.0.1:1/0", timeout_s=0.2)
    limiter = SharedLimiter(link, on_redis_error=mode)  # type: ignore[arg-type]
    k = key(max_concurrent=1)
    try:
        await link.start()
        assert not link.up and link.reason and "127.0.0.1:1" in link.reason
        for _ in range(3):
            if mode == "closed":
                with pytest.raises(GatewayHTTPError) as caught:
                    await limiter.aacquire(k, 1)
                assert caught.value.status == 503
                assert caught.value.code == "limits_unavailable"
                assert int(caught.value.headers["retry-after"]) >= 1
            else:
                (await limiter.aacquire(k, 1)).release(1)  # over max_concurrent: no limits
        counted = limiter.refused if mode == "closed" else limiter.bypassed
        assert counted._value.get() == 3
        assert limiter.redis_up._value.get() == 0
    finally:
        await limiter.aclose()
        await link.aclose()


async def test_a_hostile_reply_is_a_redis_failure_not_an_admission(
        three: Group) -> None:
    limiter = three.limiters[0]
    limiter._admit = limiter.link.script("return {0}")  # one item, not two
    with pytest.raises(GatewayHTTPError) as caught:
        await limiter.aacquire(key(max_concurrent=3), 1)
    assert caught.value.status == 503
    assert not limiter.link.up and "invalid admission reply" in (limiter.link.reason or "")


async def test_running_streams_slots_come_back_when_redis_lost_them(
        three: Group, redis_server: RedisServer) -> None:
    """Redis restarted empty (or the slot lapsed while it was out of reach): the renewal
    adds the running stream's slot again, so it counts against the limit once more."""
    k = key(max_concurrent=1)
    running = await three.limiters[0].aacquire(k, 1)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.delete(three.limiters[0].keys(k.id)[0])
    finally:
        await raw.aclose()
    await asyncio.sleep(1.3)  # one renewal (every second)
    assert await three.attempt(1, k) == "concurrency_limit"
    running.release(0)


async def test_a_settlement_redis_missed_is_sent_when_it_is_back() -> None:
    """A tokens-only key (no slot to renew): its settlement, refused while Redis was
    down, is retried until it lands."""
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer.start(Path(tmp))
        link = RedisLink(server.url, timeout_s=0.3)
        limiter, other = SharedLimiter(link), SharedLimiter(RedisLink(server.url))
        k = key(tokens_per_minute=1000)
        try:
            lease = await limiter.aacquire(k, 900)
            server.pause()
            lease.release(10)  # 890 to give back; Redis does not answer
            await asyncio.sleep(0.5)
            assert limiter._pending
            server.resume()
            deadline = time.monotonic() + 5
            while True:  # once the 890 are given back: 10 + 900 <= 1000
                try:
                    (await other.aacquire(k, 900)).release(None)
                    break
                except GatewayHTTPError as exc:
                    assert exc.code == "token_limit"
                    assert time.monotonic() < deadline, "the settlement never went out"
                    await asyncio.sleep(0.05)
        finally:
            for lim in (limiter, other):
                await lim.aclose()
                await lim.link.aclose()
            server.stop()


async def test_an_admission_whose_caller_left_frees_its_slot_at_once(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path)
    limiter = SharedLimiter(RedisLink(server.url, timeout_s=3.0))
    other = SharedLimiter(RedisLink(server.url))
    k = key(max_concurrent=1)
    try:
        (await limiter.aacquire(k, 1)).release(0)  # connected, scripts loaded
        await asyncio.sleep(0.05)
        server.pause()
        waiting = asyncio.create_task(limiter.aacquire(k, 1))
        await asyncio.sleep(0.1)  # sent; Redis will admit it once it runs again
        waiting.cancel()
        server.resume()
        left = time.monotonic()
        while not isinstance(result := await _try(other, k), Lease):
            assert time.monotonic() - left < 1.5, "the slot waited for its lease to lapse"
            await asyncio.sleep(0.05)
        result.release(0)
    finally:
        for lim in (limiter, other):
            await lim.aclose()
            await lim.link.aclose()
        server.stop()


async def _try(limiter: SharedLimiter, k: KeyConfig) -> Lease | str:
    try:
        return await limiter.aacquire(k, 1)
    except GatewayHTTPError as exc:
        return exc.code or ""


async def test_open_mode_warns_at_most_once_a_minute(caplog: pytest.LogCaptureFixture,
                                                     ) -> None:
    now = [1000.0]
    link = RedisLink("redis://127.0.0.1:1/0", timeout_s=0.2)
    limiter = SharedLimiter(link, on_redis_error="open", clock=lambda: now[0])
    k = key(requests_per_minute=1)
    try:
        link.failed(OSError("refused"))
        with caplog.at_level("WARNING", logger="tokenrelay.server"):
            for _ in range(5):
                (await limiter.aacquire(k, 1)).release(1)
            now[0] += 59.0
            (await limiter.aacquire(k, 1)).release(1)
            now[0] += 1.5
            (await limiter.aacquire(k, 1)).release(1)
        lines = [r.getMessage() for r in caplog.records if "without the shared limits" in
                 r.getMessage()]
        assert len(lines) == 2, lines
        assert lines[0].startswith("1 request(s)") and lines[1].startswith("6 request(s)")
        assert limiter.bypassed._value.get() == 7
    finally:
        await limiter.aclose()
        await link.aclose()
