"""Shared limits through the gateway: two gateways on one Redis, Redis lost and back in
both ``on_redis_error`` modes (and down at start), ``/healthz``, the CLI's refusals."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from _harness import LiveGateway, free_port, poll, sse_payloads, tokenrelay_argv
from _harness import gateway_config as config
from _redis import RedisServer, redis_prefix

pytest.importorskip("redis")

from tokenrelay.errors import ConfigurationError
from tokenrelay.events import ErrorEvent
from tokenrelay.server.config import hash_key, load_config
from tokenrelay.server.encode import STREAM_LOG_MESSAGE, ChunkEncoder, dumps, error_from_exc
from tokenrelay.server.responses import ResponsesEncoder
from tokenrelay.server.responses_schema import ResponsesRequest

SECRET = "alice-0123456789abcdef"
AUTH = {"authorization": f"Bearer {SECRET}"}
#: 20 tokens at 20/s: a stream that runs about a second.
SLOW = "mock:tokens=20,tps=20"


def gateway_config(tmp_path: Path, url: str, *, prefix: str | None = None, **redis: Any,
                   ) -> Any:
    return config(tmp_path, [], keys=[{"id": "alice", "sha256": hash_key(SECRET),
                                       "max_concurrent": 2, "requests_per_minute": 1000}],
                  redis={"url": url, "prefix": prefix or redis_prefix(), "timeout_s": 0.5,
                         **redis})


def chat(client: httpx.Client, model: str = "mock") -> httpx.Response:
    return client.post("/v1/chat/completions", headers=AUTH,
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def health(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/healthz")
    assert response.status_code == 200  # degraded or not: the process is alive and serving
    return dict(response.json())


class Running:
    """A stream in progress (its first frame read), read to its end by :meth:`finish`."""

    def __init__(self, client: httpx.Client, model: str = SLOW) -> None:
        self._cm = client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True})
        self.response = self._cm.__enter__()
        assert self.response.status_code == 200
        self._chunks = self.response.iter_raw()
        self.body = next(self._chunks)

    def finish(self) -> list[str]:
        for chunk in self._chunks:
            self.body += chunk
        self._cm.__exit__(None, None, None)
        return sse_payloads(self.body)

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def test_two_gateways_share_one_concurrency_limit(tmp_path: Path,
                                                  redis_server: RedisServer) -> None:
    prefix = redis_prefix()
    with LiveGateway(gateway_config(tmp_path / "a", redis_server.url, prefix=prefix)) as a, \
            LiveGateway(gateway_config(tmp_path / "b", redis_server.url, prefix=prefix)) as b, \
            httpx.Client(base_url=a.url, timeout=10) as ca, \
            httpx.Client(base_url=b.url, timeout=10) as cb:
        first, second = Running(ca), Running(cb)
        try:
            for client in (ca, cb):
                refused = chat(client)
                assert refused.status_code == 429
                assert refused.json()["error"]["code"] == "concurrency_limit"
            payloads = first.finish()
            assert payloads[-1] == "[DONE]"
            # Its slot is free again for the other gateway.
            assert poll(lambda: chat(cb).status_code == 200, 3)
        finally:
            first.close()
            second.close()


def _bypassed(client: httpx.Client) -> float:
    for line in client.get("/metrics", headers=AUTH).text.splitlines():
        if line.startswith("tokenrelay_limits_bypassed_total "):
            return float(line.split()[1])
    raise AssertionError("no tokenrelay_limits_bypassed_total in /metrics")


@pytest.mark.timeout(90)
def test_closed_redis_down_at_start_then_lost_mid_run(tmp_path: Path) -> None:
    """on_redis_error = "closed" (the default): while Redis cannot be reached, new requests
    of a key with limits get 503 + Retry-After and /healthz says degraded and why; running
    streams finish; once Redis is back (probed with backoff) all is as before."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server: RedisServer | None = None
    try:
        with LiveGateway(gateway_config(tmp_path, url)) as gw, \
                httpx.Client(base_url=gw.url, timeout=10) as c:
            # Down at start: the gateway started all the same.
            state = health(c)
            assert state["status"] == "degraded" and f"127.0.0.1:{port}" in state["reason"]
            assert state["on_redis_error"] == "closed"
            refused = chat(c)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "limits_unavailable"
            assert int(refused.headers["retry-after"]) >= 1
            server = RedisServer.start(tmp_path / "redis", port=port)
            assert poll(lambda: health(c)["status"] == "ok", 5), health(c)
            assert chat(c).status_code == 200
            # Lost mid-run.
            running = Running(c)
            server.kill()
            refused = chat(c)
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            state = health(c)
            assert state["status"] == "degraded" and state["reason"]
            payloads = running.finish()  # the running stream went on to its end
            assert payloads[-1] == "[DONE]"
            assert len([p for p in payloads if '"content"' in p]) == 20
            server.restart()
            assert poll(lambda: health(c)["status"] == "ok", 5), health(c)
            assert chat(c).status_code == 200
            # Redis came back empty: the stream's record was made again from its first
            # frame held in memory; its end resumes, its start (lost with Redis) is a 404.
            path = f"/v1/chat/completions/{running.response.headers['x-tokenrelay-stream-id']}"
            whole = sse_frames(running.body)
            last = whole.count(b"\n\nid: ")  # (the first frame is id 0)
            assert poll(lambda: sse_frames(c.get(f"{path}/stream?starting_after={last - 2}",
                                                 headers=AUTH).content)
                        == whole[whole.index(b"\n\nid: %d\n" % (last - 1)) + 2:], 5)
            assert c.get(f"{path}/stream", headers=AUTH).status_code == 404
    finally:
        if server is not None:
            server.stop()


