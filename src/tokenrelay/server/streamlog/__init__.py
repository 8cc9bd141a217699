"""The stream log: encoded SSE frames per stream, between producing and delivering.

``create_store(config)`` builds the configured backend (``[streams]`` in the gateway's
config): :class:`MemoryStreamLog` (default) or :class:`RedisStreamLog` (needs the
``redis`` extra). The contract is in :mod:`.base`.
"""

from __future__ import annotations

from .base import (
    FINAL_STATUSES,
    FinalStatus,
    Frame,
    FrameBatch,
    LeaseLost,
    Producer,
    ProducerLost,
    StreamInfo,
    StreamLog,
    StreamLogError,
    StreamLogFull,
    StreamLogUnavailable,
    StreamNotFound,
    StreamReader,
    StreamStatus,
    StreamTooLarge,
    new_stream_id,
    valid_stream_id,
)
from .factory import create_store
from .memory import MemoryStreamLog

__all__ = [
    "FINAL_STATUSES",
    "FinalStatus",
    "Frame",
    "FrameBatch",
    "LeaseLost",
    "MemoryStreamLog",
    "Producer",
    "ProducerLost",
    "StreamInfo",
    "StreamLog",
    "StreamLogError",
    "StreamLogFull",
    "StreamLogUnavailable",
    "StreamNotFound",
    "StreamReader",
    "StreamStatus",
    "StreamTooLarge",
    "create_store",
    "new_stream_id",
    "valid_stream_id",
]
