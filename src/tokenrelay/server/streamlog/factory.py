"""Build the configured stream store (``[streams]`` in the gateway's config)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import ConfigurationError
from .base import StreamLog
from .memory import MemoryStreamLog

if TYPE_CHECKING:
    from ..config import StreamsConfig

__all__ = ["create_store"]


def create_store(config: StreamsConfig, *, client: Any = None,
                 hold_new_streams: bool = False) -> StreamLog:
    """The stream log ``config`` asks for: in memory (default) or on Redis (``client``:
    a ``redis.asyncio.Redis`` on that same URL to share, the gateway's one client).

    Redis: while it is unreachable, running streams hold their frames in memory (at most
    ``max_bytes`` in all); with ``hold_new_streams`` (``on_redis_error = "open"``) new
    streams are made that way too, instead of being refused.

    Building the Redis store does not connect yet: the first operation does, and fails
    with :class:`~.base.StreamLogUnavailable` if Redis cannot be reached.
    """
    if config.store == "memory":
        return MemoryStreamLog(retention_s=config.retention_s, max_bytes=config.max_bytes,
                               max_stream_bytes=config.max_stream_bytes)
    if not config.redis_url:
        raise ConfigurationError('[streams] store = "redis" needs redis_url')
    try:
        from .redis_log import RedisStreamLog
    except ImportError as exc:
        raise ConfigurationError(
            '[streams] store = "redis" needs the Redis client: pip install "tokenrelay[redis]"'
        ) from exc
    return RedisStreamLog.from_url(config.redis_url, prefix=config.redis_prefix,
                                   retention_s=config.retention_s,
                                   max_stream_bytes=config.max_stream_bytes, client=client,
                                   max_held_bytes=config.max_bytes,
                                   hold_new_streams=hold_new_streams)