@pytest.mark.timeout(60)
def test_open_redis_lost_mid_run_admits_and_counts(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path / "redis")
    try:
        cfg = gateway_config(tmp_path, server.url, on_redis_error="open")
        with LiveGateway(cfg) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
            assert health(c)["status"] == "ok"
            assert chat(c).status_code == 200
            assert _bypassed(c) == 0
            running = Running(c)
            server.kill()
            # Admitted without the shared limits, even past max_concurrent = 2.
            extra = [Running(c) for _ in range(2)]
            assert chat(c).status_code == 200
            assert _bypassed(c) == 3
            state = health(c)
            assert state["status"] == "degraded" and state["on_redis_error"] == "open"
            for stream in (running, *extra):
                assert stream.finish()[-1] == "[DONE]"
            server.restart()
            assert poll(lambda: health(c)["status"] == "ok", 5), health(c)
            assert chat(c).status_code == 200
            assert _bypassed(c) == 3  # shared limits again
    finally:
        server.stop()


# -- running streams while the stream log's Redis is away ------------------------------------


def sse_frames(body: bytes) -> bytes:
    """``body`` without its comment frames (``: stream open``, heartbeats), byte for byte."""
    return b"".join(part + b"\n\n" for part in body.split(b"\n\n")
                    if part and not part.startswith(b":"))


@pytest.mark.timeout(60)
def test_a_stream_held_while_redis_is_stopped_replays_whole_once_it_is_back(
        tmp_path: Path) -> None:
    """Redis stopped (SIGSTOP) mid-stream: the client gets the whole answer; once Redis
    answers again the frames held meanwhile are in the log, and a resume returns the whole
    stream byte for byte."""
    server = RedisServer.start(tmp_path / "redis")
    try:
        with LiveGateway(gateway_config(tmp_path, server.url)) as gw, \
                httpx.Client(base_url=gw.url, timeout=20) as c:
            running = Running(c)
            stream_id = running.response.headers["x-tokenrelay-stream-id"]
            server.pause()
            try:
                payloads = running.finish()
            finally:
                server.resume()
            assert payloads[-1] == "[DONE]"
            assert len([p for p in payloads if '"content"' in p]) == 20
            path = f"/v1/chat/completions/{stream_id}/stream"
            whole = sse_frames(running.body)
            assert poll(lambda: sse_frames(c.get(path, headers=AUTH).content) == whole, 10)
            assert sse_frames(c.get(f"{path}?starting_after=5", headers=AUTH).content) == \
                whole[whole.index(b"\n\nid: 6\n") + 2:]
    finally:
        server.stop()


def test_clients_never_see_the_stream_logs_address_or_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stream that cannot be held any more (over [streams] max_bytes held while Redis is
    away) ends with a typed error in general terms; the operator's log has the details."""
    server = RedisServer.start(tmp_path / "redis")
    try:
        cfg = config(tmp_path, [], keys=[{"id": "alice", "sha256": hash_key(SECRET)}],
                     redis={"url": server.url, "prefix": redis_prefix(), "timeout_s": 0.5},
                     streams={"max_bytes": 1 << 20})
        with LiveGateway(cfg) as gw, httpx.Client(base_url=gw.url, timeout=20) as c:
            running = Running(c, "mock:tokens=9000,tps=3000")
            server.kill()
            payloads = running.finish()
        error = json.loads(payloads[-1])["error"]
        assert error["code"] == "stream_log_unavailable"
        assert error["message"] == STREAM_LOG_MESSAGE
        body = running.body.decode()
        for detail in (f"127.0.0.1:{server.port}", "ConnectionError", "redis at"):
            assert detail not in body
        assert f"redis at 127.0.0.1:{server.port}" in caplog.text  # the operator's
    finally:
        server.stop()


