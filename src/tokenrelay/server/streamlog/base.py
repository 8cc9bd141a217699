"""The stream log's contract: one log of encoded SSE frames per stream, read from a cursor.

A *producer* (the task running the provider stream) appends the frames of each tick under
the stream's id; the log numbers them 0, 1, 2, … (one sequence per stream, whatever the
endpoint). *Delivery* reads from a cursor (``after=N``: frames N+1, …), replaying what is
stored and then following live, until the final frame. The frames are stored as given:
the producer knows the sequence number of every frame it appends
(:attr:`Producer.next_seq`), so the SSE ``id:`` (and a Responses ``sequence_number``) is
already inside the bytes and delivery writes them unchanged.

The producer holds a *lease* on its stream. When the lease ends without the final frame
(the producing process died, or its task dropped the producer without finishing), a
reader raises :class:`ProducerLost` once it has returned every frame written before;
delivery answers it with a typed ``producer_lost`` error frame through
:meth:`StreamLog.end_lost`, which appends it as the stream's end for every reader (or
tells the reader that another process took the stream over, and it reads on).

Backends: :mod:`.memory` (the default, one process) and :mod:`.redis_log` (Redis
Streams, shared by processes).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, NamedTuple, Self

from ...errors import TokenrelayError

__all__ = [
    "FINAL_STATUSES",
    "FinalStatus",
    "Frame",
    "FrameBatch",
    "LeaseLost",
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
    "new_stream_id",
    "valid_stream_id",
]

StreamStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
FinalStatus = Literal["completed", "failed", "cancelled", "incomplete"]
LiveStatus = Literal["queued", "in_progress"]
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "incomplete"})
LIVE_STATUSES: frozenset[str] = frozenset({"queued", "in_progress"})

#: Lease timing (Redis): refreshed every 0.5 s, expires 1.5 s after the last refresh, so a
#: reader learns of a dead producer within ~1.5-2 s of its death.
LEASE_REFRESH_S = 0.5
LEASE_TTL_S = 1.5

_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
#: Bounds on what a stream record carries (checked on write, and on read from Redis).
MAX_OWNER_LEN = 256
MAX_ENDPOINT_LEN = 64
MAX_META_BYTES = 16 * 1024


def new_stream_id(prefix: str = "") -> str:
    """A fresh stream id: ``prefix`` + 32 hex digits (128 random bits, never sequential)."""
    return prefix + secrets.token_hex(16)


def valid_stream_id(stream_id: object) -> bool:
    """True when ``stream_id`` could be an id this log made (checked before any lookup).

    Ids come from clients: a malformed one is simply not found, and never reaches a Redis
    key name unchecked.
    """
    return isinstance(stream_id, str) and _ID_RE.fullmatch(stream_id) is not None


# -- errors -------------------------------------------------------------------------------


class StreamLogError(TokenrelayError):
    """Base of the stream log's errors."""

    code = "stream_log_error"


class StreamNotFound(StreamLogError):
    """No such stream: unknown, expired or evicted, or owned by another key (never said)."""

    code = "stream_not_found"

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"no stream {stream_id[:140]!r} (unknown, expired or evicted)")
        self.stream_id = stream_id


class ProducerLost(StreamLogError):
    """The producer's lease ended without the final frame (its process died).

    Raised by a reader once it has returned every frame written before the death:
    ``last_seq`` is the stream's last frame (-1: none; beyond it only when the reader's
    cursor was). Answer it with :meth:`StreamLog.end_lost`, then read on.
    """

    code = "producer_lost"

    def __init__(self, stream_id: str, last_seq: int) -> None:
        super().__init__(f"the process producing stream {stream_id} stopped after frame"
                         f" {last_seq} without finishing it")
        self.stream_id = stream_id
        self.last_seq = last_seq


class LeaseLost(StreamLogError):
    """A producer lost its stream: the stream ended, expired, or another process holds it.

    Its frames were not appended; the producer must stop (another process may be
    finishing the stream).
    """

    code = "lease_lost"


