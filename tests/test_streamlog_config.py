"""``[streams]`` in the gateway config, and the store it builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tokenrelay.errors import ConfigurationError
from tokenrelay.server.config import load_config
from tokenrelay.server.streamlog import MemoryStreamLog, create_store

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(path)


async def test_the_default_is_the_memory_store_with_documented_limits() -> None:
    streams = load_config().streams
    assert (streams.store, streams.retention_s, streams.max_bytes) == ("memory", 600.0, 256 << 20)
    store = create_store(streams)
    assert isinstance(store, MemoryStreamLog)
    assert (store.retention_s, store.max_bytes, store.max_stream_bytes) == (
        600.0, 256 << 20, 64 << 20)


async def test_a_streams_section_builds_the_redis_store(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    from tokenrelay.server.streamlog.redis_log import RedisStreamLog
    cfg = config(tmp_path, '[streams]\nstore = "redis"\nredis_url = "redis://127.0.0.1:1/0"\n'
                           'redis_prefix = "gw1:"\nretention_s = 30\nmax_stream_bytes = 1048576\n'
                           'max_resume_grace_s = 120\n')
    store = create_store(cfg.streams)
    assert isinstance(store, RedisStreamLog)
    assert (store.prefix, store.retention_s, store.max_stream_bytes) == ("gw1:", 30, 1 << 20)
    assert cfg.streams.max_resume_grace_s == 120
    await store.aclose()


@pytest.mark.parametrize("text, words", [
    ('store = "redis"\n', "redis_url"),
    ('store = "redis"\nredis_url = "http://127.0.0.1:6379"\n', "redis://"),
    ('store = "sqlite"\n', "streams.store"),
    ("retention_s = 0\n", "retention_s"),
    ("max_bytes = 10\n", "max_bytes"),
    ("max_resume_grace_s = -1\n", "max_resume_grace_s"),
    ('redis_prefix = "a b"\n', "redis_prefix"),
    ("keep = 1\n", "keep"),
])
def test_a_bad_streams_section_is_refused_by_name(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        config(tmp_path, "[streams]\n" + text)
    assert words in str(caught.value)


def test_the_redis_store_without_its_client_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(streams={"store": "redis", "redis_url": "redis://127.0.0.1:6379"})
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    monkeypatch.delitem(sys.modules, "tokenrelay.server.streamlog.redis_log", raising=False)
    with pytest.raises(ConfigurationError, match=r'pip install "tokenrelay\[redis\]"'):
        create_store(cfg.streams)


def test_the_redis_url_is_not_in_the_config_repr() -> None:
    cfg = load_config(streams={"store": "redis", "redis_url": "redis://:hunter2@10.0.0.9:6379"})
    assert "hunter2" not in repr(cfg)


def test_the_benchmark_smoke_run() -> None:
    """bench/bench_streamlog.py --smoke runs in seconds and prints its figures."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_streamlog.py"), "--smoke"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    for words in ("append only", "resume latency", "memory held by"):
        assert words in run.stdout
    print(run.stdout)
