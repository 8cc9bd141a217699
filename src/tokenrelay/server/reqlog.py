"""The gateway's request log: every request to SQLite (by default), written off the loop.

One writer thread takes rows from a queue and writes what arrives within 0.2 s in one
transaction (WAL, ``synchronous=NORMAL``: no fsync per commit). The event loop only
enqueues a dict. An ``asyncio.to_thread`` + insert + commit per request cost the gateway
~900 µs of CPU per request on the 2026-12-03 bench (9 µs per relayed chunk of a
100-token answer at concurrency 1); the queue and batches bring that to the figure in
bench/README.md.

Rows: key id, model, endpoint, status (ok / error / cancelled), HTTP status, usage, time
to first token, duration, the prompt and answer (``redact = true`` stores neither), error.
Keys and upstream secrets are never written.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["RequestLog"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    http_status INTEGER,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    usage_estimated INTEGER,
    time_to_first_token REAL,
    duration REAL,
    prompt TEXT,
    answer TEXT,
    error TEXT
);
"""

_COLUMNS = ("created_at", "key_id", "endpoint", "model", "status", "http_status",
            "prompt_tokens", "completion_tokens", "usage_estimated", "time_to_first_token",
            "duration", "prompt", "answer", "error")


class RequestLog:
    #: How long the writer gathers rows before one commit.
    BATCH_SECONDS = 0.2

    def __init__(self, path: str | Path, *, redact: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.redact = redact
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        self._db.executescript(_SCHEMA)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crash loses at most the last commits, never the database.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # One statement per batch: the rows go in as one JSON array. executemany steps
        # once per row and releases the GIL around every step; against a busy event loop
        # that ping-pong cost ~60 µs of CPU per row (1-token answers at c=16,
        # 2026-12-03), the single statement a few.
        self._insert = (
            f"INSERT INTO requests ({', '.join(_COLUMNS)}) SELECT "
            + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(_COLUMNS)))
            + " FROM json_each(?)")
        #: Rows, ``threading.Event`` markers (flush) and ``None`` (close).
        self._queue: queue.SimpleQueue[dict[str, Any] | threading.Event | None] = \
            queue.SimpleQueue()
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="tokenrelay-reqlog",
                                        daemon=True)
        self._writer.start()

    def record(self, **row: Any) -> None:
        """Queue one row (cheap: the writer thread serialises and writes it)."""
        row.setdefault("created_at", time.time())
        self._queue.put(row)

    def _values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        if self.redact:
            row["prompt"] = row["answer"] = None
        elif isinstance(row.get("prompt"), (list, dict)):
            row["prompt"] = json.dumps(row["prompt"])
        return tuple(row.get(c) for c in _COLUMNS)

    def _write(self, rows: list[dict[str, Any]]) -> bool:
        try:
            values = json.dumps([self._values(dict(row)) for row in rows])
            with self._lock:
                try:
                    self._db.execute(self._insert, (values,))
                    self._db.commit()
                except BaseException:
                    self._db.rollback()
                    raise
        except Exception as exc:  # noqa: BLE001  (a full disk or a bad row must not stop the writer)
            logging.getLogger("tokenrelay.server").warning(
                "request log: %d row(s) not written: %s", len(rows), exc)
            return False
        return True

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            # What arrives within BATCH_SECONDS of a row goes in the same transaction
            # (a flush or close writes at once): a commit per request cost more than the
            # row itself.
            until = time.monotonic() + self.BATCH_SECONDS
            while isinstance(items[-1], dict):
                wait = until - time.monotonic()
                try:
                    items.append(self._queue.get(timeout=wait) if wait > 0
                                 else self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [item for item in items if isinstance(item, dict)]
            if rows and not self._write(rows) and len(rows) > 1:
                for row in rows:  # one bad row must not cost the others theirs
                    self._write([row])
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()
            if any(item is None for item in items):
                return

    def flush(self, timeout: float | None = 10) -> bool:
        """Block until the rows queued so far are written; False on timeout."""
        if self._closed:
            return True
        marker = threading.Event()
        self._queue.put(marker)
        return marker.wait(timeout)

    def rows(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(
                f"SELECT id, {', '.join(_COLUMNS)} FROM requests ORDER BY id DESC LIMIT ?",
                (limit,))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def close(self) -> None:
        """Write what is queued, stop the writer, close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join(timeout=10)
        with self._lock:
            self._db.close()