@pytest.mark.parametrize("route", [None, "gpt"])
def test_a_stream_log_error_frame_is_general_on_every_face(route: str | None) -> None:
    internal = ("the stream log (redis at 10.1.2.3:6379) failed: ConnectionError: Error 111"
                " connecting to 10.1.2.3:6379. Connection refused.")
    event = ErrorEvent("stream_log_unavailable", internal)
    request = ResponsesRequest.model_validate({"model": "m", "input": "hi"})
    for frame in (ChunkEncoder("m", include_usage=False, route=route).encode(event),
                  b"".join(ResponsesEncoder(request, model="m", route=route).frames(event)),
                  dumps(error_from_exc(event, route))):
        assert b"10.1.2.3" not in frame and b"ConnectionError" not in frame, frame
        assert b"stream log is unavailable" in frame


# -- configuration and the command line -----------------------------------------------------


def _serve(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tokenrelay_argv("serve", "--port", "0", "--no-log", *args),
                          capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1:6379", "must start with redis://, rediss:// or unix://"),
    ("redis://", "has no host"),
    ("redis://127.0.0.1:63a9/0", "port is not a number"),
    ("redis://127.0.0.1:6379/zero", "database must be a number"),
    ("unix://", "socket's path"),
])
def test_a_bad_redis_url_is_a_clear_startup_error(url: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_config(redis_url=url)
    assert "redis.url" in str(caught.value) and words in str(caught.value)


def test_serve_with_a_bad_redis_url_exits_with_one_line(tmp_path: Path) -> None:
    done = _serve("--redis", "http://:hunter2@127.0.0.1:6379", tmp_path=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [(
        "error: invalid config redis.url: Value error, a Redis URL must start with redis://,"
        " rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)")]
    assert "hunter2" not in done.stderr + done.stdout


def test_redis_puts_the_stream_log_there_too_unless_streams_says_otherwise(
        tmp_path: Path) -> None:
    url = "redis://:hunter2@127.0.0.1:6379/0"
    cfg = load_config(redis_url=url)
    assert (cfg.redis.url, cfg.streams.store, cfg.streams.redis_url) == (url, "redis", url)
    assert "hunter2" not in repr(cfg)
    path = tmp_path / "gw.toml"
    path.write_text('[redis]\non_redis_error = "open"\n[streams]\nstore = "memory"\n')
    cfg = load_config(path, redis_url=url)  # --redis keeps the file's other settings
    assert (cfg.redis.url, cfg.redis.on_redis_error, cfg.streams.store) == (
        url, "open", "memory")
    path.write_text('[redis]\nurl = "redis://10.0.0.1:6379/0"\n[streams]\n'
                    'redis_url = "redis://10.0.0.2:6379/1"\n')
    cfg = load_config(path)
    assert (cfg.streams.store, cfg.streams.redis_url) == ("redis", "redis://10.0.0.2:6379/1")


LIMITED = {"id": "alice", "sha256": hash_key(SECRET), "requests_per_minute": 60}


@pytest.mark.parametrize("limit", ["max_concurrent", "requests_per_minute",
                                   "tokens_per_minute"])
def test_several_workers_with_per_key_limits_need_redis(limit: str) -> None:
    cfg = load_config(keys=[{"id": "alice", "sha256": hash_key(SECRET), limit: 5}], workers=3)
    with pytest.raises(ConfigurationError) as caught:
        cfg.check_shared_limits()
    message = str(caught.value)
    assert "3 workers" in message and "alice" in message and limit in message
    assert "3 times" in message and "--redis redis://" in message  # why, and how to fix it
    cfg.check_shared_limits(workers=1)  # one process: its own memory is exact
    load_config(keys=[{"id": "alice", "sha256": hash_key(SECRET), limit: 5}], workers=3,
                redis_url="redis://127.0.0.1:6379/0").check_shared_limits()


def test_several_workers_without_per_key_limits_start_without_redis() -> None:
    load_config(keys=[{"id": "a", "sha256": hash_key(SECRET), "max_tokens": 100}],
                workers=4).check_shared_limits()
    load_config(workers=4).check_shared_limits()


def test_serve_refuses_several_workers_with_limits_and_no_redis(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(f'workers = 2\n[[keys]]\nid = "alice"\nsha256 = "{hash_key(SECRET)}"\n'
                    "requests_per_minute = 60\n")
    started = time.monotonic()
    done = _serve("--config", str(path), tmp_path=tmp_path)
    assert done.returncode != 0 and time.monotonic() - started < 30
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to start 2 workers"), \
        done.stderr
    assert "--redis" in lines[0]


@pytest.mark.timeout(60)
def test_a_sigkilled_replicas_slots_are_free_again_within_5_s(
        processes: Any, redis_server: RedisServer, tmp_path: Path) -> None:
    cfg = {"serve_local": False, "log": {"enabled": False}, "access_log": False,
           "keys": [{"id": "alice", "sha256": hash_key(SECRET), "max_concurrent": 2}],
           "redis": {"url": redis_server.url, "prefix": redis_prefix()}}
    a = processes.serve(cfg, name="a")
    b = processes.serve(a.config_path, name="b")
    with httpx.Client(base_url=a.url, timeout=10) as ca, \
            httpx.Client(base_url=b.url, timeout=10) as cb:
        streams = [Running(ca, "mock:tokens=400,tps=20") for _ in range(2)]
        assert chat(cb).status_code == 429
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        for stream in streams:
            stream.close()
        while (status := chat(cb).status_code) != 200:
            assert status == 429
            assert time.monotonic() - killed < 5.0, "a dead replica's slots are still held"
            time.sleep(0.05)
        print(f"slots of a SIGKILLed replica free after {time.monotonic() - killed:.2f}s")


async def test_the_stream_log_and_the_limits_share_one_redis_client(
        redis_server: RedisServer) -> None:
    from tokenrelay.server.gateway import Gateway

    key = {"id": "alice", "sha256": hash_key(SECRET), "max_concurrent": 1}
    cfg = load_config(redis_url=redis_server.url, keys=[key], serve_local=False,
                      log={"enabled": False}, redis={"prefix": redis_prefix()})
    gateway = Gateway(cfg)
    try:
        assert gateway.redis is not None
        assert gateway.streams._redis is gateway.redis.client  # type: ignore[attr-defined]
        producer = await gateway.streams.create(owner="alice", endpoint="chat")
        await producer.finish("completed", [b"data: x\n\n"])
        lease = await gateway.acquire(cfg.keys[0], 1)
        lease.release(1)
        await gateway.streams.aclose()  # not the shared pool: the limits still work
        await asyncio.sleep(0.05)
        (await gateway.acquire(cfg.keys[0], 1)).release(1)
    finally:
        await gateway.aclose()
    other = load_config(redis_url=redis_server.url, serve_local=False, log={"enabled": False},
                        streams={"redis_url": redis_server.url.replace("/0", "/1")})
    gateway = Gateway(other)
    try:
        assert gateway.redis is not None
        assert gateway.streams._redis is not gateway.redis.client  # type: ignore[attr-defined]
    finally:
        await gateway.aclose()


@pytest.mark.timeout(60)
def test_a_redis_slower_than_timeout_s_counts_as_failing(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path / "redis")
    try:
        with LiveGateway(gateway_config(tmp_path, server.url)) as gw, \
                httpx.Client(base_url=gw.url, timeout=10) as c:
            assert chat(c).status_code == 200
            server.pause()  # SIGSTOP: connections open, no answers
            started = time.monotonic()
            refused = chat(c)
            waited = time.monotonic() - started
            assert refused.status_code == 503 and 0.4 < waited < 3.0, (refused, waited)
            state = health(c)
            assert state["status"] == "degraded" and "no answer within 0.5s" in state["reason"]
            started = time.monotonic()
            assert chat(c).status_code == 503  # while down: no wait on Redis at all
            assert time.monotonic() - started < 0.4
            server.resume()
            assert poll(lambda: health(c)["status"] == "ok", 5), health(c)
            assert chat(c).status_code == 200
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_workers_share_their_limits_in_redis(processes: Any, redis_server: RedisServer) -> None:
    """``--workers 2 --redis URL`` starts (the refusal is for limits without Redis) and
    its workers count in Redis. Which worker answered each request is the kernel's choice
    and not checked here: sharing between processes is what the two-gateway and SIGKILL
    tests show."""
    cfg = {"serve_local": False, "log": {"enabled": False}, "access_log": False,
           "keys": [{"id": "alice", "sha256": hash_key(SECRET), "requests_per_minute": 4}],
           "redis": {"url": redis_server.url, "prefix": redis_prefix()}}
    serve = processes.serve(cfg, "--workers", "2")
    statuses = []
    for _ in range(12):  # a connection each: the kernel spreads them over the workers
        with httpx.Client(base_url=serve.url, timeout=10) as c:
            statuses.append(chat(c).status_code)
    assert statuses.count(200) == 4 and statuses.count(429) == 8, statuses