class StreamLogFull(StreamLogError):
    """The memory store is full of live streams (``max_bytes``): no new stream now."""

    code = "stream_log_full"
    retryable = True


class StreamTooLarge(StreamLogError):
    """A stream (``max_stream_bytes``) or a frame (``max_frame_bytes``) is over its cap."""

    code = "stream_too_large"


class StreamLogUnavailable(StreamLogError):
    """The store cannot be reached or answered something invalid (Redis down, bad reply)."""

    code = "stream_log_unavailable"
    retryable = True


# -- data ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's record: who made it, where it stands."""

    id: str
    #: The key id that created it; only that key may read, resume or cancel it.
    owner: str
    #: What produced it (``chat.completions``, ``responses``, ``chat``).
    endpoint: str
    #: Unix time of creation.
    created_at: float
    status: StreamStatus
    #: Sequence number of the last frame stored; -1 before the first.
    last_seq: int
    #: Unix time of the final frame (None while live).
    finished_at: float | None = None
    cancel_requested: bool = False
    #: A producer holds the stream's lease (False: finished, or its producer is gone).
    producer_alive: bool = False
    #: Small string fields given at creation (model, request options, …).
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.status in FINAL_STATUSES


class Frame(NamedTuple):
    """One stored frame and its sequence number (what iterating a reader yields)."""

    seq: int
    data: bytes


class FrameBatch(NamedTuple):
    """Consecutive frames: ``frames[i]`` has sequence number ``first_seq + i``."""

    first_seq: int
    frames: Sequence[bytes]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.frames) - 1


# -- the producer's side ------------------------------------------------------------------


class Producer(ABC):
    """The lease on one stream and the only way to write to it.

    Made by :meth:`StreamLog.create` (lease taken with the record) or
    :meth:`StreamLog.acquire` (take-over). The store keeps the lease alive while the
    producer object lives; leaving ``async with`` (or :meth:`release`) without
    :meth:`finish` gives the lease up, and readers then see :class:`ProducerLost`.

    ``signal`` is set when the producer should stop: a cancel was requested (from any
    process, :attr:`cancel_requested`) or the lease is gone (:attr:`lease_lost`).

    :attr:`readers` and :attr:`readers_seen_at` tell whether anyone reads the stream, in
    any process (a resume grace period ends when nobody has for that long).
    """

    def __init__(self, info: StreamInfo, holder: str) -> None:
        self.info = info
        self.stream_id = info.id
        self.holder = holder
        #: Sequence number the next appended frame gets.
        self.next_seq = info.last_seq + 1
        self.signal = asyncio.Event()
        self.cancel_requested = info.cancel_requested
        self.lease_lost = False
        self.closed = False
        self._readers = 0
        self._readers_seen_at: float | None = None
        #: Called (no arguments, on the loop) when ``signal`` is set: a caller that must
        #: not keep a task waiting on ``signal`` for every stream (the gateway).
        self.on_signal: Callable[[], None] | None = None
        if self.cancel_requested:
            self.signal.set()

    @property
    def readers(self) -> int:
        """Readers attached to the stream in any process (Redis: as of the last lease
        refresh, ≤ 0.5 s old; a reader's process that died stops counting within 1.5 s)."""
        return self._readers

    @property
    def readers_seen_at(self) -> float | None:
        """``time.monotonic()`` when a reader was last seen attached (None: never)."""
        return self._readers_seen_at

    def _on_cancel(self) -> None:
        self.cancel_requested = True
        self._signal()

    def _on_lost(self) -> None:
        self.lease_lost = True
        self._signal()

    def _signal(self) -> None:
        if not self.signal.is_set():
            self.signal.set()
            if self.on_signal is not None:
                self.on_signal()

    @abstractmethod
    async def append(self, frames: Sequence[bytes], *, status: LiveStatus | None = None) -> int:
        """Store the frames of one tick (numbered from :attr:`next_seq`); the last seq.

        ``status`` moves a ``queued`` stream to ``in_progress`` (``frames`` may be empty
        then). Raises :class:`LeaseLost` (stop producing), :class:`StreamTooLarge`,
        :class:`StreamLogUnavailable`.
        """

    @abstractmethod
    async def finish(self, status: FinalStatus, frames: Sequence[bytes]) -> int:
        """Store the final frames (at least one: the last one marks the end) and release.

        Exempt from ``max_stream_bytes`` (so a stream over its cap can still end with its
        error frame). Returns the last seq.
        """

    @abstractmethod
    async def refresh(self) -> bool:
        """Extend the lease now (the store does it every 0.5 s); False when it is lost."""

    @abstractmethod
    async def release(self) -> None:
        """Give the lease up without finishing (idempotent; another process may take over)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.closed:
            try:
                await asyncio.shield(self.release())
            except StreamLogError:
                pass  # the store is unreachable: the lease expires on its own


# -- the delivery's side ------------------------------------------------------------------


class StreamReader(ABC):
    """A cursor on one stream: replays what is stored after it, then follows live.

    ``cursor`` is the seq of the last frame returned. After the final frame, ``ended`` is
    true and ``status`` holds the final status. :meth:`read` waits for frames;
    iterating yields :class:`Frame`\\ s until the end.
    """

    def __init__(self, info: StreamInfo, after: int) -> None:
        self.info = info
        self.stream_id = info.id
        self.cursor = after
        self.ended = False
        self.status: FinalStatus | None = None

    @abstractmethod
    async def read(self, timeout: float | None = None) -> FrameBatch:
        """The next frames after the cursor (at least one), waiting up to ``timeout``.

        Returns an empty batch on timeout, and at once when the stream has ended. Raises
        :class:`ProducerLost` (after every frame written before the death was returned;
        the reader stays usable, e.g. after :meth:`StreamLog.end_lost`),
        :class:`StreamNotFound` (expired or evicted meanwhile),
        :class:`StreamLogUnavailable`.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Detach: the stream's producer stops counting this reader (idempotent)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            await asyncio.shield(self.aclose())
        except StreamLogError:
            pass  # unreachable store: the presence lapses on its own

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Frame]:
        while not self.ended:
            batch = await self.read()
            seq = batch.first_seq
            for data in batch.frames:
                yield Frame(seq, data)
                seq += 1


# -- the store ----------------------------------------------------------------------------


class StreamLog(ABC):
    """Per-stream logs of encoded SSE frames, with leases, cancel and retention.

    Client-facing lookups take ``owner``: the key id of the caller. A stream owned by
    another key is reported exactly like an unknown one (None / :class:`StreamNotFound`).
    ``owner=None`` skips the check, for the gateway's own use (a producer, a take-over).
    """

    #: Finished streams are kept this long (seconds after their final frame).
    retention_s: float
    #: A frame larger than this is refused (:class:`StreamTooLarge`).
    max_frame_bytes: int
    #: A stream's frames beyond this are refused (:class:`StreamTooLarge`).
    max_stream_bytes: int
    #: Other processes read and write these streams too (Redis): a stream whose producer
    #: died can be taken over by one of them (``server/takeover.py``).
    shared: bool = False

    @abstractmethod
    async def create(self, *, owner: str, endpoint: str, meta: Mapping[str, str] | None = None,
                     id_prefix: str = "", status: LiveStatus = "queued") -> Producer:
        """A new stream (fresh unguessable id) and the lease on it.

        Raises :class:`StreamLogFull` (memory store full of live streams),
        :class:`StreamLogUnavailable`.
        """

    @abstractmethod
    async def info(self, stream_id: str, *, owner: str | None) -> StreamInfo | None:
        """The stream's record, or None (unknown, expired, evicted, another owner's)."""

    @abstractmethod
    async def reader(self, stream_id: str, *, after: int = -1,
                     owner: str | None) -> StreamReader:
        """A reader of the frames after seq ``after`` (-1: from the start), attached to
        the stream (counted in :attr:`Producer.readers`) until :meth:`StreamReader.aclose`.

        ``after`` beyond the last frame waits for it while the stream is live. Raises
        :class:`StreamNotFound`, and :class:`ValueError` when ``after`` < -1 or the stream
        has ended and ``after`` is beyond its last frame.
        """

    @abstractmethod
    async def cancel(self, stream_id: str, *, owner: str | None) -> StreamInfo | None:
        """Ask the stream's producer to stop, from any process (idempotent).

        Returns the record (a finished stream's is final and unchanged), None when not
        found. The producer sees it in ``signal`` and ends the stream as ``cancelled``.
        """

    @abstractmethod
    async def acquire(self, stream_id: str) -> Producer | None:
        """Take over a live stream whose producer is gone (None: it has a producer, or ended).

        The new producer continues the sequence (``next_seq = last_seq + 1``). Raises
        :class:`StreamNotFound`.
        """

    @abstractmethod
    async def end_lost(self, stream_id: str, *, last_seq: int, frames: Sequence[bytes],
                       status: FinalStatus = "failed") -> bool:
        """End a stream whose producer is lost with ``frames`` (e.g. a ``producer_lost`` error).

        Only if no producer holds the lease, the stream has not ended and its last frame
        is ``last_seq`` (what the reader saw): then every reader gets these frames as the
        end. False otherwise (another reader ended it, or another process took it over):
        read on.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Stop background work and close connections."""

    # -- hand-off at shutdown (stores shared by processes) ------------------------------

    async def hand_off(self, producer: Producer) -> bool:
        """Give ``producer``'s stream up unfinished, for another process to finish (this
        one is shutting down): the lease released after the last frame appended, and the
        stream listed for the other processes (:meth:`handed_off`).

        False when it cannot be (a store not shared, or frames only this process holds):
        finish the stream here. Raises :class:`StreamLogUnavailable` (the lease then lapses
        on its own; readers still take the stream over).
        """
        return False

    async def handed_off(self, limit: int = 64) -> list[str]:
        """Up to ``limit`` streams handed off by a process that shut down, oldest first
        (each stays listed until :meth:`forget_handed_off`)."""
        return []

    async def forget_handed_off(self, stream_id: str) -> None:
        """Take ``stream_id`` off the hand-off list (taken over, ended, or not possible)."""

    def _check_create(self, owner: str, endpoint: str, meta: Mapping[str, str] | None,
                      id_prefix: str) -> None:
        if not owner or len(owner) > MAX_OWNER_LEN:
            raise ValueError("owner must be a key id of 1-256 characters")
        if not endpoint or len(endpoint) > MAX_ENDPOINT_LEN:
            raise ValueError("endpoint must be 1-64 characters")
        if meta and sum(len(k) + len(v) for k, v in meta.items()) > MAX_META_BYTES:
            raise ValueError("meta over 16 KiB")
        if not re.fullmatch(r"[A-Za-z0-9_-]{0,32}", id_prefix):
            raise ValueError("id_prefix must be up to 32 of [A-Za-z0-9_-]")

    def _check_frames(self, frames: Sequence[bytes]) -> int:
        """Total size of ``frames``, each checked against ``max_frame_bytes``."""
        total = 0
        limit = self.max_frame_bytes
        for data in frames:
            n = len(data)
            if n > limit:
                raise StreamTooLarge(f"a frame of {n} bytes is over max_frame_bytes ({limit})")
            total += n
        return total


def check_after(after: int, info: StreamInfo) -> None:
    """``after`` is -1 or more, and within the frames of a stream that has ended."""
    if isinstance(after, bool) or not isinstance(after, int) or after < -1:
        raise ValueError("after must be an integer >= -1")
    if info.ended and after > info.last_seq:
        raise ValueError(f"stream {info.id} ended at frame {info.last_seq}: nothing follows"
                         f" frame {after}")
